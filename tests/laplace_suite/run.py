"""Runs laplace-torch's own diagonal-Laplace tests twice: as they are, and with every diagonal Laplace built on a
GGN backend fitted by torch_secorder's SecorderGGN instead (secorder_substitute.py). Passes when no test that
passes as it is fails with the substitution (but for the known differences in EXPECTED); writes a report.

    git clone https://github.com/aleximmer/Laplace /tmp/Laplace      # its tests are not in the wheel
    python tests/laplace_suite/run.py /tmp/Laplace --out docs/laplace_suite.md

Needs laplace-torch and its imports installed (as .ci/run does) and pytest-mock. The installed laplace-torch is
tested, not the checkout's source: only the checkout's tests/ folder is copied and run.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
# tests whose substituted outcome differs for a reason that is not a fault: (pattern, why)
EXPECTED = [
    (
        r"test_dict_data\[.*BackPackGGN",
        "the test asserts that BackPACK refuses dict batches (ValueError); SecorderGGN, substituted for it, takes them",
    )
]
ROOT = os.path.dirname(os.path.dirname(HERE))


def outcomes(junit_path):
    results = {}
    for case in ElementTree.parse(junit_path).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        results[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    return results


def run_pytest(tests, selection, plugins, junit_path):
    # torchvision_loader: torchvision's model definitions where it is installed but its C ops do not load
    loader = os.path.join(os.path.dirname(HERE), "torchvision_loader")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, loader, os.environ.get("PYTHONPATH", "")]))
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        selection,
        f"--junitxml={junit_path}",
        "tests",
    ]
    for plugin in plugins:
        command[3:3] = ["-p", plugin]
    completed = subprocess.run(command, cwd=tests, env=environment, capture_output=True, text=True)
    summary = [line for line in completed.stdout.splitlines() if line.strip()][-1:]
    substituted = re.search(r"secorder_substitute: .*", completed.stdout)
    return outcomes(junit_path), (summary[0] if summary else ""), (substituted.group(0) if substituted else "")


def git_commit(path):
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", help="a clone of github.com/aleximmer/Laplace (its tests/ folder is used)")
    parser.add_argument(
        "-k",
        dest="selection",
        default="Diag or diag",
        help="pytest -k expression choosing the diagonal-Laplace tests (default 'Diag or diag')",
    )
    parser.add_argument("--out", help="write a markdown report here")
    args = parser.parse_args(argv)
    from importlib.metadata import version

    with tempfile.TemporaryDirectory() as work:
        shutil.copytree(os.path.join(args.checkout, "tests"), os.path.join(work, "tests"))
        base, base_summary, _ = run_pytest(work, args.selection, ["torchvision_stub"], os.path.join(work, "a.xml"))
        ours, ours_summary, substituted = run_pytest(
            work, args.selection, ["torchvision_stub", "secorder_substitute"], os.path.join(work, "b.xml")
        )
    differing = sorted(t for t in base if base[t] == "passed" and ours.get(t) != "passed")
    expected = {t: why for t in differing for pattern, why in EXPECTED if re.search(pattern, t)}
    regressions = [t for t in differing if t not in expected]
    changed = sorted(t for t in base if ours.get(t) != base[t] and t not in differing)
    lines = [
        "# laplace-torch's diagonal-Laplace tests with SecorderGGN substituted",
        "",
        f"laplace-torch {version('laplace-torch')} (installed); its tests "
        f"from commit {git_commit(args.checkout)} of github.com/aleximmer/Laplace, selected with -k "
        f"'{args.selection}'; torch_secorder commit {git_commit(ROOT)}. Command: "
        "`python tests/laplace_suite/run.py CHECKOUT`.",
        "",
        f"- as they are (laplace's own backends): {base_summary} ({dict(Counter(base.values()))})",
        f"- substituted: {ours_summary} ({dict(Counter(ours.values()))})",
        f"- {substituted or 'secorder_substitute reported nothing'}",
        f"- tests passing as they are but not substituted: {len(regressions)}",
    ]
    lines += [f"  - {t}: {ours.get(t)}" for t in regressions]
    lines.append(f"- passing as they are, failing substituted for a known reason: {len(expected)}")
    lines += [f"  - {t}: {why}" for t, why in expected.items()]
    lines.append(f"- other changed outcomes: {len(changed)}")
    lines += [f"  - {t}: {base[t]} -> {ours.get(t)}" for t in changed]
    failing = sorted(t for t in base if base[t] in ("failure", "error"))
    lines.append(f"- failing in both runs (not ours; the same with laplace's own backends): {len(failing)}")
    lines += [f"  - {t}" for t in failing if ours.get(t) == base[t]]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
