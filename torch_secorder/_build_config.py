"""Sources and compiler flags of the compiled module, shared by setup.py and the JIT loader.

Kept free of torch_secorder imports so that setup.py can load it by path.
"""

import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# torch's build helpers do not add -fopenmp: without it the OpenMP pragma inside
# at::parallel_for is dropped and every CPU kernel runs on one thread.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-DTORCH_SECORDER_PYTHON_MODULE"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-Xcompiler", "-fopenmp", "-DTORCH_SECORDER_PYTHON_MODULE", "--expt-relaxed-constexpr"]


def sources(csrc=CSRC, with_cuda=False):
    """The .cpp files (and the .cu files when building for CUDA) under csrc, as absolute paths, sorted."""
    files = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    files += sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return files
