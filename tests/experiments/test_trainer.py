"""The trainer: deterministic, resumable without losing or repeating a step, honest records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from normlab.data import load_dataset
from normlab.experiments.config import RunConfig
from normlab.experiments.records import load_records, read_record, write_json_atomic
from normlab.experiments.trainer import batch_indices, record_path, train_run

DIGITS = load_dataset("digits")


def _cfg(**changes: object) -> RunConfig:
    base = {"steps": 24, "eval_every": 8, "width": 32, "depth": 2, "batch_size": 32}
    return RunConfig(**{**base, **changes})  # type: ignore[arg-type]


def test_a_record_has_every_field_and_the_global_rng_is_left_alone(tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    record = train_run(
        _cfg(probe_every=10, ema_momenta=(0.1, 0.5), activations=True), tmp_path, dataset=DIGITS
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    assert record["status"] == "complete"
    assert record["steps_done"] == 24
    assert len(record["train_loss"]) == 24
    assert [e["step"] for e in record["evals"]] == [8, 16, 24]
    assert [p["step"] for p in record["probes"]] == [0, 10, 20]
    assert len(record["probes"][0]["losses"]) == 8
    final = record["final"]
    # the tracked EMA with the layers' own momentum is the layers' running statistics (up to
    # rounding, which can flip a borderline test sample; the statistics are compared below)
    assert abs(final["ema_momenta"]["0.1"] - final["test_acc_ema"]) <= 2 / len(DIGITS.y_test)
    assert set(final) >= {"test_acc_exact", "test_loss_exact", "train_acc", "train_loss"}
    assert final["exact_stats"] is True
    assert len(record["activations"]["start"]) == 2
    assert len(record["activations"]["end"]) == 2
    assert record_path(tmp_path, record["config"]).exists()
    assert not (tmp_path / "checkpoints" / f"{record['config'].run_id}.pt").exists()


def test_the_ema_tracker_follows_training_steps_only() -> None:
    from normlab.analysis import landscape_probe
    from normlab.experiments import trainer
    from normlab.experiments.models import build_model

    cfg = _cfg()
    model = build_model(cfg, DIGITS.input_shape, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = trainer._EmaTracker(model, (0.1, 0.5))
    for step in range(12):
        idx = batch_indices(0, step, len(DIGITS.y_train), 32)
        x, y = DIGITS.x_train[idx], DIGITS.y_train[idx]
        landscape_probe(model, torch.nn.functional.cross_entropy, (x, y), lr=0.1)  # not a step
        model.train()
        tracker.active = True
        loss = torch.nn.functional.cross_entropy(model(x), y)
        tracker.active = False
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer, (mean, var) in zip(tracker.layers, tracker.state[0.1], strict=True):
        torch.testing.assert_close(mean, layer.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, layer.running_var, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tracker.state[0.5][0][1], tracker.state[0.1][0][1])
    tracker.close()
    assert not model[2]._forward_hooks


def test_runs_are_deterministic_and_share_batches_across_norms(tmp_path: Path) -> None:
    a = train_run(_cfg(dropout="dropout", p=0.3), tmp_path / "a", dataset=DIGITS)
    b = train_run(_cfg(dropout="dropout", p=0.3), tmp_path / "b", dataset=DIGITS)
    assert a["train_loss"] == b["train_loss"]
    assert torch.equal(batch_indices(0, 5, 1097, 32), batch_indices(0, 5, 1097, 32))
    assert not torch.equal(batch_indices(0, 5, 1097, 32), batch_indices(1, 5, 1097, 32))
    epoch = torch.cat([batch_indices(0, s, 100, 30) for s in range(3)])  # 3 batches, 10 dropped
    assert len(set(epoch.tolist())) == 90


class Stop(Exception):
    pass


@pytest.mark.parametrize("norm", ["batch", "noisy"])
def test_an_interrupted_run_resumes_to_the_identical_record(
    tmp_path: Path, norm: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(
        norm=norm, dropout="dropout", p=0.2, probe_every=7, ema_momenta=(0.5,), activations=True
    )
    whole = train_run(cfg, tmp_path / "whole", dataset=DIGITS)

    def interrupt(step: int, steps: int) -> None:
        if step == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "cut", dataset=DIGITS, progress=interrupt)
    checkpoint = tmp_path / "cut" / "checkpoints" / f"{cfg.run_id}.pt"
    assert checkpoint.exists()
    assert not record_path(tmp_path / "cut", cfg).exists()
    steps_run: list[int] = []
    with caplog.at_level(logging.INFO, logger="normlab.experiments.trainer"):
        resumed = train_run(
            cfg, tmp_path / "cut", dataset=DIGITS, progress=lambda s, n: steps_run.append(s)
        )
    assert "ignoring checkpoint" not in caplog.text
    assert steps_run[0] == 12  # it went on from the checkpoint, not from the start
    assert resumed["train_loss"] == whole["train_loss"]  # nothing lost, nothing twice
    assert resumed["probes"] == whole["probes"]
    assert resumed["evals"] == whole["evals"]
    assert resumed["final"] == whole["final"]
    assert resumed["activations"] == whole["activations"]
    assert resumed["activations"]["start"]
    assert not checkpoint.exists()


def test_an_interrupt_before_the_first_step_leaves_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a run has not finished one step (a busy machine, a worker just started):
    no step-0 checkpoint (it would hold nothing), and the rerun trains from the start."""
    from normlab.experiments import trainer

    cfg = _cfg()
    real = trainer.batch_indices

    def interrupt_first(*args: object) -> object:
        monkeypatch.setattr(trainer, "batch_indices", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "batch_indices", interrupt_first)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path, dataset=DIGITS)
    assert not (tmp_path / "checkpoints" / f"{cfg.run_id}.pt").exists()
    steps_run: list[int] = []
    record = train_run(cfg, tmp_path, dataset=DIGITS, progress=lambda s, n: steps_run.append(s))
    assert steps_run[0] == 1
    assert record["steps_done"] == cfg.steps


def test_a_finished_run_is_not_retrained_and_a_bad_checkpoint_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg()
    first = train_run(cfg, tmp_path, dataset=DIGITS)
    path = record_path(tmp_path, cfg)
    stamp = path.stat().st_mtime_ns
    assert train_run(cfg, tmp_path, dataset=DIGITS)["train_loss"] == first["train_loss"]
    assert path.stat().st_mtime_ns == stamp
    other = _cfg(seed=5)
    bad = tmp_path / "checkpoints" / f"{other.run_id}.pt"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        record = train_run(other, tmp_path, dataset=DIGITS)
    assert "ignoring checkpoint" in caplog.text
    assert record["steps_done"] == 24
    assert (
        record["train_loss"] == train_run(other, tmp_path / "clean", dataset=DIGITS)["train_loss"]
    )


def test_divergence_stops_the_run_and_is_recorded(tmp_path: Path) -> None:
    record = train_run(
        _cfg(norm="none", lr=1e4, init_scale=8.0, steps=40), tmp_path, dataset=DIGITS
    )
    assert record["status"] == "diverged"
    assert record["steps_done"] < 40
    assert record["train_loss"][-1] is None  # non-finite -> null in JSON
    assert record["final"]["test_acc_exact"] == record["final"]["test_acc_ema"]
    assert record["final"]["exact_stats"] is False


def test_a_norm_without_recomputed_statistics_says_so(tmp_path: Path) -> None:
    final = train_run(_cfg(norm="l1", steps=4), tmp_path, dataset=DIGITS)["final"]
    assert final["exact_stats"] is False  # L1 BN keeps its running dispersion
    assert final["test_acc_exact"] == final["test_acc_ema"]


def test_records_reject_corrupt_foreign_and_newer_files(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"one or more run records, got none\. Fix: run a study first"
    ):
        load_records(tmp_path)
    (runs / "a.json").write_text("{not json")
    with pytest.raises(
        ValueError,
        match=r"a\.json must be a readable JSON run record, got an unreadable or corrupt file",
    ):
        read_record(runs / "a.json")
    (runs / "a.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(
        ValueError, match=r"got a foreign JSON file\. Fix: keep only normlab records"
    ):
        read_record(runs / "a.json")
    write_json_atomic(runs / "a.json", {"schema": "normlab.run", "version": 99})
    with pytest.raises(
        ValueError, match=r"record version .* must be <= 1, got 99\. Fix: upgrade normlab"
    ):
        read_record(runs / "a.json")
    write_json_atomic(runs / "a.json", {"schema": "normlab.run", "version": 1, "config": {}})
    with pytest.raises(ValueError, match=r"missing \['status', 'steps_done'"):
        read_record(runs / "a.json")
    write_json_atomic(runs / "b.json", {"x": float("nan"), "y": [float("inf"), 1.0]})
    assert json.loads((runs / "b.json").read_text()) == {"x": None, "y": [None, 1.0]}
    assert sorted(p.name for p in runs.iterdir()) == ["a.json", "b.json"]  # no temporary left


def test_a_record_does_not_depend_on_the_callers_thread_count(tmp_path: Path) -> None:
    cfg = _cfg(steps=12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = train_run(cfg, tmp_path / "two", dataset=DIGITS)
        assert torch.get_num_threads() == 2  # restored
        torch.set_num_threads(1)
        one = train_run(cfg, tmp_path / "one", dataset=DIGITS)
    finally:
        torch.set_num_threads(before)
    assert two["train_loss"] == one["train_loss"]
