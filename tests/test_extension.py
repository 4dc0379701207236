"""How the compiled module is found, built and replaced: OpenMP, JIT build, fallback to references."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from torch_secorder import _extension, ops, reference_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compiled_ops_are_loaded():
    info = _extension.info()
    assert info["loaded"], info["reason"]
    assert hasattr(torch.ops.torch_secorder, "softmax_hessian_sqrt")


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one intra-op thread configured")
def test_openmp_is_really_on():
    # at::parallel_for only spreads work when our own objects were compiled with -fopenmp.
    assert _extension.load()
    used = torch.ops.torch_secorder.parallel_threads_used(64)
    assert used == min(torch.get_num_threads(), 64), used


def test_fallback_warns_once_and_uses_references(monkeypatch):
    def broken():
        raise RuntimeError("simulated: no compiler")

    monkeypatch.setattr(_extension, "_state", {"loaded": None, "source": None, "reason": None})
    monkeypatch.setattr(_extension, "_import_prebuilt", broken)
    monkeypatch.setattr(_extension, "_jit_build", broken)
    monkeypatch.setenv(_extension.ENV_VAR, "auto")
    logits, target = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 3, 2, 0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.cross_entropy_hessian_sqrt(logits, target)
        ops.cross_entropy_hessian_diag(logits, target)
    messages = [str(w.message) for w in caught if "torch_secorder" in str(w.message)]
    assert len(messages) == 1 and "simulated: no compiler" in messages[0] and "pure-torch references" in messages[0]
    assert torch.equal(first, reference_ops.cross_entropy_hessian_sqrt(logits, target))
    assert _extension.info()["loaded"] is False


def test_off_mode_is_silent(monkeypatch):
    monkeypatch.setattr(_extension, "_state", {"loaded": None, "source": None, "reason": None})
    monkeypatch.setenv(_extension.ENV_VAR, "off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ops.compiled_ops_loaded()
    monkeypatch.setenv(_extension.ENV_VAR, "sometimes")
    monkeypatch.setattr(_extension, "_state", {"loaded": None, "source": None, "reason": None})
    with pytest.raises(ValueError, match="TORCH_SECORDER_EXTENSION must be one of"):
        _extension.load()


@pytest.mark.slow
def test_jit_build_from_the_source_tree(tmp_path):
    """TORCH_SECORDER_EXTENSION=jit compiles csrc/ with cpp_extension.load and gives the same numbers."""
    script = textwrap.dedent(
        """
        import torch
        from torch_secorder import _extension, ops, reference_ops
        info = _extension.info()
        assert info == {"loaded": True, "source": "jit", "reason": None}, info
        x = torch.randn(7, 5, dtype=torch.float64)
        t = torch.tensor([0, 1, 4, 2, 3, 3, 1])
        a = ops.cross_entropy_hessian_sqrt(x, t, label_smoothing=0.1)
        b = reference_ops.cross_entropy_hessian_sqrt(x, t, label_smoothing=0.1)
        assert (a - b).abs().max().item() < 1e-14
        assert torch.ops.torch_secorder.parallel_threads_used(16) == min(torch.get_num_threads(), 16)
        print("JIT OK")
        """
    )
    env = dict(os.environ, TORCH_SECORDER_EXTENSION="jit", TORCH_EXTENSIONS_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "JIT OK" in result.stdout
