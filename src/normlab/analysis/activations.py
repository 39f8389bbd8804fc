"""Per-layer activation statistics (self-normalization to depth, dead and saturated units)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab.surgery._state import preserved

__all__ = ["ActivationStats", "activation_statistics"]

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
