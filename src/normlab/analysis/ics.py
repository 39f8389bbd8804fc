"""Internal covariate shift from the optimization viewpoint (Santurkar et al. 2018, Def. 2.1).

For layer ``i``, ``G`` is its gradient on the batch and ``G'`` the gradient of the same layer on
the same batch after every layer before it (in forward order) has taken its step; the shift is
``||G - G'||`` (ideally 0) and ``cos(G, G')`` (ideally 1).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from normlab._checks import fail
from normlab.analysis._common import LossFn, Measured, measuring

__all__ = ["CovariateShift", "LayerShift", "internal_covariate_shift"]


@dataclass(frozen=True)
class LayerShift:
    """One layer's shift: ``l2 = ||G - G'||``, ``cosine = cos(G, G')`` (1 where both are 0),
    and ``grad_norm = ||G||`` to put ``l2`` on a scale."""

    name: str
    l2: float
    cosine: float
    grad_norm: float


@dataclass(frozen=True)
class CovariateShift:
    """Per-layer internal covariate shift, in forward order; ``passes`` counts the
    forward+backward passes of the batch that were spent."""

    layers: tuple[LayerShift, ...]
    bn_mode: str
    passes: int

    def __getitem__(self, name: str) -> LayerShift:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


Update = float | torch.optim.Optimizer | Mapping[str, Tensor]


def internal_covariate_shift(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    update: Update,
    *,
    bn_mode: str = "train",
    stochastic: Literal["fixed", "eval"] = "fixed",
) -> CovariateShift:
    """Santurkar et al.'s ICS of every layer (a module owning trainable parameters directly),
    ordered by first use in the forward pass.

    ``update`` is the step the layers take: a learning rate (plain SGD, ``-lr * G``), the
    optimizer about to step (its step on ``G`` is simulated and undone: parameters, ``.grad``
    and optimizer state are restored), or ``{parameter name: delta}``. Costs one
    forward+backward pass per layer. The first layer has nothing before it: its shift is 0.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        >>> batch = (torch.randn(32, 4), torch.randn(32, 1))
        >>> ics = internal_covariate_shift(model, nn.functional.mse_loss, batch, update=0.1)
        >>> [layer.name for layer in ics.layers]
        ['0', '1', '3']
        >>> ics.layers[0].l2
        0.0
    """
    owner = "internal_covariate_shift"
    with measuring(model, loss_fn, batch, bn_mode=bn_mode, stochastic=stochastic, owner=owner) as m:
        order = _forward_order(m)
        theta = [p.detach() for p in m.params]
        _, grads = m.value_and_grad(theta)
        delta = _delta(update, m, grads, owner)
        owner_of = _layer_of(model, m.names)
        layers, passes = [], 1
        moved = list(theta)
        for i, layer in enumerate(order):
            index = [k for k, name in enumerate(m.names) if owner_of[name] == layer]
            g = torch.cat([grads[k].reshape(-1) for k in index]).double()
            if i == 0:
                g_after = g
            else:
                _, after = m.value_and_grad(moved)
                passes += 1
                g_after = torch.cat([after[k].reshape(-1) for k in index]).double()
            for k in index:  # this layer steps before the next one is measured
                moved[k] = theta[k] + delta[k]
            norms = float(g.norm() * g_after.norm())
            cosine = float(torch.dot(g, g_after)) / norms if norms > 0 else 1.0
            cosine = min(1.0, max(-1.0, cosine))  # rounding can step past +-1
            layers.append(LayerShift(layer, float((g - g_after).norm()), cosine, float(g.norm())))
    return CovariateShift(tuple(layers), bn_mode, passes)


def _layer_of(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Parameter name -> name of the module that owns it directly."""
    return {name: name.rpartition(".")[0] for name in names}


def _forward_order(m: Measured) -> list[str]:
    """Names of the modules owning the measured parameters, by first call in a forward pass
    (modules never called come last, in registration order)."""
    owners = set(_layer_of(m.model, m.names).values())
    called: list[str] = []
    handles = []
    for name, module in m.model.named_modules():
        if name in owners:

            def hook(_module: nn.Module, _inputs: Any, name: str = name) -> None:
                if name not in called:
                    called.append(name)

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            m.loss(m.batches[0])
    finally:
        for handle in handles:
            handle.remove()
    rest = [name for name, _ in m.model.named_modules() if name in owners and name not in called]
    return called + rest


def _delta(update: Update, m: Measured, grads: list[Tensor], owner: str) -> list[Tensor]:
    if isinstance(update, (int, float)) and not isinstance(update, bool):
        return [-float(update) * g for g in grads]
    if isinstance(update, torch.optim.Optimizer):
        return _optimizer_step(update, m, grads)
    if isinstance(update, Mapping):
        out = []
        for name, p in zip(m.names, m.params, strict=True):
            d = update.get(name)
            if d is None:
                out.append(torch.zeros_like(p))
            elif tuple(d.shape) != tuple(p.shape):
                fail(
                    ValueError,
                    owner,
                    f"update[{name!r}]",
                    f"of shape {tuple(p.shape)}",
                    f"shape {tuple(d.shape)}",
                    "give each step the shape of its parameter",
                )
            else:
                out.append(d.detach().to(p.dtype))
        unknown = sorted(set(update) - set(m.names))
        if unknown:
            fail(
                ValueError,
                owner,
                "the keys of 'update'",
                "names of trainable parameters",
                repr(unknown),
                "use names from model.named_parameters()",
            )
        return out
    fail(
        TypeError,
        owner,
        "argument 'update'",
        "a learning rate, a torch.optim.Optimizer or a {name: step} mapping",
        type(update).__name__,
        "pass update=optimizer (before optimizer.step())",
    )


def _optimizer_step(
    optimizer: torch.optim.Optimizer, m: Measured, grads: list[Tensor]
) -> list[Tensor]:
    """The step ``optimizer`` would take on ``grads``, taken and undone."""
    every = [p for group in optimizer.param_groups for p in group["params"]]
    state = copy.deepcopy(optimizer.state_dict())
    saved = [(p, p.detach().clone(), p.grad) for p in every]
    measured = {id(p): g for p, g in zip(m.params, grads, strict=True)}
    try:
        for p in every:
            g = measured.get(id(p))
            p.grad = None if g is None else g.detach().clone()
        optimizer.step()
        steps = {id(p): p.detach() - before for p, before, _ in saved}
    finally:
        with torch.no_grad():
            for p, before, grad in saved:
                p.copy_(before)
                p.grad = grad
        optimizer.load_state_dict(state)
    return [steps.get(id(p), torch.zeros_like(p)) for p in m.params]
