"""Studies: tiny runs of every study end to end, shared runs, and the judges on records whose
answer is known."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from normlab.experiments import judges
from normlab.experiments.config import RunConfig
from normlab.experiments.records import load_records
from normlab.experiments.runner import Interrupted, execute, read_manifest, update_manifest
from normlab.experiments.studies import DEFAULT_SELECTION, Options, available_studies, get_study
from tests.conftest import TINY


@pytest.mark.parametrize("name", list(available_studies()))
def test_every_study_runs_tiny_and_is_judged(name: str, tiny_study_dir: Path) -> None:
    study = get_study(name)
    runs = study.runs(TINY)
    assert runs
    records = {r["config"].run_id: r for r in load_records(tiny_study_dir)}
    groups: dict[str, list] = {}  # type: ignore[type-arg]
    for label, cfg in runs:
        groups.setdefault(label, []).append(records[cfg.run_id])
    verdict = study.judge(groups)
    assert verdict.status in ("supported", "not supported", "inconclusive")
    assert "nan" not in verdict.summary.lower()  # missing numbers say "n/a" or "never"
    assert len(verdict.table) >= 2
    assert all(len(row) == len(verdict.table[0]) for row in verdict.table)


def test_studies_share_runs_and_scale() -> None:
    ids = {name: {cfg.run_id for _, cfg in get_study(name).runs()} for name in DEFAULT_SELECTION}
    assert ids["bn-training"] < ids["noisy-bn"]  # noisy-bn adds noisy BN to the same runs
    assert ids["bn-training"] & ids["noisy-bn"]  # plain and BN at both learning rates
    assert ids["landscape"] & ids["bn-training"]
    full, quick = (
        get_study("bn-training").runs(),
        get_study("bn-training").runs(Options(quick=True)),
    )
    assert len(full) == 4 * 3
    assert len(quick) == 4 * 2
    assert quick[0][1].steps < full[0][1].steps
    assert {cfg.data for _, cfg in get_study("landscape").runs(Options(data="digits"))} == {
        "digits"
    }


def test_bad_names_and_options() -> None:
    with pytest.raises(
        ValueError,
        match=r"get_study: the study name must be one of \['batch-size', .* got 'bn'\. Fix: run `normlab study list`",
    ):
        get_study("bn")
    with pytest.raises(
        ValueError, match=r"Options: argument 'data' must be one of .* got 'cifar10'"
    ):
        Options(data="cifar10")
    with pytest.raises(ValueError, match="seeds"):
        Options(seeds=0)


def test_interrupted_execution_keeps_what_finished(tmp_path: Path) -> None:
    configs = [RunConfig(steps=3, seed=s, width=8, depth=1) for s in range(3)]
    seen = []

    def stop_after_first(cfg, result, done, total):  # type: ignore[no-untyped-def]
        seen.append(cfg.run_id)
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=r"interrupted after 1 of 3 runs"):
        execute(configs, tmp_path, workers=1, on_done=stop_after_first)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 1
    again: list[str] = []
    execute(configs, tmp_path, workers=1, on_done=lambda c, r, d, t: again.append(c.run_id))
    assert len(again) == 3  # the finished one comes back from its record, the rest train
    assert len(list((tmp_path / "runs").glob("*.json"))) == 3


def test_a_process_pool_gives_the_same_records(tmp_path: Path) -> None:
    configs = [RunConfig(steps=3, seed=s, width=8, depth=1) for s in range(2)]
    pooled = execute(configs, tmp_path / "pool", workers=2)
    serial = execute(configs, tmp_path / "serial", workers=1)
    assert {k: v["train_loss"] for k, v in pooled.items()} == {
        k: v["train_loss"] for k, v in serial.items()
    }


def test_ray_executor_runs_locally_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    configs = [RunConfig(steps=3, seed=s, width=8, depth=1) for s in range(2)]
    records = execute(configs, tmp_path, workers=2, executor="ray")
    assert len(records) == 2


def test_manifest_round_trip_and_output_dir_errors(tmp_path: Path) -> None:
    update_manifest(tmp_path, ["landscape"], Options(quick=True))
    update_manifest(tmp_path, ["dropout"], TINY)
    assert read_manifest(tmp_path) == {"landscape": Options(quick=True), "dropout": TINY}
    (tmp_path / "studies.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match=r"studies\.json must be a normlab study manifest"):
        read_manifest(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(
        ValueError,
        match=r"the output directory .*file/sub must be a writable directory, got NotADirectoryError",
    ):
        execute([RunConfig(steps=1)], blocker / "sub")


# -- judges on records with known answers ---------------------------------------------------------


def _record(
    losses: list[float], acc: float = 0.9, status: str = "complete", **extra: object
) -> dict:  # type: ignore[type-arg]
    return {
        "config": RunConfig(steps=len(losses)),
        "status": status,
        "train_loss": losses,
        "final": {"test_acc_ema": acc, "test_acc_exact": acc, "train_acc": acc, **extra},
        "probes": [],
    }


def _fast(step: int, n: int = 60) -> list[float]:
    return [1.0 if i < step else 0.05 for i in range(n)]


def test_bn_training_judge() -> None:
    groups = {
        "plain, lr 0.1": [_record(_fast(40)) for _ in range(3)],
        "BN, lr 0.1": [_record(_fast(20)) for _ in range(3)],
        "plain, lr 0.5": [_record([2.3] * 60, acc=0.1) for _ in range(3)],
        "BN, lr 0.5": [_record(_fast(25)) for _ in range(3)],
    }
    assert judges.bn_training(groups).status == "supported"
    groups["BN, lr 0.1"] = [_record(_fast(50)) for _ in range(3)]
    verdict = judges.bn_training(groups)
    assert verdict.status == "not supported"
    assert "first in 0 of 3 seeds" in verdict.summary


def _probe(step: int, scale: float) -> dict:  # type: ignore[type-arg]
    return {
        "step": step,
        "losses": [1.0, 1.0 + scale],
        "grad_changes": [0.0, scale],
        "beta": scale,
        "grad_norm": 1.0,
    }


def test_landscape_judge_uses_late_probes_of_runs_that_trained() -> None:
    def run(scale_early: float, scale_late: float, acc: float = 0.9) -> dict:  # type: ignore[type-arg]
        r = _record(_fast(10), acc=acc)
        r["probes"] = [
            _probe(0, scale_early),
            _probe(50, scale_early),
            _probe(150, scale_late),
            _probe(200, scale_late),
        ]
        return r

    groups = {"plain": [run(1.0, 1.0) for _ in range(3)], "BN": [run(5.0, 0.2) for _ in range(3)]}
    verdict = judges.landscape(groups)
    assert verdict.status == "supported"  # rougher early, smoother late: judged on late
    late = next(row for row in verdict.table if row[0] == "BN" and ">" in row[1])
    assert late[2].startswith("0.2; smaller in 6/6")
    groups["BN"] = [run(0.2, 3.0) for _ in range(3)]
    assert judges.landscape(groups).status == "not supported"
    groups["plain"] = [run(1.0, 1.0, acc=0.1) for _ in range(3)]  # dead plain networks
    assert judges.landscape(groups).status == "inconclusive"


def _population_run(gain: float, steps: int = 1000, default_gap: float = 0.0) -> dict:  # type: ignore[type-arg]
    """Exact statistics give 0.9; EMA at the extreme momenta 0.9 - gain, at 0.1 0.9 - default_gap."""
    r = _record(
        _fast(5),
        acc=0.9,
        ema_momenta={"0.001": 0.9 - gain, "0.1": 0.9 - default_gap, "0.9": 0.9 - gain},
    )
    r["config"] = RunConfig(steps=steps)
    return r


def test_population_judge() -> None:
    groups = {
        "batch 8, 1000 steps": [_population_run(0.05) for _ in range(3)],
        "batch 128, 300 steps": [_population_run(0.0, 300)] * 3,
        "batch 8, 40 steps": [_population_run(0.0, 40, default_gap=0.03)] * 3,
        "batch 128, 40 steps": [_population_run(0.0, 40, default_gap=0.01)] * 3,
    }
    verdict = judges.population(groups)
    assert verdict.status == "supported"
    assert "cost 5.0 points" in verdict.summary
    assert "gap is +0.0 points in full runs -- a null effect" in verdict.summary
    assert "After only 100 steps or fewer it is +2.0 points" in verdict.summary
    worse = {"batch 8, 1000 steps": [_population_run(-0.01) for _ in range(3)]}
    assert judges.population(worse).status == "not supported"
    short_only = {"batch 8, 40 steps": [_population_run(0.05, 40)] * 3}
    assert judges.population(short_only).status == "inconclusive"  # no full run to judge


def test_self_normalizing_judge() -> None:
    def run(var: float) -> dict:  # type: ignore[type-arg]
        r = _record(_fast(5))
        r["activations"] = {
            "start": [{"mean": 0.0, "variance": 1.0}] * 8 + [{"mean": 0.0, "variance": var}]
        }
        return r

    good = {"SELU + LeCun": [run(1.1)], "ReLU + Glorot": [run(1e-3)], "tanh + Glorot": [run(0.05)]}
    assert judges.self_normalizing(good).status == "supported"
    bad = {"SELU + LeCun": [run(1e-4)], "ReLU + Glorot": [run(1e-3)]}
    assert judges.self_normalizing(bad).status == "not supported"


def test_steps_to_threshold_treats_never_as_infinitely_late() -> None:
    assert math.isinf(judges._steps(_record([1.0] * 30)))
    assert judges._faster([_record(_fast(10))], [_record([1.0] * 30)]) == (1, 1)
    assert judges._faster([_record([1.0] * 30)], [_record([1.0] * 30)]) == (0, 0)


def test_batch_size_judge_compares_norms_at_equal_batch_size() -> None:
    def run(norm: str, bs: int, acc: float) -> dict:  # type: ignore[type-arg]
        r = _record(_fast(5), acc=acc)
        r["config"] = RunConfig(norm=norm, batch_size=bs, arch="vgg", width=16)
        return r

    # large batches train fewer samples' worth here: everyone is worse there; only BN's
    # standing against group/layer norm at equal batch size counts
    groups = {
        "a": [run("batch", 2, 0.70), run("batch", 128, 0.80)],
        "b": [run("group", 2, 0.85), run("group", 128, 0.78)],
        "c": [run("layer", 2, 0.84), run("layer", 128, 0.76)],
    }
    verdict = judges.batch_size(groups)
    assert verdict.status == "supported"
    assert "+2.0 points at batch 128, -15.0 at batch 2" in verdict.summary
    assert "still ahead" not in verdict.summary
    # BN's lead shrinks from 2 to 1 point: that is the claim's effect, without the crossover
    groups["a"] = [run("batch", 2, 0.86), run("batch", 128, 0.80)]
    assert judges.batch_size(groups).status == "inconclusive"  # within 2 points
    groups["a"] = [run("batch", 2, 0.855), run("batch", 128, 0.83)]
    verdict = judges.batch_size(groups)
    assert verdict.status == "supported"
    assert "BN is still ahead at batch 2" in verdict.summary
    groups["d"] = [run("renorm", 2, 0.88), run("renorm", 128, 0.83)]
    assert (
        "At batch 2, against BN (points): batch renorm +2.5." in judges.batch_size(groups).summary
    )
    groups["a"] = [run("batch", 2, 0.90), run("batch", 128, 0.80)]
    assert judges.batch_size(groups).status == "not supported"


def test_input_normalization_judge_takes_each_variant_at_its_best_rate() -> None:
    groups = {
        "raw inputs, lr 0.01": [_record(_fast(50))],
        "raw inputs, lr 0.2": [_record([float("nan")] * 5, status="diverged")],
        "training-split statistics, lr 0.01": [_record(_fast(55))],
        "training-split statistics, lr 0.2": [_record(_fast(20))],
        "test-split statistics (leak), lr 0.2": [_record(_fast(20))],
    }
    assert judges.input_normalization(groups).status == "supported"


def _at_lr(record: dict, lr: float) -> dict:  # type: ignore[type-arg]
    return {**record, "config": RunConfig(steps=len(record["train_loss"]), lr=lr)}


def test_input_normalization_judges_the_leak_at_the_same_learning_rate() -> None:
    groups = {
        "raw inputs, lr 0.01": [_at_lr(_record(_fast(50)), 0.01)],
        "training-split statistics, lr 0.01": [_at_lr(_record(_fast(55), acc=0.80), 0.01)],
        "training-split statistics, lr 0.2": [_at_lr(_record(_fast(20), acc=0.90), 0.2)],
        "test-split statistics (leak), lr 0.01": [_at_lr(_record(_fast(20), acc=0.99), 0.01)],
        "test-split statistics (leak), lr 0.2": [_at_lr(_record(_fast(20), acc=0.93), 0.2)],
    }
    summary = judges.input_normalization(groups).summary
    assert "change test accuracy by 3 points -- a change bought by looking at the test" in summary
    groups["test-split statistics (leak), lr 0.2"] = [_at_lr(_record(_fast(20), acc=0.9), 0.2)]
    assert "by 0 points: nothing measurable" in judges.input_normalization(groups).summary


def test_bn_training_is_refuted_when_plain_copes_with_the_large_rate() -> None:
    groups = {
        "plain, lr 0.1": [_record(_fast(40), acc=0.90) for _ in range(3)],
        "BN, lr 0.1": [_record(_fast(20), acc=0.95) for _ in range(3)],
        "plain, lr 0.5": [_record(_fast(15)) for _ in range(3)],
        "BN, lr 0.5": [_record(_fast(25)) for _ in range(3)],
    }
    verdict = judges.bn_training(groups)
    assert verdict.status == "not supported"
    assert "at lr 0.1: BN 95.0%, plain 90.0% (+5.0 points)" in verdict.summary


def test_noisy_bn_judge_places_noisy_bn_against_plain_and_bn() -> None:
    def groups(noisy: list[float], noisy_large_lr_trains: bool) -> dict:  # type: ignore[type-arg]
        stuck = [_record([2.3] * 60, acc=0.1) for _ in range(3)]
        return {
            "plain, lr 0.1": [_record(_fast(50)) for _ in range(3)],
            "BN, lr 0.1": [_record(_fast(20)) for _ in range(3)],
            "noisy BN, lr 0.1": [_record(noisy) for _ in range(3)],
            "plain, lr 0.5": stuck,
            "noisy BN, lr 0.5": [_record(_fast(30)) for _ in range(3)]
            if noisy_large_lr_trains
            else stuck,
        }

    close = judges.noisy_bn(groups(_fast(22), True))
    assert close.status == "supported"
    assert "needed 1.07x BN's steps: nearly as fast as BN" in close.summary
    slow = judges.noisy_bn(groups(_fast(40), False))
    assert slow.status == "supported"
    assert "(at lr 0.1)" in slow.summary
    assert "needed 1.69x BN's steps" in slow.summary
    assert "slower than BN here" in slow.summary
    like_plain = judges.noisy_bn(groups(_fast(55), False))
    assert like_plain.status == "not supported"
    assert "cancels BN's benefit" in like_plain.summary


def test_robustness_judge_counts_cells_that_train() -> None:
    def cell(norm: str, lr: float, scale: float, acc: float) -> dict:  # type: ignore[type-arg]
        r = _record(_fast(5), acc=acc)
        r["config"] = RunConfig(norm=norm, lr=lr, init_scale=scale, arch="vgg", width=16)
        return r

    groups = {
        f"{norm} {lr} {scale}": [cell(norm, lr, scale, acc)]
        for norm, good in (("batch", 3), ("none", 1))
        for i, (lr, scale) in enumerate(((0.1, 1.0), (0.5, 1.0), (0.1, 4.0), (0.5, 4.0)))
        for acc in [0.95 if i < good else 0.5]
    }
    verdict = judges.robustness(groups)
    assert verdict.status == "supported"
    assert "BN 3/4, plain 1/4" in verdict.summary
    assert "(95.0%, so >= 76.0%)" in verdict.summary
    groups = {k: v for k, v in groups.items() if not k.startswith("none")}
    assert judges.robustness(groups).status == "inconclusive"


def test_dropout_judge_compares_generalisation_gaps() -> None:
    def run(train: float, test: float) -> dict:  # type: ignore[type-arg]
        r = _record(_fast(5), acc=test)
        r["final"]["train_acc"] = train
        return r

    groups = {
        "no dropout": [run(1.0, 0.90), run(1.0, 0.92)],
        "dropout 0.5": [run(0.97, 0.93), run(0.97, 0.93)],
        "DropConnect 0.5, mean inference": [run(0.98, 0.92), run(0.98, 0.93)],
        "DropConnect 0.5, Gaussian inference": [run(0.98, 0.93), run(0.98, 0.93)],
    }
    verdict = judges.dropout(groups)
    assert verdict.status == "supported"
    assert "Gaussian inference minus DropConnect 0.5, mean inference: 0.5 (0-1) points" in (
        verdict.summary
    )
    assert "(at least as good in every seed)" in verdict.summary
    groups["dropout 0.5"] = [run(1.0, 0.89), run(1.0, 0.89)]
    assert judges.dropout(groups).status == "inconclusive"  # one helps, one does not
    groups["DropConnect 0.5, mean inference"] = [run(1.0, 0.8), run(1.0, 0.8)]
    groups["DropConnect 0.5, Gaussian inference"] = [run(1.0, 0.8), run(1.0, 0.8)]
    assert judges.dropout(groups).status == "not supported"


def test_population_judge_says_when_exact_statistics_hurt() -> None:
    # EMA 0.1 gives 0.9, exact only 0.88
    summary = judges.population(
        {"batch 8, 1000 steps": [_population_run(0.1, default_gap=0.0)] * 2}
    ).summary
    assert "Exact statistics were never worse" in summary
    hurt = _population_run(0.1)
    hurt["final"]["test_acc_exact"] = 0.88
    summary = judges.population({"batch 8, 1000 steps": [hurt, hurt]}).summary
    assert "worse than a running average by up to 2.0 points" in summary
