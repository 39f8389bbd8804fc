"""Batch norm with a twist: batch renormalization and ghost (virtual-batch) batch norm."""

from __future__ import annotations

import torch
from torch import Tensor

from normlab._checks import check_values_per_channel, fail
from normlab.functional import _triton
from normlab.functional._core import (
    apply_function,
    channels_last_format,
    compiling,
    on_accelerator,
    pool_moments,
    stats_dtype,
    store_if_finite_,
    update_running_stats_,
)
from normlab.functional._fast import (
    BatchNormTrain,
    PerGroupBatchNorm,
    batch_moments,
    use_fast_batch_stats,
    use_given_stats,
)
from normlab.functional._lean import (
    batch_renorm_channels_last,
    ghost_batch_norm_channels_last,
    lean_usable,
    renorm_usable,
)
from normlab.functional.batch_norm import batch_norm_unchecked

__all__ = ["batch_renorm_unchecked", "ghost_batch_norm_unchecked", "renorm_correction"]


def renorm_correction(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """Batch renorm's ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
    ``d = clip((mu_B - mu) / sigma, -d_max, d_max)`` (Ioffe 2017, Alg. 1), from the batch's
    ``mean`` and biased ``var`` and the running ``mu``, ``sigma`` *before* this step's update.
    Both are constants for the gradient (computed without autograd).

    >>> r, d = renorm_correction(torch.tensor([1.0]), torch.tensor([4.0]), torch.tensor([0.0]),
    ...                          torch.tensor([1.0]), 0.0, r_max=3.0, d_max=0.5)
    >>> r.item(), d.item()
    (2.0, 0.5)
    """
    if torch.compiler.is_compiling():
        # An opaque op: the compiled backward must not recompute r and d from the running
        # statistics, which this step updates in place (it would silently use the new ones).
        return _correction_op(  # type: ignore[no-any-return]
            mean,
            var,
            running_mean,
            running_std,
            eps,
            torch.as_tensor(r_max, dtype=torch.float64),
            torch.as_tensor(d_max, dtype=torch.float64),
        )
    return _correction(mean, var, running_mean, running_std, eps, r_max, d_max)


def _correction(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        std = torch.sqrt(var.double() + eps)
        sigma = running_std.double()
        r = (std / sigma).clamp(1.0 / r_max, r_max)  # type: ignore[arg-type]
        d = ((mean.double() - running_mean.double()) / sigma).clamp(-d_max, d_max)  # type: ignore[arg-type]
    return r, d


@torch.library.custom_op("normlab::renorm_correction", mutates_args=())
def _correction_op(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    eps: float,
    r_max: Tensor,
    d_max: Tensor,
) -> tuple[Tensor, Tensor]:
    r, d = _correction(mean, var, running_mean, running_std, eps, r_max, d_max)
    return r.clone(), d.clone()


@_correction_op.register_fake
def _(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    eps: float,
    r_max: Tensor,
    d_max: Tensor,
) -> tuple[Tensor, Tensor]:
    shape = torch.broadcast_shapes(mean.shape, running_mean.shape)  # type: ignore[no-untyped-call]
    return (
        mean.new_empty(shape, dtype=torch.float64),
        mean.new_empty(shape, dtype=torch.float64),
    )


def batch_renorm_unchecked(
    input: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
    owner: str,
) -> Tensor:
    """Batch renormalization (Ioffe, NeurIPS 2017) on validated arguments.

    Training: ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta`` with
    ``sigma_B = sqrt(var_B + eps)`` (biased ``var_B``), ``r``, ``d`` from
    :func:`renorm_correction` (no gradient; ``mu_B`` and ``sigma_B`` get theirs); then in place
    ``mu += momentum * (mu_B - mu)`` and ``sigma += momentum * (sigma_B - sigma)`` -- the paper keeps
    a moving average of the standard deviation, not of the variance. Evaluation:
    ``y = gamma * (x - mu) / sigma + beta``.

    Computed as a batch norm whose affine map absorbs ``r`` and ``d``
    (``gamma' = gamma * r``, ``beta' = gamma * d + beta``), so it runs on the same kernels.
    """
    if not training:  # the eval-mode batch-norm kernel with var = sigma^2 - eps is exact
        var = (running_std.double().square() - eps).clamp_min(0.0).to(running_std.dtype)
        return batch_norm_unchecked(input, running_mean, var, weight, bias, False, 0.0, eps, owner)
    c = input.shape[1]
    check_values_per_channel(
        input, input.numel() // c if c else 0, owner=owner, what="values per channel"
    )
    if renorm_usable(input, weight, bias, running_mean, running_std, r_max, d_max):
        return batch_renorm_channels_last(
            input,
            weight,
            bias,
            running_mean,
            running_std,
            momentum,
            eps,
            float(r_max),
            float(d_max),
            owner,
        )
    if on_accelerator(input) and use_given_stats(input, weight, bias, running_mean, running_std):
        return _renorm_on_device(
            input, weight, bias, running_mean, running_std, momentum, eps, r_max, d_max, owner
        )
    mean, var = batch_moments(input)
    r, d = renorm_correction(mean, var, running_mean, running_std, eps, r_max, d_max)
    dtype = weight.dtype if weight is not None else input.dtype
    new_weight, new_bias = _renorm_affine(weight, bias, r.to(dtype), d.to(dtype))
    y: Tensor
    if use_given_stats(input, new_weight, new_bias):
        # one statistics pass: normalize with the moments already computed for r and d
        y = apply_function(BatchNormTrain, input, new_weight, new_bias, eps, mean, var)[0]
    else:
        y = batch_norm_unchecked(input, None, None, new_weight, new_bias, True, 0.0, eps, owner)
    with torch.no_grad():
        std = torch.sqrt(var + eps)
        new_mean = torch.add(
            running_mean, (mean - running_mean.double()).to(running_mean.dtype), alpha=momentum
        )
        new_std = torch.add(
            running_std, (std - running_std.double()).to(running_std.dtype), alpha=momentum
        )
        store_if_finite_(((running_mean, new_mean), (running_std, new_std)), mean, var, owner=owner)
    return y


def _renorm_affine(
    weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor
) -> tuple[Tensor, Tensor]:
    """Batch norm's affine map with batch renorm's ``r`` and ``d`` absorbed:
    ``(gamma * r, gamma * d + beta)`` (``gamma`` 1 and ``beta`` 0 where absent)."""
    if weight is None:
        return r, d if bias is None else d + bias
    return weight * r, weight * d if bias is None else torch.addcmul(bias, weight, d)


def _renorm_on_device(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_std: Tensor,
    momentum: float,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
    owner: str,
) -> Tensor:
    """Batch renorm's training step on an accelerator, in few small ops: on a GPU each is a kernel
    launch, and the host's time per launch, not these per-channel vectors, sets their cost.
    The batch's statistics (one read), then ``r``, ``d`` and the running averages in the input's
    dtype, then torch's training-mode batch norm with ``r`` and ``d`` folded into its affine map:
    cuDNN's kernels where torch.nn's BatchNorm2d gets them, which on the H200 beat torch's own
    channels-first kernels (backward 640 against 875 us, 128x128x56x56 float32)."""
    with torch.no_grad():
        x = input.detach()
        if channels_last_format(x) is None and x.dtype in (torch.float32, torch.float64):
            # one reduction kernel: 2.2x faster on channels-first input than torch's statistics
            # kernel (173 us against 381 us on the H200 at 128x128x56x56 float32)
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        else:  # channels-last: torch's statistics kernel reads it at full speed (96 us there)
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)  # var: biased
    stats = (mean, var, running_mean, running_std)
    fused = _triton.renorm_step(weight, bias, stats, (r_max, d_max), momentum, eps)
    if fused is not None:  # r, d, the folded affine map and the running update in one kernel
        return torch.batch_norm(
            input, *fused, None, None, True, 0.0, eps, torch.backends.cudnn.enabled
        )
    with torch.no_grad():
        std = (var + eps).sqrt_()
        low = r_max.reciprocal() if isinstance(r_max, Tensor) else 1.0 / r_max
        r = (std / running_std).clamp_(low, r_max)  # type: ignore[arg-type]
        d = ((mean - running_mean) / running_std).clamp_(-d_max, d_max)  # type: ignore[arg-type]
    new_weight, new_bias = _renorm_affine(weight, bias, r, d)
    y = torch.batch_norm(
        input, new_weight, new_bias, None, None, True, 0.0, eps, torch.backends.cudnn.enabled
    )
    with torch.no_grad():
        updates = (
            (running_mean, torch.lerp(running_mean, mean, momentum)),
            (running_std, torch.lerp(running_std, std, momentum)),
        )
        store_if_finite_(updates, var, owner=owner, nonnegative=True)
    return y


def _ghost_on_device(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, sizes: list[int]
) -> tuple[Tensor, tuple[list[Tensor], list[Tensor]]]:
    """Ghost batch norm on accelerators: torch's batch-norm kernels on each virtual batch (a slice
    along the batch, contiguous in both memory formats), the pieces concatenated -- the kernel's
    two reads and a write, then one read and write to concatenate, where the group-norm route's
    transposing copies (two each way) move about twice the bytes; and a handful of launches per
    virtual batch instead of the per-batch sequences of :class:`PerGroupBatchNorm`. Returns ``(y,
    (means, invstds))``: the virtual batches' statistics as torch's kernel saves them, their
    means and ``1 / sqrt(var + eps)`` (:func:`_ghost_moments` recovers the variances)."""
    low = stats_dtype(input.dtype) != input.dtype
    # float32 parameters with low-precision input (torch's accurate mixed-precision path)
    w, b = (None if t is None else t.float() if low else t for t in (weight, bias))
    pieces, means, invstds = [], [], []
    for chunk in torch.split(input, sizes):
        # torch's dispatcher between cuDNN's kernels and its own, as torch.nn's batch norm
        # (cuDNN's took 640 + 264 us for a 205 MB step on the H200, torch's own channels-first
        # ones 887 + 572), returning the saved mean and 1 / sqrt(var + eps) of either
        y, mean, invstd, _, _ = torch._batch_norm_impl_index(
            chunk, w, b, None, None, True, 0.0, eps, torch.backends.cudnn.enabled
        )
        pieces.append(y)
        means.append(mean)
        invstds.append(invstd)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0], (means, invstds)


def _ghost_moments(means: list[Tensor], invstds: list[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """The virtual batches' float64 means and biased variances from what torch's kernel saved
    (variances recovered from its float32 ``1 / sqrt(var + eps)``: relative error ~1e-7 * (var +
    eps) / var, 5e-5 for a near-constant channel of variance 1e-8), which pool into the whole
    batch's."""
    with torch.no_grad():
        mean = torch.stack(means).double()
        var = (torch.stack(invstds).double().pow(-2) - eps).clamp_min(0.0)
    return mean, var


def ghost_batch_norm_unchecked(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    virtual_batch_size: int,
    owner: str,
) -> Tensor:
    """Ghost batch norm (Hoffer, Hubara & Soudry, 2017) on validated arguments.

    Training: the batch (at least ``virtual_batch_size`` samples) is cut into consecutive *virtual
    batches* of ``virtual_batch_size`` samples; each is normalized with its own statistics. A
    ragged remainder of at least 2 samples is a smaller virtual batch of its own; a single
    leftover sample joins the previous virtual batch. The running statistics are updated once per
    call with the statistics of the **whole** batch (exactly as ``BatchNorm`` would), so
    evaluation -- running statistics -- is plain batch norm. Without running statistics,
    evaluation uses virtual batches too.

    Routes: large channels-first and all channels-last virtual batches by
    :class:`~normlab.functional._fast.PerGroupBatchNorm` (each virtual batch normalized into a
    slice of one output; running statistics pooled from the virtual batches' own); others
    (small, 2-D, compiled) by torch's group-norm kernel on a transposed copy ``(k, C, vbs *
    positions)`` (one channel per group), which is exact.
    """
    if running_mean is not None and not training:
        return batch_norm_unchecked(
            input, running_mean, running_var, weight, bias, False, 0.0, eps, owner
        )
    n, c = input.shape[0], input.shape[1]
    check_values_per_channel(
        input, input.numel() // c if c else 0, owner=owner, what="values per channel"
    )
    if n < virtual_batch_size:
        fail(
            ValueError,
            owner,
            "the batch size",
            f"at least virtual_batch_size={virtual_batch_size}",
            f"{n} (input shape {tuple(input.shape)})",
            "use larger batches (e.g. drop_last=True in the DataLoader), a smaller "
            "virtual_batch_size, or .eval() to use the running statistics",
        )
    vbs = virtual_batch_size
    full, rest = divmod(n, vbs)
    if rest == 1:  # a lone sample has no variance: it joins the last full virtual batch
        full, rest = full - 1, vbs + 1
    sizes = [vbs] * full + ([rest] if rest else [])
    if training and lean_usable(input, weight, bias, running_mean, running_var, momentum):
        return ghost_batch_norm_channels_last(
            input, weight, bias, eps, sizes, running_mean, running_var, float(momentum), owner
        )
    y: Tensor
    stats: tuple[Tensor, Tensor] | None = None  # per virtual batch (mean, biased var)
    if on_accelerator(input) and not compiling():
        y, saved = _ghost_on_device(input, weight, bias, eps, sizes)
        count = input.numel() // c
        if (
            training
            and running_mean is not None
            and running_var is not None
            and _triton.ghost_running_update_(
                *saved, sizes, count, eps, momentum, running_mean, running_var
            )
        ):  # pooled and applied in one kernel
            return y
        stats = _ghost_moments(*saved, eps)
    elif not compiling() and (
        channels_last_format(input) is not None
        or (full and use_fast_batch_stats(input[:vbs], weight, bias))
    ):
        # Large channels-first virtual batches (normlab's own statistics, each a contiguous
        # slice) and channels-last ones (torch's kernel, fast there): one function normalizing
        # each virtual batch into slices of one output; their statistics also give the whole
        # batch's, by pooling.
        y, means, _, variances = PerGroupBatchNorm.apply(input, weight, bias, eps, sizes)  # type: ignore[no-untyped-call]
        stats = (means, variances)
    else:
        pieces = []
        if full:
            head = input[: full * vbs]
            # (full * vbs, C, *) -> (full, vbs, C, P) -> (full, C, vbs, P): one row per
            # (chunk, channel)
            grouped = head.reshape(full, vbs, c, -1).transpose(1, 2).contiguous()
            normed = torch.group_norm(grouped, c, weight, bias, eps)
            pieces.append(normed.transpose(1, 2).reshape(head.shape))
        if rest:
            tail = input[full * vbs :]
            pieces.append(
                batch_norm_unchecked(tail, None, None, weight, bias, True, 0.0, eps, owner)
            )
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        # CUDA autocast runs group norm in float32; batch norm returns the input's dtype
        y = y.to(input.dtype)
    if training and running_mean is not None and running_var is not None:
        if stats is not None:  # pooled from the virtual batches (Chan et al.)
            counts = None  # equal virtual batches (the usual case): plain means, fewer ops
            if sizes[-1] != sizes[0]:  # only the last differs: filled on the device (a tensor
                # made from a Python list would be a copy from the host, a sync on a GPU)
                counts = stats[1].new_full((len(sizes), 1), float(sizes[0]))
                counts[-1] = float(sizes[-1])
            mean, var = pool_moments(stats[0].double(), stats[1], 0, counts)
        else:
            mean, var = batch_moments(input)
        update_running_stats_(
            running_mean, running_var, mean, var, input.numel() // c, momentum, owner
        )
    return y
