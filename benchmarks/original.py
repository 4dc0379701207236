"""Loads hessian_diagonal from the original torch-secorder 0.0.1 (PyPI) for comparison.

It shares our import name, so it cannot be pip-installed beside us: its wheel is
downloaded once into benchmarks/.cache and the one module we time is loaded by path.
"""

import glob
import importlib.util
import os
import subprocess
import sys
import zipfile

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "torch_secorder_0.0.1")
MODULE = os.path.join("torch_secorder", "core", "hessian_diagonal.py")


def load_original():
    """The original module, or None (with the reason printed) when it cannot be had."""
    path = os.path.join(CACHE, MODULE)
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                CACHE,
                "torch-secorder==0.0.1",
            ],
            capture_output=True,
            text=True,
        )
        wheels = glob.glob(os.path.join(CACHE, "torch_secorder-0.0.1-*.whl"))
        if not wheels:
            print(f"original torch-secorder 0.0.1 unavailable: {result.stderr.strip()[-300:]}")
            return None
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(MODULE.replace(os.sep, "/"), CACHE)
    spec = importlib.util.spec_from_file_location("torch_secorder_original_hessian_diagonal", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
