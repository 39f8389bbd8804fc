# mypy: ignore-errors
"""Triton kernels for the per-channel steps of normlab's accelerator routes (see ``_triton.py``,
the only importer: this module needs ``triton``).

Each kernel runs as one program over all channels (a loop over blocks of ``BLOCK`` channels):
its work is a few vectors of ``C`` values, and what it saves is the kernel launches of the ten to
twenty torch ops it replaces, each of which costs a GPU's host tens of microseconds. The
arithmetic is float64 whatever the tensors' dtypes; stores round to each output's dtype.
(Not type-checked: triton.jit kernels take untyped arguments, typed by triton at each launch.)
"""

# (no `from __future__ import annotations`: triton reads `tl.constexpr` annotations as objects)
import triton
import triton.language as tl


@triton.jit
def _all_finite(ptr, n, BLOCK: tl.constexpr):
    """1 if the ``n`` values at ``ptr`` are all finite, else 0 (NaN compares false)."""
    ok = tl.full((), 1, tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float64)
        ok = ok & tl.min((tl.abs(v) < float("inf")).to(tl.int32), axis=0)
    return ok


@triton.jit
def _lerp(a, b, w):
    """torch.lerp's formula: ``a + w (b - a)`` for ``|w| < 0.5``, else ``b - (b - a)(1 - w)``."""
    return tl.where(tl.abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _join(hi, lo):
    """A float64 number passed as two float32 scalar arguments (Triton passes Python floats as
    float32): ``hi + lo``, ~48 bits of it."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def _clamp(v, low, high):
    """torch.clamp: ``v`` into ``[low, high]``, NaN kept (Triton's min/max would drop it)."""
    v = tl.maximum(v, low, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, high, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _move_towards(ptr, offs, current, target, w, ok, updated):
    """A running statistic's update: ``lerp(current, target, w)`` stored at ``ptr + offs`` for
    the channels below ``updated`` (all, or none when ``ok`` is 0: then the target is replaced by
    the current value, so that no inf - inf is computed, which numpy, in the interpreter, would
    report)."""
    new = _lerp(current, tl.where(ok == 1, target, current), w)
    tl.store(ptr + offs, new, mask=offs < updated)


@triton.jit
def guarded_copy(
    check_a,
    n_check_a,
    check_b,
    n_check_b,
    dst_a,
    src_a,
    dst_b,
    src_b,
    n,
    WHEN_FINITE: tl.constexpr,
    CHECK_B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``dst_a[:n] = src_a[:n]`` and ``dst_b[:n] = src_b[:n]`` if every value of ``check_a`` (and
    ``check_b``) is finite (``WHEN_FINITE``), or if one is not (``not WHEN_FINITE``)."""
    ok = _all_finite(check_a, n_check_a, BLOCK)
    if CHECK_B:
        ok = ok & _all_finite(check_b, n_check_b, BLOCK)
    # the channels to copy: all or none (a mask from a scalar condition, as a bound)
    limit = tl.where(ok == 1, n, 0) if WHEN_FINITE else tl.where(ok == 0, n, 0)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < limit
        tl.store(dst_a + offs, tl.load(src_a + offs, mask=m), mask=m)
        tl.store(dst_b + offs, tl.load(src_b + offs, mask=m), mask=m)


@triton.jit
def renorm_step(
    mean_ptr,
    var_ptr,
    running_mean_ptr,
    running_std_ptr,
    weight_ptr,
    bias_ptr,
    r_max_ptr,
    d_max_ptr,
    scale_ptr,
    shift_ptr,
    r_ptr,
    d_ptr,
    n,
    r_max_hi,
    r_max_lo,
    d_max_hi,
    d_max_lo,
    momentum_hi,
    momentum_lo,
    eps_hi,
    eps_lo,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LIMIT_TENSORS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Batch renorm's per-channel step, from the batch's mean and biased variance:
    ``std = sqrt(var + eps)``, ``r = clamp(std / running_std, 1 / r_max, r_max)``,
    ``d = clamp((mean - running_mean) / running_std, -d_max, d_max)``; the affine map with them
    folded in, ``scale = weight r`` and ``shift = weight d + bias`` (``weight`` 1, ``bias`` 0
    where absent), and ``r``, ``d`` for the backward; then the running mean and std move towards
    ``mean`` and ``std`` by ``momentum`` (torch.lerp's formula) if every variance is finite.
    ``r_max``, ``d_max``: 0-dim tensors (``LIMIT_TENSORS``: read on the device, no host sync)
    or numbers; numbers come as two float32 halves (:func:`_join`)."""
    ok = _all_finite(var_ptr, n, BLOCK)
    if LIMIT_TENSORS:
        r_max = tl.load(r_max_ptr).to(tl.float64)
        d_max = tl.load(d_max_ptr).to(tl.float64)
    else:
        r_max = _join(r_max_hi, r_max_lo)
        d_max = _join(d_max_hi, d_max_lo)
    w = _join(momentum_hi, momentum_lo)
    eps = _join(eps_hi, eps_lo)
    updated = tl.where(ok == 1, n, 0)  # the running statistics move in all channels or none
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        mean = tl.load(mean_ptr + offs, mask=m, other=0.0).to(tl.float64)
        var = tl.load(var_ptr + offs, mask=m, other=0.0).to(tl.float64)
        running_mean = tl.load(running_mean_ptr + offs, mask=m, other=0.0).to(tl.float64)
        running_std = tl.load(running_std_ptr + offs, mask=m, other=1.0).to(tl.float64)
        std = tl.sqrt(var + eps)
        r = _clamp(std / running_std, 1.0 / r_max, r_max)
        d = _clamp((mean - running_mean) / running_std, -d_max, d_max)
        scale = r
        shift = d
        if HAS_WEIGHT:
            gamma = tl.load(weight_ptr + offs, mask=m, other=1.0).to(tl.float64)
            scale = gamma * r
            shift = gamma * d
        if HAS_BIAS:
            shift = shift + tl.load(bias_ptr + offs, mask=m, other=0.0).to(tl.float64)
        tl.store(scale_ptr + offs, scale, mask=m)
        tl.store(shift_ptr + offs, shift, mask=m)
        tl.store(r_ptr + offs, r, mask=m)
        tl.store(d_ptr + offs, d, mask=m)
        _move_towards(running_mean_ptr, offs, running_mean, mean, w, ok, updated)
        _move_towards(running_std_ptr, offs, running_std, std, w, ok, updated)


@triton.jit
def renorm_weight_grad(
    grad_scale_ptr, grad_shift_ptr, r_ptr, d_ptr, out_ptr, n, BLOCK: tl.constexpr
):
    """``grad_weight = grad_scale r + grad_shift d`` (the affine map's ``scale = weight r``,
    ``shift = weight d + bias``)."""
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        gs = tl.load(grad_scale_ptr + offs, mask=m, other=0.0).to(tl.float64)
        gb = tl.load(grad_shift_ptr + offs, mask=m, other=0.0).to(tl.float64)
        r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float64)
        d = tl.load(d_ptr + offs, mask=m, other=0.0).to(tl.float64)
        tl.store(out_ptr + offs, gs * r + gb * d, mask=m)


@triton.jit
def renorm_limits(schedule_ptr, count_ptr, out_ptr, BLOCK: tl.constexpr):
    """Batch renorm's ``(r_max, d_max)`` at step ``count`` of the schedule ``(r_max, d_max,
    warmup, r_end, d_end)``: each limit moves from its neutral value (1, 0) to its final one as
    ``(count - warmup) / (end - warmup)`` goes from 0 to 1 (a ramp of no length: at once when
    the warm-up ends), torch.lerp's formula; float64."""
    t = tl.load(count_ptr).to(tl.float64)
    warmup = tl.load(schedule_ptr + 2).to(tl.float64)
    offs = tl.arange(0, 2)
    final = tl.load(schedule_ptr + offs).to(tl.float64)
    end = tl.load(schedule_ptr + 3 + offs).to(tl.float64)
    neutral = tl.where(offs == 0, 1.0, 0.0).to(tl.float64)
    span = end - warmup
    ramp = (t - warmup) / tl.where(span > 0, span, 1.0)
    progress = tl.where(span > 0, ramp, tl.where(t >= warmup, 1.0, 0.0))
    progress = tl.minimum(tl.maximum(progress, 0.0), 1.0)
    tl.store(out_ptr + offs, _lerp(neutral, final, progress))


@triton.jit
def lp_forward(
    mean_ptr,
    dispersion_ptr,
    weight_ptr,
    running_mean_ptr,
    running_scale_ptr,
    scale_ptr,
    denom_ptr,
    a_ptr,
    n,
    count,
    constant_hi,
    constant_lo,
    eps_hi,
    eps_lo,
    momentum_hi,
    momentum_lo,
    momentum_ptr,
    HAS_WEIGHT: tl.constexpr,
    RUNNING: tl.constexpr,
    MOMENTUM_TENSOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Lp batch norm's per-channel forward step (the fast extra's ``_lp_epilogue`` on GPUs):
    ``scale = dispersion / count * K``, ``denom = scale + eps``, ``a = weight / denom``; then,
    with ``RUNNING`` and if every mean and dispersion is finite, the running mean and scale move
    towards ``mean`` and ``scale`` by ``momentum`` (torch.lerp's formula; ``MOMENTUM_TENSOR``: a
    0-dim tensor, a cumulative average's factor kept on the device)."""
    ok = _all_finite(mean_ptr, n, BLOCK) & _all_finite(dispersion_ptr, n, BLOCK)
    updated = tl.where(ok == 1, n, 0)
    constant = _join(constant_hi, constant_lo)
    eps = _join(eps_hi, eps_lo)
    w = tl.load(momentum_ptr).to(tl.float64) if MOMENTUM_TENSOR else _join(momentum_hi, momentum_lo)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        dispersion = tl.load(dispersion_ptr + offs, mask=m, other=0.0).to(tl.float64)
        scale = dispersion / count * constant
        denom = scale + eps
        a = 1.0 / denom
        if HAS_WEIGHT:
            a = tl.load(weight_ptr + offs, mask=m, other=1.0).to(tl.float64) / denom
        tl.store(scale_ptr + offs, scale, mask=m)
        tl.store(denom_ptr + offs, denom, mask=m)
        tl.store(a_ptr + offs, a, mask=m)
        if RUNNING:
            mean = tl.load(mean_ptr + offs, mask=m, other=0.0).to(tl.float64)
            running_mean = tl.load(running_mean_ptr + offs, mask=m, other=0.0).to(tl.float64)
            running_scale = tl.load(running_scale_ptr + offs, mask=m, other=0.0).to(tl.float64)
            _move_towards(running_mean_ptr, offs, running_mean, mean, w, ok, updated)
            _move_towards(running_scale_ptr, offs, running_scale, scale, w, ok, updated)


@triton.jit
def lp_backward(
    denom_ptr,
    weight_ptr,
    sum_dy_z_ptr,
    sum_dy_ptr,
    sign_sum_ptr,
    alpha_ptr,
    beta_ptr,
    shift_ptr,
    grad_weight_ptr,
    n,
    count,
    factor_hi,
    factor_lo,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Lp batch norm's per-channel backward step (the fast extra's ``_lp_grad_epilogue`` on
    GPUs), from ``D = denom``, ``S = sum(dy (x - mu))``, ``sum(dy)`` and the sum of the signs
    that carry the dispersion's gradient: ``alpha = weight / D``, ``beta = -weight S / D^2 *
    factor``, ``shift = -(alpha sum(dy) + beta signs) / count`` (the input gradient is
    ``alpha dy + beta sign(x - mu) + shift``) and the weight's gradient ``S / D``."""
    factor = _join(factor_hi, factor_lo)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        d = tl.load(denom_ptr + offs, mask=m, other=1.0).to(tl.float64)
        s = tl.load(sum_dy_z_ptr + offs, mask=m, other=0.0).to(tl.float64)
        sum_dy = tl.load(sum_dy_ptr + offs, mask=m, other=0.0).to(tl.float64)
        signs = tl.load(sign_sum_ptr + offs, mask=m, other=0.0).to(tl.float64)
        g = tl.full([BLOCK], 1.0, tl.float64)
        if HAS_WEIGHT:
            g = tl.load(weight_ptr + offs, mask=m, other=1.0).to(tl.float64)
        alpha = g / d
        beta = -g * s / (d * d) * factor
        tl.store(alpha_ptr + offs, alpha, mask=m)
        tl.store(beta_ptr + offs, beta, mask=m)
        tl.store(shift_ptr + offs, -(alpha * sum_dy + beta * signs) / count, mask=m)
        tl.store(grad_weight_ptr + offs, s / d, mask=m)


@triton.jit
def ghost_running_update(
    stats_ptr,
    running_mean_ptr,
    running_var_ptr,
    momentum_ptr,
    n,
    groups,
    size,
    last_size,
    eps_hi,
    eps_lo,
    momentum_hi,
    momentum_lo,
    bessel_hi,
    bessel_lo,
    MOMENTUM_TENSOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Ghost batch norm's running statistics from its virtual batches, in one kernel: ``stats``
    is ``(2 groups, n)``, the virtual batches' means, then their ``1 / sqrt(var + eps)`` (what
    torch's batch-norm kernels save), the batches of ``size`` samples but the last of
    ``last_size``. Pooled per channel by Chan's rule (``var = mean_g(var_g) + mean_g((mean_g -
    mean)^2)``, weighted by the sizes; ``var_g = max(invstd^-2 - eps, 0)``), then torch's update
    ``running (1 - m) + m batch`` with the unbiased variance (``bessel``), or ``running + (batch
    - running) m`` for a 0-dim ``momentum`` tensor -- if every pooled statistic is finite."""
    eps = _join(eps_hi, eps_lo)
    bessel = _join(bessel_hi, bessel_lo)
    w = tl.load(momentum_ptr).to(tl.float64) if MOMENTUM_TENSOR else _join(momentum_hi, momentum_lo)
    total = (groups - 1) * size + last_size
    ok = tl.full((), 1, tl.int32)
    for start in range(0, n, BLOCK):  # pass 1: are the pooled statistics finite?
        offs = start + tl.arange(0, BLOCK)
        mean, var = _pooled(
            stats_ptr, offs, offs < n, n, groups, size, last_size, total, eps, BLOCK
        )
        good = (tl.abs(mean) < float("inf")) & (tl.abs(var) < float("inf"))
        ok = ok & tl.min(tl.where(offs < n, good, True).to(tl.int32), axis=0)
    updated = tl.where(ok == 1, n, 0)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        mean, var = _pooled(stats_ptr, offs, m, n, groups, size, last_size, total, eps, BLOCK)
        mean = tl.where(ok == 1, mean, 0.0)  # (no inf arithmetic where nothing is stored)
        var = tl.where(ok == 1, var, 0.0) * bessel
        running_mean = tl.load(running_mean_ptr + offs, mask=m, other=0.0).to(tl.float64)
        running_var = tl.load(running_var_ptr + offs, mask=m, other=0.0).to(tl.float64)
        if MOMENTUM_TENSOR:
            new_mean = running_mean + (mean - running_mean) * w
            new_var = running_var + (var - running_var) * w
        else:
            new_mean = running_mean * (1.0 - w) + mean * w
            new_var = running_var * (1.0 - w) + var * w
        tl.store(running_mean_ptr + offs, new_mean, mask=offs < updated)
        tl.store(running_var_ptr + offs, new_var, mask=offs < updated)


@triton.jit
def _pooled(stats_ptr, offs, m, n, groups, size, last_size, total, eps, BLOCK: tl.constexpr):
    """The pooled mean and biased variance of channels ``offs`` (see ghost_running_update)."""
    mean = tl.zeros([BLOCK], tl.float64)
    for g in range(0, groups):
        weight = tl.where(g == groups - 1, last_size, size).to(tl.float64) / total
        mean += weight * _no_inf(
            tl.load(stats_ptr + g * n + offs, mask=m, other=0.0).to(tl.float64)
        )
    var = tl.zeros([BLOCK], tl.float64)
    for g in range(0, groups):
        weight = tl.where(g == groups - 1, last_size, size).to(tl.float64) / total
        mean_g = _no_inf(tl.load(stats_ptr + g * n + offs, mask=m, other=0.0).to(tl.float64))
        invstd = tl.load(stats_ptr + (groups + g) * n + offs, mask=m, other=1.0).to(tl.float64)
        var_g = tl.maximum(1.0 / (invstd * invstd) - eps, 0.0, propagate_nan=tl.PropagateNan.ALL)
        var += weight * (var_g + (mean_g - mean) * (mean_g - mean))
    return mean, var


@triton.jit
def standardize_rows(w_ptr, out_ptr, mean_ptr, rstd_ptr, k, eps_hi, eps_lo, BLOCK: tl.constexpr):
    """Weight standardization, one program per row (output unit) of ``k`` values: ``out = (w -
    mean) * rstd`` with the row's mean and ``rstd = 1 / sqrt(var + eps)`` (biased variance, both
    float64, the variance from the deviations: two reads of the row), which are also stored."""
    row = tl.program_id(0).to(tl.int64)
    eps = _join(eps_hi, eps_lo)
    total = tl.zeros([BLOCK], tl.float64)
    for start in range(0, k, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.load(w_ptr + row * k + offs, mask=offs < k, other=0.0).to(tl.float64)
    mean = tl.sum(total, axis=0) / k
    squares = tl.zeros([BLOCK], tl.float64)
    for start in range(0, k, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < k
        v = tl.load(w_ptr + row * k + offs, mask=m, other=0.0).to(tl.float64)
        squares += tl.where(m, (v - mean) * (v - mean), 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / k + eps)
    for start in range(0, k, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < k
        v = tl.load(w_ptr + row * k + offs, mask=m, other=0.0).to(tl.float64)
        tl.store(out_ptr + row * k + offs, (v - mean) * rstd, mask=m)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def standardize_rows_backward(w_ptr, grad_ptr, mean_ptr, rstd_ptr, out_ptr, k, BLOCK: tl.constexpr):
    """The weight's gradient through weight standardization, per row: with ``h = (w - mean)
    rstd`` and the output's gradient ``g``, ``dw = rstd (g - mean(g) - h mean(g h))``."""
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(mean_ptr + row).to(tl.float64)
    rstd = tl.load(rstd_ptr + row).to(tl.float64)
    sum_g = tl.zeros([BLOCK], tl.float64)
    sum_gh = tl.zeros([BLOCK], tl.float64)
    for start in range(0, k, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < k
        g = tl.load(grad_ptr + row * k + offs, mask=m, other=0.0).to(tl.float64)
        h = (tl.load(w_ptr + row * k + offs, mask=m, other=0.0).to(tl.float64) - mean) * rstd
        sum_g += g
        sum_gh += tl.where(m, g * h, 0.0)
    mean_g = tl.sum(sum_g, axis=0) / k
    mean_gh = tl.sum(sum_gh, axis=0) / k
    for start in range(0, k, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < k
        g = tl.load(grad_ptr + row * k + offs, mask=m, other=0.0).to(tl.float64)
        h = (tl.load(w_ptr + row * k + offs, mask=m, other=0.0).to(tl.float64) - mean) * rstd
        tl.store(out_ptr + row * k + offs, rstd * (g - mean_g - h * mean_gh), mask=m)


@triton.jit
def linf_block_worst(
    x_ptr, mean_ptr, worst_ptr, c, p, per_row, nb, B: tl.constexpr, BLOCK: tl.constexpr
):
    """L-inf batch norm's top-k search, first step, on a contiguous ``(N, C, P)`` tensor: for each
    channel (program axis 1, at most 65535 on CUDA) and each block of ``B`` consecutive
    positions of one sample (``per_row`` blocks per sample, ``nb`` per channel; programs along
    axis 0 take ``BLOCK // B`` blocks each), the largest ``|x - mean|`` in it, into ``worst``
    ``(C, nb)``."""
    ch = tl.program_id(1).to(tl.int64)
    blocks = tl.program_id(0).to(tl.int64) * (BLOCK // B) + tl.arange(0, BLOCK // B)
    j = tl.arange(0, B)
    sample = blocks // per_row
    pos = (blocks % per_row) * B
    address = sample[:, None] * c * p + ch * p + pos[:, None] + j[None, :]
    m = (blocks[:, None] < nb) & (pos[:, None] + j[None, :] < p)
    centre = _no_inf(tl.load(mean_ptr + ch))
    v = tl.load(x_ptr + address, mask=m, other=0.0)
    deviation = _nan_first(tl.where(m, tl.abs(v - centre), -float("inf")))
    tl.store(worst_ptr + ch * nb + blocks, tl.max(deviation, axis=1), mask=blocks < nb)


@triton.jit
def linf_row_worst(
    x_ptr, mean_ptr, worst_ptr, c, p, nb, B: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr
):
    """L-inf batch norm's top-k search, first step, on rows of ``C`` values (channels-last or
    ``(N, C)`` storage, ``p`` rows): for each block of ``B`` consecutive rows (program axis 0)
    and each channel of a tile of ``CT`` (axis 1: the reads run along the contiguous channels),
    the largest ``|x - mean|`` in the block, into ``worst`` ``(C, nb)``. (``BLOCK``: unused,
    every launch passes it.)"""
    block = tl.program_id(0).to(tl.int64)
    chs = tl.program_id(1).to(tl.int64) * CT + tl.arange(0, CT)
    rows = block * B + tl.arange(0, B)
    m = (rows[:, None] < p) & (chs[None, :] < c)
    centre = _no_inf(tl.load(mean_ptr + chs, mask=chs < c, other=0.0))
    v = tl.load(x_ptr + rows[:, None] * c + chs[None, :], mask=m, other=0.0)
    deviation = _nan_first(tl.where(m, tl.abs(v - centre[None, :]), -float("inf")))
    tl.store(worst_ptr + chs * nb + block, tl.max(deviation, axis=0), mask=chs < c)


@triton.jit
def linf_select(
    x_ptr,
    mean_ptr,
    worst_ptr,
    top_ptr,
    offsets_ptr,
    signs_ptr,
    c,
    p,
    per_row,
    nb,
    k,
    K_PAD: tl.constexpr,
    B: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    """L-inf batch norm's top-k search, second step, one program per channel: the ``k`` blocks
    with the largest ``worst`` (every value outside them is exceeded by at least one value in
    each of them, so the ``k`` largest deviations lie there), then the ``k`` largest ``|x - mean|``
    among their values: into ``top``, ``offsets`` (storage offsets) and ``signs`` (of ``x -
    mean``), each ``(C, k)``. Ties go to the lower block and offset. ``ROWS``: ``x`` is ``p``
    rows of ``c`` values (:func:`linf_row_worst`'s blocks; one sample, ``per_row = nb``), else
    ``(N, C, p)`` (:func:`linf_block_worst`'s)."""
    ch = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, K_PAD)
    chosen = tl.full([K_PAD], -1, tl.int64)
    last_value = tl.full((), float("inf"), tl.float64)
    last_index = tl.full((), -1, tl.int64)
    for t in range(0, k):  # the next block in (worst descending, index ascending) order
        best_value = tl.full((), -float("inf"), tl.float64)
        best_index = tl.full((), nb, tl.int64)
        for start in range(0, nb, BLOCK):
            idx = start + tl.arange(0, BLOCK).to(tl.int64)
            w = tl.load(worst_ptr + ch * nb + idx, mask=idx < nb, other=-float("inf"))
            w = w.to(tl.float64)
            after = (w < last_value) | ((w == last_value) & (idx > last_index))
            w = tl.where(after & (idx < nb), w, -float("inf"))
            top = tl.max(w, axis=0)
            first = tl.min(tl.where((w == top) & after & (idx < nb), idx, nb), axis=0)
            better = (top > best_value) | ((top == best_value) & (first < best_index))
            best_index = tl.where(better, first, best_index)
            best_value = tl.where(better, top, best_value)
        found = best_index < nb
        chosen = tl.where((slots == t) & found, best_index, chosen)
        last_value = best_value
        last_index = best_index
    # the chosen blocks' values: a (K_PAD, B) tile
    j = tl.arange(0, B)
    sample = chosen // per_row
    pos = (chosen % per_row) * B
    if ROWS:  # the block's rows, one value of this channel in each
        address = (pos[:, None] + j[None, :]) * c + ch
    else:
        address = sample[:, None] * c * p + ch * p + pos[:, None] + j[None, :]
    m = (chosen[:, None] >= 0) & (pos[:, None] + j[None, :] < p)
    centre = _no_inf(tl.load(mean_ptr + ch))
    v = tl.load(x_ptr + address, mask=m, other=0.0)
    deviation = _nan_first(tl.where(m, tl.abs(v - centre), -float("inf")).to(tl.float64))
    flat = tl.reshape(deviation, [K_PAD * B])
    where = tl.reshape(tl.where(m, address, -1), [K_PAD * B])
    last_value = tl.full((), float("inf"), tl.float64)
    last_address = tl.full((), -1, tl.int64)
    for t in range(0, k):  # the k largest deviations, (value descending, address ascending)
        after = (flat < last_value) | ((flat == last_value) & (where > last_address))
        candidate = tl.where(after & (where >= 0), flat, -float("inf"))
        top = tl.max(candidate, axis=0)
        at = tl.min(tl.where((candidate == top) & after & (where >= 0), where, 2**62), axis=0)
        # the value and its sign read back (NaN stays NaN, as the torch ops return it)
        diff = tl.load(x_ptr + tl.where(at < 2**62, at, 0)) - centre
        tl.store(top_ptr + ch * k + t, tl.abs(diff))
        tl.store(offsets_ptr + ch * k + t, at)
        tl.store(signs_ptr + ch * k + t, tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)))
        last_value = top
        last_address = at


@triton.jit
def _no_inf(v):
    """``v`` with its infinities as NaN, in its dtype (a channel whose mean is infinite has no
    finite deviations either way; NaN spreads where inf - inf would be reported by numpy in the
    interpreter)."""
    return tl.where(tl.abs(v) < float("inf"), v, float("nan"))


@triton.jit
def _nan_first(v):
    """``v`` with NaN as +inf: a NaN deviation ranks first in the top-k search (as a valid
    element to select: the torch ops' topk returns NaN first too), where max and comparisons
    would pass it over."""
    return tl.where(v != v, float("inf"), v)


@triton.jit
def _deviation_sums(z, m, deviations, signs):
    """:func:`l1_sums`' step: ``|z|`` and ``sign(z)`` (0 for NaN) added where ``m`` holds, in
    the accumulators' dtype."""
    deviations += tl.where(m, tl.abs(z), 0.0).to(deviations.dtype)
    signs += tl.where(m & (z > 0), 1.0, tl.where(m & (z < 0), -1.0, 0.0)).to(signs.dtype)
    return deviations, signs


@triton.jit
def l1_sums(
    x_ptr,
    mean_ptr,
    part_ptr,
    c,
    p,
    n,
    splits,
    WIDE: tl.constexpr,
    ROWS: tl.constexpr,
    B: tl.constexpr,
    CT: tl.constexpr,
    SR: tl.constexpr,
    PB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """L1 batch norm's statistics read on the device: per channel ``sum |x - mean|`` and ``sum
    sign(x - mean)`` (a NaN adds NaN to the first and 0 to the second) over a share of its
    values, into ``part`` ``(2, splits, C)`` in float64 (each lane sums in float32, in float64
    with ``WIDE``, for float64 data).
    ``ROWS``: ``x`` is ``p`` rows of ``c`` values; program axis 0 takes a tile of ``CT``
    channels, axis 1 every ``splits``-th block of ``B`` rows. Else ``x`` is ``(n, c, p)``; axis 0
    takes a channel, axis 1 every ``splits``-th tile of ``SR`` samples by a run of ``PB``
    positions (few positions: many samples per tile). (``BLOCK``: unused, every launch passes
    it.)"""
    s = tl.program_id(1)
    if ROWS:
        chs = tl.program_id(0).to(tl.int64) * CT + tl.arange(0, CT)
        cm = chs < c
        centre = _no_inf(tl.load(mean_ptr + chs, mask=cm, other=0.0).to(x_ptr.dtype.element_ty))
        deviations = tl.zeros([B, CT], tl.float64 if WIDE else tl.float32)
        signs = tl.zeros([B, CT], tl.float64 if WIDE else tl.float32)
        for w in range(s, tl.cdiv(p, B), splits):
            rows = (tl.arange(0, B) + w * B).to(tl.int64)  # (fewer than 2**31 rows)
            m = (rows[:, None] < p) & cm[None, :]
            v = tl.load(x_ptr + rows[:, None] * c + chs[None, :], mask=m, other=0.0)
            deviations, signs = _deviation_sums(v - centre[None, :], m, deviations, signs)
        total = tl.sum(deviations, axis=0).to(tl.float64)
        count = tl.sum(signs, axis=0).to(tl.float64)
        tl.store(part_ptr + s * c + chs, total, mask=cm)
        tl.store(part_ptr + (splits + s) * c + chs, count, mask=cm)
    else:
        ch = tl.program_id(0).to(tl.int64)
        centre = _no_inf(tl.load(mean_ptr + ch).to(x_ptr.dtype.element_ty))
        deviations = tl.zeros([SR, PB], tl.float64 if WIDE else tl.float32)
        signs = tl.zeros([SR, PB], tl.float64 if WIDE else tl.float32)
        runs = tl.cdiv(p, PB)
        for w in range(s, tl.cdiv(n, SR) * runs, splits):
            samples = ((w // runs) * SR + tl.arange(0, SR)).to(tl.int64)
            j = ((w % runs) * PB + tl.arange(0, PB)).to(tl.int64)
            m = (samples[:, None] < n) & (j[None, :] < p)
            v = tl.load(x_ptr + (samples[:, None] * c + ch) * p + j[None, :], mask=m, other=0.0)
            deviations, signs = _deviation_sums(v - centre, m, deviations, signs)
        total = tl.sum(tl.sum(deviations, axis=1), axis=0).to(tl.float64)
        tl.store(part_ptr + s * c + ch, total)
        count = tl.sum(tl.sum(signs, axis=1), axis=0).to(tl.float64)
        tl.store(part_ptr + (splits + s) * c + ch, count)


@triton.jit
def _lp_value(v, g, centre, a, b, k, GRAD: tl.constexpr, HAS_B: tl.constexpr):
    """One element of :func:`lp_pass`'s output, in ``v``'s dtype."""
    z = v - centre
    if GRAD:
        out = a * g + b * tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, z)).to(v.dtype) + k
    else:
        out = z * a
        if HAS_B:
            out = out + b
    return out


@triton.jit
def lp_pass(
    x_ptr,
    dy_ptr,
    mean_ptr,
    a_ptr,
    b_ptr,
    k_ptr,
    out_ptr,
    c,
    p,
    n,
    GRAD: tl.constexpr,
    HAS_B: tl.constexpr,
    ROWS: tl.constexpr,
    B: tl.constexpr,
    CT: tl.constexpr,
    SR: tl.constexpr,
    PB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Lp batch norm's element-wise passes on the device, in the data's dtype, per channel:
    the output ``(x - mean) * a (+ b)`` (exact however far off-centre ``x`` is), or with
    ``GRAD`` L1's input gradient ``a * dy + b * sign(x - mean) + k`` (``dy`` in ``x``'s layout).
    ``ROWS``: ``x`` is ``p`` rows of ``c`` values, a program per block of ``B`` rows (axis 0)
    and tile of ``CT`` channels (axis 1); else ``(n, c, p)``, a program per channel and tile of
    ``SR`` samples (axis 0) and run of ``PB`` positions (axis 1). (``BLOCK``: unused.)"""
    if ROWS:
        rows = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
        chs = tl.program_id(1).to(tl.int64) * CT + tl.arange(0, CT)
        m = (rows[:, None] < p) & (chs[None, :] < c)
        where = rows[:, None] * c + chs[None, :]
        ch = chs[None, :]  # the per-channel values as a row, broadcast down the rows
    else:
        tile = tl.program_id(0).to(tl.int64)  # tile of samples * c + channel
        ch = tile % c
        samples = (tile // c) * SR + tl.arange(0, SR)
        j = tl.program_id(1).to(tl.int64) * PB + tl.arange(0, PB)
        m = (samples[:, None] < n) & (j[None, :] < p)
        where = (samples[:, None] * c + ch) * p + j[None, :]
    cm = ch < c
    v = tl.load(x_ptr + where, mask=m, other=0.0)
    g = v
    if GRAD:
        g = tl.load(dy_ptr + where, mask=m, other=0.0)
    centre = _no_inf(tl.load(mean_ptr + ch, mask=cm, other=0.0).to(v.dtype))
    a = tl.load(a_ptr + ch, mask=cm, other=0.0).to(v.dtype)
    b = tl.load(b_ptr + ch, mask=cm, other=0.0).to(v.dtype)
    k = tl.load(k_ptr + ch, mask=cm, other=0.0).to(v.dtype)
    tl.store(out_ptr + where, _lp_value(v, g, centre, a, b, k, GRAD, HAS_B), mask=m)
