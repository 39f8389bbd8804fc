"""The command line: parses, calls, prints."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import normlab
from normlab.cli import main


def test_demo_prints_both_accuracies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "final test accuracy, norm=none:" in out
    assert "final test accuracy, norm=batch:" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_bad_option_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--epochs", "many"])
    assert info.value.code == 2


def test_python_dash_m_and_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "normlab", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"normlab {normlab.__version__}"


def test_study_list_names_every_study(capsys: pytest.CaptureFixture[str]) -> None:
    from normlab.experiments.studies import available_studies

    assert main(["study", "list"]) == 0
    out = capsys.readouterr().out
    for name in available_studies():
        assert name in out
    assert "bn-training (default)" in out


def test_study_run_then_report(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    args = [
        "--data",
        "digits",
        "--seeds",
        "1",
        "--steps",
        "3",
        "--workers",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(["study", "run", "population-stats", *args]) == 0
    out = capsys.readouterr().out
    assert "population-stats: 2 runs on 1 worker(s)" in out
    assert "[  2/2]" in out
    assert (tmp_path / "report.html").exists()
    (tmp_path / "report.html").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists()
    # finished runs are reused; options may also come before `run` (same output directory)
    assert main(["study", *args, "run", "population-stats"]) == 0
    out = capsys.readouterr().out
    assert f"into {tmp_path}/" in out
    assert "complete" in out


def test_an_unwritable_report_is_one_clear_line(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    import normlab.report

    def refuse(directory: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "report.md"))

    monkeypatch.setattr(normlab.report, "render_report", refuse)
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("normlab: error: [Errno 13] Permission denied")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["study", "run", "bn"], "the study name must be one of ['batch-size'"),
        (["study", "run", "dropout", "--data", "cifar10"], "argument 'data' must be one of"),
        (["report", "/nonexistent/dir"], "a study output directory (with studies.json)"),
        (["study", "run", "dropout", "--out", "/proc/normlab"], "must be a writable directory"),
    ],
)
def test_study_errors_are_one_clear_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("normlab: error: ")
    assert message in err


def test_ctrl_c_keeps_checkpoints_and_a_rerun_completes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import time

    study = [
        "study",
        "run",
        "bn-training",
        "--data",
        "digits",
        "--seeds",
        "1",
        "--steps",
        "2000",
        "--workers",
        "2",
        "--checkpoint-every",
        "0.5",
        "--out",
    ]
    args = [sys.executable, "-m", "normlab", *study, str(tmp_path)]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    # Ctrl-C once a run is part-way (its first checkpoint, 0.5 s into training, is the sign) --
    # not after a fixed time, which a busy machine may spend before the workers start training
    deadline = time.monotonic() + 300
    while not list((tmp_path / "checkpoints").glob("*.pt")):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no run checkpointed within 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted after" in err
    assert "run the same command again to continue" in err
    checkpoints = list((tmp_path / "checkpoints").glob("*.pt"))
    assert checkpoints, "Ctrl-C during 2000-step runs should leave their checkpoints"
    for path in checkpoints:  # loadable as the rerun loads them (the rerun's workers log apart)
        assert torch.load(path, weights_only=True)["step"] > 0
    assert main([*study, str(tmp_path)]) == 0
    assert len(list((tmp_path / "runs").glob("*.json"))) == 4


def test_audit_command_writes_json_html_and_a_fixed_copy(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    import json

    (tmp_path / "flawed.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32, "
        "momentum=0.99), nn.ReLU(), nn.Linear(32, 10))\n"
    )
    torch.save(
        {"x": torch.randn(300, 1, 8, 8) * 50, "y": torch.randint(0, 10, (300,))},
        tmp_path / "data.pt",
    )
    out = [str(tmp_path / n) for n in ("a.json", "a.html", "fixed.pt")]
    argv = ["audit", f"{tmp_path / 'flawed.py'}:build", "--data", str(tmp_path / "data.pt")]
    code = main([*argv, "--json", out[0], "--html", out[1], "--fix", out[2]])
    assert code == 1  # findings
    printed = capsys.readouterr().out
    assert "input-scale" in printed
    assert "bias-before-norm" in printed
    record = json.loads((tmp_path / "a.json").read_text())
    assert {f["check"] for f in record["findings"]} >= {"input-scale", "bias-before-norm", "modes"}
    page = (tmp_path / "a.html").read_text()
    assert page.startswith("<!doctype html>")
    assert "bias-before-norm" in page
    fixed = torch.load(out[2], weights_only=True)
    assert not fixed["1.bias"].any()  # the redundant bias is zeroed and folded
    from normlab.audit.loading import load_model

    reloaded = load_model(f"{tmp_path / 'flawed.py'}:build", out[2])  # the factory's model
    assert not reloaded[1].bias.any()
    clean = tmp_path / "clean.py"
    clean.write_text("import torch.nn as nn\ndef build():\n    return nn.Linear(64, 10)\n")
    x = torch.randn(300, 64)
    torch.save(x, tmp_path / "x.pt")
    assert main(["audit", f"{clean}:build", "--data", str(tmp_path / "x.pt")]) == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nomodule", "the model must be 'module:factory' or 'file.py:factory', got 'nomodule'"),
        ("no_such_module_xyz:build", "the module 'no_such_module_xyz' must be importable"),
        ("torch.nn:NotThere", "torch.nn:NotThere must be a callable that builds the model"),
        ("math:pi", "math:pi must be a callable"),
    ],
)
def test_audit_command_errors(spec: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normlab: error: ")
    assert message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "cifar99"], "the data file 'cifar99' must be an existing file"),
        (["--samples", "0"], "option --samples must be a positive number of inputs, got 0"),
        (["--checkpoint", "CORRUPT"], "must be a state dict saved with torch.save"),
    ],
)
def test_audit_command_input_errors(
    argv: list[str], message: str, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "m.py").write_text(
        "import torch.nn as nn\ndef build():\n    return nn.Linear(64, 10)\n"
    )
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    argv = [a.replace("CORRUPT", str(tmp_path / "corrupt.pt")) for a in argv]
    assert main(["audit", f"{tmp_path / 'm.py'}:build", *argv]) == 2
    assert message in capsys.readouterr().err


def test_audit_command_reports_a_failing_factory(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "f.py").write_text("def build():\n    raise RuntimeError('no GPU')\n")
    assert main(["audit", f"{tmp_path / 'f.py'}:build"]) == 2
    assert (
        "must be a factory that builds the model without arguments, got RuntimeError: no GPU"
        in (capsys.readouterr().err)
    )


def test_audit_command_checks_the_checkpoint(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "m.py").write_text(
        "import torch.nn as nn\ndef build():\n    return nn.Linear(64, 10)\n"
    )
    torch.save({"weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    argv = ["audit", f"{tmp_path / 'm.py'}:build", "--checkpoint", str(tmp_path / "bad.pt")]
    assert main(argv) == 2
    assert "the checkpoint" in capsys.readouterr().err
