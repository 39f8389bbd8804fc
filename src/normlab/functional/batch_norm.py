"""Batch norm and instance norm: normalization with statistics that can be tracked for inference."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normlab._checks import (
    check_channels_first,
    check_momentum,
    check_nonempty_batch,
    check_values_per_channel,
    fail,
)
from normlab.functional import _kernels as kernels
from normlab.functional import _triton
from normlab.functional._core import (
    all_finite,
    apply_function,
    channels_last_format,
    compiling,
    finite_statistics,
    on_accelerator,
    on_device_only,
    relayout,
    stats_dtype,
    store_running_stats_,
    update_running_stats_,
)
from normlab.functional._fast import (
    BatchNormTrain,
    ChannelsLastGroupNorm,
    InstanceNormTrain,
    PerGroupBatchNorm,
    channels_last_groups_usable,
    use_fast_batch_stats,
)

__all__ = ["batch_norm", "batch_norm_unchecked", "instance_norm", "instance_norm_unchecked"]


def _check_common(
    owner: str,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
) -> None:
    """Validate the arguments shared by batch and instance norm."""
    check_channels_first(
        input,
        owner=owner,
        eps=eps,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
    )
    if (running_mean is None) != (running_var is None):
        fail(
            ValueError,
            owner,
            "running_mean and running_var",
            "both tensors or both None",
            f"running_mean={'None' if running_mean is None else 'tensor'}, "
            f"running_var={'None' if running_var is None else 'tensor'}",
            "pass both running statistics or neither",
        )
    check_momentum(momentum, owner=owner, allow_none=False)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization (Ioffe & Szegedy, 2015): per-channel statistics over the batch.

    .. math:: y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} \\gamma + \\beta

    For ``input`` of shape ``(N, C, *)``, ``mu`` and ``sigma^2`` are per channel, over ``N`` and all
    trailing dims: per activation for dense ``(N, C)`` input, one scalar per channel (over the batch
    and the positions) for convolutional input.

    * ``training=True`` with running statistics given: normalize with the **batch** statistics
      (biased variance) and update the running buffers in place:
      ``running = (1 - momentum) * running + momentum * batch`` with the **unbiased** batch variance.
    * ``training=False`` with running statistics given: normalize with the running statistics.
    * no running statistics (``None``): always the batch statistics, nothing is updated (torch's
      ``track_running_stats=False``).

    Args:
        input: ``(N, C, *)`` floating-point tensor.
        running_mean, running_var: ``(C,)`` buffers, or ``None`` (both or neither).
        weight, bias: ``(C,)`` affine parameters ``gamma``, ``beta``, or ``None``.
        training: required keyword: whether to use (and track) batch statistics.
        momentum: weight of the new batch in the running average, in [0, 1]. Default 0.1.
        eps: added to the variance inside the square root. Default 1e-5.

    Returns:
        Tensor of the input's shape, dtype and memory format.

    Raises:
        ValueError: a single value per channel when batch statistics are needed (the variance
            would be 0 -- torch raises here too); shapes of parameters or buffers not ``(C,)``;
            ``eps <= 0``; ``momentum`` outside [0, 1].
        TypeError: non-tensor or non-floating-point input.

    Note:
        Large channels-first float32/float64 CPU inputs take a path that computes the batch
        statistics at memory speed (``normlab.functional._fast``); channels-last, low-precision,
        CUDA and small inputs call torch's kernel. Both give the same result to float rounding.

    Example:
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
        >>> batch_norm(x, training=True).round(decimals=4)
        tensor([[-1., -1.],
                [ 1.,  1.]])
    """
    owner = "normlab.functional.batch_norm"
    _check_common(owner, input, running_mean, running_var, weight, bias, momentum, eps)
    return batch_norm_unchecked(
        input, running_mean, running_var, weight, bias, training, momentum, eps, owner
    )


def batch_norm_unchecked(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    owner: str,
) -> Tensor:
    """:func:`batch_norm` for callers that validated the arguments (the modules): no re-checks.

    Still refuses batch statistics from a single value per channel (``owner`` names the caller).
    """
    if running_mean is not None and not training:
        return _native_batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps)
    check_nonempty_batch(input, owner=owner)
    c = input.shape[1]
    count = input.numel() // c if c else 0
    check_values_per_channel(input, count, owner=owner, what="values per channel")
    track = training and running_mean is not None
    if use_fast_batch_stats(input, weight, bias, running_mean, running_var):
        running = None
        if track and running_mean is not None and running_var is not None:
            running = (running_mean, running_var, momentum)
        args = (input, weight, bias, eps, None, None, running, owner)
        return apply_function(BatchNormTrain, *args)[0]  # type: ignore[no-any-return]
    if not track or running_mean is None or running_var is None:
        return _native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
    if isinstance(momentum, Tensor):  # a cumulative average under torch.compile
        y = _native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
        dims = [0, *range(2, input.dim())]
        with torch.no_grad():
            var, mean = torch.var_mean(input.to(stats_dtype(input.dtype)), dims, correction=0)
        update_running_stats_(running_mean, running_var, mean, var, count, momentum, owner)
        return y
    if compiling() or running_mean.dtype != running_var.dtype:
        # torch's kernel updates the running statistics in place and keeps them for its
        # backward: give it copies, and store the result only if it is finite
        new_mean, new_var = running_mean.clone(), running_var.clone()
        y = _native_batch_norm(input, weight, bias, new_mean, new_var, True, momentum, eps)
        store_running_stats_(running_mean, running_var, new_mean, new_var, owner)
        return y
    # Eager: the kernel updates the buffers themselves (as torch.nn's does); their old values,
    # kept in one tensor, go back if this batch's statistics are not finite -- through .data, so
    # that the version counters of the tensors autograd saved do not move. (~5 us less per call
    # than copies in and out: BatchNorm1d on 128x128 takes ~16 us of which ~11 us are torch's.)
    kept = torch.cat((running_mean, running_var))
    y = _native_batch_norm(input, weight, bias, running_mean, running_var, True, momentum, eps)
    if on_device_only(running_var):  # an accelerator: the choice stays on the device, no sync
        olds = ((running_mean.data, kept[:c]), (running_var.data, kept[c:]))
        if _triton.guarded_copy_(olds, (running_var.data,), when_finite=False):  # one kernel
            return y
        with torch.no_grad():
            ok = all_finite(running_var, nonnegative=True)
            for buffer, old in olds:  # (buffers through .data)
                torch.where(ok, buffer, old, out=buffer)
    elif not finite_statistics(running_var, owner=owner):
        running_mean.data.copy_(kept[:c])
        running_var.data.copy_(kept[c:])
    return y


def _native_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    batch_stats: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """torch's batch-norm kernel; float16/bfloat16 input gets float32 parameters and statistics.

    With low-precision parameters torch's kernel folds the statistics into a low-precision
    shift ``bias - mean * scale`` (e.g. -100 in bfloat16 is off by up to 0.25), which costs
    ~10x the output's own rounding error; with float32 parameters (its mixed-precision path) the
    output is exact to rounding. Updated running statistics are copied back to the buffers.
    """
    tensors = (weight, bias, running_mean, running_var)
    lowp = stats_dtype(input.dtype) != input.dtype and any(
        t is not None and t.dtype != torch.float32 for t in tensors
    )
    if not lowp:
        return torch.batch_norm(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            batch_stats,
            momentum,
            eps,
            torch.backends.cudnn.enabled,
        )
    w, b, rm, rv = (None if t is None else t.float() for t in tensors)
    y = torch.batch_norm(
        input, w, b, rm, rv, batch_stats, momentum, eps, torch.backends.cudnn.enabled
    )
    with torch.no_grad():
        for buffer, updated in ((running_mean, rm), (running_var, rv)):
            if batch_stats and buffer is not None and updated is not None:
                buffer.copy_(updated)
    return y


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance normalization (Ulyanov et al., 2016): per sample and channel, over the positions.

    ``mu`` and ``sigma^2`` are computed for each ``(n, c)`` over the trailing (spatial) dims of an
    ``(N, C, *)`` input, then a per-channel ``weight``/``bias`` is applied. This is group norm with
    one channel per group and is computed by torch's group-norm kernel (a test proves equality).

    * running statistics given and ``training=True``: normalize with the instance statistics and
      update the running buffers with their batch average (mean of the per-instance means and of
      the per-instance **unbiased** variances), as torch does;
    * running statistics given and ``training=False``: normalize every sample with the running
      statistics (torch's ``track_running_stats=True`` eval behaviour);
    * no running statistics: always the instance statistics -- the paper's layer, same in train
      and eval.

    Args:
        input: ``(N, C, *)`` floating-point tensor with at least one trailing dim.
        running_mean, running_var: ``(C,)`` buffers, or ``None`` (both or neither).
        weight, bias: ``(C,)`` affine parameters, or ``None``.
        training: required keyword: whether to use (and track) instance statistics.
        momentum: weight of the new batch in the running average, in [0, 1]. Default 0.1.
        eps: added to the variance inside the square root. Default 1e-5.

    Raises:
        ValueError: fewer than 2 positions per instance when instance statistics are needed
            (torch: "Expected more than 1 spatial element when training"), bad shapes, ``eps``,
            ``momentum``.

    Example:
        >>> x = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
        >>> instance_norm(x, training=True).round(decimals=4)
        tensor([[[-1.,  1.],
                 [-1.,  1.]]])
    """
    owner = "normlab.functional.instance_norm"
    _check_common(owner, input, running_mean, running_var, weight, bias, momentum, eps)
    if input.dim() < 3:
        fail(
            ValueError,
            owner,
            "the input",
            "a tensor (N, C, *) with at least one spatial dim",
            f"shape {tuple(input.shape)}",
            "instance norm normalizes over positions; for (N, C) features use LayerNorm",
        )
    return instance_norm_unchecked(
        input, running_mean, running_var, weight, bias, training, momentum, eps, owner
    )


# Channels-last instance norm runs per sample (PerGroupBatchNorm) from this many values per
# sample on (fewer: the per-call overhead outweighs the layout conversions it saves).
_MIN_SAMPLE_CL = 1 << 12


def instance_norm_unchecked(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    owner: str,
) -> Tensor:
    """:func:`instance_norm` for callers that validated the arguments (the modules)."""
    fmt = channels_last_format(input)
    if running_mean is not None and not training:
        y = _native_batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps)
        return y.contiguous(memory_format=fmt or torch.contiguous_format)
    check_nonempty_batch(input, owner=owner)
    n, c = input.shape[0], input.shape[1]
    positions = math.prod(input.shape[2:])
    check_values_per_channel(
        input,
        positions,
        owner=owner,
        what="spatial elements per instance",
        fix="instance norm needs a feature map larger than 1 element; use BatchNorm or "
        "LayerNorm for 1x1 features",
    )
    cpu = not on_accelerator(input)
    if fmt is not None and positions * c >= _MIN_SAMPLE_CL and cpu and not compiling():
        # Channels-last on the CPU: one sample is a channels-last (1, C, *) tensor whose batch statistics
        # are its instance statistics: torch's read-only statistics kernel per sample, then one
        # multiply-add into a channels-last output; the input gradient stays channels-last too
        # (PerGroupBatchNorm, a group per sample).
        y, mean, rstd, _ = PerGroupBatchNorm.apply(input, weight, bias, eps, [1] * input.shape[0])  # type: ignore[no-untyped-call]
    elif channels_last_groups_usable(input, weight, bias):
        # Large channels-last input on accelerators: normalized in its own layout, no copies
        y, mean, rstd = ChannelsLastGroupNorm.apply(input, weight, bias, c, eps)  # type: ignore[no-untyped-call]
    else:
        # Channels-first contiguous: torch's group-norm kernel is accurate and fast there (with
        # the fast extra and a gradient to come, InstanceNormTrain's fused backward); on
        # channels-last input it is slower than a copy plus the channels-first kernel, and its
        # float32 weight gradient is ~40x less accurate (tests/nn/test_parity.py); small
        # channels-last samples take that route too, converted back (torch's instance norm
        # returns channels-first), as do small or low-precision channels-last ones on
        # accelerators (channels_last_groups_usable).
        first = relayout(input, torch.contiguous_format)
        # torch's group-norm kernel takes low-precision input with float32 parameters on the
        # CPU only: on accelerators normlab computes such input in float32 and returns it in
        # its own dtype, as torch.nn's instance norm (batch norm on a reshape) does there
        mixed = (
            not cpu
            and weight is not None
            and weight.dtype == torch.float32
            and first.dtype in (torch.float16, torch.bfloat16)
        )
        if _fused_instance_backward(first, weight, bias):
            y, mean, rstd = InstanceNormTrain.apply(first, weight, bias, eps)  # type: ignore[no-untyped-call]
        elif mixed:
            assert weight is not None
            wide = first.to(weight.dtype)
            y, mean, rstd = torch.native_group_norm(wide, weight, bias, n, c, positions, c, eps)
            y = y.to(first.dtype)
        else:
            y, mean, rstd = torch.native_group_norm(first, weight, bias, n, c, positions, c, eps)
        if fmt is not None:
            y = y.contiguous(memory_format=fmt)
    if training and running_mean is not None and running_var is not None:
        with torch.no_grad():
            var = (rstd.double().pow(-2) - eps).clamp_min(0.0).view(n, c).mean(0)
            update_running_stats_(
                running_mean,
                running_var,
                mean.double().view(n, c).mean(0),
                var,
                positions,
                momentum,
                owner,
            )
    return y


def _fused_instance_backward(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether instance norm of the channels-first ``x`` runs as :class:`InstanceNormTrain`: a
    gradient will be needed and the fast extra's loops read ``x`` (its backward's fused
    per-row pass); parameters of another dtype stay with torch's kernel (which refuses them)."""
    return (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, weight, bias))
        and all(t is None or t.dtype == x.dtype for t in (weight, bias))
        and kernels.usable(x)
    )
