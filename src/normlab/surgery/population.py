"""Exact population statistics for every running-statistics layer: the lecture's test-time rule.

"You compute after you finish the training the mean and the standard deviation of the batch
normalization layer once for the entire training set and you keep it constant."
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab._batches import CHUNK_ROWS, InputFn, iter_inputs
from normlab._checks import fail
from normlab.functional._core import Moments, pool_moments
from normlab.functional._fast import row_moments
from normlab.functional.sync import collective
from normlab.surgery._state import preserved, running_stat_layers

__all__ = ["PopulationStatsReport", "recompute_population_stats"]

log = logging.getLogger(__name__)

Mode = Literal["inference", "pooled"]
OWNER = "recompute_population_stats"


@dataclass(frozen=True)
class PopulationStatsReport:
    """What :func:`recompute_population_stats` did.

    ``passes`` lists, per pass over the data, the layers whose statistics it fixed (by name);
    ``skipped`` the running-statistics layers the model never called (left unchanged); ``samples`` counts the samples seen in one pass; ``world_size`` is the number of processes
    whose data was merged.
    """

    mode: str
    passes: tuple[tuple[str, ...], ...]
    skipped: tuple[str, ...]
    samples: int
    batches: int
    world_size: int
    seconds: float

    @property
    def num_passes(self) -> int:
        return len(self.passes)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(name for names in self.passes for name in names)


class _Stop(Exception):
    """Raised from a hook once every layer of interest has seen its input: ends the forward."""


class _Accumulator:
    """Exact per-channel statistics of one layer's inputs, merged across batches and processes."""

    def __init__(self, module: nn.Module) -> None:
        self.instance = isinstance(module, _InstanceNorm)
        # instance norms also take unbatched (C, *) input: one dim fewer than batched
        self.unbatched_dims = (
            cast(_InstanceNorm, module)._get_no_batch_dim()  # type: ignore[no-untyped-call]
            if self.instance
            else -1
        )
        self.moments: Moments | None = None
        self.instance_sums: Tensor | None = None  # (3, C): instances, sum of means, sum of vars

    def add(self, x: Tensor) -> None:
        x = x.detach()
        if self.instance and x.dim() == self.unbatched_dims:
            x = x.unsqueeze(0)
        if x.dim() == 2 and not self.instance:  # dense (N, C): the float64 two-pass moments
            batch = Moments.of(x, [0])
            self.moments = batch if self.moments is None else self.moments.merge(batch)
            return
        if x.dtype in (torch.float32, torch.float64) and x[0, 0].numel() > 1:
            # Per-(sample, channel) rows at memory speed (torch's group-norm kernel, stable).
            _, row_mean, row_var = row_moments(x.contiguous())  # (N, C) float64
        else:
            flat = x.double().flatten(2)  # (N, C, positions)
            row_mean, row_var = flat.mean(2), flat.var(2, correction=0)
        n, positions = x.shape[0], x[0, 0].numel()
        if self.instance:
            # torch's instance-norm running statistics average the per-instance mean and the
            # per-instance unbiased variance; the population version averages over all instances.
            bessel = positions / (positions - 1) if positions > 1 else 1.0
            sums = torch.stack(
                [
                    row_mean.new_full((x.shape[1],), float(n)),
                    row_mean.sum(0),
                    row_var.sum(0) * bessel,
                ]
            )
            self.instance_sums = sums if self.instance_sums is None else self.instance_sums + sums
            return
        mean, var = pool_moments(row_mean, row_var, 0)  # (C,): the batch's per-channel moments
        count = mean.new_full(mean.shape, float(n * positions))
        batch = Moments(count, mean, var * count)
        self.moments = batch if self.moments is None else self.moments.merge(batch)

    def all_reduce(self) -> None:
        """Merge the statistics of all processes (exactly) when torch.distributed is initialised."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        if self.instance:
            sums = self.instance_sums
            if sums is not None:
                collective(
                    lambda: dist.all_reduce(sums),
                    None,
                    "recompute_population_stats",
                    "all-reduce of the instance statistics",
                )
            return
        if self.moments is None:
            return
        local = torch.stack([self.moments.count, self.moments.mean, self.moments.m2])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        collective(
            lambda: dist.all_gather(gathered, local),
            None,
            "recompute_population_stats",
            "all-gather of the population statistics",
        )
        merged = Moments(*gathered[0])
        for other in gathered[1:]:
            merged = merged.merge(Moments(*other))
        self.moments = merged

    def write(self, module: nn.Module, name: str) -> None:
        """Store mean and unbiased variance in the module's running buffers (torch's convention)."""
        if self.instance:
            if self.instance_sums is None:
                return
            count, mean_sum, var_sum = self.instance_sums
            mean, var = mean_sum / count, var_sum / count
        else:
            if self.moments is None:
                return
            mean, var = self.moments.mean, self.moments.variance(unbiased=True)
        bad = int((~torch.isfinite(mean)).sum() + (~torch.isfinite(var)).sum())
        if bad:
            fail(
                ValueError,
                "recompute_population_stats",
                f"the statistics of layer {name!r} ({type(module).__name__})",
                "finite",
                f"{bad} NaN/Inf values (non-finite values reach this layer on the data)",
                "find the NaN/Inf in the data or the layers before it; the running statistics "
                "were left as they were",
            )
        setter = getattr(module, "set_running_stats_", None)
        if callable(setter):  # layers whose buffers are not (mean, var), e.g. batch renorm
            setter(mean, var)
            return
        with torch.no_grad():
            cast(Tensor, module.running_mean).copy_(mean)
            cast(Tensor, module.running_var).copy_(var)


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Bitwise-equal values, NaN equal to NaN (non-finite data must not look like a change)."""
    if a.is_floating_point() or a.is_complex():
        return bool(torch.isclose(a, b, rtol=0.0, atol=0.0, equal_nan=True).all())
    return torch.equal(a, b)


def _device_of(model: nn.Module) -> torch.device | None:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def _to(args: tuple[Any, ...], device: torch.device | None) -> tuple[Any, ...]:
    if device is None:
        return args
    return tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)


def _batches(
    data: Any, input_fn: InputFn | None, num_batches: int | None, device: torch.device | None
) -> Iterator[tuple[Any, ...]]:
    for args in iter_inputs(data, owner=OWNER, input_fn=input_fn, num_batches=num_batches):
        yield _to(args, device)


def _batch_size(args: tuple[Any, ...]) -> int:
    first = args[0] if args else None
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 1


@dataclass(frozen=True)
class _Plan:
    """Which layers each pass fixes, and how often each layer runs per forward."""

    passes: list[list[nn.Module]]
    calls: dict[int, int]


def _record_inputs(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    args: tuple[Any, ...],
    perturb: nn.Module | None = None,
) -> tuple[list[int], dict[int, list[Tensor]]]:
    """One eval forward: the layers in order of first call, and every call's input per layer.

    With ``perturb``, that layer's output gets large seeded noise, so that every value computed
    from it changes -- through detach, no_grad, comparisons and integer ops alike."""
    index = {id(m): i for i, (_, m) in enumerate(layers)}
    order: list[int] = []
    inputs: dict[int, list[Tensor]] = {}
    generator = torch.Generator(device="cpu").manual_seed(0)

    def pre_hook(module: nn.Module, inp: tuple[Any, ...]) -> None:
        i = index[id(module)]
        if i not in inputs:
            order.append(i)
            inputs[i] = []
        if inp and isinstance(inp[0], Tensor):
            inputs[i].append(inp[0].detach().clone())

    def post_hook(module: nn.Module, inp: tuple[Any, ...], out: Any) -> Any:
        if module is not perturb or not isinstance(out, Tensor):
            return None
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
        return out + noise * (4.0 * (out.detach().abs().mean() + 1.0))

    handles = []
    try:
        for _, m in layers:
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(post_hook))
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return order, inputs


def _plan_passes(
    model: nn.Module, layers: list[tuple[str, nn.Module]], args: tuple[Any, ...]
) -> _Plan:
    """Group the layers into passes: a layer's pass comes after the passes of every layer whose
    output changes its input.

    Dependencies are measured, not inferred from the graph: one eval forward of the first batch,
    then one more per layer with that layer's output perturbed; a layer depends on every layer
    whose perturbation changed any of its inputs. Exact whatever the model does in between
    (detach, no_grad, gates, routing, shared layers); costs ``len(layers) + 1`` forwards of one
    batch. Layers never called are left out (and reported by the caller).
    """
    order, base = _record_inputs(model, layers, args)
    deps: dict[int, set[int]] = {i: set() for i in order}
    for source in order:
        _, perturbed = _record_inputs(model, layers, args, perturb=layers[source][1])
        for target in order:
            old, new = base[target], perturbed.get(target, [])
            changed = len(old) != len(new) or any(
                a.shape != b.shape or not _same_values(a, b) for a, b in zip(old, new, strict=False)
            )
            if changed:
                deps[target].add(source)
    level: dict[int, int] = {}
    visiting: set[int] = set()

    def depth(i: int) -> int:  # longest dependency chain ending at i (cycles are refused)
        if i in level:
            return level[i]
        if i in visiting or i in deps[i]:
            fail(
                ValueError,
                OWNER,
                f"layer {layers[i][0]!r} for mode='inference'",
                "a layer whose input does not depend on its own output",
                "a layer fed by itself (recurrent use)",
                "use mode='pooled': test-time statistics of a recurrent layer are not defined",
            )
        visiting.add(i)
        level[i] = 1 + max((depth(d) for d in deps[i]), default=-1)
        visiting.discard(i)
        return level[i]

    for i in order:
        depth(i)
    passes: list[list[nn.Module]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for i in order:
        passes[level[i]].append(layers[i][1])
    calls = {id(layers[i][1]): len(base[i]) for i in order}
    return _Plan(passes, calls)


def recompute_population_stats(
    model: nn.Module,
    data: Any,
    *,
    mode: Mode = "inference",
    num_batches: int | None = None,
    input_fn: InputFn | None = None,
) -> PopulationStatsReport:
    """Fill the running statistics of every batch-norm-like layer with exact training-set statistics.

    Every layer with ``running_mean``/``running_var`` buffers (torch's and normlab's batch norms,
    instance norms with ``track_running_stats=True``) gets the mean and the **unbiased** variance
    (torch's convention) of its input over all samples of ``data`` and over all of the layer's
    calls per forward (a shared encoder's layer pools both branches) -- exact moments merged in
    float64 and weighted by sample count (a smaller last batch counts for what it holds), not the
    equal-weight average of per-batch statistics that ``torch.optim.swa_utils.update_bn`` takes.

    Modes:

    * ``"inference"`` (default): the statistics each layer sees **at test time**. Layers are fixed
      in dependency order, each pass with the layers before it already fixed, so afterwards the
      eval-mode network equals a train-mode forward of the whole training set as one batch (with
      the unbiased variance). Dependencies are measured on the first batch (one extra forward of
      that batch per layer, see :func:`_plan_passes`); one pass over the data per dependency
      level, independent layers share a pass, and a pass stops once its layers have their inputs.
    * ``"pooled"``: one pass in which upstream norms normalize with batch statistics, as in
      training (Ioffe & Szegedy's Alg. 2, fvcore's PreciseBN); exact pooled moments.

    During the passes every other module is in eval mode (dropout and other noise off), nothing is
    learned, and afterwards every module's mode, momentum, hooks and ``requires_grad`` are as
    before -- also if an exception is raised, in which case no buffer has changed either. With
    ``torch.distributed`` initialised, every process passes its own shard of the data and all end
    with the statistics of the union (counts, means and centred second moments merged exactly).

    Args:
        model: any ``nn.Module``; its running buffers are overwritten in place.
        data: the training data: a tensor, or an iterable / ``DataLoader`` of tensors or
            ``(x, y)`` tuples. ``"inference"`` iterates it once per pass, so it must be re-iterable
            (not a generator) and should not apply random augmentation.
        mode: ``"inference"`` or ``"pooled"``.
        num_batches: use only the first ``num_batches`` batches of each pass.
        input_fn: maps one batch to the model's input (a tensor or a tuple of arguments).

    Returns:
        :class:`PopulationStatsReport` (passes, layers per pass, samples, seconds).

    Raises:
        ValueError: no layer with running statistics; empty data; an unknown ``mode``; a one-shot
            iterator in ``"inference"`` mode; a layer fed by its own output in ``"inference"`` mode.
        RuntimeError: a batch calls a layer less often than the first batch did.
        TypeError: batches that are neither tensors nor tuples and no ``input_fn``.
    """
    start = time.perf_counter()
    if mode not in ("inference", "pooled"):
        fail(
            ValueError,
            OWNER,
            "argument 'mode'",
            "'inference' or 'pooled'",
            repr(mode),
            "pass mode='inference' (test-time statistics) or mode='pooled'",
        )
    layers = running_stat_layers(model)
    if not layers:
        fail(
            ValueError,
            OWNER,
            "the model",
            "a model with at least one running-statistics layer (e.g. BatchNorm)",
            f"{type(model).__name__} without one",
            "check the model; layers with track_running_stats=False have nothing to recompute",
        )
    names = {id(m): name for name, m in layers}
    device = _device_of(model)
    modules = [m for _, m in layers]
    if mode == "inference" and isinstance(data, Iterator):
        fail(
            ValueError,
            OWNER,
            "'data' for mode='inference'",
            "re-iterable (one pass per dependency level)",
            f"a one-shot {type(data).__name__}",
            "pass a list, a tensor or a DataLoader instead of a generator, or use mode='pooled'",
        )
    with preserved(model, buffers_of=modules) as handles:
        model.eval()
        if mode == "inference":
            first = next(_batches(data, input_fn, num_batches, device))
            plan = _plan_passes(model, layers, first)
        else:
            plan = _Plan([modules], {})  # call counts are learned from the first batch
        samples = batches = 0
        reached: set[int] = set()
        for k, group in enumerate(plan.passes):
            samples, batches, called = _one_pass(
                model,
                modules,
                group,
                plan.calls,
                data,
                input_fn,
                num_batches,
                device,
                mode,
                handles,
            )
            reached |= called
            log.info(
                "%s pass %d/%d: %d layers, %d samples in %d batches",
                mode,
                k + 1,
                len(plan.passes),
                len(group),
                samples,
                batches,
            )
    skipped = tuple(names[id(m)] for m in modules if id(m) not in reached)
    if skipped:
        log.warning("%s: layers not called by the model, statistics unchanged: %s", OWNER, skipped)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return PopulationStatsReport(
        mode=mode,
        passes=tuple(
            tuple(names[id(m)] for m in group if id(m) in reached) for group in plan.passes
        ),
        skipped=skipped,
        samples=samples,
        batches=batches,
        world_size=world,
        seconds=time.perf_counter() - start,
    )


def _one_pass(
    model: nn.Module,
    modules: list[nn.Module],
    group: list[nn.Module],
    calls: dict[int, int],
    data: Any,
    input_fn: InputFn | None,
    num_batches: int | None,
    device: torch.device | None,
    mode: Mode,
    handles: list[Any],
) -> tuple[int, int, set[int]]:
    """Accumulate every call's input of the ``group`` layers over one pass; write their statistics.

    ``calls`` gives how often each layer runs per forward (empty: learn it from the first batch,
    which then runs to the end); a forward stops once every layer has had all its calls.
    Returns the samples and batches seen and the ids of the layers that were called.
    """
    accumulators = {id(m): _Accumulator(m) for m in group}
    expected = {key: calls[key] for key in accumulators if key in calls}
    learning = not expected
    pending: dict[int, int] = {}

    def collect(module: nn.Module, inp: tuple[Any, ...]) -> None:
        key = id(module)
        if learning:
            accumulators[key].add(inp[0])
            expected[key] = expected.get(key, 0) + 1
        elif pending.get(key, 0) > 0:
            accumulators[key].add(inp[0])
            pending[key] -= 1
            if not any(pending.values()):
                raise _Stop

    local = [m.register_forward_pre_hook(collect) for m in group]
    handles.extend(local)
    model.eval()
    if mode == "pooled":
        for m in modules:
            m.train()  # upstream norms normalize with batch statistics, as in training
    snapshot = [(b, b.detach().clone()) for m in modules for b in m.buffers(recurse=False)]
    samples = batches = 0
    total = _length(data, num_batches)
    with torch.no_grad():
        for args in _batches(data, input_fn, num_batches, device):
            pending.clear()
            pending.update(expected)
            with contextlib.suppress(_Stop):
                model(*args)
            if any(pending.values()):
                missing = [type(m).__name__ for m in group if pending.get(id(m), 0) > 0]
                fail(
                    RuntimeError,
                    OWNER,
                    "every layer being estimated",
                    "called as often in each forward as in the first one",
                    f"{missing} called less often for batch {batches}",
                    "use the same code path for every batch (no data-dependent branches)",
                )
            learning = False
            samples += _batch_size(args)
            batches += 1
            if total and batches % max(1, total // 4) == 0:
                log.debug("  %d/%d batches", batches, total)
    for handle in local:
        handle.remove()
    with torch.no_grad():  # train-mode passes updated running buffers: undo before writing
        for buffer, value in snapshot:
            buffer.copy_(value)
    names = {id(m): n for n, m in model.named_modules()}
    for m in group:
        accumulators[id(m)].all_reduce()
        accumulators[id(m)].write(m, names.get(id(m), "?"))
    return samples, batches, set(expected)


def _length(data: Any, num_batches: int | None) -> int:
    """Number of batches in one pass, if known (for progress messages); 0 if unknown."""
    try:
        n = math.ceil(data.shape[0] / CHUNK_ROWS) if isinstance(data, Tensor) else len(data)
    except TypeError:
        return 0
    return min(n, num_batches) if num_batches is not None else n
