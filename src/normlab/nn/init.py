"""Initializers for self-normalizing networks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normlab._checks import fail

__all__ = ["fan_in", "lecun_normal_"]


def fan_in(tensor: Tensor) -> int:
    """Inputs per output unit of a Linear/Conv weight: ``in_features`` or ``C_in/groups * kernel``."""
    if tensor.dim() < 2:
        fail(
            ValueError,
            "fan_in",
            "the weight",
            "a tensor with at least 2 dims (out, in, *kernel)",
            f"shape {tuple(tensor.shape)}",
            "pass a Linear or Conv weight, not a bias",
        )
    return int(tensor.shape[1] * math.prod(tensor.shape[2:]))


def lecun_normal_(tensor: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Fill ``tensor`` in place with ``N(0, 1 / fan_in)`` (LeCun normal), the initialisation
    self-normalizing networks need (Klambauer et al. 2017): with it a SELU layer maps mean 0 /
    variance 1 inputs to mean 0 / variance 1 outputs. (torch's ``calculate_gain('selu')`` is
    3/4 on purpose and is *not* this; Keras' ``lecun_normal`` is a truncated normal with the same
    variance.) Returns ``tensor``.

    >>> w = lecun_normal_(torch.empty(256, 400), generator=torch.Generator().manual_seed(0))
    >>> round(w.std().item() * 20, 1)
    1.0
    """
    std = 1.0 / math.sqrt(fan_in(tensor))
    with torch.no_grad():
        return tensor.normal_(0.0, std, generator=generator)
