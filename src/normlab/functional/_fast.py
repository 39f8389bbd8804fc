"""Training-mode batch norm on channels-first CPU tensors at memory speed.

torch's CPU batch norm in training mode on NCHW tensors computes its statistics with a
double-precision scalar loop and runs ~10x below the memory bandwidth (see the benchmark table in
the README), while its group-norm kernel computes per-row moments with a vectorised, numerically
stable cascade at bandwidth, and its eval-mode batch-norm kernel applies a per-channel affine map at
bandwidth. This module composes the two:

1. the per-channel batch mean and biased variance come from per-``(sample, channel)`` row sums and
   row norms (``sum`` and ``linalg.vector_norm``: two vectorised read-only passes, no scratch
   tensor), pooled over the batch in float64. Their float32 error grows as ``1 + mean^2 / var``:
   for channels more than ``_MAX_SUMSQ_OFFSET`` standard deviations off-centre the moments are
   recomputed from ``native_group_norm`` with one group per channel (a numerically stable cascade
   per row, which also writes a scratch tensor), beyond ``_MAX_OFFSET`` by torch's kernel;
2. the eval-mode kernel writes ``(x - mean) / sqrt(var + eps) * weight + bias`` in one pass;
3. the backward pass takes the two per-channel sums from torch's group-norm backward kernel and
   writes the input gradient in two bandwidth-bound passes (:func:`_fast_backward`); for double
   backward (``create_graph=True``) and for data far off-centre it calls torch's
   ``native_batch_norm_backward`` with the same statistics instead, which is differentiable again.

With the fast extra (numba) the forward is two fused loops instead
(:func:`normlab.functional._kernels.batch_norm_forward`: one-read moments, then the output), and
the backward's sums and input gradient are one pass each (:func:`channel_grad_sums`,
:func:`input_grad`).

Saved for backward: ``x``, ``weight``, per-channel mean and inverse std -- the same as torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from normlab.functional import _kernels as kernels
from normlab.functional._core import (
    FULL_PRECISION,
    bessel_factor,
    channel_affine,
    channels_last_format,
    on_accelerator,
    pool_moments,
    update_running_stats_,
)

__all__ = [
    "BatchNormTrain",
    "ChannelsLastGroupNorm",
    "InstanceNormTrain",
    "PerGroupBatchNorm",
    "batch_moments",
    "centred_first",
    "centred_grad_sums",
    "channel_grad_sums",
    "channel_sums",
    "channels_last_groups_usable",
    "input_grad",
    "kernel_param",
    "normalize_given",
    "row_moments",
    "sample_affine",
    "use_fast_batch_stats",
    "use_given_stats",
]

# Below these sizes the fixed cost of the extra small ops outweighs the gain (measured with
# `python benchmarks/layers.py --crossover`): rows (values per sample and channel) shorter than
# _MIN_ROW make the per-row kernel inefficient; smaller tensors are dominated by call overhead.
_MIN_ROW = 32
_MIN_NUMEL = 1 << 19
# Above this |mean| / std (in any channel) the fast backward's reductions lose accuracy; torch's
# backward kernel is used instead (see _fast_backward).
_MAX_OFFSET = 8.0
# Up to this |mean| / std (in every channel) the sum / sum-of-squares moments are as accurate as
# torch's kernel (relative variance error ~1e-7 in float32, measured against float64); further
# off-centre the group-norm kernel's centred moments are used (see _batch_moments).
_MAX_SUMSQ_OFFSET = 2.0
# Longest run of values one float32 norm reduces in _batch_moments (its error grows with length).
_NORM_PIECE = 4096


def _eligible(x: Tensor, others: tuple[Tensor | None, ...], accelerators: bool = False) -> bool:
    """Eager CPU (with ``accelerators``, any device's) float32/float64 ``(N, C, *spatial)`` input
    whose ``others`` share its dtype and device, outside ``torch.compile``, ``torch.func``
    transforms and forward-mode AD."""
    if (on_accelerator(x) and not accelerators) or x.dtype not in FULL_PRECISION or x.dim() < 3:
        return False
    for p in others:
        if p is not None and (p.dtype != x.dtype or p.device != x.device):
            return False
    return not (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or forward_ad._current_level >= 0  # inside a forward-AD dual_level
    )


def _loops(x: Tensor, *like: Tensor | None) -> bool:
    """Whether the fast extra's fused loops (:mod:`normlab.functional._kernels`) serve these
    channels-first tensors. On channels-last tensors torch's batch-norm kernels are as fast as the
    loops (in-process A/B at 64x64x32x32: the loops' backward 1.06-1.09x the time), so they stay."""
    return x.is_contiguous() and kernels.usable(x, *like)


def use_fast_batch_stats(x: Tensor, *others: Tensor | None) -> bool:
    """Whether :class:`BatchNormTrain` computes the statistics of ``x`` (else the native kernel is
    used).

    Eager CPU float32/float64 channels-first contiguous tensors with spatial dims, large enough to
    pay off, whose ``others`` (weight, bias, running statistics; ``None`` allowed) share their
    dtype and device -- mixed dtypes go to torch's kernel, which raises for them. Under
    ``torch.compile``, ``torch.func`` transforms and forward-mode AD the native op is used: the
    compiler generates its own fused kernel, the transforms need the op's batching and jvp rules.
    """
    return (
        x.is_contiguous()
        and x.numel() >= _MIN_NUMEL
        and x.numel() // (x.shape[0] * x.shape[1]) >= _MIN_ROW
        and _eligible(x, others)
    )


def use_given_stats(x: Tensor, *others: Tensor | None) -> bool:
    """Whether :class:`BatchNormTrain` can normalize ``x`` with statistics computed beforehand
    (batch renorm needs them first): :func:`use_fast_batch_stats`, eligible channels-last input
    (whose statistics torch computes read-only and fast), or eager float32/float64 input on an
    accelerator whose ``others`` share its dtype and device (there its forward is torch's
    eval-mode kernel and its backward torch's training-mode one)."""
    return use_fast_batch_stats(x, *others) or (
        (channels_last_format(x) is not None or on_accelerator(x))
        and _eligible(x, others, accelerators=True)
    )


def channel_sums(x: Tensor) -> Tensor:
    """Per-channel sums of ``(N, C, *)`` input in its dtype (accumulated in float64 across rows).
    On contiguous channels-first tensors it sums each ``(sample, channel)`` row (a reduction along
    contiguous memory, ~2x faster there than torch's sum over dims ``(0, 2, ...)``)."""
    if x.dim() > 2 and x.is_contiguous():
        n, c = x.shape[0], x.shape[1]
        return x.view(n * c, -1).sum(1).view(n, c).double().sum(0).to(x.dtype)
    return x.sum([0, *range(2, x.dim())])


def row_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(scratch, mean, var)`` of every ``(sample, channel)`` row of a contiguous ``(N, C, *)``
    tensor: float64 ``(N, C)`` mean and biased variance over the trailing positions, from torch's
    group-norm kernel (one read of ``x``, numerically stable). ``scratch`` is a garbage buffer of
    ``x``'s shape and dtype that callers may reuse.
    """
    n, c = x.shape[0], x.shape[1]
    row = x.numel() // (n * c)
    # eps=0 so that the variance is recovered exactly as rstd**-2 (a constant row gives rstd=inf,
    # var=0); the group-norm output written to `scratch` is not used.
    scratch, row_mean, row_rstd = torch.native_group_norm(x, None, None, n, c, row, c, 0.0)
    return scratch, row_mean.view(n, c).double(), row_rstd.view(n, c).double().pow(-2)


def _batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, var)``: per-channel batch mean and biased variance in float64 of a contiguous
    ``(N, C, *)`` tensor, without writing an activation-sized tensor where the data allow it.

    Row sums and norms serve data whose channels all lie within ``_MAX_SUMSQ_OFFSET`` standard
    deviations of zero; up to ``_MAX_OFFSET`` the group-norm kernel's per-row cascade is accurate;
    further off-centre (or when the float32 squares overflow) torch's kernel, which accumulates
    in double, decides. Each route is about as accurate as torch's kernel on its data.
    """
    if _loops(x):  # one read, exactly centred (the fast extra)
        mean, var = kernels.moments(x)
        return (mean, var) if bool(var.isfinite().all()) else _native_moments(x)
    n, c = x.shape[0], x.shape[1]
    rows = x.view(n * c, -1)
    count = x.numel() // c
    # torch's float32 norm accumulates linearly (its error grows with the length reduced, ~2e-5
    # at 1M values): norms of pieces of at most _NORM_PIECE values, squared and summed in float64
    piece = _piece(rows.shape[1])
    if piece is None:
        _, row_mean, row_var = row_moments(x)
        return pool_moments(row_mean, row_var, 0)
    sums = rows.sum(1).double().view(n, c).sum(0)
    pieces = torch.linalg.vector_norm(rows.reshape(-1, piece), 2, 1).double().square()
    squares = pieces.view(n, c, -1).sum((0, 2))
    mean = sums / count
    var = (squares / count - mean.square()).clamp_min(0.0)
    if not bool(var.isfinite().all()):  # NaN/Inf in x, or squares beyond float32's range
        return _native_moments(x)
    offset = mean.square() / var  # (mean / std)^2; 0/0 (an all-zero channel) is NaN
    offset = torch.where(mean == 0, 0.0, offset).max()
    if bool(offset <= _MAX_SUMSQ_OFFSET**2):
        return mean, var
    if bool(offset <= _MAX_OFFSET**2):
        _, row_mean, row_var = row_moments(x)  # (N, C) each
        return pool_moments(row_mean, row_var, 0)
    return _native_moments(x)


def _piece(length: int) -> int | None:
    """Values per float32 norm in :func:`_batch_moments`: ``length`` itself up to
    ``_NORM_PIECE``, else its largest divisor in ``[_NORM_PIECE // 4, _NORM_PIECE]`` (``None``
    if there is none: the group-norm kernel serves such rows)."""
    if length <= _NORM_PIECE:
        return length
    return next((d for d in range(_NORM_PIECE, _NORM_PIECE // 4 - 1, -1) if length % d == 0), None)


def _native_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance (float64) from torch's training-mode kernel."""
    _, mean, invstd = torch.ops.aten.native_batch_norm(
        x.detach(), None, None, None, None, True, 0.0, 0.0
    )
    return mean.double(), invstd.double().pow(-2)


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance of ``(N, C, *)`` input, float64, no gradient.

    Large channels-first CPU tensors use row sums and norms (:func:`_batch_moments`),
    channels-last float32/float64 CPU tensors and float32/float64 tensors on accelerators
    torch's read-only statistics kernel (one read, Welford's update: no output written, where the
    batch-norm kernel writes a whole normalized tensor); everything else torch's batch-norm kernel
    in training mode.
    """
    with torch.no_grad():
        if use_fast_batch_stats(x):
            return _batch_moments(x)
        read_only = on_accelerator(x) or channels_last_format(x) is not None
        if read_only and x.dtype in FULL_PRECISION:
            mean, var = torch.batch_norm_update_stats(x.detach(), None, None, 0.0)
            return mean.double(), var.double()  # var: biased
        if x.dim() == 2 or x[0, 0].numel() == 1:
            flat = (
                x.detach().double().flatten(2) if x.dim() > 2 else x.detach().double().unsqueeze(2)
            )
            dims = (0, 2)
            mean = flat.mean(dims)
            centered = flat - mean.view(1, -1, 1)
            return mean, (centered * centered).mean(dims)
        return _native_moments(x)


class BatchNormTrain(torch.autograd.Function):
    """``y = (x - mu_B) / sqrt(var_B + eps) * weight + bias`` with batch statistics over all dims but 1.

    ``apply(x, weight, bias, eps, mean=None, var=None, running=None, owner)`` returns
    ``(y, mean, var)``; ``mean`` and the biased ``var`` are float64 per-channel batch statistics
    (not differentiable), for the running-statistics update. They are computed here (channels-first input that passes
    :func:`use_fast_batch_stats`: the fast extra's fused forward,
    :func:`normlab.functional._kernels.batch_norm_forward`, else :func:`_batch_moments`) unless
    given -- from :func:`batch_moments` of
    the same ``x``, by a caller that needs them first (input passing :func:`use_given_stats`);
    the gradient flows through them as through batch norm's own. The output keeps ``x``'s layout.

    ``running = (running_mean, running_var, momentum)``: those buffers are moved towards the
    batch's statistics here (:func:`normlab.functional.update_running_stats_`'s rule and
    non-finite policy; ``owner`` names the layer in its warning) -- by the fused forward's
    epilogue where it can (one serial loop instead of ~10 small ops after the pass).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        mean: Tensor | None = None,
        var: Tensor | None = None,
        running: tuple[Tensor, Tensor, float | Tensor] | None = None,
        owner: str = "batch norm",
    ) -> tuple[Tensor, Tensor, Tensor]:
        # on accelerators torch's eval-mode kernel writes its own output (one launch; into a
        # given tensor CUDA's also copies the statistics and inverts the variance: three)
        out = None if on_accelerator(x) else torch.empty_like(x)
        finite = updated = False
        count = x.numel() // x.shape[1]
        if (mean is None or var is None) and out is not None and _loops(x, out):
            # moments, output, the saved statistics and the running statistics' update in one
            # go (the fast extra)
            fused = None
            if (
                running is not None
                and not isinstance(running[2], Tensor)
                and kernels.writable_buffers(*running[:2])
            ):
                fused = (*running[:2], running[2], bessel_factor(count))
            finite, updated, mean, var, save_mean, save_invstd = kernels.batch_norm_forward(
                x, weight, bias, eps, out, fused
            )
            if not finite:  # NaN/Inf in x: torch's kernel decides the statistics
                mean, var = _native_moments(x)
        elif mean is None or var is None:
            mean, var = _batch_moments(x)
        if not finite:
            out = normalize_given(x, weight, bias, mean, var, eps, out)
            save_mean = mean.to(x.dtype)
            save_invstd = torch.rsqrt(var + eps).to(x.dtype)
        if running is not None and not updated:
            update_running_stats_(running[0], running[1], mean, var, count, running[2], owner)
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (unused) grads
        assert out is not None  # written by the fused forward or by normalize_given
        return out, mean, var

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor | None, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None, None, None]:
        if grad_out is None:  # grads are not materialized: no gradient reached the output
            return None, None, None, None, None, None, None, None
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous(
            memory_format=channels_last_format(x) or torch.contiguous_format
        )
        if (
            torch.is_grad_enabled()
            or on_accelerator(x)
            or not (_loops(x, grad_out) or centred_first(x, save_mean, save_invstd))
        ):
            # Double backward (create_graph=True) needs torch's differentiable formula; far
            # off-centre data needs its exactly centred reductions (see _fast_backward); on
            # accelerators it is torch's kernel, and looking at the data would be a host sync.
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_out,
                x,
                weight,
                None,
                None,
                save_mean,
                save_invstd,
                True,
                ctx.eps,
                [need_x, need_w and weight is not None, need_b],
            )
        else:
            grad_x, grad_w, grad_b = _fast_backward(
                grad_out, x, weight, save_mean, save_invstd, need_x
            )
        return (
            grad_x if need_x else None,
            grad_w if need_w else None,
            grad_b if need_b else None,
            None,
            None,
            None,
            None,
            None,
        )


def centred_first(x: Tensor, mean: Tensor, invstd: Tensor) -> bool:
    """Whether the group-norm backward kernel's sums (:func:`channel_grad_sums`) are accurate
    for ``x`` without the fast extra -- batch norm's and sync batch norm's fast backward:
    channels-first contiguous (on channels-last tensors torch's backward kernel is already fast),
    every channel's mean within ``_MAX_OFFSET`` standard deviations of zero."""
    return x.is_contiguous() and bool((mean.double().abs() * invstd.double()).max() <= _MAX_OFFSET)


def normalize_given(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    out: Tensor | None = None,
) -> Tensor:
    """Batch norm's training-mode output from batch moments computed beforehand (out of place,
    or into ``out``): the eval-mode kernel with them as its "running" statistics, one pass. On
    CPU channels-last float32/float64 input instead ``x * a + (bias - mean * a)`` with
    ``a = weight / sqrt(var + eps)`` folded in float64 (the kernel folds the same way, in ``x``'s
    dtype), a multiply-add broadcast along the contiguous channels (:func:`channel_affine`):
    0.79-0.80x the kernel's time there (64x64x32x32 float32, 1 thread)."""
    if _channels_last_cpu(x):
        scale, shift = _folded(mean, torch.rsqrt(var.double() + eps), weight, bias)
        return channel_affine(x, scale.to(x.dtype), shift.to(x.dtype), out=out)
    args = (x, weight, bias, mean.to(x.dtype), var.to(x.dtype), False, 0.0, eps)
    if out is None:
        return torch.batch_norm(*args, torch.backends.cudnn.enabled)
    unused = x.new_empty(0)
    torch.ops.aten.native_batch_norm.out(
        *args, out=out, save_mean=unused, save_invstd=unused.clone()
    )
    return out


def _channels_last_cpu(x: Tensor) -> bool:
    """Channels-last CPU float32/float64 input, whose batch-norm output the multiply-add along
    the contiguous channels writes faster than torch's kernels (:func:`normalize_given`)."""
    return (
        not on_accelerator(x) and x.dtype in FULL_PRECISION and channels_last_format(x) is not None
    )


def _folded(
    mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Batch norm as ``x * scale + shift``: ``scale = weight * invstd`` and
    ``shift = bias - mean * scale`` in float64, from the float64 ``invstd = 1 / sqrt(var + eps)``
    (statistics of shape ``(C,)`` or ``(groups, C)``)."""
    scale = invstd
    if weight is not None:
        scale = scale * weight.double()
    shift = -mean.double() * scale
    return scale, shift if bias is None else shift + bias.double()


def _fast_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, need_x: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Batch-norm backward from two per-channel reductions and two bandwidth-bound passes
    (:func:`channel_grad_sums`, then :func:`input_grad`)."""
    grad_w, grad_b = channel_grad_sums(grad_out, x, mean, invstd)
    if not need_x:
        return None, grad_w, grad_b
    count = x.numel() // x.shape[1]
    return input_grad(grad_out, x, weight, mean, invstd, grad_b, grad_w, count), grad_w, grad_b


def channel_grad_sums(
    grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor]:
    """``(sum(dy * xhat), sum(dy))`` per channel of contiguous ``(N, C, *)`` tensors, with
    ``xhat = (x - mean) * invstd`` -- batch norm's ``grad_weight`` and ``grad_bias``.

    From torch's group-norm backward kernel (one group per channel, given the batch statistics for
    every sample) in one read of ``dy`` and ``x``. It forms ``sum(dy * x) - mean * sum(dy)`` per
    row, which loses ~``eps * |mean| / std`` relative accuracy: callers keep far off-centre data
    (``|mean| / std > _MAX_OFFSET``) on torch's exactly centred kernels.
    """
    if _loops(x, grad_out):
        dz, d = kernels.grad_sums(grad_out, x, mean)
        return (dz * invstd.double()).to(x.dtype), d.to(x.dtype)
    n, c = x.shape[0], x.shape[1]
    row = x.numel() // (n * c)
    per_row = (n, c)
    _, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
        grad_out,
        x,
        mean.expand(per_row).contiguous(),
        invstd.expand(per_row).contiguous(),
        torch.ones_like(mean),
        n,
        c,
        row,
        c,
        [False, True, True],
    )
    return grad_w, grad_b


def centred_grad_sums(
    grad_out: Tensor, x: Tensor, mean: Tensor, centred: bool
) -> tuple[Tensor, Tensor]:
    """``(sum(dy * (x - mean)), sum(dy))`` per channel of ``(N, C, *)`` tensors of one layout,
    read once: by the group-norm backward kernel (:func:`channel_grad_sums`) for centred
    channels-first data (``centred``: ``|mean| / std`` at most ~``_MAX_OFFSET``), else by torch's
    batch-norm backward kernel, which centres exactly (and is fast on channels-last tensors); with
    the fast extra by its exactly centred loop, however far off-centre."""
    ones = torch.ones_like(mean)
    if _loops(x, grad_out) or (centred and x.dim() > 2 and x.is_contiguous()):
        dz, d = channel_grad_sums(grad_out, x, mean, ones)
        return dz, d
    _, dz, d = torch.ops.aten.native_batch_norm_backward(
        grad_out, x, ones, None, None, mean, ones, True, 0.0, [False, True, True]
    )
    return dz, d


def input_grad(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int | float,
    out: Tensor | None = None,
) -> Tensor:
    """Batch norm's input gradient given the per-channel sums over ``count`` values::

        grad_x = w * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M) = a * dy + b * x + c

    ``b * x + c`` is written by the eval-mode batch-norm kernel (into ``out`` if given), then
    ``a * dy`` is added in place: two bandwidth-bound passes. With the fast extra one fused pass
    writes the centred form ``a * dy + b * (x - mean) - a * sum_dy / M``.
    """
    c = x.shape[1]
    w = torch.ones_like(invstd) if weight is None else weight
    a = (w * invstd).double()
    inv = invstd.double()
    mean_dy, mean_dy_xhat = sum_dy.double() / count, sum_dy_xhat.double() / count
    b = -a * inv * mean_dy_xhat
    # centred, b * (x - mean) - a * mean_dy, in one pass: also on channels-last tensors (ghost
    # batch norm's per-group backward: 0.94x the time in an in-process A/B), unlike the sums
    if kernels.usable(x, grad_out, out):
        return kernels.input_grad(grad_out, x, mean, a, b, -a * mean_dy, out)
    shift = a * (mean.double() * inv * mean_dy_xhat - mean_dy)
    grad_x = channel_affine(x, b.to(x.dtype), shift.to(x.dtype), out=out)
    grad_x.addcmul_(grad_out, a.to(x.dtype).view(c, *([1] * (x.dim() - 2))))
    return grad_x


def kernel_param(t: Tensor | None, x: Tensor) -> Tensor | None:
    """Affine parameters for torch's kernel: float32 where activations are float16/bfloat16 (its
    mixed-precision path), else as they are."""
    if t is None or x.dtype == torch.float64 or t.dtype == torch.float32:
        return t
    return t.float()


class InstanceNormTrain(torch.autograd.Function):
    """Instance norm with instance statistics on a channels-first contiguous ``(N, C, *)`` tensor:
    torch's group-norm kernel (one group per channel) forward, and with the fast extra a backward
    that writes each (sample, channel) row's input gradient right after its two sums, while the
    row is in cache (:func:`normlab.functional._kernels.instance_norm_backward`; torch's
    backward kernel makes the sums over the whole tensor first, then a second pass). Without
    the fast extra and for inputs the loops do not read: torch's backward kernel; in double
    backward: autograd through the kernel's forward again. ``apply(x, weight, bias, eps)``
    returns the kernel's ``(y, mean, rstd)``; saves what torch's autograd saves for it (``x``, ``weight``, ``mean``, ``rstd``)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, c = x.shape[0], x.shape[1]
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, x.numel() // (n * c), c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, rstd)
        return y, mean, rstd

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor, *_grad_stats: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        n, c = x.shape[0], x.shape[1]
        positions = x.numel() // (n * c)
        has_bias = ctx.bias_dtype is not None
        if torch.is_grad_enabled():  # double backward: differentiate the kernel's forward again
            grad_x, grad_w = _grads_again(
                lambda x, w: torch.native_group_norm(x, w, None, n, c, positions, c, ctx.eps)[0],
                x,
                weight,
                grad_out,
                need_x,
                need_w,
            )
            grad_b = grad_out.sum([0, *range(2, x.dim())]) if need_b and has_bias else None
        elif kernels.usable(x, grad_out):
            grad_x, grad_w64, grad_b64 = kernels.instance_norm_backward(
                grad_out, x, mean, rstd, weight, need_x
            )
            grad_w = None if weight is None else grad_w64.to(weight.dtype)
            grad_b = grad_b64.to(ctx.bias_dtype or x.dtype)
        else:  # torch's kernel; it cannot give the bias gradient without a weight
            kernel_b = need_b and has_bias and weight is not None
            grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
                grad_out,
                x,
                mean,
                rstd,
                weight,
                n,
                c,
                positions,
                c,
                [need_x, need_w and weight is not None, kernel_b],
            )
            if need_b and has_bias and weight is None:
                grad_b = grad_out.sum([0, *range(2, x.dim())])
        return (
            grad_x if need_x else None,
            grad_w if need_w and weight is not None else None,
            grad_b if need_b and has_bias else None,
            None,
        )


# ChannelsLastGroupNorm from this many bytes of input on. Its ~24 launches against the copy
# route's ~12 cost more than the copies save on small tensors: on the H200 (a host whose launches
# cost ~40 us each), training forward+backward of instance norm took 1.72x torch.nn's time at
# 64x64x32x32 (16 MiB; the copy route 0.86x), 1.37x at 64x128x56x56 (98 MiB; copy route 1.50x)
# and 0.68x at 128x128x56x56 (196 MiB; copy route 1.50x); group norm 2.97x / 1.19x / 0.74x
# (copy route 1.38x / 1.22x / 1.23x). `python benchmarks/cl_groups.py --device cuda`.
_MIN_BYTES_CL_GROUPS = 96 << 20


def channels_last_groups_usable(x: Tensor, *params: Tensor | None) -> bool:
    """Whether :class:`ChannelsLastGroupNorm` takes ``x``: a channels-last float32/float64 tensor
    of at least ``_MIN_BYTES_CL_GROUPS`` on an accelerator, with parameters of its dtype and
    device (or none), outside ``torch.compile``, ``torch.func`` transforms, forward-mode AD
    (:func:`_eligible`) and ``torch.jit.trace`` (which cannot record a Python function)."""
    return (
        on_accelerator(x)
        and x.numel() * x.element_size() >= _MIN_BYTES_CL_GROUPS
        and not torch.jit.is_tracing()  # type: ignore[attr-defined, no-untyped-call]
        and channels_last_format(x) is not None
        and _eligible(x, params, accelerators=True)
    )


def _grouped_view(x: Tensor, groups: int) -> Tensor:
    """A channels-last ``(N, C, *S)`` tensor as the ``(N, P, G, C // G)`` view of its memory
    (``P`` positions, ``G`` groups): no copy."""
    n, c = x.shape[0], x.shape[1]
    return x.movedim(1, -1).reshape(n, -1, groups, c // groups)


def _from_grouped(v: Tensor, like: Tensor) -> Tensor:
    """The ``(N, P, G, K)`` result ``v`` back in the shape of the channels-last ``like`` (a view,
    channels-last)."""
    n, c = like.shape[0], like.shape[1]
    return v.view(n, *like.shape[2:], c).movedim(-1, 1)


def _grouped_forward(
    xv: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Group norm of the grouped view ``xv`` in differentiable torch ops: ``(y, mean, rstd)``,
    statistics of shape ``(N, 1, G, 1)``. One read for the moments (``var_mean``: a Welford
    reduction, numerically stable), one read and write for ``y = x * scale + shift`` with the
    per-(sample, channel) ``scale`` and ``shift`` folded beforehand."""
    var, mean = torch.var_mean(xv, dim=(1, 3), correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.view(xv.shape[2], xv.shape[3])
    if bias is None:
        shift = -mean * scale
    else:  # bias - mean * scale, one kernel
        shift = torch.addcmul(bias.view(xv.shape[2], xv.shape[3]), mean, scale, value=-1)
    return torch.addcmul(shift, xv, scale), mean, rstd


class ChannelsLastGroupNorm(torch.autograd.Function):
    """Group norm (instance norm: one channel per group) of a channels-last tensor on an
    accelerator, channels-last in and out, with no layout conversion: torch's group-norm kernels
    need channels-first memory, so torch.nn (and normlab before this) copied the input to it,
    and normlab copied the output and, in the backward pass, the gradients back -- four copies,
    which took 1347 us of a 2077 us instance-norm step on the H200 at 128x128x56x56 float32.

    Here the memory is read as ``(N, P, G, K)`` (``P`` positions, ``G`` groups of ``K``
    channels). Forward: ``var_mean`` over ``(P, K)``, then one multiply-add (3 passes over the
    activation). Backward: per-(sample, channel) sums of ``g`` and ``g * x`` over the positions
    (``g * x`` materialized), then ``dx = A g - B x + C`` with per-(sample, channel) ``A`` and
    per-(sample, group) ``B``, ``C`` -- torch's group-norm backward formula, 7 passes. Double
    backward differentiates the forward's torch ops again.

    ``apply(x, weight, bias, groups, eps)`` returns ``(y, mean, rstd)``, the statistics of shape
    ``(N, G)`` (not differentiable), as torch's ``native_group_norm``.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        xv = _grouped_view(x, groups)
        yv, mean, rstd = _grouped_forward(xv, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups, ctx.eps, ctx.has_bias = groups, eps, bias is not None
        n = x.shape[0]
        mean, rstd = mean.view(n, groups), rstd.view(n, groups)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        return _from_grouped(yv, x), mean, rstd

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor | None, *_grad_stats: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        if grad_out is None:
            return None, None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        groups = ctx.groups
        xv = _grouped_view(x, groups)
        gv = _grouped_view(grad_out, groups)  # reshape: a copy only if not channels-last
        if torch.is_grad_enabled():  # double backward: differentiate the forward's ops again
            grad_x, grad_w = _grads_again(
                lambda x, w: _grouped_forward(_grouped_view(x, groups), w, None, ctx.eps)[0],
                x,
                weight,
                gv,
                need_x,
                need_w,
            )
            grad_b = gv.sum((0, 1)).flatten() if need_b and ctx.has_bias else None
            return grad_x, grad_w, grad_b, None, None
        k = xv.shape[3]
        count = xv.shape[1] * k
        sum_g = gv.sum(1, keepdim=True)  # (N, 1, G, K)
        prod = gv * xv
        # sum over the positions of g * x_hat, without the weight: rstd * (sum g x - mean sum g)
        gx_hat = torch.addcmul(prod.sum(1, keepdim=True), mean, sum_g, value=-1).mul_(rstd)
        grad_w = gx_hat.sum((0, 1)).flatten() if need_w and weight is not None else None
        grad_b = sum_g.sum((0, 1)).flatten() if need_b and ctx.has_bias else None
        grad_x = None
        if need_x:
            # dx = A g - B x + C: A = rstd w per (sample, channel); per (sample, group)
            # B = rstd^2 mean(w g x_hat), C = B mean - rstd mean(w g), means over the group
            both = torch.cat((sum_g, gx_hat), 1)  # (N, 2, G, K)
            if weight is not None:
                both = both * weight.view(groups, k)
            s1, s2 = both.sum(3, keepdim=True).unbind(1)  # (N, G, 1) each
            r = rstd.squeeze(1)
            b = (r * r).mul_(s2).div_(count)
            c = torch.addcmul(b * mean.squeeze(1), r, s1, value=-1.0 / count)
            scale = rstd if weight is None else rstd * weight.view(groups, k)
            b, c = b.unsqueeze(1), c.unsqueeze(1)
            grad_x = _from_grouped(
                torch.addcmul(c, xv, b, value=-1, out=prod).addcmul_(gv, scale), x
            )
        return grad_x, grad_w, grad_b, None, None


class PerGroupBatchNorm(torch.autograd.Function):
    """Batch norm of each group of samples ``torch.split(x, sizes)`` with its own statistics, into
    slices of one output of ``x``'s layout: ghost batch norm (a group per virtual batch) and
    channels-last instance norm (a group per sample, whose batch statistics are its instance
    statistics). No concatenation: the output, and in backward the input gradient, are written
    slice by slice (a concatenation keeps the pieces and the result alive at once: one more
    activation-sized tensor at the peak).

    Per group (:func:`_per_group_forward`): large channels-first groups get their moments from
    :func:`_batch_moments` and the eval-mode kernel's one pass; channels-last float32/float64
    input torch's read-only statistics kernel per group and one multiply-add over the whole
    tensor (:func:`_per_group_channels_last`); others (small, low precision) torch's
    training-mode kernel. Backward per group: the two
    per-channel sums (:func:`centred_grad_sums`), then the input gradient written into the slice
    (:func:`_per_group_backward`); float32/float64 instance norm instead reduces per (sample,
    channel) around a cascade-summed mean (:func:`_per_sample_grads`: more accurate than the
    kernel's float32 mean on positions).

    ``apply(x, weight, bias, eps, sizes)`` returns ``(y, mean, invstd, var)`` with one row of
    statistics per group (``var``: float64 biased variance). Saved for backward: ``x`` and the
    statistics, as torch."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        sizes: list[int],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out, mean, invstd, var = _per_group_forward(x, weight, bias, eps, sizes)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.sizes = eps, sizes
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, invstd, var)
        return out, mean, invstd, var

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor, *_grad_stats: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # double backward: differentiate torch's formula again
            grad_x, grad_w = _per_group_grads(
                x, weight, grad_out, ctx.eps, ctx.sizes, need_x, need_w
            )
            grad_b = grad_out.sum([0, *range(2, x.dim())]) if need_b else None
            return grad_x, grad_w, grad_b, None, None
        if (
            x.dtype in FULL_PRECISION
            and channels_last_format(x) is not None
            and all(size == 1 for size in ctx.sizes)
        ):
            grad_x, grad_w, grad_b = _per_sample_grads(
                grad_out, x, weight, invstd, need_x, need_w, need_b, ctx.bias_dtype
            )
        else:  # ghost batch norm; low-precision instance norm (float32 accumulation in the kernel)
            grad_x, grad_w, grad_b = _per_group_backward(
                grad_out, x, weight, mean, invstd, ctx.eps, ctx.sizes, need_x, ctx.bias_dtype
            )
        return (
            grad_x if need_x else None,
            grad_w if need_w else None,
            grad_b if need_b else None,
            None,
            None,
        )


def _per_sample_grads(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    invstd: Tensor,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    bias_dtype: torch.dtype | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Instance norm's gradients of float32/float64 channels-last input, ``invstd`` ``(N, C)``.

    Per (sample, channel) over the M spatial positions, centred on a cascade-summed mean (with the
    kernel's float32 mean the weight gradient is ~10x less accurate than torch's when ``dy`` is
    off-centre, and sum(dy) would amplify its error)::

        grad_x = a * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M),  a = weight * invstd

    written as ``a * dy + b * (x - mean) + c`` in two passes over broadcast coefficients.
    """
    n, c = x.shape[0], x.shape[1]
    spatial = list(range(2, x.dim()))
    view = (n, c, *([1] * len(spatial)))
    count = math.prod(x.shape[2:])
    inv = invstd.view(view).to(x.dtype if x.dtype == torch.float64 else torch.float32)
    centred = x - x.mean(spatial, keepdim=True, dtype=inv.dtype).to(x.dtype)
    sum_dy = grad_out.sum(spatial, keepdim=True, dtype=inv.dtype)
    sum_dy_xhat = (centred * grad_out).sum(spatial, keepdim=True, dtype=inv.dtype) * inv
    grad_x = grad_w = grad_b = None
    if need_x:
        w = 1.0 if weight is None else weight.to(inv.dtype).view(1, c, *([1] * len(spatial)))
        a = w * inv
        grad_x = torch.addcmul(
            (-a * sum_dy / count).to(x.dtype),
            (-a * inv * sum_dy_xhat / count).to(x.dtype),
            centred,
        )
        grad_x.addcmul_(grad_out, a.to(x.dtype))
    if need_b and bias_dtype is not None:
        grad_b = sum_dy.sum(0).flatten().to(bias_dtype)
    if need_w and weight is not None:
        grad_w = sum_dy_xhat.sum(0).flatten().to(weight.dtype)
    return grad_x, grad_w, grad_b


def _per_group_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, sizes: list[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode batch norm of each group of samples ``torch.split(x, sizes)`` with its own
    statistics, written into slices of one output (of ``x``'s layout): ``(y, mean, invstd,
    var)`` with one row of statistics per group (``var`` float64)."""
    if _channels_last_cpu(x):
        return _per_group_channels_last(x, weight, bias, eps, sizes)
    w, b = (kernel_param(t, x) for t in (weight, bias))
    out = torch.empty_like(x)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = x.new_empty((len(sizes), x.shape[1]), dtype=dtype)
    invstd = torch.empty_like(mean)
    var = x.new_empty((len(sizes), x.shape[1]), dtype=torch.float64)
    kernel = []  # groups normalized by the training-mode kernel (it returns invstd)
    first = x.is_contiguous()  # else no group is channels-first contiguous (skip the checks)
    for k, (xs, ys) in enumerate(zip(torch.split(x, sizes), torch.split(out, sizes), strict=True)):
        if first and use_fast_batch_stats(xs, w, b):
            # moments without a scratch tensor, then the eval-mode kernel's one pass
            mean_k, var[k] = _batch_moments(xs)
            mean[k], invstd[k] = mean_k, torch.rsqrt(var[k] + eps)
            normalize_given(xs, w, b, mean_k, var[k], eps, ys)
        else:
            torch.ops.aten.native_batch_norm.out(
                xs,
                w,
                b,
                None,
                None,
                True,
                0.0,
                eps,
                out=ys,
                save_mean=mean[k],
                save_invstd=invstd[k],
            )
            kernel.append(k)
    if kernel:  # its variance: exact to float32 rounding unless var << eps
        var[kernel] = (invstd[kernel].double().pow(-2) - eps).clamp_min(0.0)
    return out, mean, invstd, var


def _per_group_channels_last(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, sizes: list[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_per_group_forward` of channels-last CPU float32/float64 input: each group's
    moments from torch's read-only statistics kernel (the one its training kernel runs), then one
    multiply-add over the whole tensor with per-sample scale and shift along the contiguous
    channels, folded in float64 (the kernel folds the same way in ``x``'s dtype). Against the
    training kernel per group, at 64x64x32x32 float32 and 1 thread: ghost batch norm's forward
    (four groups) 0.91-0.96x the time, channels-last instance norm's (64 groups) 0.77-0.85x
    (pairs of single calls and blocked timings): torch's read-only statistics kernel and a
    broadcast multiply-add beat its training kernel on this layout."""
    stats = [torch.batch_norm_update_stats(xs, None, None, 0.0) for xs in torch.split(x, sizes)]
    mean = torch.stack([m for m, _ in stats])  # (groups, C), x's dtype
    var = torch.stack([v for _, v in stats]).double()  # biased
    invstd = torch.rsqrt(var + eps)
    scale, shift = _folded(mean, invstd, weight, bias)
    counts = torch.tensor(sizes)
    per_sample = [t.to(x.dtype).repeat_interleave(counts, 0) for t in (scale, shift)]  # (N, C)
    return sample_affine(x, *per_sample), mean, invstd.to(mean.dtype), var


def sample_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` with one row of ``(N, C)`` ``scale`` and ``shift`` per sample: one
    multiply-add broadcast along the contiguous channels of a channels-last ``x``, whose layout
    the result keeps."""
    view = (x.shape[0], *([1] * (x.dim() - 2)), x.shape[1])
    rows = x.movedim(1, -1)  # (N, *spatial, C), contiguous
    return torch.addcmul(shift.view(view), rows, scale.view(view)).movedim(-1, 1)


def _per_group_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    eps: float,
    sizes: list[int],
    need_x: bool,
    bias_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Batch-norm gradients of each group of samples ``torch.split(x, sizes)`` with its own
    statistics (one row of ``mean``/``invstd`` per group), written into slices of one input
    gradient of ``x``'s layout: ``(grad_x, grad_weight, grad_bias)`` (``None`` without weight /
    bias). float32/float64: per group the two sums read once (:func:`centred_grad_sums`: the
    group-norm backward kernel for centred channels-first groups, else torch's batch-norm
    backward kernel), then the input gradient written into the slice (two passes); low
    precision: torch's kernel (float32 accumulation) and a copy into the slice (its out= variant
    costs more than both)."""
    w = kernel_param(weight, x)
    grad_out = grad_out.contiguous(memory_format=channels_last_format(x) or torch.contiguous_format)
    grad_x = torch.empty_like(x)
    grad_w = None if weight is None else torch.zeros_like(mean[0])
    grad_b = torch.zeros_like(mean[0]) if bias_dtype is not None else None
    fast = x.dtype in FULL_PRECISION
    centred = (mean.abs() * invstd <= _MAX_OFFSET).all(1).tolist() if fast else []
    for k, (gs, xs, gx) in enumerate(
        zip(
            torch.split(grad_out, sizes),
            torch.split(x, sizes),
            torch.split(grad_x, sizes),
            strict=True,
        )
    ):
        if fast:
            sum_dy_z, gb_k = centred_grad_sums(gs, xs, mean[k], centred[k])
            gw_k = sum_dy_z * invstd[k]
            if need_x:
                count = xs.numel() // xs.shape[1]
                input_grad(gs, xs, w, mean[k], invstd[k], gb_k, gw_k, count, out=gx)
        else:
            gx_k, gw_k, gb_k = torch.ops.aten.native_batch_norm_backward(
                gs, xs, w, None, None, mean[k], invstd[k], True, eps, [need_x, True, True]
            )
            if need_x:
                gx.copy_(gx_k)
        if grad_w is not None:
            grad_w += gw_k
        if grad_b is not None:
            grad_b += gb_k
    return (
        grad_x,
        None if grad_w is None or weight is None else grad_w.to(weight.dtype),
        None if grad_b is None or bias_dtype is None else grad_b.to(bias_dtype),
    )


def _grads_again(
    forward: Callable[[Tensor, Tensor | None], Tensor],
    x: Tensor,
    weight: Tensor | None,
    grad_out: Tensor,
    need_x: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients of ``forward(x, weight)`` (a normalization without its bias),
    recomputed differentiably (``create_graph``): the double-backward route of functions whose
    own backward is not differentiable. Only the gradients asked for; a bias gradient needs no
    second pass through the forward."""
    wanted = [t for t, need in ((x, need_x), (weight, need_w)) if t is not None and need]
    grads: tuple[Tensor, ...] = ()
    if wanted:
        with torch.enable_grad():
            y = forward(x, weight)
        grads = torch.autograd.grad(y, wanted, grad_out, create_graph=True)
    got = iter(grads)
    grad_x = next(got) if need_x else None
    return grad_x, next(got) if need_w and weight is not None else None


def _per_group_grads(
    x: Tensor,
    weight: Tensor | None,
    grad_out: Tensor,
    eps: float,
    sizes: int | list[int],
    need_x: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients of batch norm run separately on the groups of samples
    ``torch.split(x, sizes)``, differentiably (``create_graph``): the double-backward route of the
    per-sample and per-virtual-batch functions above. Saved tensors stay connected to the graph of
    the first backward; leaves that need no gradient get a detached stand-in."""
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_()
        wg = None
        if weight is not None:
            wg = weight if weight.requires_grad else weight.detach().requires_grad_()
        y = torch.cat(
            [
                torch.batch_norm(s, wg, None, None, None, True, 0.0, eps, False)
                for s in torch.split(xg, sizes)
            ]
        )
        wrt = [xg] if wg is None else [xg, wg]
        grads = torch.autograd.grad(y, wrt, grad_out, create_graph=True)
    return (
        grads[0] if need_x else None,
        grads[1] if need_w and wg is not None else None,
    )
