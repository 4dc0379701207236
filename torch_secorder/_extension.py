"""Finds the compiled ops: the prebuilt torch_secorder._C, else a JIT build of csrc/.

TORCH_SECORDER_EXTENSION chooses:
  "auto" (default)  prebuilt module, else JIT build from a source checkout, else references
  "jit"             JIT build even when a prebuilt module exists
  "off"             never load compiled code: every op runs its pure-torch reference
If no compiled code can be had, one warning says why and the references are used.
"""

import importlib
import os
import shutil
import threading
import warnings

import torch

from . import _build_config

ENV_VAR = "TORCH_SECORDER_EXTENSION"
_MODES = ("auto", "jit", "off")

_lock = threading.Lock()
_state: dict = {"loaded": None, "source": None, "reason": None}


def _mode():
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR} must be one of {_MODES}, got {mode!r}")
    return mode


def _import_prebuilt():
    importlib.import_module("torch_secorder._C")
    return "prebuilt"


def _jit_build():
    """Compiles csrc/ with torch.utils.cpp_extension.load (needs ninja and a C++ compiler)."""
    from torch.utils import cpp_extension  # lazy: its import costs ~1 s and only the JIT build needs it

    _put_ninja_on_path()
    if not os.path.isdir(_build_config.CSRC):
        raise RuntimeError(f"no C++ sources at {_build_config.CSRC} (the JIT build needs a source checkout)")
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    cpp_extension.load(
        name="torch_secorder_jit_cuda" if with_cuda else "torch_secorder_jit",
        sources=_build_config.sources(with_cuda=with_cuda),
        extra_cflags=_build_config.CXX_FLAGS,
        extra_cuda_cflags=_build_config.NVCC_FLAGS,
        extra_ldflags=_build_config.LD_FLAGS,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("TORCH_SECORDER_VERBOSE_BUILD", "0") == "1",
    )
    return "jit"


def _put_ninja_on_path():
    """A notebook kernel in a venv often lacks venv/bin on PATH; the ninja wheel knows where its binary is."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # lazy: optional (the ninja wheel), only to find its binary
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load():
    """Loads the compiled ops once; returns True if torch.ops.torch_secorder is usable."""
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        mode = _mode()
        attempts = {"auto": [_import_prebuilt, _jit_build], "jit": [_jit_build], "off": []}[mode]
        errors = []
        for attempt in attempts:
            try:
                _state["source"] = attempt()
                _state["loaded"] = True
                _register_fake_kernels()
                return True
            except Exception as error:
                errors.append(f"{attempt.__name__.lstrip('_')}: {type(error).__name__}: {error}".splitlines()[0])
        _state["loaded"] = False
        _state["reason"] = f"{ENV_VAR}=off" if mode == "off" else "; ".join(errors)
        if mode != "off":
            warnings.warn(
                "torch_secorder: compiled ops unavailable, using the pure-torch references "
                f"(slower, same results). Reasons: {_state['reason']}",
                RuntimeWarning,
                stacklevel=3,
            )
        return False


def info():
    """Where the compiled ops came from: {'loaded': bool, 'source': 'prebuilt'|'jit'|None, 'reason': str|None}."""
    load()
    return dict(_state)


_FAKES_REGISTERED: list = []  # once per process


def _register_fake_kernels():
    """Shape-only kernels, so the ops work under torch.compile and FakeTensor."""
    if _FAKES_REGISTERED:
        return

    def same_shape(logits, scale):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    def sqrt_factor(logits, scale):
        rows, classes = logits.shape
        return logits.new_empty((rows, classes, classes))

    torch.library.register_fake("torch_secorder::softmax_hessian_diag")(same_shape)
    torch.library.register_fake("torch_secorder::sigmoid_hessian_diag")(same_shape)
    torch.library.register_fake("torch_secorder::softmax_hessian_sqrt")(sqrt_factor)

    def householder_columns(logits, scale):
        rows, classes = logits.shape
        return logits.new_empty((rows, max(classes - 1, 0), classes))

    torch.library.register_fake("torch_secorder::softmax_hessian_columns")(householder_columns)

    def sampled_columns(logits, scale, uniforms):
        return logits.new_empty((logits.shape[0], uniforms.shape[1], logits.shape[1]))

    torch.library.register_fake("torch_secorder::softmax_sampled_columns")(sampled_columns)

    def factor_diagonal(factors, signs=None):
        return factors.new_empty((factors.shape[0], factors.shape[2]))

    def affine_weight_diagonal(factors, signs, inputs):
        return factors.new_empty((factors.shape[2], inputs.shape[1]))

    torch.library.register_fake("torch_secorder::factor_diagonal")(factor_diagonal)
    torch.library.register_fake("torch_secorder::affine_weight_diagonal")(affine_weight_diagonal)

    def selected_weight_diagonal(factors, signs, indices, inputs, per_sample=False):
        leading = (factors.shape[0],) if per_sample else ()
        return factors.new_empty((*leading, factors.shape[2], inputs.shape[1]))

    torch.library.register_fake("torch_secorder::selected_weight_diagonal")(selected_weight_diagonal)

    def channel_weight_diagonal(factors, signs, values):
        return factors.new_empty((factors.shape[2],))

    torch.library.register_fake("torch_secorder::channel_weight_diagonal")(channel_weight_diagonal)
    _FAKES_REGISTERED.append(True)
