"""The examples run as a user runs them (a subprocess, default settings) and do what they say."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # whole scripts, 10 to 20 s each (the GPU check runs the tests that are not slow)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _with_torchvision_loader():
    """The environment with tests/torchvision_loader first on PYTHONPATH: its sitecustomize lets torchvision's
    model definitions (imported by laplace-torch) load where its C ops cannot."""
    loader = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_loader")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [loader, env.get("PYTHONPATH")]))
    return env


def run_example(name, out, *arguments):
    completed = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), "--out", str(out), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env=_with_torchvision_loader(),
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Warning" not in completed.stderr, completed.stderr  # nothing fell back to the generic method
    return completed.stdout


def test_sophia_training_against_adam(tmp_path):
    output = run_example("sophia_training.py", tmp_path)
    results = json.loads((tmp_path / "sophia_training.json").read_text())["results"]
    for task, least_accuracy in (("cnn", 0.85), ("transformer", 0.9)):
        for name in ("adam", "sophia"):
            run = results[task][name]
            assert len(run["losses"]) == 300
            assert run["train_loss"] < 0.3 * run["losses"][0], (task, name, run["train_loss"])
            assert run["test_accuracy"] >= least_accuracy, (task, name, run["test_accuracy"])
        assert results[task]["sophia"]["curvature_seconds"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in output
    else:
        assert (tmp_path / "sophia_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sophia_training_with_the_hutchinson_estimator(tmp_path):
    run_example("sophia_training.py", tmp_path, "--curvature", "hutchinson", "--tasks", "transformer", "--steps", "100")
    run = json.loads((tmp_path / "sophia_training.json").read_text())["results"]["transformer"]["sophia"]
    assert run["train_loss"] < 0.5 * run["losses"][0]


def test_obd_pruning(tmp_path):
    run_example("obd_pruning.py", tmp_path)
    result = json.loads((tmp_path / "obd_pruning.json").read_text())
    assert result["dense"]["test_accuracy"] > 0.85
    assert result["hessian_vs_ggn"] < 1e-6  # a ReLU CNN: the Hessian diagonal is the GGN diagonal
    half = next(row for row in result["rows"] if row["sparsity"] == 0.5)
    # the saliency 0.5 H_ii w^2 keeps what matters: at half the weights gone, far less damage than magnitude
    assert half["obd_hessian"]["train_loss"] < half["magnitude"]["train_loss"] - 0.1
    assert half["obd_hessian"]["test_accuracy"] > result["dense"]["test_accuracy"] - 0.02


def test_laplace_diag(tmp_path):
    pytest.importorskip("laplace")
    run_example("laplace_diag.py", tmp_path)
    result = json.loads((tmp_path / "laplace_diag.json").read_text())
    assert result["laplace"]["nll"] < result["map"]["nll"]
    assert result["laplace"]["far_confidence"] < result["map"]["far_confidence"] - 0.03
    assert result["prior_precision"] > 0


def test_a_hugging_face_model_trained_with_sophia_in_train_mode(tmp_path):
    """One process (Adam beside it), then DDP with 2 gloo processes: both learn, nothing falls back."""
    pytest.importorskip("transformers")
    run_example("hf_sophia_training.py", tmp_path)
    results = json.loads((tmp_path / "hf_sophia_training.json").read_text())["results"]
    for name in ("adam", "sophia"):
        run = results[name]
        assert len(run["losses"]) == 300
        assert run["train_loss"] < 0.5 * run["losses"][0], (name, run["train_loss"])
        assert run["test_accuracy"] >= 0.8, (name, run["test_accuracy"])
    assert results["sophia"]["curvature_seconds"] > 0
    run_example("hf_sophia_training.py", tmp_path, "--ddp", "2", "--steps", "150")
    run = json.loads((tmp_path / "hf_sophia_training.json").read_text())["results"]["sophia"]
    assert run["processes"] == 2 and len(run["losses"]) == 150
    assert run["train_loss"] < 0.7 * run["losses"][0], run["train_loss"]
