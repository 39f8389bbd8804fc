"""Lp batch norm: normalize by a mean absolute deviation (L1) or a top-k deviation (L-infinity).

Hoffer, Banner, Golan & Soudry, "Norm matters" (NeurIPS 2018), and Santurkar et al. (2018, §3.3):
dividing by ``mean |x - mu|`` or by the largest deviations instead of the standard deviation needs no
squares, so it stays finite in float16 where the variance overflows, and trains as well as BN.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from normlab._checks import check_values_per_channel
from normlab.functional._core import (
    channel_affine,
    channel_view_shape,
    channels_last_format,
    compiling,
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
        fused: Tensor | None = None  # the output, from the fused L1 function
        if p == "1" and center and _fused(input, weight, bias):
            constant = L1_CONSTANT if gaussian_constant else 1.0
            fused, mean, scale = L1BatchNormTrain.apply(input, weight, bias, eps, constant)  # type: ignore[no-untyped-call]
        else:
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
        if fused is not None:
            return fused
    xs = input.to(stats_dtype(input.dtype))
    y = (xs - mean.view(shape)) / (scale.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(input.dtype)


def _fused(x: Tensor, *params: Tensor | None) -> bool:
    """Whether :class:`L1BatchNormTrain` applies: eager float32/float64 with matching parameters
    (low precision, ``torch.compile`` and ``torch.func`` transforms use the composite ops)."""
    return (
        x.dtype in (torch.float32, torch.float64)
        and x.dim() >= 2
        and all(t is None or (t.dtype == x.dtype and t.device == x.device) for t in params)
        and not compiling()
        and not torch._C._are_functorch_transforms_active()
    )


class L1BatchNormTrain(torch.autograd.Function):
    """Training-mode L1 batch norm, ``y = weight * (x - mu) / (K mean|x - mu| + eps) + bias``, with
    its own backward: per-channel sums and two passes (:func:`channel_affine`, then an in-place
    multiply-add), layout-preserving, saving only
    ``x`` and per-channel statistics (autograd through the composite ops keeps three
    activation-sized tensors and, on channels-last input, runs mixed-layout kernels ~10x slower).

    Per channel over M values, with ``z = x - mu``, ``D = K mean|z| + eps``, ``h = weight * dy``:
    ``dx = h / D - K sign(z) sum(h z) / (M D^2)``, minus its mean over the channel.
    ``apply(x, weight, bias, eps, K)`` returns ``(y, mu, K mean|z|)``.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, k: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims)
        z = channel_affine(x, None, -mean)  # centred first: exact for far off-centre data
        scale = z.abs().mean(dims) * k
        denom = scale + eps
        y = channel_affine(z, (1.0 / denom) if weight is None else weight / denom, bias)
        ctx.save_for_backward(x, weight, mean, denom)
        ctx.eps, ctx.k = eps, k
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, scale)
        return y, mean, scale

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor, _grad_mean: Tensor | None, _grad_scale: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, denom = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dims = [0, *range(2, x.dim())]
        view = channel_view_shape(x.dim(), x.shape[1])
        if torch.is_grad_enabled():  # double backward: differentiate the composite formula
            with torch.enable_grad():
                xg = x if x.requires_grad else x.detach().requires_grad_()
                wg = None
                if weight is not None:
                    wg = weight if weight.requires_grad else weight.detach().requires_grad_()
                mu = xg.mean(dims)
                z = xg - mu.view(view)
                y = z / (ctx.k * z.abs().mean(dims) + ctx.eps).view(view)
                if wg is not None:
                    y = y * wg.view(view)
                wrt = [xg] if wg is None else [xg, wg]
                grads = torch.autograd.grad(y, wrt, grad, create_graph=True)
            return (
                grads[0] if need_x else None,
                grads[1] if need_w and wg is not None else None,
                grad.sum(dims) if need_b and ctx.has_bias else None,
                None,
                None,
            )
        count = x.numel() // x.shape[1]
        z = channel_affine(x, None, -mean)
        sum_dy = grad.sum(dims)
        sum_dy_z = (grad * z).sum(dims)
        grad_x = None
        if need_x:
            gamma = torch.ones_like(denom) if weight is None else weight
            sign = z.sign_()  # z is not needed any more
            total_sign = sign.sum(dims)
            alpha = gamma / denom
            beta = -ctx.k * gamma * sum_dy_z / (count * denom.square())
            shift = -(alpha * sum_dy + beta * total_sign) / count
            grad_x = channel_affine(sign, beta, shift)
            grad_x.addcmul_(grad, alpha.view(view))
        return (
            grad_x,
            sum_dy_z / denom if need_w and weight is not None else None,
            sum_dy if need_b and ctx.has_bias else None,
            None,
            None,
        )
