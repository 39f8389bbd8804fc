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
from normlab.surgery._state import preserved, running_stat_layers

__all__ = ["PopulationStatsReport", "recompute_population_stats"]

log = logging.getLogger(__name__)

Mode = Literal["inference", "pooled"]
OWNER = "recompute_population_stats"


@dataclass(frozen=True)
class PopulationStatsReport:
    """What :func:`recompute_population_stats` did.

    ``passes`` lists, per pass over the data, the layers whose statistics it fixed (by name);
    ``samples`` counts the samples seen in one pass; ``world_size`` is the number of processes
    whose data was merged.
    """

    mode: str
    passes: tuple[tuple[str, ...], ...]
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
        self.moments: Moments | None = None
        self.instance_sums: Tensor | None = None  # (3, C): instances, sum of means, sum of vars

    def add(self, x: Tensor) -> None:
        x = x.detach()
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
            if self.instance_sums is not None:
                dist.all_reduce(self.instance_sums)
            return
        if self.moments is None:
            return
        local = torch.stack([self.moments.count, self.moments.mean, self.moments.m2])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        merged = Moments(*gathered[0])
        for other in gathered[1:]:
            merged = merged.merge(Moments(*other))
        self.moments = merged

    def write(self, module: nn.Module) -> None:
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
        with torch.no_grad():
            cast(Tensor, module.running_mean).copy_(mean)
            cast(Tensor, module.running_var).copy_(var)


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


def _dependency_passes(
    model: nn.Module, layers: list[tuple[str, nn.Module]], args: tuple[Any, ...]
) -> list[list[nn.Module]]:
    """Group the layers into passes: a layer's pass comes after the passes of every layer it
    depends on (whose output reaches its input), found from the autograd graph of one forward.

    Where the graph says nothing (an input that does not require grad, a layer called twice),
    the layer is taken to depend on every layer executed before it -- always correct, only
    slower. Layers never reached by the forward are left out.
    """
    index = {id(m): i for i, (_, m) in enumerate(layers)}
    order: list[int] = []
    inputs: dict[int, Tensor | None] = {}
    output_nodes: dict[Any, int] = {}
    calls: dict[int, int] = {}

    def pre_hook(module: nn.Module, inp: tuple[Any, ...]) -> None:
        i = index[id(module)]
        calls[i] = calls.get(i, 0) + 1
        if calls[i] == 1:
            order.append(i)
        first = inp[0] if inp else None
        inputs[i] = first if isinstance(first, Tensor) else None

    def post_hook(module: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, Tensor) and out.grad_fn is not None:
            output_nodes[out.grad_fn] = index[id(module)]

    with preserved(model) as handles:
        for _, m in layers:
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(post_hook))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        traced = tuple(
            a.detach().clone().requires_grad_(True)
            if isinstance(a, Tensor) and a.is_floating_point()
            else a
            for a in args
        )
        with torch.enable_grad():
            model(*traced)

    memo: dict[Any, frozenset[int]] = {}

    def upstream(root: Any) -> frozenset[int]:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo:
                continue
            parents = [n for n, _ in node.next_functions if n is not None]
            if not expanded:
                stack.append((node, True))
                stack.extend((p, False) for p in parents if p not in memo)
                continue
            found: set[int] = set()
            if node in output_nodes:
                found.add(output_nodes[node])
            for p in parents:
                found |= memo[p]
            memo[node] = frozenset(found)
        return memo[root]

    level: dict[int, int] = {}
    for position, i in enumerate(order):
        x = inputs.get(i)
        if calls[i] > 1 or x is None or not x.requires_grad:
            deps: frozenset[int] | list[int] = order[:position]  # conservative: all earlier
        elif x.grad_fn is None:
            deps = frozenset()  # the model input itself
        else:
            deps = upstream(x.grad_fn)
        level[i] = 1 + max((level[d] for d in deps if d in level), default=-1)
    passes: list[list[nn.Module]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for i in order:
        passes[level[i]].append(layers[i][1])
    return passes


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
    (torch's convention) of its input over all samples of ``data`` -- exact moments merged in
    float64 and weighted by sample count (a smaller last batch counts for what it holds), not the
    equal-weight average of per-batch statistics that ``torch.optim.swa_utils.update_bn`` takes.

    Modes:

    * ``"inference"`` (default): the statistics each layer sees **at test time**. Layers are fixed
      in dependency order, each pass with the layers before it already fixed, so afterwards the
      eval-mode network equals a train-mode forward of the whole training set as one batch (with
      the unbiased variance). One pass per dependency level; a pass stops at the last layer it
      estimates, and independent layers share a pass.
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
            iterator where several passes are needed.
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
    if mode == "inference" and iter(data) is data:
        fail(
            ValueError,
            OWNER,
            "'data' for mode='inference'",
            "re-iterable (one pass per dependency level)",
            f"a one-shot {type(data).__name__}",
            "pass a list, a tensor or a DataLoader instead of a generator, or use mode='pooled'",
        )
    with preserved(model, buffers_of=modules) as handles:
        if mode == "inference":
            first = next(_batches(data, input_fn, num_batches, device))
            passes = _dependency_passes(model, layers, first)
        else:
            passes = [modules]
        samples = batches = 0
        for k, group in enumerate(passes):
            samples, batches = _one_pass(
                model, modules, group, data, input_fn, num_batches, device, mode, handles
            )
            log.info(
                "%s pass %d/%d: %d layers, %d samples in %d batches",
                mode,
                k + 1,
                len(passes),
                len(group),
                samples,
                batches,
            )
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return PopulationStatsReport(
        mode=mode,
        passes=tuple(tuple(names[id(m)] for m in group) for group in passes),
        samples=samples,
        batches=batches,
        world_size=world,
        seconds=time.perf_counter() - start,
    )


def _one_pass(
    model: nn.Module,
    modules: list[nn.Module],
    group: list[nn.Module],
    data: Any,
    input_fn: InputFn | None,
    num_batches: int | None,
    device: torch.device | None,
    mode: Mode,
    handles: list[Any],
) -> tuple[int, int]:
    """Accumulate the inputs of ``group`` over one pass; write their statistics; return sizes."""
    accumulators = {id(m): _Accumulator(m) for m in group}
    pending: set[int] = set()

    def collect(module: nn.Module, inp: tuple[Any, ...]) -> None:
        key = id(module)
        if key in pending:
            accumulators[key].add(inp[0])
            pending.discard(key)
            if not pending:
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
            pending.update(accumulators)
            with contextlib.suppress(_Stop):
                model(*args)
            if pending:
                missing = [type(m).__name__ for m in group if id(m) in pending]
                fail(
                    RuntimeError,
                    OWNER,
                    "every layer being estimated",
                    "called in each forward",
                    f"{missing} not called for batch {batches}",
                    "use the same code path for every batch (no data-dependent branches)",
                )
            samples += _batch_size(args)
            batches += 1
            if total and batches % max(1, total // 4) == 0:
                log.info("  %d/%d batches", batches, total)
    for handle in local:
        handle.remove()
    with torch.no_grad():  # train-mode passes updated running buffers: undo before writing
        for buffer, value in snapshot:
            buffer.copy_(value)
    for m in group:
        accumulators[id(m)].all_reduce()
        accumulators[id(m)].write(m)
    return samples, batches


def _length(data: Any, num_batches: int | None) -> int:
    """Number of batches in one pass, if known (for progress messages); 0 if unknown."""
    try:
        n = math.ceil(data.shape[0] / CHUNK_ROWS) if isinstance(data, Tensor) else len(data)
    except TypeError:
        return 0
    return min(n, num_batches) if num_batches is not None else n
