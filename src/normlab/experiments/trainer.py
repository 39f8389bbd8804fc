"""Train one :class:`RunConfig` and write its record; resumable after a kill.

Progress is checkpointed (model, optimizer, RNG states and the record so far) every
``checkpoint_seconds`` and on Ctrl-C; starting the same run again continues from the checkpoint,
and because the batch of step ``t`` is a function of ``(seed, t)`` and the RNG states are saved,
the resumed run is identical to an uninterrupted one -- no step is lost or recorded twice.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.analysis import activation_statistics, landscape_probe
from normlab.data import Dataset, load_dataset
from normlab.experiments.config import RunConfig
from normlab.experiments.models import build_model, count_parameters
from normlab.experiments.records import SCHEMA, VERSION, RunRecord, read_record, write_json_atomic
from normlab.surgery import recompute_population_stats
from normlab.surgery._state import running_stat_layers

__all__ = ["batch_indices", "evaluate", "record_path", "train_run"]

log = logging.getLogger(__name__)


def record_path(out: Path, cfg: RunConfig) -> Path:
    return Path(out) / "runs" / f"{cfg.run_id}.json"


def _checkpoint_path(out: Path, cfg: RunConfig) -> Path:
    return Path(out) / "checkpoints" / f"{cfg.run_id}.pt"


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> Tensor:
    """Indices of the training batch of ``step``: epoch-wise reshuffling from a generator seeded
    by ``(seed, epoch)`` only; the last incomplete batch of an epoch is dropped.

    >>> batch_indices(0, 0, 10, 4).tolist() == batch_indices(0, 0, 10, 4).tolist()
    True
    """
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[i * batch_size : (i + 1) * batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 1000) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` in eval mode (mode restored)."""
    was = model.training
    model.eval()
    try:
        loss, correct = 0.0, 0
        for i in range(0, len(y), chunk):
            out = model(x[i : i + chunk])
            loss += float(F.cross_entropy(out, y[i : i + chunk], reduction="sum"))
            correct += int((out.argmax(1) == y[i : i + chunk]).sum())
    finally:
        model.train(was)
    return loss / len(y), correct / len(y)


class _EmaTracker:
    """Running averages of each batch norm's batch statistics for several momenta at once (the
    population-statistics study), fed by forward hooks in training mode."""

    def __init__(self, model: nn.Module, momenta: tuple[float, ...]) -> None:
        self.momenta = momenta
        self.layers = [
            m
            for _, m in running_stat_layers(model)
            if type(m).__name__ in ("BatchNorm1d", "BatchNorm2d")
        ]
        self.state: dict[float, list[tuple[Tensor, Tensor]]] = {
            mom: [
                (
                    torch.zeros_like(_buffer(m, "running_mean")),
                    torch.ones_like(_buffer(m, "running_var")),
                )
                for m in self.layers
            ]
            for mom in momenta
        }
        self.active = False
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self.active:  # probes and statistics passes are not training steps
                return
            x = inputs[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            mean, var = x.mean(dims), x.var(dims, correction=1)
            for mom in self.momenta:
                m, v = self.state[mom][index]
                self.state[mom][index] = ((1 - mom) * m + mom * mean, (1 - mom) * v + mom * var)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def accuracies(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
        out = {}
        for mom in self.momenta:
            twin = copy.deepcopy(model)
            layers = [
                m
                for _, m in running_stat_layers(twin)
                if type(m).__name__ in ("BatchNorm1d", "BatchNorm2d")
            ]
            for layer, (m, v) in zip(layers, self.state[mom], strict=True):
                _buffer(layer, "running_mean").copy_(m)
                _buffer(layer, "running_var").copy_(v)
            out[f"{mom:g}"] = evaluate(twin, x, y)[1]
        return out


def _buffer(module: nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    assert isinstance(value, Tensor)  # running_stat_layers checked it
    return value


def _generators(model: nn.Module) -> list[torch.Generator]:
    return [
        g
        for m in model.modules()
        if isinstance(g := getattr(m, "generator", None), torch.Generator)
    ]


def _version() -> str:
    try:
        return importlib.metadata.version("normlab")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def _new_record(cfg: RunConfig, model: nn.Module) -> RunRecord:
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "normlab": _version(),
        "torch": str(torch.__version__),  # a TorchVersion would not load with weights_only
        "config": cfg.to_dict(),
        "status": "running",
        "steps_done": 0,
        "seconds": 0.0,
        "parameters": count_parameters(model),
        "train_loss": [],
        "evals": [],
        "probes": [],
        "final": None,
        "activations": None,
    }


def _activations(model: nn.Module, x: Tensor) -> list[dict[str, Any]]:
    stats = activation_statistics(model, x, training=True)
    return [{"name": s.name, "kind": s.kind, "mean": s.mean, "variance": s.variance} for s in stats]


def train_run(
    cfg: RunConfig,
    out: Path,
    *,
    dataset: Dataset | None = None,
    checkpoint_seconds: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> RunRecord:
    """Train ``cfg``, measure, and write ``<out>/runs/<run_id>.json``; return the record (with
    ``config`` as a :class:`RunConfig`). A finished record is returned without retraining; a
    checkpoint (after a kill or Ctrl-C) is resumed. Training uses one thread (so records are the
    same on every machine and executor); the global RNG and the thread count are restored.

    ``progress(step, steps)`` is called after every step.
    """
    out = Path(out)
    final_path, ckpt = record_path(out, cfg), _checkpoint_path(out, cfg)
    if final_path.exists():
        done = read_record(final_path)
        if done["config"] == cfg:
            return done
    data = dataset if dataset is not None else load_dataset(cfg.data, standardize=cfg.standardize)
    if cfg.train_size:
        data = dataclasses.replace(
            data, x_train=data.x_train[: cfg.train_size], y_train=data.y_train[: cfg.train_size]
        )
    outer_rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    # one thread: the float summation order, and so the record, must not depend on the machine
    # or on who calls (a serial run, a pool worker, a resumed run in a new process)
    torch.set_num_threads(1)
    try:
        return _train(cfg, data, out, final_path, ckpt, checkpoint_seconds, progress)
    finally:
        torch.random.set_rng_state(outer_rng)
        torch.set_num_threads(threads)


def _train(
    cfg: RunConfig,
    data: Dataset,
    out: Path,
    final_path: Path,
    ckpt: Path,
    checkpoint_seconds: float,
    progress: Callable[[int, int], None] | None,
) -> RunRecord:
    model, opt, record, tracker = _start(cfg, data)
    step, resumed = 0, False
    if ckpt.exists():
        at = _resume(ckpt, cfg, model, opt, record, tracker)
        if at is None:  # unusable: the model may be half loaded, so start from scratch
            if tracker is not None:
                tracker.close()
            model, opt, record, tracker = _start(cfg, data)
        else:
            step, resumed = at, True
    if not resumed and cfg.activations:
        record["activations"] = {"start": _activations(model, data.x_train[:256]), "end": None}
    n = len(data.y_train)
    started, last_save = time.perf_counter() - record["seconds"], time.perf_counter()

    def save() -> None:
        record["seconds"] = time.perf_counter() - started
        _save_checkpoint(ckpt, cfg, step, model, opt, record, tracker)

    try:
        while step < cfg.steps:
            idx = batch_indices(cfg.seed, step, n, cfg.batch_size)
            xb, yb = data.x_train[idx], data.y_train[idx]
            if cfg.probe_every and step % cfg.probe_every == 0:
                record["probes"].append(_probe(model, xb, yb, cfg.lr, step))
            model.train()
            if tracker is not None:
                tracker.active = True
            try:
                loss = F.cross_entropy(model(xb), yb)
            finally:
                if tracker is not None:
                    tracker.active = False
            value = float(loss.detach())
            record["train_loss"].append(value)
            if not math.isfinite(value):
                record["status"] = "diverged"
                log.info("%s diverged at step %d", cfg.run_id, step)
                step += 1
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record["evals"].append(_eval_entry(model, data, step))
            if progress is not None:
                progress(step, cfg.steps)
            if time.perf_counter() - last_save > checkpoint_seconds:
                record["steps_done"] = step
                save()
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        if step > 0:  # before the first step there is nothing to keep: a rerun starts afresh
            record["steps_done"] = step
            save()
        raise
    record["steps_done"] = step
    if record["status"] == "running":
        record["status"] = "complete"
    record["final"] = _final(model, data, tracker, record["status"])
    if tracker is not None:
        tracker.close()
    if cfg.activations:
        acts = record["activations"] or {"start": None}
        record["activations"] = {**acts, "end": _activations(model, data.x_train[:256])}
    record["seconds"] = time.perf_counter() - started
    write_json_atomic(final_path, record)
    ckpt.unlink(missing_ok=True)
    return read_record(final_path)


def _start(
    cfg: RunConfig, data: Dataset
) -> tuple[nn.Module, torch.optim.Optimizer, RunRecord, _EmaTracker | None]:
    """A freshly initialised run: model, optimizer, empty record, EMA tracker; global RNG seeded."""
    model = build_model(cfg, data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    tracker = _EmaTracker(model, cfg.ema_momenta) if cfg.ema_momenta else None
    torch.manual_seed(cfg.seed)  # dropout masks and the like
    return model, opt, _new_record(cfg, model), tracker


def _probe(model: nn.Module, x: Tensor, y: Tensor, lr: float, step: int) -> dict[str, Any]:
    p = landscape_probe(model, F.cross_entropy, (x, y), lr=lr)
    return {
        "step": step,
        "loss": p.loss,
        "grad_norm": p.grad_norm,
        "step_sizes": list(p.step_sizes),
        "losses": list(p.losses),
        "grad_changes": list(p.grad_changes),
        "loss_range": list(p.loss_range),
        "grad_pred_range": list(p.gradient_predictiveness),
        "beta": p.beta_smoothness,
    }


def _eval_entry(model: nn.Module, data: Dataset, step: int) -> dict[str, Any]:
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    _, val_acc = evaluate(model, data.x_val, data.y_val)
    return {"step": step, "test_loss": test_loss, "test_acc": test_acc, "val_acc": val_acc}


def _final(
    model: nn.Module, data: Dataset, tracker: _EmaTracker | None, status: str
) -> dict[str, Any]:
    loss_ema, acc_ema = evaluate(model, data.x_test, data.y_test)
    final: dict[str, Any] = {"test_acc_ema": acc_ema, "test_loss_ema": loss_ema}
    final["train_loss"], final["train_acc"] = evaluate(model, data.x_train, data.y_train)
    final["exact_stats"] = bool(running_stat_layers(model)) and status == "complete"
    if final["exact_stats"]:
        exact = copy.deepcopy(model)
        chunks = [data.x_train[i : i + 512] for i in range(0, len(data.y_train), 512)]
        recompute_population_stats(exact, chunks)
        final["test_loss_exact"], final["test_acc_exact"] = evaluate(
            exact, data.x_test, data.y_test
        )
    else:
        final["test_loss_exact"], final["test_acc_exact"] = loss_ema, acc_ema
    final["ema_momenta"] = tracker.accuracies(model, data.x_test, data.y_test) if tracker else {}
    return final


def _save_checkpoint(
    path: Path,
    cfg: RunConfig,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    record: RunRecord,
    tracker: _EmaTracker | None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "config": cfg.to_dict(),
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "record": record,
        "rng": torch.random.get_rng_state(),
        "generators": [g.get_state() for g in _generators(model)],
        "ema": {f"{k:g}": v for k, v in tracker.state.items()} if tracker else {},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _resume(
    path: Path,
    cfg: RunConfig,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    record: RunRecord,
    tracker: _EmaTracker | None,
) -> int | None:
    """Load the checkpoint into the run; its step, or ``None`` (deleted, with a warning) when it
    is corrupt or belongs to another configuration."""
    try:
        state = torch.load(path, weights_only=True)
        if state["config"] != cfg.to_dict():
            raise ValueError("the checkpoint belongs to another configuration")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.random.set_rng_state(state["rng"])
        for g, s in zip(_generators(model), state["generators"], strict=True):
            g.set_state(s)
        if tracker is not None:
            tracker.state = {float(k): v for k, v in state["ema"].items()}
    except Exception as error:  # a corrupt or foreign checkpoint: start over, say so
        log.warning("ignoring checkpoint %s (%s); the run starts from step 0", path, error)
        path.unlink(missing_ok=True)
        return None
    record.clear()
    record.update(state["record"])
    log.info("%s resumes at step %d", cfg.run_id, state["step"])
    return int(state["step"])
