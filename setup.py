"""Builds torch_secorder._C from csrc/: a CppExtension, or a CUDAExtension when
CUDA is usable (or FORCE_CUDA=1). Install with `pip install --no-build-isolation .`
into an environment that already has torch."""

import importlib.util
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - a message for people who forget --no-build-isolation
    raise SystemExit(
        "torch_secorder builds against the torch already installed: install torch (>= 2.4) first, "
        "then run `pip install --no-build-isolation .`"
    ) from error

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "_build_config", os.path.join(HERE, "torch_secorder", "_build_config.py")
)
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)


def use_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def extension():
    with_cuda = use_cuda()
    sources = [os.path.relpath(path, HERE) for path in build_config.sources(with_cuda=with_cuda)]
    if with_cuda:
        return CUDAExtension(
            "torch_secorder._C",
            sources,
            extra_compile_args={"cxx": build_config.CXX_FLAGS, "nvcc": build_config.NVCC_FLAGS},
            extra_link_args=build_config.LD_FLAGS,
        )
    return CppExtension(
        "torch_secorder._C",
        sources,
        extra_compile_args={"cxx": build_config.CXX_FLAGS},
        extra_link_args=build_config.LD_FLAGS,
    )


setup(
    packages=find_packages(include=["torch_secorder", "torch_secorder.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
