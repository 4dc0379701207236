"""The main job: python -m torch_secorder."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from torch_secorder import model_hessian_diagonal
from torch_secorder.cli import classifier, main, synthetic_blobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_prints_the_exact_diagonal_summary(capsys):
    assert (
        main(
            [
                "--hidden",
                "6",
                "--batch-size",
                "32",
                "--train-steps",
                "5",
                "--dtype",
                "float64",
                "--method",
                "all",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
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
    assert "100%" in out.err  # progress (a tqdm bar or the plain line)


def test_module_entry_point_runs():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch_secorder",
            "--hidden",
            "4",
            "--batch-size",
            "16",
            "--train-steps",
            "1",
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "exact Hessian diagonal (method auto)" in result.stdout and "timings (" in result.stdout
    assert "auto (uses backprop)" in result.stdout


def test_plot_saves_a_picture_of_the_diagonal_and_the_timings(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.png"
    assert (
        main(
            [
                "--hidden",
                "4",
                "--batch-size",
                "16",
                "--train-steps",
                "1",
                "--method",
                "all",
                "--quiet",
                "--plot",
                str(path),
            ]
        )
        == 0
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert f"picture: {path}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "path, message",
    [("missing_folder/x.png", "does not exist"), ("report.xyz", "the suffix must name a picture format")],
)
def test_a_plot_path_that_cannot_be_written_is_a_usage_error_before_any_work(tmp_path, capsys, path, message):
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit) as exit_info:
        main(["--plot", str(tmp_path / path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr()
    assert message in err.err and err.out == ""


def test_plot_without_matplotlib_is_a_usage_error_before_any_work(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["--plot", "x.png"])
    assert exit_info.value.code == 2
    err = capsys.readouterr()
    assert "--plot needs matplotlib" in err.err and "torch-secorder[plot]" in err.err and err.out == ""


def test_progress_plain_and_tqdm(monkeypatch, capsys):
    from torch_secorder import progress

    report = progress.plain_progress("job")
    for done in (0, 5, 10):
        report(done, 10)
    assert capsys.readouterr().err.endswith("job: 10/10 entries (100%)\n")
    monkeypatch.setitem(sys.modules, "tqdm", None)
    fallback = progress.progress_bar("job")
    fallback(3, 3)
    assert "job: 3/3 entries (100%)" in capsys.readouterr().err
    monkeypatch.undo()
    progress.progress_bar("job", enabled=False)(3, 3)
    assert capsys.readouterr().err == ""
    pytest.importorskip("tqdm")
    bar = progress.tqdm_progress("bar")
    for done in (1, 4, 8):
        bar(done, 8)
    err = capsys.readouterr().err
    assert "bar: 100%" in err and "8.00/8.00" in err, err
