"""The main job's --plot picture: the diagonal per parameter tensor and each method's time (matplotlib)."""

import os


def require_matplotlib():
    """matplotlib's pyplot with a file-only backend, or an ImportError that says how to get it."""
    try:
        import matplotlib  # lazy: optional extra 'plot'
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or 'torch-secorder[plot]')") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend above

    return plt


def plot_path_problem(path):
    """Why the picture could not be saved at path (None if it can): a missing folder, a format matplotlib
    does not write. Raises ImportError without matplotlib."""
    plt = require_matplotlib()
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--plot {path}: the folder {folder} does not exist"
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if suffix not in formats:
        return f"--plot {path}: the suffix must name a picture format ({', '.join(sorted(formats))})"
    return None


def plot_report(path, names, diagonals, seconds, gradient_seconds, title):
    """Left: the distribution of |H_ii| per parameter tensor on a log scale (boxes: quartiles, whiskers: 5th and
    95th percentiles; how many entries are negative and zero under each name). Right: each method's time
    as a multiple of one gradient."""
    plt = require_matplotlib()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[2.2, 1]))
    magnitudes, labels = [], []
    for name, diagonal in zip(names, diagonals):
        values = diagonal.detach().double().reshape(-1).cpu()
        nonzero = values[values != 0].abs()
        magnitudes.append(nonzero.numpy() if nonzero.numel() else [float("nan")])
        negative, zero = (values < 0).sum().item(), (values == 0).sum().item()
        labels.append(f"{name}\n{tuple(diagonal.shape)}\n{negative:,} neg, {zero:,} zero")
    left.boxplot(magnitudes, whis=(5, 95), showfliers=False)
    left.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    left.set(yscale="log", ylabel="|Hessian diagonal entry|", title="exact Hessian diagonal per parameter tensor")

    methods = list(seconds)
    ratios = [seconds[m] / gradient_seconds for m in methods]
    bars = right.barh(methods, ratios, color="tab:blue")
    right.bar_label(bars, labels=[f"{r:,.1f}x" for r in ratios], padding=3, fontsize=8)
    right.set(xscale="log", xlabel="time / one gradient (forward + backward)", title="cost of each method")
    right.set_xlim(min(1.0, min(ratios) / 2), max(ratios) * 8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
