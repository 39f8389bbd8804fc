"""The benchmark scripts run (tiny shapes, no timing asserted): they must not rot."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_layers_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layers = _load("layers")
    out = tmp_path / "table.md"
    assert (
        layers.main(
            ["--shapes", "4x16x8x8", "--min-time", "0.001", "--channels-last", "--out", str(out)]
        )
        == 0
    )
    table = out.read_text()
    for name in (
        "BatchNorm2d train fwd+bwd",
        "InstanceNorm2d(affine) fwd",
        "GroupNorm(32) fwd",
        "LayerNorm([C,H,W]) fwd",
        "ChannelLayerNorm fwd+bwd",
        "channels_last",
        "% of the copy's bandwidth",
    ):
        assert name in table
    assert "ratio" in capsys.readouterr().out


def test_run_all_benchmark_smoke(tmp_path: Path) -> None:
    run_all = _load("run_all")
    out = tmp_path / "table.md"
    assert run_all.main(["--quick", "--out", str(out)]) == 0
    table = out.read_text()
    for text in (
        "| BatchNorm2d train | 8x16x8x8 | float32 | NCHW |",
        "| InstanceNorm2d(affine) | 8x16x8x8 | bfloat16 | channels_last |",
        "| NoisyBatchNorm vs BN2d+noise |",
        "| VGG-4 CNN, BN | 2 |",
        "| MLP 3x128, BN | 1 |",
    ):
        assert text in table
    assert " / " in table  # peak memory normlab / torch


def test_run_all_chooses_layers_by_name_and_names_them_when_none_match(
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_all = _load("run_all")
    chosen = run_all.matching(run_all.VARIANTS, ["RENORM", "ghost"])
    assert [s.name for s in chosen] == [
        "BatchRenorm2d (r,d active) vs BN2d",
        "GhostBatchNorm(vbs=N/4) vs BN2d",
    ]
    assert run_all.matching(run_all.LAYERS, None) == run_all.LAYERS
    with pytest.raises(SystemExit):
        run_all.main(["--quick", "--layers", "no-such-layer"])
    err = capsys.readouterr().err
    assert "--layers: expected text found in a layer's name, got ['no-such-layer']" in err
    assert "GroupNorm(32)" in err


# fvcore (when installed, benchmark environment only) scripts functions at import.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_population_benchmarks_smoke(tmp_path: Path) -> None:
    speed = _load("population")
    out = tmp_path / "speed.md"
    assert speed.main(["--quick", "--out", str(out)]) == 0
    assert "normlab inference" in out.read_text()
    accuracy = _load("population_accuracy")
    out = tmp_path / "accuracy.md"
    assert accuracy.main(["--seeds", "1", "--steps", "3", "--out", str(out)]) == 0
    assert out.read_text().count("\n| ") == 9  # header + 8 rows


def test_sync_benchmark_smoke(tmp_path: Path) -> None:
    """Run as a script: its worker processes import the benchmark as the main module."""
    out = tmp_path / "sync.md"
    subprocess.run(
        [sys.executable, str(BENCH / "sync.py"), "--repeats", "1", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert "SyncBatchNorm (2 gloo processes)" in out.read_text()


def test_stochastic_benchmark_smoke(tmp_path: Path) -> None:
    stochastic = _load("stochastic")
    out = tmp_path / "stochastic.md"
    assert stochastic.main(["--quick", "--min-time", "0.001", "--out", str(out)]) == 0
    assert "DropConnectLinear per-sample" in out.read_text()


def test_analysis_benchmark_smoke(tmp_path: Path) -> None:
    analysis = _load("analysis")
    out = tmp_path / "analysis.md"
    assert analysis.main(["--quick", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| 9 (reported 9) |" in table
    assert "train (batch statistics" in table


def test_audit_benchmark_smoke(tmp_path: Path) -> None:
    bench = _load("audit")
    out = tmp_path / "audit.md"
    assert (
        bench.main(["--samples", "300", "--repeats", "1", "--steps", "5", "--out", str(out)]) == 0
    )
    table = out.read_text()
    assert "| stale-statistics |" in table
    assert "target < 30 s" in table


def test_stream_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "stream.md"
    subprocess.run(  # its own process: the peak-memory figure must be its own
        [sys.executable, str(BENCH / "stream.py"), "--gb", "0.02", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    table = out.read_text()
    assert "| InputStandardizer.fit: max rel. error" in table
    assert "peak RSS" in table


def test_overhead_benchmark_smoke(tmp_path: Path) -> None:
    overhead = _load("overhead")
    out = tmp_path / "table.md"
    assert (
        overhead.main(
            ["--shape", "4x8x4x4", "--calls", "2", "--flush-mb", "0.1", "--out", str(out)]
        )
        == 0
    )
    table = out.read_text()
    for text in (
        "| GhostBatchNorm(vbs=N/4) vs BN2d | channels_last |",
        "| BatchNorm2d eval | NCHW |",
    ):
        assert text in table


def test_launches_benchmark_counts_ops_on_the_accelerator_routes(tmp_path: Path) -> None:
    launches = _load("launches")
    out = tmp_path / "table.md"
    assert launches.main(["--shape", "4x8x2x2", "--verbose", "--out", str(out)]) == 0
    table = out.read_text()
    # eval batch norm is torch's one kernel on both sides; the training row lists torch's kernel
    assert "| BatchNorm2d eval | NCHW | fwd | 1 | 1 | 1.0 | native_batch_norm 1 |" in table
    assert "| L1BatchNorm vs BN2d | channels_last | fwd+bwd |" in table
    row = next(line for line in table.splitlines() if line.startswith("| BatchNorm2d train | NCHW"))
    assert "native_batch_norm_backward 1" in row
    from normlab.functional import _triton

    if _triton.available():  # its guard: one Triton kernel (interpreted here), not four ops
        assert "triton:guarded_copy 1" in row
        assert "where" not in row
        # and the torch ops that stand in for the kernels where triton is missing
        assert (
            launches.main(["--shape", "4x8x2x2", "--verbose", "--no-triton", "--out", str(out)])
            == 0
        )
        lines = out.read_text().splitlines()
        row = next(line for line in lines if line.startswith("| BatchNorm2d train |"))
        assert "triton" not in row
        assert "where 2" in row
    # the counter sees ops, not views
    counts = launches.count_ops(lambda: torch.arange(6.0).view(2, 3).t().mul(2).sum())
    assert counts == {"arange": 1, "mul": 1, "sum": 1}


def test_cl_groups_benchmark_forces_each_route(tmp_path: Path) -> None:
    cl_groups = _load("cl_groups")
    from normlab.functional import _fast
    from normlab.functional._core import accelerator_routes

    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    with accelerator_routes():
        for copy_free in (True, False):
            with cl_groups.route(copy_free):
                assert _fast.channels_last_groups_usable(x) == copy_free
    out = tmp_path / "table.md"
    assert cl_groups.main(["--shapes", "2x32x4x4", "--min-time", "0.003", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| InstanceNorm2d(affine) | 2x32x4x4 |" in table
    assert "| GroupNorm(32) | 2x32x4x4 |" in table


def test_cuda_check_script_parses_and_skips_what_is_not_asked(tmp_path: Path) -> None:
    """benchmarks/cuda_check.sh (the GPU checks of a short lease) is valid bash, and with no
    stage asked it runs none (no GPU needed)."""
    script = BENCH / "cuda_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(
        ["bash", str(script)],
        env={"PATH": "/usr/bin:/bin", "STAGES": "none", "OUT": str(tmp_path), "DEADLINE": "5"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert "== done after" in done.stdout
    assert "== tests" not in done.stdout


def test_machine_line_names_the_cpu_generation() -> None:
    """The tables' header names the CPU's family, vector width and caches where the OS says them
    (one model name covers hosts on which the loops compare differently with torch)."""
    harness = _load("_harness")
    line = harness.machine()
    assert f"torch {__import__('torch').__version__}" in line
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "cpu family" in cpuinfo.read_text():
        assert "family " in line
    if Path("/sys/devices/system/cpu/cpu0/cache/index0/size").exists():
        assert "L1d " in line or "L2 " in line


def test_pairs_benchmark_smoke(tmp_path: Path) -> None:
    import torch

    pairs = _load("pairs")
    out = tmp_path / "pairs.md"
    argv = ["l1", "BatchNorm2d eval", "--shapes", "4x8x4x4", "--inner", "1", "--threads", "1"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert pairs.main([*argv, "--pairs", "3", "--out", str(out)]) == 0
        assert torch.get_num_threads() == 2  # restored
        assert pairs.main([*argv, "--pairs", "1", "--format", "nchw"]) == 0
    finally:
        torch.set_num_threads(before)
    table = out.read_text()
    assert "| L1BatchNorm vs BN2d | 4x8x4x4 | channels_last | **" in table
    assert "| BatchNorm2d eval | 4x8x4x4 | channels_last | **" in table
    assert "| - | - |" in table  # eval: forward only


def test_pairs_alternate_which_side_runs_first() -> None:
    pairs = _load("pairs")
    order: list[str] = []
    pairs.paired(lambda: order.append("torch"), lambda: order.append("ours"), 4, 1)
    # a warm-up call of each, then pairs torch-first and ours-first in turn
    assert order == [
        "torch",
        "ours",
        "torch",
        "ours",
        "ours",
        "torch",
        "torch",
        "ours",
        "ours",
        "torch",
    ]


def test_pairs_benchmark_refuses_unknown_names_and_counts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pairs = _load("pairs")
    with pytest.raises(SystemExit, match=r"no layer matches \['nosuchnorm'\].*pass e.g. L1"):
        pairs.main(["nosuchnorm"])
    with pytest.raises(SystemExit):
        pairs.main(["l1", "--pairs", "0"])
    assert "--pairs, --inner and --threads must be at least 1; got 0, 3 and 1" in (
        capsys.readouterr().err
    )
    for bad in ("64-64", "4x8x4", "4x0x4x4"):
        with pytest.raises(SystemExit):
            pairs.main(["l1", "--shapes", bad])
        assert (
            f"--shapes: each shape must be N x C x H x W, positive ints joined by 'x' for --format channels_last; got '{bad}'"
            in (capsys.readouterr().err)
        )
