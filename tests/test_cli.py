"""The main job: python -m torch_secorder."""

import os
import re
import subprocess
import sys

import torch
import torch.nn as nn

from torch_secorder.cli import classifier, main, synthetic_blobs
from torch_secorder import model_hessian_diagonal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_prints_the_exact_diagonal_summary(capsys):
    assert main(["--hidden", "6", "--batch-size", "32", "--train-steps", "5", "--dtype", "float64",
                 "--method", "all", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "MLP 20-6-6-4 (Tanh), 196 parameters" in out.out
    # recompute what the job computed and compare the printed traces
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x, y = synthetic_blobs(32, 20, 4, generator, torch.float64)
    model = classifier(20, 6, 2, 4).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        optimizer.step()
    diag = model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y)
    for (name, _), d in zip(model.named_parameters(), diag):
        row = re.search(rf"^{re.escape(name)}\s+\S.*\s(\S+)$", out.out, re.M)
        assert row, name
        assert abs(float(row.group(1)) - d.sum().item()) <= 1e-4 * abs(d.sum().item()) + 1e-12
    for method in ("backprop", "autograd"):
        difference = float(re.search(rf"{method} vs loop: max relative difference (\S+)", out.out).group(1))
        assert difference < 1e-10
    assert "method 'auto' would use backprop" in out.out
    assert "entries (100%)" in out.err  # progress


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "torch_secorder", "--hidden", "4", "--batch-size", "16",
                             "--train-steps", "1", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "exact Hessian diagonal (method auto)" in result.stdout and "timings (" in result.stdout
    assert "auto (uses backprop)" in result.stdout
