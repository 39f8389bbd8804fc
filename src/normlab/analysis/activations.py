"""Per-layer activation statistics (self-normalization to depth, dead and saturated units)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab._checks import check_positive_int
from normlab.surgery._state import preserved

__all__ = [
    "TRACKED",
    "ActivationStats",
    "ActivationTracker",
    "activation_statistics",
    "percentiles",
]

ACTIVATIONS = (nn.ReLU, nn.SELU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.SiLU)


@dataclass(frozen=True)
class ActivationStats:
    """Statistics of one module's output on a batch, over all its elements.

    ``dead``: fraction of units (channels/features) that are never positive on the batch;
    ``saturated``: fraction of elements beyond 0.99 of a bounded activation's range (tanh,
    sigmoid), else 0.
    """

    name: str
    kind: str
    mean: float
    variance: float
    dead: float
    saturated: float


def activation_statistics(
    model: nn.Module,
    *inputs: Any,
    select: Callable[[str, nn.Module], bool] | None = None,
    training: bool = False,
) -> list[ActivationStats]:
    """Mean, variance, dead and saturated units of the output of every selected module, in
    forward order (default: every activation module: ReLU, SELU, ELU, tanh, sigmoid, GELU, ...).

    The model runs once under ``torch.no_grad`` in eval mode (``training=True``: train mode, e.g.
    to see batch statistics); its modes and hooks are restored afterwards.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh())
        >>> [s.kind for s in activation_statistics(net, torch.randn(16, 4))]
        ['ReLU', 'Tanh']
    """
    chosen = select or (lambda name, m: isinstance(m, ACTIVATIONS))
    stats: list[ActivationStats] = []
    names = {id(m): name for name, m in model.named_modules()}

    def record(module: nn.Module, inp: Any, out: Any) -> None:
        if not isinstance(out, Tensor) or out.numel() == 0:
            return
        y = out.detach().double()
        units = y.transpose(0, 1).reshape(y.shape[1], -1) if y.dim() > 1 else y.view(1, -1)
        bounded = isinstance(module, (nn.Tanh, nn.Sigmoid))
        low = 0.0 if isinstance(module, nn.Sigmoid) else -1.0
        saturated = (
            ((y - low) < 0.005 * (1 - low)) | ((1 - y) < 0.005 * (1 - low)) if bounded else None
        )
        stats.append(
            ActivationStats(
                name=names.get(id(module), ""),
                kind=type(module).__name__,
                mean=y.mean().item(),
                variance=y.var(correction=0).item(),
                dead=(units.max(1).values <= 0).double().mean().item(),
                saturated=saturated.double().mean().item() if saturated is not None else 0.0,
            )
        )

    with preserved(model) as handles, torch.no_grad():
        model.train(training)
        for name, m in model.named_modules():
            if chosen(name, m):
                handles.append(m.register_forward_hook(record))
        model(*inputs)
    return stats


#: What :class:`ActivationTracker` records per layer and step, in this order.
TRACKED = ("mean", "variance", "p15", "p50", "p85")


def percentiles(values: Tensor, qs: tuple[float, ...]) -> list[float]:
    """Percentiles ``qs`` (0-100) of all elements with linear interpolation (numpy's default),
    by selection (``kthvalue``), so any size works (``torch.quantile`` stops at 2**24)."""
    flat = values.reshape(-1)
    n = flat.numel()
    out = []
    for q in qs:
        pos = q / 100 * (n - 1)
        low, frac = int(pos), pos - int(pos)
        a = flat.kthvalue(low + 1).values.double()
        if frac > 0:
            b = flat.kthvalue(low + 2).values.double()
            a = a + frac * (b - a)
        out.append(float(a))
    return out


class ActivationTracker:
    """Per-layer mean, variance and 15th/50th/85th percentiles of activations over training
    (Ioffe & Szegedy 2015, Fig. 1), recorded by forward hooks every ``every``-th training forward
    of the model (eval-mode forwards are not counted).

    A context manager: hooks are attached on entry and removed on exit. ``unit`` picks one
    feature/channel (index along dim 1) to follow, as in the paper's figure; by default all
    elements of a layer's output are pooled. Each record is a ``(layers, 5)`` float32 row, so a
    long run stays small; :meth:`history` returns a layer's series.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 1))
        >>> with ActivationTracker(net) as tracker:
        ...     for _ in range(3):
        ...         _ = net(torch.randn(32, 4))
        >>> tracker.steps, tracker.names
        ([0, 1, 2], ['1'])
        >>> sorted(tracker.history("1"))
        ['mean', 'p15', 'p50', 'p85', 'variance']
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        select: Callable[[str, nn.Module], bool] | None = None,
        every: int = 1,
        unit: int | None = None,
    ) -> None:
        check_positive_int(every, name="every", owner="ActivationTracker")
        self.model = model
        chosen = select or (lambda name, m: isinstance(m, ACTIVATIONS))
        self.modules = [(n, m) for n, m in model.named_modules() if chosen(n, m)]
        if not self.modules:
            raise ValueError(
                "ActivationTracker: 'select' must pick at least one module, got none. Fix: pass "
                "select=lambda name, module: ... matching the layers to follow"
            )
        self.names = [n for n, _ in self.modules]
        self.every = every
        self.unit = unit
        self.steps: list[int] = []
        self._rows: list[Tensor] = []
        self._forwards = 0
        self._current: Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> ActivationTracker:
        self._handles.append(self.model.register_forward_pre_hook(self._start))
        for index, (_, module) in enumerate(self.modules):
            self._handles.append(
                module.register_forward_hook(
                    lambda mod, inp, out, index=index: self._record(index, out)
                )
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _start(self, module: nn.Module, inputs: Any) -> None:
        self._current = None
        if module.training:
            if self._forwards % self.every == 0:
                self._current = torch.full((len(self.modules), len(TRACKED)), math.nan)
                self._rows.append(self._current)
                self.steps.append(self._forwards)
            self._forwards += 1

    def _record(self, index: int, out: Any) -> None:
        if self._current is None or not isinstance(out, Tensor) or out.numel() == 0:
            return
        y = out.detach()
        if self.unit is not None:
            y = y.select(1, self.unit) if y.dim() > 1 else y
        y64 = y.double()
        self._current[index] = torch.tensor(
            [y64.mean().item(), y64.var(correction=0).item(), *percentiles(y, (15, 50, 85))]
        )

    def history(self, name: str) -> dict[str, Tensor]:
        """``{statistic: tensor over recorded steps}`` of one layer (NaN where it did not run)."""
        if name not in self.names:
            raise KeyError(f"ActivationTracker: no tracked layer {name!r}; tracked: {self.names}")
        rows = self.as_tensor()[:, self.names.index(name)]
        return {stat: rows[:, k] for k, stat in enumerate(TRACKED)}

    def as_tensor(self) -> Tensor:
        """All records: ``(steps, layers, 5)``; the last dim follows :data:`TRACKED`."""
        if not self._rows:
            return torch.empty(0, len(self.modules), len(TRACKED))
        return torch.stack(self._rows)
