"""Lp batch norm: normalize by a mean absolute deviation (L1) or a top-k deviation (L-infinity).

Hoffer, Banner, Golan & Soudry, "Norm matters" (NeurIPS 2018), and Santurkar et al. (2018, §3.3):
dividing by ``mean |x - mu|`` or by the largest deviations instead of the standard deviation needs no
squares, so it stays finite in float16 where the variance overflows, and trains as well as BN.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from normlab._checks import check_values_per_channel
from normlab.functional import _kernels as kernels
from normlab.functional import _triton
from normlab.functional._core import (
    apply_function,
    channel_affine,
    channel_view_shape,
    channels_last_format,
    compiling,
    finite_statistics,
    on_accelerator,
    on_device_only,
    stats_dtype,
    storage_layout,
    store_if_finite_,
)
from normlab.functional._fast import centred_grad_sums, channel_sums

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
    momentum: float | Tensor,
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
        fused: Tensor | None = None  # the output, from a fused function
        running: _Running = None  # the fused functions update the running statistics
        if training and running_mean is not None and running_scale is not None:
            running = (running_mean, running_scale, momentum)
        if p == "1" and center and _fused(input, weight, bias):
            constant = L1_CONSTANT if gaussian_constant else 1.0
            fused, mean, scale = apply_function(
                L1BatchNormTrain, input, weight, bias, eps, constant, running, owner
            )
        elif (
            p == "inf"
            and center
            and _fused(input, weight, bias)
            and storage_layout(input) is not None
        ):
            n = input.numel() // c
            constant = linf_constant(n) if gaussian_constant else 1.0
            fused, mean, scale = apply_function(
                LinfBatchNormTrain, input, weight, bias, eps, constant, min(k, n), running, owner
            )
        else:
            dims = [0, *range(2, input.dim())]
            mean = input.to(stats_dtype(input.dtype)).mean(dims)
            scale = lp_dispersion(
                input, mean, p, k=k, center=center, gaussian_constant=gaussian_constant
            )
        if fused is not None:
            return fused
        _update_running(running, mean, scale, owner)
    xs = input.to(stats_dtype(input.dtype))
    y = (xs - mean.view(shape)) / (scale.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(input.dtype)


# (running mean, running dispersion, momentum) to update in a training step, or None
_Running = tuple[Tensor, Tensor, float | Tensor] | None


def _update_running(running: _Running, mean: Tensor, scale: Tensor, owner: str) -> None:
    """Move the running statistics towards the batch's (torch's momentum rule, ``lerp_`` in the
    buffers' dtype) -- unless a statistic is not finite (then warn, change nothing)."""
    if running is None:
        return
    running_mean, running_scale, momentum = running
    with torch.no_grad():
        # a 0-dim tensor for cumulative averages on accelerators (nn._base.momentum_factor)
        w = momentum.to(running_mean.dtype) if isinstance(momentum, Tensor) else momentum
        new_mean = torch.lerp(running_mean, mean.detach().to(running_mean.dtype), w)
        new_scale = torch.lerp(running_scale, scale.detach().to(running_scale.dtype), w)
        updates = ((running_mean, new_mean), (running_scale, new_scale))
        store_if_finite_(updates, mean.detach(), scale.detach(), owner=owner)


def _epilogues(x: Tensor, running: _Running) -> bool:
    """Whether the fused functions' per-channel arithmetic (and the running statistics' update)
    runs in the fast extra's serial loops (:func:`kernels.lp_coefficients`): CPU input with
    numba, running statistics (if any) CPU float32/float64 buffers of one dtype."""
    if on_accelerator(x) or not kernels.available():
        return False
    if running is None:
        return True
    running_mean, running_scale, momentum = running
    if isinstance(momentum, Tensor):  # a cumulative average's factor kept on the device
        return False
    return running_mean.dtype == running_scale.dtype and kernels.writable_buffers(
        running_mean, running_scale
    )


def _epilogue_forward(
    ctx: Any,
    saved: tuple[Tensor | None, ...],
    dispersion: Tensor,
    count: int,
    constants: tuple[float, float, int, float],
    bias: Tensor | None,
    running: _Running,
    owner: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused functions' forward after their statistics, with the fast extra: one epilogue
    (:func:`kernels.lp_coefficients`) for the coefficients, the centring test and the running
    statistics, then the output. ``saved`` is ``(x, weight, mean, *extra)``; ``constants``
    ``(eps, K, k, within)``; ``dispersion`` the L1 sum or the L-inf top-k mean, over
    ``count``."""
    x, weight, mean, *extra = saved
    assert x is not None
    assert mean is not None
    eps, constant, k, within = constants
    coefficients, centred, updated = kernels.lp_coefficients(
        mean,
        dispersion,
        count,
        constant,
        eps,
        within,
        weight,
        bias,
        cast("tuple[Tensor, Tensor, float] | None", running),  # _epilogues: a float momentum
    )
    scale, denom, a, shift = coefficients
    _keep(ctx, (x, weight, mean, denom, *extra), eps, constant, k, bias, scale, centred)
    if running is not None and not updated:  # not finite: warn, as the torch route does
        finite_statistics(mean, scale, owner=owner)
    y = channel_affine(x, a, shift) if centred else _scaled_output(x, mean, a, bias, False)
    return y, mean, scale


def _coefficients(
    mean: Tensor,
    dispersion: Tensor,
    count: int,
    constant: float,
    eps: float,
    weight: Tensor | None,
    running: _Running,
    owner: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused functions' forward coefficients without the fast extra: ``(scale, denom, a)``,
    ``scale = dispersion / count * K`` in ``mean``'s dtype, ``denom = scale + eps``, ``a = weight
    / denom``; and the running statistics' update. One Triton kernel on GPUs, else torch ops."""
    fused = _triton.lp_forward(mean, dispersion, count, constant, eps, weight, running)
    if fused is not None:
        return fused
    per_value = dispersion if count == 1 else dispersion / count  # (L-inf: a mean already)
    scale = (per_value * constant).to(mean.dtype)
    denom = scale + eps
    a = (1.0 / denom) if weight is None else weight / denom
    _update_running(running, mean, scale, owner)
    return scale, denom, a


def _grad_coefficients(
    denom: Tensor,
    weight: Tensor | None,
    sums: tuple[Tensor, Tensor, Tensor],
    factor: float,
    count: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The fused functions' backward coefficients without the fast extra, from ``sums = (S =
    sum(dy (x - mu)), sum(dy), the signs' sum)``: ``(alpha, beta, shift, grad_weight)``, the input
    gradient ``alpha dy + beta sign(x - mu) + shift`` (``alpha = weight / D``, ``beta = -weight S
    / D^2 * factor``, ``shift = -(alpha sum(dy) + beta signs) / count``) and ``S / D`` (from the
    kernel only: ``None`` from the torch ops, which leave it to the caller if it is wanted). One
    Triton kernel on GPUs, else torch ops."""
    fused = _triton.lp_backward(denom, weight, sums, factor, count)
    if fused is not None:
        return fused
    sum_dy_z, sum_dy, sign_sum = sums
    gamma = torch.ones_like(denom) if weight is None else weight
    alpha = gamma / denom
    beta = -gamma * sum_dy_z / denom.square() * factor
    shift = -(alpha * sum_dy + beta * sign_sum) / count
    return alpha, beta, shift, None


def _fused(x: Tensor, *params: Tensor | None) -> bool:
    """Whether the fused functions (:class:`L1BatchNormTrain`, :class:`LinfBatchNormTrain`) apply:
    eager float32/float64 with matching parameters (low precision, ``torch.compile``,
    ``torch.func`` transforms and forward-mode AD use the composite ops, which have jvp rules)."""
    return (
        x.dtype in (torch.float32, torch.float64)
        and x.dim() >= 2
        and all(t is None or (t.dtype == x.dtype and t.device == x.device) for t in params)
        and not compiling()
        and not torch._C._are_functorch_transforms_active()
        and forward_ad._current_level < 0  # not inside a forward-AD dual_level
    )


class L1BatchNormTrain(torch.autograd.Function):
    """Training-mode L1 batch norm, ``y = weight * (x - mu) / (K mean|x - mu| + eps) + bias``, with
    its own backward, layout-preserving, saving only ``x`` and per-channel statistics (autograd
    through the composite ops keeps three activation-sized tensors and, on channels-last input,
    runs mixed-layout kernels ~10x slower). Forward without activation-sized scratch
    (channels-first, channels-last and ``(N, C)`` layouts; others are reduced whole):
    ``sum |x - mu|`` chunk by chunk through a cache-sized buffer (:func:`_abs_deviation_sums`),
    then the output in one pass from ``x`` (centred data) or from ``x - mu`` (far off-centre,
    exact there). Backward: the per-channel sums, ``sign(x - mu)`` into one buffer that becomes
    the input gradient (two more passes).

    Per channel over M values, with ``z = x - mu``, ``D = K mean|z| + eps``, ``h = weight * dy``:
    ``dx = h / D - K sign(z) sum(h z) / (M D^2)``, minus its mean over the channel.
    ``apply(x, weight, bias, eps, K)`` returns ``(y, mu, K mean|z|)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        constant: float,
        running: _Running = None,
        owner: str = "L1 batch norm",
    ) -> tuple[Tensor, Tensor, Tensor]:
        count = x.numel() // x.shape[1]
        z = None
        if on_accelerator(x):
            # With triton: the mean, then one kernel reading sum |x - mean| and the sign sums
            # (the backward's), then the output in one pass (four transfers of the activation).
            # Without: z = x - mean into the buffer that becomes the output, and sum |z| as its
            # L1 norm (no |z| written): six transfers where the CPU's chunks take ten, and a
            # dozen fewer launches. No chunks: each costs a few launches (~5-10 us of host time)
            # whatever its size; 512 KiB ones made L1 batch norm 27-111x BatchNorm2d's time on
            # an H200 at 128x128x56x56 (400 chunks, 2026-12-04).
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dims)
            fused = _triton.l1_sums(x, mean)  # one read, with the backward's sign sums
            if fused is not None:
                sums, signs = fused
            else:
                z = channel_affine(x, None, -mean)
                sums, signs = torch.linalg.vector_norm(z, 1, dims), None
        else:
            mean = _channel_mean(x, count)
            # channels-last with the fast extra, when the input's gradient will be needed: sum
            # sign(x - mu) too, kept for the backward (which then takes its other two sums from
            # torch's kernel, faster there than the loop's)
            sums, signs = _abs_deviation_sums(x, mean, ctx.needs_input_grad[0])
        extra = () if signs is None else (signs,)
        # the L1 divisor is ~1 std (0.8 without the Gaussian constant): centred within 8 of them
        if _epilogues(x, running):
            constants = (eps, constant, 1, 8.0)
            return _epilogue_forward(
                ctx, (x, weight, mean, *extra), sums, count, constants, bias, running, owner
            )
        scale, denom, a = _coefficients(mean, sums, count, constant, eps, weight, running, owner)
        _remember(ctx, (x, weight, mean, denom, *extra), eps, constant, 1, bias, scale, 8.0)
        if z is not None:  # (on accelerators ctx.centred is False) the output from z, in place
            return channel_affine(z, a, bias, out=z), mean, scale
        y = _triton.lp_pass(x, mean, a, bias) if signs is not None and on_accelerator(x) else None
        if y is not None:  # the kernel's sums: the output in one more pass
            return y, mean, scale
        return _scaled_output(x, mean, a, bias, ctx.centred), mean, scale

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor | None, _grad_mean: Tensor | None, _grad_scale: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        if grad is None:  # grads are not materialized: no gradient reached the output
            return (None,) * 7
        x, weight, mean, denom, *counted = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # double backward: differentiate the composite formula
            return (*_composite_grads(ctx, x, weight, grad, "1"), None, None, None, None)
        known = counted[0] if counted else None
        grad, count, sum_dy_z, sum_dy, total_sign = _grad_sums(ctx, grad, x, mean, True, known)
        if total_sign is not None:  # the fast extra: one epilogue, the input gradient in one pass
            sums = torch.stack((sum_dy_z, sum_dy, total_sign))
            factor = ctx.constant / count
            alpha, beta, shift, grad_w, grad_b = kernels.lp_grad_coefficients(
                denom, weight, sums, factor, count
            )
            return (
                kernels.input_grad(grad, x, mean, alpha, beta, shift, signs=True)
                if need_x
                else None,
                grad_w if need_w and weight is not None else None,
                grad_b if need_b and ctx.has_bias else None,
                None,
                None,
                None,
                None,
            )
        grad_x = grad_w = None
        if need_x:
            # a * dy + b * sign(x - mu) + c: one kernel on accelerators given the forward's sign
            # sums (its statistics kernel counted them), else sign(x - mu) in the buffer that
            # becomes dx, then whole-tensor passes over it (chunk by chunk, five broadcast ops
            # per chunk measured 1.05-1.14x slower)
            fused = known is not None and on_accelerator(x)
            sign = None if fused else channel_affine(x, None, -mean).sign_()
            signs = known if sign is None else channel_sums(sign)
            assert signs is not None  # (fused: the forward's)
            alpha, beta, shift, grad_w = _grad_coefficients(
                denom, weight, (sum_dy_z, sum_dy, signs), ctx.constant / count, count
            )
            if fused:
                grad_x = _triton.lp_pass(x, mean, alpha, beta, shift, grad=grad)
            if grad_x is None:
                sign = channel_affine(x, None, -mean).sign_() if sign is None else sign
                grad_x = channel_affine(sign, beta, shift, out=sign)
                grad_x.addcmul_(grad, alpha.view(channel_view_shape(x.dim(), x.shape[1])))
        return (
            grad_x,
            (sum_dy_z / denom if grad_w is None else grad_w)
            if need_w and weight is not None
            else None,
            sum_dy if need_b and ctx.has_bias else None,
            None,
            None,
            None,
            None,
        )


# Chunks of about this many bytes keep the element-wise passes of the fused L1 functions in the
# cache (a core's L2 here; measured 128 KiB-2 MiB with benchmarks/layers.py shapes: 512 KiB-1 MiB
# fastest, forward ~1.5x faster than passes over a full-size scratch tensor). On such chunks
# torch's broadcast ops beat the batch-norm kernel (channel_affine) by 1.3-2.6x.
_CHUNK_BYTES = 1 << 19


def _channel_chunks(x: Tensor) -> tuple[tuple[Tensor, ...], list[int], list[int]]:
    """Chunks of an ``(N, C, *)`` tensor, ~``_CHUNK_BYTES`` each: ``(chunks, dims to reduce per
    channel, per-channel view shape)``. Channels-first tensors are cut along the batch (``(k, C,
    positions)`` views), channels-last and ``(N, C)`` ones along their rows of ``C`` values
    (``(rows, C)`` views); other layouts come whole."""
    c = x.shape[1]
    layout = storage_layout(x)
    if layout == "first":
        rows, dims, view = x.view(x.shape[0], c, -1), [0, 2], [1, c, 1]
    elif layout == "last":
        rows, dims, view = x.movedim(1, -1).view(-1, c), [0], [c]
    else:
        return (x,), [0, *range(2, x.dim())], channel_view_shape(x.dim(), c)
    per = max(1, _CHUNK_BYTES // (rows[0].numel() * x.element_size()))
    return torch.split(rows, per), dims, view


# Channels-last tensors of at least this many channels and at least this many bytes get their
# channel sums from the fast extra's loop (in-process A/B against torch's sum over dims (0, 2, 3),
# 1 thread, 2026-12-04): 0.43-0.49x at 256x256x14x14 (51 MB), 0.57-0.59x at 128x64x32x32 and
# 64x128x32x32, 0.83-0.95x at 64x64x32x32 (16.8 MB, in this machine's 32 MiB L3), 0.96x at
# 48x64x32x32 (12.6 MB). Not for fewer channels, where torch's reduction is fast and the loop's
# short rows are not: 2.2x at 128x32x32x32 and 256x32x28x28, 1.6x at 128x16x64x64 (33.5 MB); nor
# for small tensors (1.4-1.5x at 16-32x64x32x32, and the call's fixed cost: 3-7x below 1 MB).
# Inside a training step the input comes from memory more often than in a forward-only loop: L1
# forward+backward at 64x64x32x32 0.94x with the loop's sums (forward alone 0.91x).
_LOOP_SUMS_BYTES = 12 << 20
_LOOP_SUMS_CHANNELS = 64


def _channel_mean(x: Tensor, count: int) -> Tensor:
    """The per-channel mean of ``x`` (``count`` values each) in its dtype."""
    if (
        x.numel() * x.element_size() >= _LOOP_SUMS_BYTES
        and x.shape[1] >= _LOOP_SUMS_CHANNELS
        and storage_layout(x) == "last"
        and kernels.usable(x)
    ):
        return (kernels.abs_deviation_sums(x, None)[0] / count).to(x.dtype)
    return channel_sums(x) / count


def _abs_deviation_sums(
    x: Tensor, mean: Tensor, signs: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Per-channel ``sum |x - mean|`` (float64), chunk by chunk through one small buffer: one read
    of ``x``, no activation-sized scratch (but for layouts :func:`_channel_chunks` takes whole);
    with the fast extra one fused loop (:func:`normlab.functional._kernels.abs_deviation_sums`),
    which with ``signs`` on channels-last storage also counts ``sum sign(x - mean)`` (else
    ``None``)."""
    if kernels.usable(x):
        return kernels.abs_deviation_sums(x, mean, signs)
    chunks, dims, view = _channel_chunks(x)
    # float64 totals across chunks (where the device has float64)
    total = x.new_zeros(x.shape[1], dtype=x.dtype if x.device.type == "mps" else torch.float64)
    buffer = torch.empty_like(chunks[0])
    mu = mean.view(view)
    for xc in chunks:
        part = torch.sub(xc, mu, out=buffer[: xc.shape[0]])
        total += part.abs_().sum(dims)
    return total, None


def _scaled_output(
    x: Tensor, mean: Tensor, a: Tensor, bias: Tensor | None, centred: bool
) -> Tensor:
    """``(x - mean) * a + bias`` per channel: one pass from ``x`` for ``centred`` data (the
    folded shift loses nothing near zero), else centred first into the buffer that becomes the
    output (folding a far off-centre mean into the shift would cancel)."""
    if centred:
        return channel_affine(x, a, -mean * a if bias is None else bias - mean * a)
    z = channel_affine(x, None, -mean)
    return channel_affine(z, a, bias, out=z)


def _remember(
    ctx: Any,
    saved: tuple[Tensor | None, ...],
    eps: float,
    constant: float,
    k: int,
    bias: Tensor | None,
    scale: Tensor,
    centred_within: float,
) -> None:
    """What the fused functions keep for backward; ``saved`` is ``(x, weight, mean, denom, ...)``.
    ``ctx.centred``: every channel's ``|mean|`` within ``centred_within`` divisors of zero (about
    8 standard deviations: then the group-norm kernel's gradient sums and the folded output are
    accurate). On accelerators it is ``False`` without looking (the route accurate for any data,
    one more elementwise pass, where looking would be a host sync: :func:`on_device_only`)."""
    mean, denom = saved[2], saved[3]
    assert mean is not None
    assert denom is not None
    centred = not on_device_only(mean) and bool((mean.abs() <= centred_within * denom).all())
    _keep(ctx, saved, eps, constant, k, bias, scale, centred)


def _keep(
    ctx: Any,
    saved: tuple[Tensor | None, ...],
    eps: float,
    constant: float,
    k: int,
    bias: Tensor | None,
    scale: Tensor,
    centred: bool,
) -> None:
    """:func:`_remember` with the centring test's result given."""
    ctx.save_for_backward(*saved)
    ctx.eps, ctx.constant, ctx.k, ctx.centred = eps, constant, k, centred
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(saved[2], scale)
    ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (unused) grads


def _grad_sums(
    ctx: Any,
    grad: Tensor,
    x: Tensor,
    mean: Tensor,
    signs: bool = False,
    known_signs: Tensor | None = None,
) -> tuple[Tensor, int, Tensor, Tensor, Tensor | None]:
    """``(grad in x's layout, values per channel, sum(dy * (x - mean)), sum(dy), sum sign(x -
    mean))`` per channel, the sums read at once; the sign sum only when ``signs`` and the fast
    extra's loops serve ``x`` (else ``None``; the three sums are float64 then, else ``x``'s
    dtype). ``known_signs``: the sign sum counted by the forward (channels-last), where torch's
    kernel reads the other two sums faster than the loop (1.4x at 64x64x32x32, equal at
    256x256x14x14: A/B, 1 thread)."""
    grad = grad.contiguous(memory_format=channels_last_format(x) or torch.contiguous_format)
    count = x.numel() // x.shape[1]
    if signs and kernels.usable(x, grad):
        if known_signs is not None:
            sum_dy_z, sum_dy = centred_grad_sums(grad, x, mean, ctx.centred)
            return grad, count, sum_dy_z.double(), sum_dy.double(), known_signs
        sum_dy_z, sum_dy, total_sign = kernels.grad_sums(grad, x, mean, signs=True)
        return grad, count, sum_dy_z, sum_dy, total_sign
    sum_dy_z, sum_dy = centred_grad_sums(grad, x, mean, ctx.centred)
    return grad, count, sum_dy_z, sum_dy, None


def _composite_grads(
    ctx: Any, x: Tensor, weight: Tensor | None, grad: Tensor, p: P
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Input, weight and bias gradients of the fused functions by autograd through the composite
    formula, differentiably (``create_graph``): their double-backward route. ``ctx`` carries
    ``eps``, ``constant``, ``k``, ``has_bias`` and ``needs_input_grad``."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dims = [0, *range(2, x.dim())]
    view = channel_view_shape(x.dim(), x.shape[1])
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_()
        wg = None
        if weight is not None:
            wg = weight if weight.requires_grad else weight.detach().requires_grad_()
        mu = xg.mean(dims)
        dispersion = lp_dispersion(xg, mu, p, k=ctx.k, gaussian_constant=False)
        y = (xg - mu.view(view)) / (ctx.constant * dispersion + ctx.eps).view(view)
        if wg is not None:
            y = y * wg.view(view)
        wrt = [xg] if wg is None else [xg, wg]
        grads = torch.autograd.grad(y, wrt, grad, create_graph=True)
    return (
        grads[0] if need_x else None,
        grads[1] if need_w and wg is not None else None,
        grad.sum(dims) if need_b and ctx.has_bias else None,
    )


def _block(length: int, low: int, high: int) -> int:
    """Values per block for the top-k search: the largest divisor of ``length`` in
    ``[low, high]``, else ``length`` itself (one block)."""
    return next((b for b in range(high, low - 1, -1) if length % b == 0), length)


def _row_block(x: Tensor) -> int:
    """Rows per block of the torch route's top-k search on channels-last (or ``(N, C)``)
    storage: a divisor of the row count."""
    return _block(x.numel() // x.shape[1], 16, 64)


def _mean_and_tails(x: Tensor, k: int) -> tuple[Tensor, tuple[Any, ...] | None]:
    """The per-channel mean (``x``'s dtype) and, on channels-last storage with the fast extra,
    from the same read what the top-k search needs (:func:`kernels.group_tails`)."""
    count = x.numel() // x.shape[1]
    if storage_layout(x) == "first" or not kernels.usable(x):
        return channel_sums(x) / count, None
    sums, tails = kernels.group_tails(x, k)
    return (sums / count).to(x.dtype), tails


def _top_deviations(
    x: Tensor, mean: Tensor, k: int, tails: tuple[Any, ...] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` largest ``|x - mean|`` per channel without sorting the data: ``(values, offsets,
    signs)``, each ``(C, k)``, with the storage offsets of those values in ``x`` and the signs of
    ``x - mean`` there.

    The values are cut into blocks (:func:`_block`; contiguous runs of positions on channels-first
    storage, runs of rows on channels-last storage); each block's largest deviation is
    ``max(max(x) - mean, mean - min(x))`` (two fast reductions); the ``k`` largest values of a
    channel all lie in its ``k`` blocks with the largest such maxima (any value outside them is
    exceeded by at least one value in each of those ``k`` blocks), so top-k runs only on those
    ``k`` blocks' values. On channels-last storage with the fast extra, ``tails`` (from
    :func:`_mean_and_tails`, gathered during the mean's read) name the few groups of rows to
    read back (:func:`kernels.tail_deviations`).
    """
    c = x.shape[1]
    centre = mean.to(x.dtype).view(c, 1)
    if tails is not None:  # the fast extra (channels-last): a few groups per channel read back
        return kernels.tail_deviations(x, centre.view(c), tails, k)
    fused = _triton.linf_top_deviations(x, mean, k)  # GPUs: two kernels
    if fused is not None:
        return fused
    channel = torch.arange(c, device=x.device).view(c, 1)
    flat = torch.as_strided(x, (x.numel(),), (1,))  # the storage, in order
    if storage_layout(x) == "first":  # storage (N, C, positions): blocks along the positions
        # long blocks: the reductions over them run at bandwidth, and each chosen block is a
        # contiguous run, copied whole
        n = x.shape[0]
        r = x.numel() // (n * c)
        b = _block(r, 64, 256)
        view = x.view(n, c, r // b, b)
        hi = view.amax(3).transpose(0, 1).reshape(c, -1)  # (C, N * blocks per sample)
        lo = view.amin(3).transpose(0, 1).reshape(c, -1)
        worst = torch.maximum(hi - centre, centre - lo)
        chosen = worst.topk(min(k, worst.shape[1]), dim=1).indices  # (C, kb) block ids
        sample, block = chosen // (r // b), chosen % (r // b)
        start = sample * (c * r) + channel * r + block * b
        values = flat.view(-1, b).index_select(0, (start // b).flatten()).view(c, -1)
        offsets = (start.unsqueeze(2) + torch.arange(b, device=x.device)).reshape(c, -1)
    else:  # storage (M, C): blocks of consecutive rows, one strided value per row gathered
        b = _row_block(x)
        view = torch.as_strided(x, (x.numel() // c // b, b, c), (b * c, c, 1))
        worst = torch.maximum(view.amax(1) - centre.t(), centre.t() - view.amin(1)).t()
        chosen = worst.topk(min(k, worst.shape[1]), dim=1).indices
        start = chosen * (b * c) + channel
        offsets = (start.unsqueeze(2) + torch.arange(b, device=x.device) * c).reshape(c, -1)
        values = flat[offsets]
    values = values - centre  # (C, kb * B)
    top = values.abs().topk(k, dim=1)
    return top.values, offsets.gather(1, top.indices), values.gather(1, top.indices).sign()


class LinfBatchNormTrain(torch.autograd.Function):
    """Training-mode L-infinity (top-k) batch norm, ``y = weight * (x - mu) / D + bias`` with
    ``D = K * mean(top_k |x - mu|) + eps`` per channel, with its own backward: the top-k search
    reads ``x`` twice (block maxima and minima, :func:`_top_deviations`; on channels-last storage
    with the fast extra once, with the mean, and then a few groups of rows per channel) instead
    of sorting an activation-sized copy, and the gradient is one per-channel multiply-add over ``dy`` plus a
    sparse correction at the ``k`` selected values of each channel. Saves ``x`` and per-channel
    statistics (and the ``(C, k)`` selection).

    Per channel over M values, with ``z = x - mu``, ``h = weight * dy``, ``T`` the top-k set and
    ``S = sum(h z)``: ``dL/dz_i = h_i / D - S / D^2 * K / k * sign(z_i) [i in T]``, and ``dx`` is
    that minus its mean over the channel. ``apply(x, weight, bias, eps, K, k)`` returns
    ``(y, mu, K mean(top_k |z|))``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        constant: float,
        k: int,
        running: _Running = None,
        owner: str = "L-infinity batch norm",
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean, tails = _mean_and_tails(x, k)
        top, offsets, signs = _top_deviations(x, mean, k, tails)
        # the L-inf divisor is ~1.4 std with Hoffer's constant C(n) (docs of linf_constant), so
        # ~1.4 / C(n) std without it: ~8 std is 6 divisors, or 6 C(n) divisors
        within = 6.0 * min(1.0, constant / linf_constant(x.numel() // x.shape[1]))
        if _epilogues(x, running):
            saved = (x, weight, mean, offsets, signs)
            constants = (eps, constant, k, within)
            return _epilogue_forward(ctx, saved, top.mean(1), 1, constants, bias, running, owner)
        scale, denom, a = _coefficients(mean, top.mean(1), 1, constant, eps, weight, running, owner)
        _remember(
            ctx, (x, weight, mean, denom, offsets, signs), eps, constant, k, bias, scale, within
        )
        y = _triton.lp_pass(x, mean, a, bias) if on_accelerator(x) else None
        if y is not None:  # one pass, centred (ctx.centred is False on accelerators)
            return y, mean, scale
        return _scaled_output(x, mean, a, bias, ctx.centred), mean, scale

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor | None, _grad_mean: Tensor | None, _grad_scale: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        if grad is None:  # grads are not materialized: no gradient reached the output
            return (None,) * 8
        x, weight, mean, denom, offsets, signs = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # double backward: differentiate the composite formula
            return (*_composite_grads(ctx, x, weight, grad, "inf"), None, None, None, None, None)
        grad, count, sum_dy_z, sum_dy, _ = _grad_sums(ctx, grad, x, mean)
        grad_b = sum_dy if need_b and ctx.has_bias else None
        grad_x = grad_w = None
        if need_x:  # the coefficients' step also gives the weight's gradient, S / D
            if _epilogues(x, None):  # one epilogue: alpha, the coefficient per unit sign, shift
                sums = torch.stack((sum_dy_z, sum_dy, signs.sum(1)))
                alpha, coef, shift, grad_w = kernels.lp_grad_coefficients(
                    denom, weight, sums, ctx.constant / ctx.k, count
                )[:4]
            else:
                alpha, coef, shift, grad_w = _grad_coefficients(
                    denom, weight, (sum_dy_z, sum_dy, signs.sum(1)), ctx.constant / ctx.k, count
                )
            grad_x = channel_affine(grad, alpha, shift)
            flat = torch.as_strided(grad_x, (grad_x.numel(),), (1,))
            flat.index_put_((offsets.flatten(),), (coef.view(-1, 1) * signs).flatten(), True)
        if not need_w or weight is None:
            grad_w = None
        elif grad_w is None:
            grad_w = sum_dy_z / denom
        return (grad_x, grad_w, grad_b, None, None, None, None, None)
