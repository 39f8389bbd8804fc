"""Monte-Carlo prediction: sample the stochastic layers at test time (MC dropout)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from normlab._checks import check_positive_int
from normlab.surgery._state import preserved

__all__ = ["MCPrediction", "is_stochastic", "mc_predict"]


@dataclass(frozen=True)
class MCPrediction:
    """Mean and (biased) variance of ``samples`` stochastic forward passes."""

    mean: Tensor
    variance: Tensor
    samples: int


def is_stochastic(module: nn.Module) -> bool:
    """Dropout-like layers: torch's dropout family (incl. alpha dropout) and normlab's stochastic
    layers (``stochastic = True``: dropout, alpha dropout, DropConnect)."""
    return isinstance(module, _DropoutNd) or getattr(type(module), "stochastic", False) is True


def mc_predict(
    model: nn.Module, *inputs: Any, samples: int = 30, generator_seed: int | None = None
) -> MCPrediction:
    """Average ``samples`` forward passes with only the stochastic layers in training mode.

    Every other module -- batch norms above all -- runs in eval mode (running statistics, no
    update), so the spread comes from the sampled masks alone (Gal & Ghahramani's MC dropout;
    torch has no switch for it, PR #17549). Runs under ``torch.no_grad``; every module's mode is
    restored afterwards, also on error, and so are the states of layers' own generators (seeded
    layers). With ``generator_seed`` torch's global RNG and the layers' generators are seeded
    (and restored) so the prediction is reproducible.

    Returns:
        :class:`MCPrediction` with the per-output mean and variance.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5))
        >>> mc_predict(model, torch.ones(1, 3), samples=8).mean.shape
        torch.Size([1, 2])
    """
    check_positive_int(samples, name="samples", owner="mc_predict")
    state = torch.random.get_rng_state() if generator_seed is not None else None
    generators = [
        g
        for m in model.modules()
        if isinstance(g := getattr(m, "generator", None), torch.Generator)
    ]
    generator_states = [g.get_state() for g in generators]
    with preserved(model), torch.no_grad():
        model.eval()
        for m in model.modules():
            if is_stochastic(m):
                m.train()
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
            for i, g in enumerate(generators):
                g.manual_seed(generator_seed + 1 + i)
        try:
            outputs = torch.stack([model(*inputs) for _ in range(samples)])
        finally:
            if state is not None:
                torch.random.set_rng_state(state)
            for g, saved in zip(generators, generator_states, strict=True):
                g.set_state(saved)
    return MCPrediction(outputs.mean(0), outputs.var(0, correction=0), samples)
