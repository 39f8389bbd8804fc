"""Lp batch norm: normalize by a mean absolute deviation (L1) or a top-k deviation (L-infinity).

Hoffer, Banner, Golan & Soudry, "Norm matters" (NeurIPS 2018), and Santurkar et al. (2018, §3.3):
dividing by ``mean |x - mu|`` or by the largest deviations instead of the standard deviation needs no
squares, so it stays finite in float16 where the variance overflows, and trains as well as BN.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from normlab._checks import check_values_per_channel
from normlab.functional._core import (
    channel_view_shape,
    channels_last_format,
    finite_statistics,
    stats_dtype,
)

__all__ = ["L1_CONSTANT", "linf_constant", "lp_batch_norm_unchecked", "lp_dispersion"]

#: ``sqrt(pi / 2)``: for Gaussian data ``E|x - mu| = sigma * sqrt(2 / pi)``, so
#: ``L1_CONSTANT * mean|x - mu|`` estimates ``sigma``.
L1_CONSTANT = math.sqrt(math.pi / 2)

P = Literal["1", "2", "inf"]


def linf_constant(n: int) -> float:
    """Hoffer et al.'s ``C(n) = (1 + sqrt(pi * ln 4)) / 2 / sqrt(2 ln n)`` for ``n`` values.

    With it, ``C(n) * max|x - mu|`` is of the order of ``sigma`` for Gaussian data (about 1.4 sigma
    measured, not 1: the layer's ``weight`` absorbs the difference).

    >>> round(linf_constant(1024), 6)
    0.414539
    """
    return 0.5 * (1.0 + math.sqrt(math.pi * math.log(4.0))) / math.sqrt(2.0 * math.log(max(n, 2)))


def lp_dispersion(
    x: Tensor,
    mean: Tensor,
    p: P,
    *,
    k: int = 10,
    center: bool = True,
    gaussian_constant: bool = True,
) -> Tensor:
    """Per-channel dispersion of ``(N, C, *)`` input, shape ``(C,)``, in the stats dtype.

    * ``p="1"``: ``mean |x - mu|`` (times ``sqrt(pi/2)`` with ``gaussian_constant``);
    * ``p="2"``: ``sqrt(mean (x - mu)^2)``, the standard deviation (Hoffer's L2 baseline);
    * ``p="inf"``: the mean of the ``k`` largest ``|x - mu|`` (times ``C(n)``).

    ``center=False`` measures ``|x|`` instead of ``|x - mu|`` (Santurkar et al.'s variant: the
    p-norm "before shifting the mean"). Differentiable.
    """
    xs = x.to(stats_dtype(x.dtype))
    c = x.shape[1]
    shape = channel_view_shape(x.dim(), c)
    dev = (xs - mean.view(shape)) if center else xs
    dims = [0, *range(2, x.dim())]
    n = x.numel() // c if c else 0
    if p == "1":  # reductions over the non-channel dims: no (C, -1) copy, any memory layout
        value = dev.abs().mean(dims)
        constant = L1_CONSTANT
    elif p == "2":
        value = dev.square().mean(dims).sqrt()
        constant = 1.0
    else:
        if channels_last_format(x) is not None:  # (N * positions, C) is a free view there
            rows = dev.abs().movedim(1, -1).reshape(-1, c)
            value = rows.topk(min(k, n), dim=0).values.mean(0)
        else:
            per_channel = dev.abs().transpose(0, 1).reshape(c, -1)  # (C, N * positions)
            value = per_channel.topk(min(k, n), dim=1).values.mean(1)
        constant = linf_constant(n)
    return value * constant if gaussian_constant else value


def lp_batch_norm_unchecked(
    input: Tensor,
    running_mean: Tensor | None,
    running_scale: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    p: P,
    k: int,
    center: bool,
    gaussian_constant: bool,
    owner: str,
) -> Tensor:
    """``y = (x - mu) / (dispersion + eps) * weight + bias`` with batch statistics in training
    (running averages updated in place, torch's momentum rule, of the mean and of the
    dispersion itself -- not of its reciprocal, which Jensen's inequality biases) and running
    statistics in evaluation. ``eps`` is added outside, as in the reference code."""
    c = input.shape[1]
    shape = channel_view_shape(input.dim(), c)
    if running_mean is not None and running_scale is not None and not training:
        mean, scale = running_mean, running_scale
    else:
        check_values_per_channel(
            input, input.numel() // c if c else 0, owner=owner, what="values per channel"
        )
        dims = [0, *range(2, input.dim())]
        mean = input.to(stats_dtype(input.dtype)).mean(dims)
        scale = lp_dispersion(
            input, mean, p, k=k, center=center, gaussian_constant=gaussian_constant
        )
        if (
            training
            and running_mean is not None
            and running_scale is not None
            and finite_statistics(mean, scale, owner=owner)
        ):
            with torch.no_grad():
                running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
                running_scale.lerp_(scale.detach().to(running_scale.dtype), momentum)
    xs = input.to(stats_dtype(input.dtype))
    y = (xs - mean.view(shape)) / (scale.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(input.dtype)
