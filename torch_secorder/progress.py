"""Progress callbacks for the library's progress=... argument, progress(done, total).

    model_hessian_diagonal(model, loss_fn, x, y, method="autograd", progress=progress_bar("hessian"))

A tqdm bar on stderr when tqdm is installed (pip install "torch-secorder[progress]"); otherwise one stderr
line rewritten at most every half second. Both finish their line when done reaches total.
"""

import sys
import time


def progress_bar(label, enabled=True):
    """A progress(done, total) callback showing `label`; a no-op when not enabled."""
    if not enabled:
        return lambda done, total: None
    try:
        import tqdm  # noqa: F401  (lazy: optional extra "progress"; only asks whether it is there)
    except ImportError:
        return plain_progress(label)
    return tqdm_progress(label)


def tqdm_progress(label):
    from tqdm.auto import tqdm  # lazy: optional extra "progress"

    bar = None

    def report(done, total):
        nonlocal bar
        if bar is None or bar.total != total:
            bar = tqdm(total=total, desc=label, unit=" entries", unit_scale=True, file=sys.stderr, mininterval=0.5)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bar = None

    return report


def plain_progress(label, interval=0.5):
    last = 0.0

    def report(done, total):
        nonlocal last
        now = time.monotonic()
        if now - last >= interval or done >= total:
            last = now
            print(
                f"\r  {label}: {done:,}/{total:,} entries ({100 * done / max(total, 1):.0f}%)",
                end="\n" if done >= total else "",
                file=sys.stderr,
                flush=True,
            )

    return report
