"""Lean training routes: few Python-level steps between the passes over memory.

Right after a pass over a large activation every small torch op costs several times its warm
~2-5 us (the interpreter's and the dispatcher's data left the caches), and a layer's routes
through the functional and autograd layers run tens of them on per-channel vectors. Measured
right after two copies of 16.8 MB (8x64x8x8 float32 input, 1 thread, so that the passes
themselves are short): ghost batch norm's channels-last module took 365 us per forward and
788 us per forward+backward, torch's ``BatchNorm2d`` 75 and 176 us; at 64x64x32x32 that excess
is ~20 % of the layer's time. The routes here keep the passes (torch's kernels where they are
fastest, the fast extra's loops elsewhere) and do all the per-channel arithmetic in between --
statistics into coefficients, running statistics, gradient sums into input-gradient
coefficients -- in one serial numba loop per step
(:func:`normlab.functional._kernels.ghost_coefficients` and friends): 194-282 us and 456-654
us for ghost batch norm after (the host drifts by ~1.5x between runs).

Ghost batch norm and batch renorm on channels-last input (:func:`lean_usable`,
:func:`renorm_usable`; L1 and L-infinity batch norm use the same epilogues inside their fused
functions, :mod:`normlab.functional.lp_norm`). They serve eager CPU float32/float64 input with
the fast extra; every other case keeps the general routes, which compute the same values (the
tests compare them). Forward calls that need no gradient skip the autograd function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.functional import _kernels as kernels
from normlab.functional._core import (
    apply_function,
    bessel_factor,
    channel_affine,
    channels_last_format,
    finite_statistics,
    pool_moments,
    update_running_stats_,
)
from normlab.functional._fast import _eligible, _per_group_grads, sample_affine

__all__ = [
    "batch_renorm_channels_last",
    "ghost_batch_norm_channels_last",
    "lean_usable",
    "renorm_usable",
]


def lean_usable(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | Tensor,
) -> bool:
    """Whether the lean routes serve this training call (ghost batch norm's directly, batch
    renorm's through :func:`renorm_usable`): channels-last input the fast extra's loops read
    (:func:`normlab.functional._kernels.usable`), parameters of its dtype, CPU float32/float64
    running statistics (or none) and a number for ``momentum``."""
    return (
        not isinstance(momentum, Tensor)
        and channels_last_format(x) is not None
        and _eligible(x, (weight, bias))
        and kernels.usable(x)
        and kernels.writable_buffers(running_mean, running_var)
        and (running_mean is None) == (running_var is None)
    )


def ghost_batch_norm_channels_last(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    sizes: list[int],
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    owner: str,
) -> Tensor:
    """Ghost batch norm's training step on input passing :func:`lean_usable`: each virtual batch
    (``sizes``: their sample counts) normalized with its own statistics, the running statistics
    (if given) updated with the whole batch's (pooled from the virtual batches'), as
    :func:`normlab.functional.batch_variants.ghost_batch_norm_unchecked` does.

    Forward: torch's read-only statistics kernel per virtual batch, one epilogue, one
    multiply-add over the whole tensor (per-sample scale and shift). Backward: torch's backward
    kernel for the two sums per virtual batch (fast on this layout), one epilogue, the input
    gradient in one pass (:func:`normlab.functional._kernels.input_grad`, one row of coefficients
    per sample). Saved for backward: ``x``, ``weight`` and the statistics, as torch."""
    running = None
    if running_mean is not None and running_var is not None:
        count = x.numel() // x.shape[1]
        running = (running_mean, running_var, momentum, bessel_factor(count))
    y: Tensor = apply_function(_GhostChannelsLast, x, weight, bias, eps, sizes, running, owner)
    return y


def _ghost_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    sizes: list[int],
    running: tuple[Tensor, Tensor, float, float] | None,
    owner: str,
) -> tuple[Tensor, Tensor]:
    """``(y, stats)``: ``stats`` ``(G, 2, C)`` each virtual batch's mean and
    ``1 / sqrt(var + eps)`` in ``x``'s dtype (what the backward keeps)."""
    stats = _group_stats(x, sizes)
    scale, shift, updated = kernels.ghost_coefficients(stats, sizes, weight, bias, eps, running)
    if running is not None and not updated:  # non-finite: the general route warns, skips
        # (stats[:, 1] holds 1 / sqrt(var + eps) now: the moments again, on this rare path)
        moments = _group_stats(x, sizes).double()
        counts = torch.tensor(sizes, dtype=torch.float64).unsqueeze(1)
        mean, var = pool_moments(moments[:, 0], moments[:, 1], 0, counts)
        update_running_stats_(*running[:2], mean, var, x.numel() // x.shape[1], running[2], owner)
    return sample_affine(x, scale, shift), stats


def _group_stats(x: Tensor, sizes: list[int]) -> Tensor:
    """Each virtual batch's mean and biased variance, ``(G, 2, C)`` in ``x``'s dtype (torch's
    read-only statistics kernel, fast on channels-last tensors)."""
    pieces = [torch.batch_norm_update_stats(xs, None, None, 0.0) for xs in torch.split(x, sizes)]
    return torch.stack([t for piece in pieces for t in piece]).view(len(sizes), 2, -1)


class _GhostChannelsLast(torch.autograd.Function):
    """:func:`ghost_batch_norm_channels_last` with a gradient; double backward differentiates
    torch's batch norm per virtual batch again."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        sizes: list[int],
        running: tuple[Tensor, Tensor, float, float] | None,
        owner: str,
    ) -> Tensor:
        y, stats = _ghost_forward(x, weight, bias, eps, sizes, running, owner)
        ctx.save_for_backward(x, weight, stats)
        ctx.eps, ctx.sizes, ctx.has_bias = eps, sizes, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, stats = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        need_b = need_b and ctx.has_bias
        # double backward, or a backward under vmap (is_grads_batched): torch's differentiable
        # formula
        if torch.is_grad_enabled() or kernels._batched(grad) or not kernels.usable(x):
            return _torch_grads(ctx, x, weight, grad, need_x, need_w, need_b)
        grad = grad.contiguous(memory_format=channels_last_format(x) or torch.contiguous_format)
        if not kernels.usable(x, grad):  # strides of size-1 dims can differ: copy into x's
            grad = torch.empty_like(x).copy_(grad)
        sizes = ctx.sizes
        groups = zip(
            torch.split(grad, sizes),
            torch.split(x, sizes),
            stats[:, 0].unbind(),
            stats[:, 1].unbind(),
            strict=True,
        )
        sums = torch.stack(
            [
                t
                for gs, xs, mean, inv in groups
                for t in torch.ops.aten.native_batch_norm_backward(
                    gs, xs, None, None, None, mean, inv, True, ctx.eps, [False, True, True]
                )[1:]
            ]
        ).view(stats.shape)
        grad_x, grad_w, grad_b = kernels.ghost_backward(grad, x, stats, sums, sizes, weight, need_x)
        return (
            grad_x,
            grad_w if need_w else None,
            grad_b if need_b else None,
            None,
            None,
            None,
            None,
        )


def _torch_grads(
    ctx: Any,
    x: Tensor,
    weight: Tensor | None,
    grad: Tensor,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor | None, ...]:
    """The gradients by autograd through torch's batch norm per virtual batch: double backward,
    and gradients the loops do not read."""
    grad_x, grad_w = _per_group_grads(x, weight, grad, ctx.eps, ctx.sizes, need_x, need_w)
    grad_b = grad.sum([0, *range(2, x.dim())]) if need_b else None
    return grad_x, grad_w, grad_b, None, None, None, None


def renorm_usable(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_std: Tensor,
    r_max: float | Tensor,
    d_max: float | Tensor,
) -> bool:
    """Whether :func:`batch_renorm_channels_last` serves this training call: as
    :func:`lean_usable`, with numbers for the limits and running statistics of one dtype."""
    return (
        not isinstance(r_max, Tensor)
        and not isinstance(d_max, Tensor)
        and lean_usable(x, weight, bias, running_mean, running_std, 0.0)
        and running_mean.dtype == running_std.dtype
    )


def batch_renorm_channels_last(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_std: Tensor,
    momentum: float,
    eps: float,
    r_max: float,
    d_max: float,
    owner: str,
) -> Tensor:
    """Batch renorm's training step on input passing :func:`renorm_usable`, as
    :func:`normlab.functional.batch_variants.batch_renorm_unchecked` computes it: torch's
    read-only statistics kernel, one epilogue (``r``, ``d``, the output's coefficients, the
    running mean and std; :func:`normlab.functional._kernels.renorm_coefficients`), one
    multiply-add. Backward: torch's batch-norm backward with ``weight * r`` (the gradient flows
    through the batch statistics as through batch norm's; ``r`` and ``d`` are constants).
    Saved for backward: ``x``, ``weight`` and per-channel statistics, as torch."""
    args = (x, weight, bias, running_mean, running_std, momentum, eps, r_max, d_max, owner)
    y: Tensor = apply_function(_RenormChannelsLast, *args)
    return y


def _renorm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_std: Tensor,
    momentum: float,
    eps: float,
    r_max: float,
    d_max: float,
    owner: str,
) -> tuple[Tensor, Tensor]:
    """``(y, coefficients)`` (:func:`normlab.functional._kernels.renorm_coefficients`)."""
    stats = torch.stack(torch.batch_norm_update_stats(x, None, None, 0.0))
    coefficients, updated = kernels.renorm_coefficients(
        stats, weight, bias, eps, r_max, d_max, running_mean, running_std, momentum
    )
    if not updated:  # non-finite statistics: warn (the running statistics stay)
        finite_statistics(stats, owner=owner)
    return channel_affine(x, coefficients[0], coefficients[1]), coefficients


class _RenormChannelsLast(torch.autograd.Function):
    """:func:`batch_renorm_channels_last` with a gradient."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> Tensor:
        x, weight, bias, eps = args[0], args[1], args[2], args[6]
        y, coefficients = _renorm_forward(*args)
        ctx.save_for_backward(x, weight, coefficients[2:])
        ctx.eps, ctx.has_bias = eps, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, coefficients = ctx.saved_tensors
        mean, invstd, _, r, d = coefficients
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        need_b = need_b and ctx.has_bias
        # weight * r from the saved weight (double backward differentiates through it)
        scaled = r if weight is None else weight * r
        if not kernels._batched(grad):  # (vmap cannot query a batched tensor's layout)
            grad = grad.contiguous(memory_format=channels_last_format(x) or torch.contiguous_format)
        grad_x, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad,
            x,
            scaled,
            None,
            None,
            mean,
            invstd,
            True,
            ctx.eps,
            [need_x, need_w, need_w or need_b],
        )
        return (
            grad_x if need_x else None,
            sum_dy_xhat * r + sum_dy * d if need_w else None,
            sum_dy if need_b else None,
            *([None] * 7),
        )
