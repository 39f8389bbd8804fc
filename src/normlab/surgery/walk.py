"""One module walker and one state copier: every converter is built from these two."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["copy_norm_state", "replace_modules"]

Predicate = Callable[[str, nn.Module], bool]
Factory = Callable[[str, nn.Module], nn.Module]


def replace_modules(
    model: nn.Module, predicate: Predicate, make: Factory, *, inplace: bool = False
) -> nn.Module:
    """Replace every submodule ``m`` (dotted name ``name``) with ``predicate(name, m)`` true by
    ``make(name, m)``; return the model.

    Top-down: a replaced module's children are not visited. The root itself (name ``""``) may be
    replaced. Unless ``inplace=True`` the caller's model is deep-copied first and never changed.

    >>> m = replace_modules(nn.Sequential(nn.ReLU(), nn.Tanh()),
    ...                     lambda name, m: isinstance(m, nn.ReLU), lambda name, m: nn.GELU())
    >>> [type(c).__name__ for c in m]
    ['GELU', 'Tanh']
    """
    root = model if inplace else copy.deepcopy(model)
    if predicate("", root):
        return make("", root)
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        prefix, parent = stack.pop()
        for name, child in list(parent.named_children()):
            full = f"{prefix}.{name}" if prefix else name
            if predicate(full, child):
                setattr(parent, name, make(full, child))
            else:
                stack.append((full, child))
    return root


_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def copy_norm_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy affine parameters and running statistics from ``src`` to ``dst`` where both have
    them with the same shape (values cast to ``dst``'s dtype and device); copy the training flag.
    Returns ``dst``."""
    with torch.no_grad():
        for name in _STATE:
            a, b = getattr(src, name, None), getattr(dst, name, None)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
                b.copy_(a)
    dst.train(src.training)
    return dst
