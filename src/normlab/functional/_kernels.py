"""Fused CPU reductions compiled by numba: the ``fast`` extra (``pip install 'normlab[fast]'``).

torch's CPU kernels reach normlab's statistics in two or more passes over an activation (a row sum
and a row norm; a group-norm backward for the two gradient sums and two more passes for the input
gradient; broadcast ops chunk by chunk for ``sum |x - mean|`` on channels-last tensors). The loops
here do each job in one pass over memory, and each is numerically as careful as torch's cascades:

* moments in one read: on channels-first rows, sums of ``x - shift`` and its square (the shift
  being the mean of the channel's first block in sample 0), exact to float rounding when the row's
  mean lies within one std of the shift (the subtraction then loses at most one bit) -- else (and
  channels-last) by the corrected two-pass
  algorithm (Chan, Golub & LeVeque 1983) on cache-sized blocks (a row block of ``_BLOCK``
  values, or up to ``_CL_ROWS`` channels-last rows) whose second pass reads the block from L1/L2;
  block sums accumulate in the data's dtype (vectorised; channels-last centred sums over
  ``_CL_PART`` rows at a time, then in float64), blocks are combined in float64 (Chan's
  rule; float64 data far off-centre lose a little there, from pooling absolute means: ~8e-10
  relative error of the variance at 1e8 std);
* batch norm's training forward on channels-first tensors: those moments, then the output
  ``(x - mean) * scale + bias`` in one more pass, without a torch op in between;
* gradient sums ``sum(dy)``, ``sum(dy * (x - mean))`` exactly centred (no cancellation however far
  off-centre the data are), block partial sums in float64;
* the input gradient ``a * dy + b * (x - mean) + k`` (or ``b * sign(x - mean)``) per channel in
  one pass (read ``dy`` and ``x``, write);
* ``sum |x - mean|`` per channel in one read;
* on channels-last rows, per-channel sums in one read that also keeps each channel's largest
  and smallest group extremes, and the k largest ``|x - mean|`` per channel from the few groups
  of rows those single out (L-infinity batch norm's top-k search);
* instance norm's backward on channels-first rows: each row's two gradient sums, then its input
  gradient while the row is still in cache.

Two layouts: channels-first rows ``(N * C, L)`` (row ``r`` is channel ``r % C``) and
channels-last rows ``(M, C)`` (channels contiguous; also plain ``(N, C)`` input). Loops run on
``torch.get_num_threads()`` numba threads (serial code for one thread; parallel calls are
serialised by a lock, so concurrent callers never share numba's thread pool).

numba is optional: :func:`usable` is ``False`` without it (or with ``NORMLAB_NUMBA=0`` in the
environment), and every caller keeps its torch route as the fallback. The first call of each
kernel per dtype compiles it (~0.3-1 s; cached on disk by numba afterwards).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as _np
import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch.autograd.graph import increment_version

from normlab._checks import fail
from normlab.functional._core import FULL_PRECISION, on_accelerator, pool_moments, storage_layout

__all__ = [
    "abs_deviation_sums",
    "available",
    "batch_norm_forward",
    "ghost_backward",
    "ghost_coefficients",
    "grad_sums",
    "group_tails",
    "input_grad",
    "instance_norm_backward",
    "lp_coefficients",
    "lp_grad_coefficients",
    "moments",
    "renorm_coefficients",
    "tail_deviations",
    "usable",
    "writable_buffers",
]

# Values per float32 partial sum along a channels-first row (the block also sits in L1 between
# the two passes of the moments; vectorised, each lane sums ~1/16 of it). Channels-last rows are
# summed one row after the other per channel: at most _CL_ROWS of them per partial sum (the
# float32 error grows as sqrt(rows) * eps: ~1e-6 relative), and at most _BLOCK_BYTES per block.
_BLOCK = 2048
_CL_ROWS = 256
# rows per float32 partial of the channels-last moments' centred sums (see _cl_moments)
_CL_PART = 32
_BLOCK_BYTES = 1 << 18
# L-infinity batch norm's top-k search (_cl_tails): rows per group (the unit the search reads
# back) and groups per superblock (of which two per side enter the lists). Measured at
# 256x256x14x14, 1 thread: the read 0.91 of torch's statistics pass with 32 groups, 1.43 with 8
# (the lists' insertions per superblock), 0.95 with 64.
_TAIL_ROWS = 16
_TAIL_GROUPS = 32
# Tensors of at least this many bytes (half this machine's 32 MiB L3: in a training step they
# come from memory) read each group row after row, in storage order, with the group's sums and
# extremes in three rows of accumulators; smaller ones go down each channel's 16 rows, a vector
# of channels at a time, the accumulators in registers. On the Zen 4 host (family 25), the whole
# read in rows against down the channels (in-process A/B, 1 thread): 0.43-0.46x at
# 256x64x28x28 and 64x64x32x32 (16 MiB), 0.58-0.67x at 256x32x32x32, 512x48x16x16 and
# 128x128x28x28, 0.81-0.95x at 256x256x14x14 and 128x512x14x14 -- but 1.2-1.7x at 12.8 MB
# (32x512x14x14, 64x1024x7x7) and 1.4-1.5x at 64x32x32x32 (8.4 MB), read from the caches, where
# the three rows' stores cost more than the prefetchers save. Down the channels the hardware
# sees 16 interleaved streams per group: the Zen 4 host read them at ~12 GB/s from memory,
# against ~22 GB/s for a plain row-by-row sum.
_TAIL_ROWWISE_BYTES = 16 << 20
# Parallel chunks of superblocks in that read (fewer for fewer superblocks): a number fixed by
# the size alone, so that the lists (and so which of equal values the search keeps) and the
# float64 sums do not depend on the number of threads; 8 balance 2 or 4 threads (fixed chunks
# of 8 or 32 superblocks: 1.03-1.06x the time at one of the two shapes, A/B).
_TAIL_CHUNKS = 8
# Below this many values the numba call's fixed cost (~5-10 us) is not worth it.
_MIN_NUMEL = 1 << 14
_LOCK = threading.Lock()
# Loops without sums to vectorise, compiled without reassociation: the serial and the parallel
# build then evaluate their float64 pooling identically (with it they differed by an ulp).
_IN_ORDER = frozenset({"_rows_normalize"})
# Per-channel epilogues: no fast-math at all (no fused multiply-adds either), so they round as the
# torch routes' ops do; numpy's error model, so a division by zero gives inf/NaN as torch's does
# (numba's default raises ZeroDivisionError: e.g. batch renorm with a zero running std).
_EXACT = frozenset(
    {
        "_running_epilogue",
        "_ghost_epilogue",
        "_ghost_grad_epilogue",
        "_lp_epilogue",
        "_lp_grad_epilogue",
        "_renorm_epilogue",
    }
)
# reassociation lets LLVM vectorise the sums; no-NaN/Inf assumptions are left out, so a NaN in
# the data still reaches the statistics (and the callers' finiteness checks); no approximate
# reciprocals either: Chan's rule then keeps the mean of constant data exact
_FASTMATH = {"reassoc", "contract", "nsz"}


@functools.cache
def _numba() -> Any:
    if os.environ.get("NORMLAB_NUMBA", "1") == "0":
        return None
    try:
        import numba
    except ImportError:
        return None
    return numba


def available() -> bool:
    """Whether numba is importable and not switched off (``NORMLAB_NUMBA=0``)."""
    return _numba() is not None


def usable(x: Tensor, *like: Tensor | None) -> bool:
    """Whether the kernels here serve ``x``: numba available, a CPU float32/float64 tensor of at
    least ``_MIN_NUMEL`` values stored channels-first contiguous with spatial dims, channels-last,
    or as a contiguous ``(N, C)`` matrix; every tensor in ``like`` (``None`` skipped: a gradient,
    an output buffer) has ``x``'s dtype, shape and strides (the kernels read them as ``x``); not
    under ``torch.compile``, ``torch.func`` transforms (e.g. a vmap'd backward) or forward AD."""
    if on_accelerator(x) or x.dtype not in FULL_PRECISION or x.numel() < _MIN_NUMEL:
        return False
    if storage_layout(x) is None or not available():
        return False
    if (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or forward_ad._current_level >= 0
    ):
        return False
    return all(
        t is None
        or (
            t.dtype == x.dtype
            and t.shape == x.shape
            and t.stride() == x.stride()
            and not _batched(t)
        )
        for t in (x, *like)
    )


def _batched(t: Tensor) -> bool:
    """A functorch-wrapped or (legacy) batched tensor, which has no memory the loops could read:
    ``autograd.grad(..., is_grads_batched=True)`` hands one to the backward while no transform
    is active in that frame."""
    functorch = torch._C._functorch
    legacy = getattr(functorch, "is_legacy_batchedtensor", None)
    return bool(functorch.is_functorch_wrapped_tensor(t) or (legacy is not None and legacy(t)))


def _require(x: Tensor, *like: Tensor | None) -> None:
    """The loops read raw memory: refuse (instead of reading out of bounds) tensors that
    :func:`usable` would not pass."""
    if not usable(x, *like):
        shapes = ", ".join(
            f"{tuple(t.shape)} {t.dtype} strides {t.stride()}" for t in (x, *like) if t is not None
        )
        fail(
            ValueError,
            "normlab.functional._kernels",
            "the tensors",
            "CPU float32/float64 of one shape, dtype and layout (channels-first contiguous, "
            f"channels-last or (N, C)), at least {_MIN_NUMEL} values, numba available",
            shapes,
            "check kernels.usable(x, *others) first and use the torch route when it is False",
        )


def _rows(x: Tensor) -> Any:
    """The numpy view the kernels read: ``(N * C, L)`` channels-first, ``(M, C)`` channels-last."""
    x = x.detach()
    if storage_layout(x) == "first":
        return x.view(x.shape[0] * x.shape[1], -1).numpy()
    c = x.shape[1]
    return x.movedim(1, -1).reshape(-1, c).numpy()  # a view: channels are the contiguous dim


def _block_rows(c: int, itemsize: int) -> int:
    return max(8, min(_CL_ROWS, _BLOCK_BYTES // (c * itemsize)))


# --- the loops (plain Python; compiled on first use, serial and parallel) --------------------------
# (``_np.float64(v)`` widens a float32 value; numba types ``float(v)`` as float32 for float32 ``v``)


def _rows_moments(
    rows: Any, c: int, block: int, shifts: Any, guesses: Any, mean: Any, m2: Any
) -> None:  # pragma: no cover - numba
    nrows, length = rows.shape
    zero = _np.zeros(1, rows.dtype)[0]
    head = min(block, length)
    for j in _prange(c):  # channel j's shift: the mean of its first block in sample 0
        xs = rows[j, :head]
        s = zero
        for i in range(head):
            s += xs[i]
        shifts[j] = _np.float64(s) / head
    for r in _prange(nrows):
        k = shifts[r % c]
        t1 = 0.0
        t2 = 0.0
        for start in range(0, length, block):
            xs = rows[r, start : min(start + block, length)]
            s1 = zero
            s2 = zero
            for i in range(xs.shape[0]):
                d = xs[i] - k
                s1 += d
                s2 += d * d
            t1 += _np.float64(s1)
            t2 += _np.float64(s2)
        mz = t1 / length
        m2z = t2 - t1 * mz
        # the shift within one std of the row's mean: False for NaN, and an overflowed sum of
        # squares (+inf) goes to the two-pass too, whose centred squares stay finite
        if mz * mz * length <= m2z < _np.inf:
            mean[r] = _np.float64(k) + mz
            m2[r] = m2z
            continue
        # far from the shift: the corrected two-pass on blocks (the block re-read from L1)
        count = 0.0
        total_mean = 0.0
        total_m2 = 0.0
        for start in range(0, length, block):
            # 1-D slices: LLVM vectorises loops over them (not over 2-D indexing from an offset)
            xs = rows[r, start : min(start + block, length)]
            n = xs.shape[0]
            s = zero
            for i in range(n):
                s += xs[i]
            guesses[r] = _np.float64(s) / n  # the block mean in the data's dtype (row r's own slot)
            guess = guesses[r]
            corr = zero
            sq = zero
            for i in range(n):
                d = xs[i] - guess
                corr += d
                sq += d * d
            cb = _np.float64(corr)
            b_mean = _np.float64(guess) + cb / n
            b_m2 = _np.float64(sq) - cb * cb / n
            new = count + n
            delta = b_mean - total_mean
            total_mean += delta * n / new
            total_m2 += b_m2 + delta * delta * count * n / new
            count = new
        mean[r] = total_mean
        m2[r] = total_m2


def _rows_normalize(
    row_mean: Any,
    row_m2: Any,
    eps: float,
    weight: Any,
    bias: Any,
    rows: Any,
    stats: Any,
    saved: Any,
    out: Any,
) -> None:  # pragma: no cover - numba
    c = stats.shape[1]
    samples = row_mean.shape[0] // c
    length = rows.shape[1]
    scale = _np.empty(c, rows.dtype)
    offset = _np.empty(c, rows.dtype)
    for j in _prange(c):  # Chan's rule over the samples' rows of channel j
        count = 0.0
        total_mean = 0.0
        total_m2 = 0.0
        for s in range(samples):
            new = count + length
            delta = row_mean[s * c + j] - total_mean
            total_mean += delta * length / new
            total_m2 += row_m2[s * c + j] + delta * delta * count * length / new
            count = new
        v = total_m2 / count
        invstd = 1.0 / _np.sqrt(v + eps)
        stats[0, j] = total_mean
        stats[1, j] = v
        saved[0, j] = total_mean
        saved[1, j] = invstd
        a = weight[j] * invstd
        scale[j] = a
        # the mean in two parts: x - mean_hi (data's dtype) is exact near the mean, the rest
        # of the mean moves into the offset (so a constant channel gives bias exactly)
        offset[j] = bias[j] - (total_mean - _np.float64(saved[0, j])) * a
    for r in _prange(rows.shape[0]):
        # centred: far off-centre data keep their digits (x * scale + shift would round at
        # |mean| * scale, x - float32(mean) at |mean| * 6e-8)
        m = saved[0, r % c]
        a = scale[r % c]
        b = offset[r % c]
        xs = rows[r]
        os = out[r]
        for i in range(xs.shape[0]):
            os[i] = (xs[i] - m) * a + b


def _cl_moments(rows: Any, block: int, mean: Any, m2: Any) -> None:  # pragma: no cover - numba
    nrows, c = rows.shape
    for b in _prange(mean.shape[0]):
        xs = rows[b * block : min(b * block + block, nrows)]
        n = xs.shape[0]
        s = _np.zeros(c, rows.dtype)
        for m in range(n):
            xm = xs[m]
            for j in range(c):
                s[j] += xm[j]
        guess = _np.empty(c, rows.dtype)
        for j in range(c):
            guess[j] = _np.float64(s[j]) / n
        # the centred sums in float32 over _CL_PART rows at a time, then in float64: on tied
        # data (few distinct squares) the float32 roundings add up instead of cancelling --
        # over 256 rows 2.2e-6 relative error of the variance, 2.9e-7 over 32 (1.01-1.09x the
        # read's time; float64 accumulators 1.11-1.18x)
        corr = _np.zeros(c)
        sq = _np.zeros(c)
        part_corr = _np.empty(c, rows.dtype)
        part_sq = _np.empty(c, rows.dtype)
        for start in range(0, n, _CL_PART):
            part = xs[start : min(start + _CL_PART, n)]
            for j in range(c):
                part_corr[j] = 0
                part_sq[j] = 0
            for m in range(part.shape[0]):
                xm = part[m]
                for j in range(c):
                    d = xm[j] - guess[j]
                    part_corr[j] += d
                    part_sq[j] += d * d
            for j in range(c):
                corr[j] += _np.float64(part_corr[j])
                sq[j] += _np.float64(part_sq[j])
        for j in range(c):
            cj = corr[j]
            mean[b, j] = _np.float64(guess[j]) + cj / n
            m2[b, j] = sq[j] - cj * cj / n


def _rows_grad_sums(
    dy: Any, x: Any, center: Any, block: int, signs: bool, sums: Any
) -> None:  # pragma: no cover - numba
    nrows, length = x.shape
    c = center.shape[0]
    zero = _np.zeros(1, x.dtype)[0]
    for r in _prange(nrows):
        mu = center[r % c]
        total_dy = 0.0
        total_dyz = 0.0
        total_sign = 0.0
        for start in range(0, length, block):
            stop = min(start + block, length)
            gs = dy[r, start:stop]
            xs = x[r, start:stop]
            s = zero
            q = zero
            t = zero
            for i in range(gs.shape[0]):
                g = gs[i]
                z = xs[i] - mu
                s += g
                q += g * z
                if signs:  # loop-invariant: LLVM unswitches it
                    t += _np.sign(z)
            total_dy += _np.float64(s)
            total_dyz += _np.float64(q)
            total_sign += _np.float64(t)
        sums[0, r] = total_dy
        sums[1, r] = total_dyz
        sums[2, r] = total_sign


def _cl_grad_sums(
    dy: Any, x: Any, center: Any, block: int, signs: bool, sums: Any
) -> None:  # pragma: no cover - numba
    nrows, c = x.shape
    for b in _prange(sums.shape[1]):
        stop = min(b * block + block, nrows)
        gs = dy[b * block : stop]
        xs = x[b * block : stop]
        s = _np.zeros(c, x.dtype)
        q = _np.zeros(c, x.dtype)
        t = _np.zeros(c, x.dtype)
        for m in range(gs.shape[0]):
            gm = gs[m]
            xm = xs[m]
            for j in range(c):
                g = gm[j]
                z = xm[j] - center[j]
                s[j] += g
                q[j] += g * z
                if signs:
                    t[j] += _np.sign(z)
        for j in range(c):
            sums[0, b, j] = s[j]
            sums[1, b, j] = q[j]
            sums[2, b, j] = t[j]


def _rows_input_grad(
    dy: Any,
    x: Any,
    center: Any,
    signs: bool,
    a: Any,
    b: Any,
    k: Any,
    per: int,
    rowmap: Any,
    out: Any,
) -> None:  # pragma: no cover - numba
    nrows = x.shape[0]
    c = a.shape[1]
    for r in _prange(nrows):
        s = rowmap[r // per]  # the coefficients' row (per: rows per entry of rowmap)
        j = r % c
        mu = center[s, j]
        ar = a[s, j]
        br = b[s, j]
        kr = k[s, j]
        gs = dy[r]
        xs = x[r]
        os = out[r]
        if signs:
            for i in range(xs.shape[0]):
                os[i] = ar * gs[i] + br * _np.sign(xs[i] - mu) + kr
        else:
            for i in range(xs.shape[0]):
                os[i] = ar * gs[i] + br * (xs[i] - mu) + kr


def _cl_input_grad(
    dy: Any,
    x: Any,
    center: Any,
    signs: bool,
    a: Any,
    b: Any,
    k: Any,
    per: int,
    rowmap: Any,
    out: Any,
) -> None:  # pragma: no cover - numba
    nrows, c = x.shape
    for m in _prange(nrows):
        s = rowmap[m // per]  # the coefficients' row (per: rows per entry of rowmap)
        mu = center[s]
        am = a[s]
        bm = b[s]
        km = k[s]
        gm = dy[m]
        xm = x[m]
        om = out[m]
        if signs:
            for j in range(c):
                om[j] = am[j] * gm[j] + bm[j] * _np.sign(xm[j] - mu[j]) + km[j]
        else:
            for j in range(c):
                om[j] = am[j] * gm[j] + bm[j] * (xm[j] - mu[j]) + km[j]


def _rows_abs_dev(x: Any, center: Any, block: int, out: Any) -> None:  # pragma: no cover - numba
    nrows, length = x.shape
    c = center.shape[0]
    zero = _np.zeros(1, x.dtype)[0]
    for r in _prange(nrows):
        mu = center[r % c]
        total = 0.0
        for start in range(0, length, block):
            xs = x[r, start : min(start + block, length)]
            s = zero
            for i in range(xs.shape[0]):
                s += abs(xs[i] - mu)
            total += _np.float64(s)
        out[r] = total


def _cl_abs_dev(
    x: Any, center: Any, mode: int, block: int, out: Any
) -> None:  # pragma: no cover - numba
    # per block of rows into out[0, b]: sum x (mode 0), or sum |x - center| (1), and with it
    # sum sign(x - center) into out[1, b] (2), counted by two compares (a NaN counts 0: its
    # channel's deviation sum is NaN anyway); np.sign's chain of tests made the loop 1.2-1.25x
    # slower, the compares 1.0-1.06x (A/B against mode 1, 1 thread; a later A/B on the Zen 4
    # host read mode 2 at 1.2-1.5x mode 1: the two accumulator rows' loads and stores per row)
    nrows, c = x.shape
    one = _np.ones(1, x.dtype)[0]
    zero = _np.zeros(1, x.dtype)[0]
    for b in _prange(out.shape[1]):
        xs = x[b * block : min(b * block + block, nrows)]
        s = _np.zeros(c, x.dtype)
        t = _np.zeros(c, x.dtype)
        for m in range(xs.shape[0]):
            xm = xs[m]
            if mode == 2:
                for j in range(c):
                    z = xm[j] - center[j]
                    s[j] += abs(z)
                    t[j] += (one if z > zero else zero) - (one if z < zero else zero)
            elif mode == 1:
                for j in range(c):
                    s[j] += abs(xm[j] - center[j])
            else:
                for j in range(c):
                    s[j] += xm[j]
        for j in range(c):
            out[0, b, j] = s[j]
            out[1, b, j] = t[j]


def _cl_tails(
    x: Any,
    per: int,
    rowwise: bool,
    sums: Any,
    hv: Any,
    hg: Any,
    lv: Any,
    lg: Any,
    third_hi: Any,
    third_lo: Any,
) -> None:  # pragma: no cover - numba
    # L-infinity batch norm's one read, per chunk of `per` superblocks (in parallel; chunk p
    # fills sums[p], hv[p] ...; then all go into chunk 0's, in order): each channel's sum
    # (float32 over a group of _TAIL_ROWS rows, float64 across groups) and, for the top-k
    # search, the kk largest group maxima (hv, sorted, group ids in hg) and smallest group minima
    # (lv, lg); a whole group is read row after row if rowwise, else down the channels (see
    # _TAIL_ROWWISE_BYTES; the sums rounded in another order). Of each superblock of
    # _TAIL_GROUPS groups only the two largest (smallest) enter the lists, by a branch-free
    # insertion over all channels at once; the superblock's third largest maximum (smallest
    # minimum) goes to third_hi (third_lo): it bounds every group left out. Updates are selects
    # on values loaded into locals first (re-reading an array element after storing into
    # another produced wrong group ids in numba's vectorised code), and index whole rows of
    # channels (an offset into them, to split the channels between threads, stopped the
    # vectorisation: 4x slower)
    nrows, c = x.shape
    kk = hv.shape[1]
    ngroups = (nrows + _TAIL_ROWS - 1) // _TAIL_ROWS
    nsb = third_hi.shape[0]
    for p in _prange(hv.shape[0]):
        h_v, h_g, l_v, l_g = hv[p], hg[p], lv[p], lg[p]
        # one allocation each (rows of one scratch array: 1.1x slower, LLVM cannot tell them
        # apart): a group's sum, maximum, minimum; the superblock's three largest maxima and
        # smallest minima so far and the groups of the first two
        part = _np.empty(c, x.dtype)
        top = _np.empty(c, x.dtype)
        bot = _np.empty(c, x.dtype)
        s1 = _np.empty(c, x.dtype)
        s2 = _np.empty(c, x.dtype)
        s3 = _np.empty(c, x.dtype)
        b1 = _np.empty(c, x.dtype)
        b2 = _np.empty(c, x.dtype)
        b3 = _np.empty(c, x.dtype)
        i1 = _np.empty(c, _np.int32)
        i2 = _np.empty(c, _np.int32)
        j1 = _np.empty(c, _np.int32)
        j2 = _np.empty(c, _np.int32)
        acc = _np.zeros(c)
        for q in range(kk):
            for j in range(c):
                h_v[q, j] = -_np.inf
                h_g[q, j] = -1
                l_v[q, j] = _np.inf
                l_g[q, j] = -1
        for sb in range(p * per, min(p * per + per, nsb)):
            for j in range(c):
                s1[j] = s2[j] = s3[j] = -_np.inf
                b1[j] = b2[j] = b3[j] = _np.inf
                i1[j] = i2[j] = j1[j] = j2[j] = -1
            for g in range(sb * _TAIL_GROUPS, min(sb * _TAIL_GROUPS + _TAIL_GROUPS, ngroups)):
                m = g * _TAIL_ROWS
                # whole groups apart from the last, partial one: with the constant trip count
                # the group's loop vectorises (one loop with a trip count of min(rows left,
                # _TAIL_ROWS) made the read 3.5x slower)
                if rowwise and m + _TAIL_ROWS <= nrows:
                    # row after row, in storage order (see _TAIL_ROWWISE_BYTES)
                    for j in range(c):
                        v = x[m, j]
                        part[j] = v
                        top[j] = v
                        bot[j] = v
                    for r in range(m + 1, m + _TAIL_ROWS):
                        xr = x[r]
                        for j in range(c):
                            v, total, hi, lo = xr[j], part[j], top[j], bot[j]
                            part[j] = total + v
                            top[j] = v if v > hi else hi
                            bot[j] = v if v < lo else lo
                elif m + _TAIL_ROWS <= nrows:  # down each channel's 16 rows, vector by vector
                    for j in range(c):
                        total = hi = lo = x[m, j]
                        for r in range(1, _TAIL_ROWS):
                            v = x[m + r, j]
                            total += v
                            hi = v if v > hi else hi
                            lo = v if v < lo else lo
                        part[j] = total
                        top[j] = hi
                        bot[j] = lo
                else:  # the last, partial group
                    for j in range(c):
                        total = hi = lo = x[m, j]
                        for r in range(m + 1, nrows):
                            v = x[r, j]
                            total += v
                            hi = v if v > hi else hi
                            lo = v if v < lo else lo
                        part[j] = total
                        top[j] = hi
                        bot[j] = lo
                gid = _np.int32(g)
                for j in range(c):
                    acc[j] += _np.float64(part[j])
                _rank(top, gid, s1, s2, s3, i1, i2, True)
                _rank(bot, gid, b1, b2, b3, j1, j2, False)
            for j in range(c):
                third_hi[sb, j] = s3[j]
                third_lo[sb, j] = b3[j]
            # the superblock's two largest (smallest) into the sorted lists
            _insert(h_v, h_g, s1, i1, True)
            _insert(h_v, h_g, s2, i2, True)
            _insert(l_v, l_g, b1, j1, False)
            _insert(l_v, l_g, b2, j2, False)
        for j in range(c):
            sums[p, j] = acc[j]
    # the chunks' lists and sums into chunk 0's, in chunk order: the same result on any number
    # of threads
    for p in range(1, hv.shape[0]):
        for q in range(kk):
            _insert(hv[0], hg[0], hv[p, q], hg[p, q], True)
            _insert(lv[0], lg[0], lv[p, q], lg[p, q], False)
        for j in range(c):
            sums[0, j] += sums[p, j]


def _rank_three(
    vals: Any, gid: Any, first: Any, second: Any, third: Any, id1: Any, id2: Any, upper: bool
) -> None:  # pragma: no cover - numba
    # each channel's value of group gid against the three largest (smallest if not upper) so
    # far, with the groups of the first two -- branch-free selects, vectorised over the channels
    for j in range(vals.shape[0]):
        v, a1, a2, a3, n1, n2 = vals[j], first[j], second[j], third[j], id1[j], id2[j]
        u1 = (v > a1) if upper else (v < a1)
        u2 = (v > a2) if upper else (v < a2)
        u3 = (v > a3) if upper else (v < a3)
        third[j] = a2 if u2 else (v if u3 else a3)
        second[j] = a1 if u1 else (v if u2 else a2)
        id2[j] = n1 if u1 else (gid if u2 else n2)
        first[j] = v if u1 else a1
        id1[j] = gid if u1 else n1


def _insert_sorted(
    lst: Any, lid: Any, vals: Any, vids: Any, upper: bool
) -> None:  # pragma: no cover - numba
    # one value per channel (vals, ids vids) into the channels' sorted lists (lst, ids lid;
    # descending if upper, else ascending), the last entry dropping out: each level keeps the
    # larger (smaller) of its entry and the carried value and carries the other down -- branch
    # free, vectorised over the channels (vals and vids are overwritten)
    for q in range(lst.shape[0]):
        for j in range(lst.shape[1]):
            h, hid, v, vid = lst[q, j], lid[q, j], vals[j], vids[j]
            up = (v > h) if upper else (v < h)
            lst[q, j] = v if up else h
            lid[q, j] = vid if up else hid
            vals[j] = h if up else v
            vids[j] = hid if up else vid


def _cl_tail_search(
    x: Any,
    center: Any,
    hv: Any,
    hg: Any,
    lv: Any,
    lg: Any,
    third_hi: Any,
    third_lo: Any,
    top: Any,
    offsets: Any,
    signs: Any,
) -> None:  # pragma: no cover - numba
    # per channel (in parallel): the k largest |x - mu|, kept sorted by insertion (strictly
    # larger values enter: the first of equal values stays), reading the groups in _cl_tails'
    # lists (both sides) in order of the largest |x - mu| they can hold (a list group's maximum
    # - mu, or mu - its minimum) until the next can hold no larger value -- after every group of
    # a superblock whose third value could beat the list's last entry (any group left out of the
    # lists lies below one of the two). With NaN in the data (NaN never enters the lists) fewer
    # than k values may be found: then every other group, so that each entry is real
    nrows, c = x.shape
    k = top.shape[1]
    kk = hv.shape[0]
    ngroups = (nrows + _TAIL_ROWS - 1) // _TAIL_ROWS
    nsb = third_hi.shape[0]
    for j in _prange(c):
        seen = _np.zeros(ngroups, _np.bool_)
        cand = _np.empty(ngroups + 2 * kk, _np.int64)
        bound = _np.empty(ngroups + 2 * kk, x.dtype)
        mu = center[j]
        best = top[j]
        where = offsets[j]
        sign = signs[j]
        n = 0
        for sb in range(nsb):  # groups the lists may have left out: first, unbounded
            if third_hi[sb, j] > hv[kk - 1, j] or third_lo[sb, j] < lv[kk - 1, j]:
                for g in range(sb * _TAIL_GROUPS, min(sb * _TAIL_GROUPS + _TAIL_GROUPS, ngroups)):
                    cand[n] = g
                    bound[n] = _np.inf
                    n += 1
        first = n
        for q in range(2 * kk):
            g = hg[q, j] if q < kk else lg[q - kk, j]
            if g < 0:
                continue
            b = hv[q, j] - mu if q < kk else mu - lv[q - kk, j]
            i = n  # insertion by bound, largest first
            while i > first and b > bound[i - 1]:
                cand[i] = cand[i - 1]
                bound[i] = bound[i - 1]
                i -= 1
            cand[i] = g
            bound[i] = b
            n += 1
        count = 0
        i = 0
        everything = False
        while True:
            if i == n:  # fewer than k values (NaN data): every other group, once
                if count == k or everything:
                    break
                everything = True
                for g in range(ngroups):
                    if not seen[g]:
                        cand[n] = g
                        bound[n] = _np.inf
                        n += 1
                continue
            g = cand[i]
            if count == k and bound[i] <= best[k - 1]:
                break
            i += 1
            if seen[g]:
                continue
            seen[g] = True
            for r in range(g * _TAIL_ROWS, min(g * _TAIL_ROWS + _TAIL_ROWS, nrows)):
                z = x[r, j] - mu
                a = abs(z)
                if count < k or a > best[k - 1]:
                    p = count if count < k else k - 1
                    while p > 0 and a > best[p - 1]:
                        best[p] = best[p - 1]
                        where[p] = where[p - 1]
                        sign[p] = sign[p - 1]
                        p -= 1
                    best[p] = a
                    where[p] = r * c + j
                    sign[p] = 1.0 if z > 0 else (-1.0 if z < 0 else z)
                    count = min(count + 1, k)


def _rows_instance_grad(
    dy: Any,
    x: Any,
    mean: Any,
    rstd: Any,
    weight: Any,
    block: int,
    need_x: bool,
    out: Any,
    sums: Any,
) -> None:  # pragma: no cover - numba
    # one (sample, channel) row at a time: its two sums from memory, then (the row still in
    # L1/L2) its input gradient -- three passes' traffic instead of torch's group-norm backward's
    # five (the sums over the whole tensor, then the gradient)
    nrows, length = x.shape
    c = weight.shape[0]
    zero = _np.zeros(1, x.dtype)[0]
    for r in _prange(nrows):
        mu = mean[r]
        total_dy = 0.0
        total_dyz = 0.0
        for start in range(0, length, block):
            stop = min(start + block, length)
            gs = dy[r, start:stop]
            xs = x[r, start:stop]
            s = zero
            q = zero
            for i in range(gs.shape[0]):
                g = gs[i]
                s += g
                q += g * (xs[i] - mu)
            total_dy += _np.float64(s)
            total_dyz += _np.float64(q)
        sums[0, r] = total_dy
        sums[1, r] = total_dyz
        if need_x:
            rs = _np.float64(rstd[r])
            a = _np.float64(weight[r % c]) * rs
            coef = _np.empty(3, x.dtype)  # in x's dtype: the loop below vectorises
            coef[0] = a
            coef[1] = -a * rs * rs * total_dyz / length
            coef[2] = -a * total_dy / length
            ar, br, kr = coef[0], coef[1], coef[2]
            gs = dy[r]
            xs = x[r]
            os = out[r]
            for i in range(length):
                os[i] = ar * gs[i] + br * (xs[i] - mu) + kr


# --- per-channel epilogues (serial, compiled in order: they match the torch routes' float64 math) --


def _running_epilogue(
    stats: Any, running_mean: Any, running_var: Any, momentum: float, bessel: float
) -> bool:  # pragma: no cover - numba
    # batch norm's running statistics from the batch's float64 mean and biased variance (stats
    # (2, C)): torch's rule with the variance times bessel, in float64 and rounded as
    # update_running_stats_ rounds (no fused multiply-add: in _EXACT); written only if every
    # result is finite. Also inlined into _ghost_epilogue (as _update_running)
    keep = 1.0 - momentum
    c = stats.shape[1]
    for j in range(c):
        m = keep * _np.float64(running_mean[j]) + momentum * stats[0, j]
        v = keep * _np.float64(running_var[j]) + (momentum * bessel) * stats[1, j]
        if not (_np.isfinite(m) and _np.isfinite(v)):
            return False
    for j in range(c):
        running_mean[j] = keep * _np.float64(running_mean[j]) + momentum * stats[0, j]
        running_var[j] = keep * _np.float64(running_var[j]) + (momentum * bessel) * stats[1, j]
    return True


def _ghost_epilogue(
    stats: Any,
    sizes: Any,
    weight: Any,
    bias: Any,
    eps: float,
    momentum: float,
    bessel: float,
    running_mean: Any,
    running_var: Any,
    out: Any,
) -> bool:  # pragma: no cover - numba
    # stats (G, 2, C): each virtual batch's mean and biased variance. First the running
    # statistics from the pooled batch (Chan's rule), written only if all are finite; then out
    # (2N, C): the samples' scale = weight / sqrt(var + eps) and shift = bias - mean * scale
    # (float64 math, stored in the data's dtype), and each batch's 1 / sqrt(var + eps) in place
    # of its variance (what the backward keeps).
    groups, _, c = stats.shape
    n = out.shape[0] // 2
    total = 0
    for g in range(groups):
        total += sizes[g]
    finite = True
    if running_mean.shape[0] != 0:
        pooled = _np.empty((2, c))
        for j in range(c):
            mu = 0.0
            for g in range(groups):
                mu += sizes[g] / total * _np.float64(stats[g, 0, j])
            m2 = 0.0
            for g in range(groups):
                d = _np.float64(stats[g, 0, j]) - mu
                m2 += sizes[g] / total * (_np.float64(stats[g, 1, j]) + d * d)
            pooled[0, j] = mu
            pooled[1, j] = m2
        finite = _update_running(pooled, running_mean, running_var, momentum, bessel)
    # each batch's coefficients once, then copied row by row (writing them channel by channel,
    # one strided column per channel, took ~10x longer: 0.4 ms for 256 samples x 256 channels)
    row = 0
    for g in range(groups):
        for j in range(c):
            inv = 1.0 / _np.sqrt(_np.float64(stats[g, 1, j]) + eps)
            stats[g, 1, j] = inv
            s = inv if weight.shape[0] == 0 else inv * _np.float64(weight[j])
            t = -_np.float64(stats[g, 0, j]) * s
            if bias.shape[0] != 0:
                t += _np.float64(bias[j])
            out[row, j] = s
            out[n + row, j] = t
        for i in range(row + 1, row + sizes[g]):
            out[i] = out[row]
            out[n + i] = out[n + row]
        row += sizes[g]
    return finite


def _ghost_grad_epilogue(
    stats: Any, sums: Any, sizes: Any, positions: int, weight: Any, out: Any
) -> None:  # pragma: no cover - numba
    # per virtual batch g (stats (G, 2, C): mean, 1 / sqrt(var + eps)) over its
    # sizes[g] * positions values (sums (G, 2, C): sum(dy * xhat), sum(dy)): out[0:4, g] the
    # centre (the mean), a = weight * invstd, b = -a * invstd * mean(dy * xhat) and
    # k = -a * mean(dy); out[4, :2] the weight's and the bias's gradients (float64 sums over the
    # batches, stored in out's dtype)
    groups, _, c = stats.shape
    grad_w = _np.zeros(c)
    grad_b = _np.zeros(c)
    for g in range(groups):
        count = sizes[g] * positions
        for j in range(c):
            inv = _np.float64(stats[g, 1, j])
            dz = _np.float64(sums[g, 0, j])
            d = _np.float64(sums[g, 1, j])
            grad_w[j] += dz
            grad_b[j] += d
            aj = inv if weight.shape[0] == 0 else _np.float64(weight[j]) * inv
            out[0, g, j] = stats[g, 0, j]
            out[1, g, j] = aj
            out[2, g, j] = -aj * inv * (dz / count)
            out[3, g, j] = -aj * (d / count)
    for j in range(c):
        out[4, 0, j] = grad_w[j]
        out[4, 1, j] = grad_b[j]


def _lp_epilogue(
    mean: Any,
    dispersion: Any,
    divide: Any,
    consts: Any,
    weight: Any,
    bias: Any,
    momentum: Any,
    running_mean: Any,
    running_scale: Any,
    out: Any,
) -> int:  # pragma: no cover - numba
    # Lp batch norm per channel j, rounded as the torch route: scale = dispersion / count * K
    # (divide = (count, K) in dispersion's dtype), then in out's dtype (consts = (eps, within,
    # 1) there) denom = scale + eps, a = weight / denom, shift = bias - mean * a; out (4, C) =
    # scale, denom, a, shift. Returns 1 if every |mean| <= within * denom (centred), plus 2 if
    # the running statistics moved (torch's lerp in their dtype: momentum = (m, 1) there) --
    # only when every statistic is finite.
    c = mean.shape[0]
    eps, within, one = consts[0], consts[1], consts[2]
    flags = 1
    finite = True
    for j in range(c):
        out[0, j] = dispersion[j] / divide[0] * divide[1]
        d = out[0, j] + eps
        out[1, j] = d
        a = one / d if weight.shape[0] == 0 else weight[j] / d
        out[2, j] = a
        m = mean[j]
        out[3, j] = -m * a if bias.shape[0] == 0 else bias[j] - m * a
        if not abs(m) <= within * d:
            flags = flags & ~1
        finite = finite and _np.isfinite(m) and _np.isfinite(out[0, j])
    if running_mean.shape[0] == 0 or not finite:
        return flags
    w = momentum[0]
    new = _np.empty(2, running_mean.dtype)  # the statistics in the buffers' dtype
    for j in range(c):
        new[0] = mean[j]
        new[1] = out[0, j]
        for buffer, e in ((running_mean, new[0]), (running_scale, new[1])):
            r = buffer[j]
            if w < 0.5:
                buffer[j] = r + w * (e - r)
            else:
                buffer[j] = e - (e - r) * (momentum[1] - w)
    return flags | 2


def _lp_grad_epilogue(
    denom: Any, weight: Any, sums: Any, factor: float, count: int, out: Any
) -> None:  # pragma: no cover - numba
    # Lp batch norm's backward per channel, from sums (3, C) float64: S = sum(dy * (x - mu)),
    # sum(dy), and the sum of the signs that carry the dispersion's gradient; out (5, C):
    # alpha = weight / D, beta = -weight * S / D^2 * factor, shift = -(alpha * sum(dy) +
    # beta * signs) / count (the input gradient alpha * dy + beta * sign(x - mu) + shift), and
    # the weight's (S / D) and bias's (sum(dy)) gradients
    c = denom.shape[0]
    for j in range(c):
        d = _np.float64(denom[j])
        g = 1.0 if weight.shape[0] == 0 else _np.float64(weight[j])
        dz = sums[0, j]
        alpha = g / d
        beta = -g * dz / (d * d) * factor
        out[0, j] = alpha
        out[1, j] = beta
        out[2, j] = -(alpha * sums[1, j] + beta * sums[2, j]) / count
        out[3, j] = dz / d
        out[4, j] = sums[1, j]


def _renorm_epilogue(
    stats: Any,
    weight: Any,
    bias: Any,
    limits: Any,
    momentum: Any,
    running_mean: Any,
    running_std: Any,
    out: Any,
) -> bool:  # pragma: no cover - numba
    # Batch renorm per channel j, rounded as the torch route: from the batch's mean and biased
    # variance (stats (2, C)) and the running mean and std before this step, in float64
    # r = clip(std_B / sigma, 1 / r_max, r_max), d = clip((mu_B - mu) / sigma, -d_max, d_max)
    # (limits = (eps, r_max, d_max)), stored in out's dtype; weight' = weight * r and
    # bias' = weight * d + bias there; then scale = weight' / std_B and
    # shift = bias' - mu_B * scale folded in float64. out (7, C) = scale, shift, mean,
    # 1 / std_B, weight', r, d. Then, if the statistics are finite, the running mean and std move
    # towards the batch's (torch's add_ in their dtype: momentum there) and True is returned.
    c = stats.shape[1]
    eps, r_max, d_max = limits[0], limits[1], limits[2]
    finite = True
    for j in range(c):
        mean = _np.float64(stats[0, j])
        var = _np.float64(stats[1, j])
        std = _np.sqrt(var + eps)
        sigma = _np.float64(running_std[j])
        r = min(max(std / sigma, 1.0 / r_max), r_max)
        d = min(max((mean - _np.float64(running_mean[j])) / sigma, -d_max), d_max)
        out[5, j] = r
        out[6, j] = d
        if weight.shape[0] == 0:
            out[4, j] = out[5, j]
            new_bias = out[6, j]
        else:
            out[4, j] = weight[j] * out[5, j]
            new_bias = weight[j] * out[6, j]
        if bias.shape[0] != 0:
            new_bias = new_bias + bias[j]
        inv = 1.0 / _np.sqrt(var + eps)
        scale = inv * _np.float64(out[4, j])
        out[0, j] = scale
        out[1, j] = -mean * scale + _np.float64(new_bias)
        out[2, j] = mean
        out[3, j] = inv
        finite = finite and _np.isfinite(mean) and _np.isfinite(var)
    if not finite:
        return False
    step = _np.empty(2, running_mean.dtype)  # each change in the buffers' dtype
    for j in range(c):
        mean = _np.float64(stats[0, j])
        step[0] = mean - _np.float64(running_mean[j])
        step[1] = _np.sqrt(_np.float64(stats[1, j]) + eps) - _np.float64(running_std[j])
        running_mean[j] = running_mean[j] + momentum[0] * step[0]
        running_std[j] = running_std[j] + momentum[0] * step[1]
    return True


# numba.prange once numba is imported, and the loops' shared pieces compiled to be inlined
# (names the loops resolve at compile time)
_prange: Callable[..., Any] = range
_insert: Callable[..., Any] = _insert_sorted
_rank: Callable[..., Any] = _rank_three
_update_running: Callable[..., Any] = _running_epilogue


@functools.cache
def _compiled(name: str, parallel: bool) -> Any:
    """The loop ``name`` compiled serial or parallel. Only the serial code is cached on disk:
    numba's cache key (signature, bytecode, closure) ignores ``parallel``, so with both cached one
    would load the other's machine code (a "serial" call starting numba's thread pool). Where no
    cache directory is writable (a read-only install) the loops are compiled in every process."""
    global _prange, _insert, _rank, _update_running
    numba = _numba()
    _prange = numba.prange
    _insert = numba.njit(_insert_sorted, inline="always", fastmath=_FASTMATH, nogil=True)
    _rank = numba.njit(_rank_three, inline="always", fastmath=_FASTMATH, nogil=True)
    _update_running = numba.njit(
        _running_epilogue, inline="always", fastmath=False, error_model="numpy", nogil=True
    )
    fastmath: Any = _FASTMATH - {"reassoc"} if name in _IN_ORDER else _FASTMATH
    options = {"parallel": parallel, "fastmath": fastmath, "nogil": True}
    if name in _EXACT:
        options.update(fastmath=False, error_model="numpy")
    try:
        return numba.njit(globals()[name], cache=not parallel, **options)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(globals()[name], cache=False, **options)


def _call(name: str, *args: Any) -> Any:
    """Run the loop ``name`` on ``torch.get_num_threads()`` numba threads (serial code for one);
    returns what it returns."""
    numba = _numba()
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    try:
        if threads <= 1:
            return _compiled(name, False)(*args)
        with _LOCK:
            numba.set_num_threads(threads)
            return _compiled(name, True)(*args)
    except numba.core.errors.NumbaError as err:
        _numba_failed(name, err)


def _epilogue(name: str, *args: Any) -> Any:
    """Call the serial epilogue ``name`` (a loop over channels: no threads to set up)."""
    try:
        return _compiled(name, False)(*args)
    except _numba().core.errors.NumbaError as err:
        _numba_failed(name, err)


def _numba_failed(name: str, err: Exception) -> None:
    """numba could not build a loop (e.g. an LLVM or numba/numpy version mismatch)."""
    fail(
        RuntimeError,
        "normlab.functional._kernels",
        f"numba's build of the loop {name}",
        "successful",
        f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
        "set NORMLAB_NUMBA=0 in the environment to run every layer on torch's kernels (and "
        "report numba's and numpy's versions)",
    )


def _check_per_channel(
    entry: str, c: int, optional: bool, samples: int = 0, **vectors: Tensor | None
) -> None:
    """Refuse per-channel vectors that are not ``(c,)`` -- or, with ``samples``, ``(samples, c)``
    (one row per sample) -- (the loops read them without bounds checks); with ``optional``,
    ``None`` passes."""
    shapes = [(c,), (samples, c)] if samples else [(c,)]
    for name, t in vectors.items():
        if (t is None and not optional) or (t is not None and tuple(t.shape) not in shapes):
            per_sample = f" or a ({samples}, {c}) tensor (one row per sample)" if samples else ""
            fail(
                ValueError,
                f"normlab.functional._kernels.{entry}",
                name,
                f"{'None or ' if optional else ''}a ({c},) tensor (one value per channel)"
                + per_sample,
                "None" if t is None else f"shape {tuple(t.shape)}",
                f"pass one {name} value per channel of x",
            )


def _channel_vector(t: Tensor, x: Tensor) -> Any:
    """``t`` (a per-channel vector) as a contiguous numpy array of ``x``'s dtype
    (no copy when it is one already)."""
    t = t.detach()
    if t.dtype != x.dtype or not t.is_contiguous():
        t = t.to(x.dtype).contiguous()
    return t.numpy()


def _scratch(n: int, c: int, dtype: Any) -> tuple[Any, Any]:
    """``_rows_moments``'s shifts (one per channel) and two-pass guesses (one per row), in the
    data's dtype."""
    return _np.empty(c, dtype), _np.empty(n * c, dtype)


def _row_moments(x: Tensor) -> tuple[Any, Any, Any]:
    """``(rows, mean, m2)``: the ``(N * C, L)`` numpy rows of a channels-first ``x`` and each
    row's float64 mean and sum of squared deviations (``_rows_moments``)."""
    rows = _rows(x)
    mean = _np.empty(rows.shape[0])
    m2 = _np.empty(rows.shape[0])
    n, c = x.shape[0], x.shape[1]
    _call("_rows_moments", rows, c, _BLOCK, *_scratch(n, c, rows.dtype), mean, m2)
    return rows, mean, m2


# --- what the layers call -------------------------------------------------------------------------


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance of ``x`` (all dims but 1), float64, from one
    read of memory (requires :func:`usable`)."""
    _require(x)
    n, c = x.shape[0], x.shape[1]
    if storage_layout(x) == "first":
        rows, row_mean, row_m2 = _row_moments(x)
        mean, m2 = (torch.from_numpy(a).view(n, c) for a in (row_mean, row_m2))
        return pool_moments(mean, m2 / rows.shape[1], 0)
    rows = _rows(x)
    block = _block_rows(c, x.element_size())
    nblocks = -(-rows.shape[0] // block)
    mean = torch.empty(nblocks, c, dtype=torch.float64)
    m2 = torch.empty_like(mean)
    _call("_cl_moments", rows, block, mean.numpy(), m2.numpy())
    counts = torch.full((nblocks, 1), float(block), dtype=torch.float64)
    counts[-1] = rows.shape[0] - block * (nblocks - 1)
    return pool_moments(mean, m2 / counts, 0, counts)


def batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    out: Tensor,
    running: tuple[Tensor, Tensor, float, float] | None = None,
) -> tuple[bool, bool, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode batch norm of a channels-first contiguous ``x`` into ``out`` (of ``x``'s
    layout) in two loops and no torch op in between (each small op costs several times its
    isolated ~2 us right after a pass over a large tensor): the per-row moments of
    :func:`moments`, then -- pooled per channel by Chan's rule in float64 --
    ``(x - mean_hi) * scale + offset`` in one more pass (``mean_hi`` the mean in ``x``'s dtype,
    the rest of the mean folded into ``offset``). With ``running = (running_mean, running_var,
    momentum, bessel)`` (buffers passing :func:`writable_buffers`) one serial loop then moves the
    running statistics by torch's rule, the variance times ``bessel`` (float64 math rounded as
    :func:`normlab.functional.update_running_stats_` rounds; written only if every result is
    finite; the version counters move).

    Returns ``(finite, updated, mean, var, save_mean, save_invstd)``: ``finite`` is ``False`` if
    NaN/Inf in ``x`` made the statistics (and ``out``) non-finite; ``updated`` whether the running
    statistics were written; ``mean`` and the biased ``var`` in float64, ``mean`` and
    ``1 / sqrt(var + eps)`` in ``x``'s dtype (what the backward keeps)."""
    _require(x, out)
    if storage_layout(x) != "first":
        fail(
            ValueError,
            "normlab.functional._kernels.batch_norm_forward",
            "x",
            "a channels-first contiguous tensor",
            f"strides {x.stride()} for shape {tuple(x.shape)}",
            "use moments() and the eval-mode kernel for other layouts",
        )
    c = x.shape[1]
    _check_per_channel("batch_norm_forward", c, True, weight=weight, bias=bias)
    buffers: tuple[Tensor, ...] = () if running is None else running[:2]
    if running is not None:
        _check_per_channel(
            "batch_norm_forward", c, False, running_mean=running[0], running_var=running[1]
        )
    if not writable_buffers(*buffers):
        fail(
            ValueError,
            "normlab.functional._kernels.batch_norm_forward",
            "running",
            "1-D CPU float32/float64 buffers that require no gradient",
            ", ".join(f"{t.dtype} on {t.device}, requires_grad={t.requires_grad}" for t in buffers),
            "update the running statistics with normlab.functional.update_running_stats_",
        )
    rows, row_mean, row_m2 = _row_moments(x)
    stats = torch.empty(2, c, dtype=torch.float64)
    saved = torch.empty(2, c, dtype=x.dtype)
    params = [
        _np.full(c, fill, rows.dtype) if t is None else _channel_vector(t, x)
        for t, fill in ((weight, 1.0), (bias, 0.0))
    ]
    _call(
        "_rows_normalize",
        row_mean,
        row_m2,
        eps,
        *params,
        rows,
        stats.numpy(),
        saved.numpy(),
        _rows(out),
    )
    updated = False
    if running is not None:
        updated = _epilogue(
            "_running_epilogue", stats.numpy(), *(t.numpy() for t in buffers), *running[2:]
        )
        if updated:
            increment_version(buffers)
    finite = bool(_np.isfinite(stats.numpy()).all())
    return finite, bool(updated), stats[0], stats[1], saved[0], saved[1]


def grad_sums(grad_out: Tensor, x: Tensor, mean: Tensor, signs: bool = False) -> tuple[Tensor, ...]:
    """``(sum(dy * (x - mean)), sum(dy))`` per channel, float64, exactly centred, in one read of
    ``dy`` and ``x`` (both of ``x``'s layout; requires :func:`usable`); with ``signs`` also
    ``sum sign(x - mean)`` (L1 batch norm's backward) in the same read."""
    _require(x, grad_out)
    dy, rows = _rows(grad_out), _rows(x)
    center = _channel_vector(mean, x)
    if storage_layout(x) == "first":
        sums = torch.zeros(3, rows.shape[0], dtype=torch.float64)
        _call("_rows_grad_sums", dy, rows, center, _BLOCK, signs, sums.numpy())
    else:
        block = _block_rows(x.shape[1], x.element_size())
        sums = torch.zeros(3, -(-rows.shape[0] // block), x.shape[1], dtype=torch.float64)
        _call("_cl_grad_sums", dy, rows, center, block, signs, sums.numpy())
    total = sums.view(3, -1, x.shape[1]).sum(1)
    return (total[1], total[0], total[2]) if signs else (total[1], total[0])


def input_grad(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    a: Tensor,
    b: Tensor,
    k: Tensor,
    out: Tensor | None = None,
    signs: bool = False,
) -> Tensor:
    """``a * dy + b * (x - mean) + k`` with per-channel ``mean``, ``a``, ``b``, ``k`` (centred:
    nothing cancels however far off-centre ``x`` is) -- or with ``signs``
    ``a * dy + b * sign(x - mean) + k`` -- written in one pass into ``out`` (a new tensor of
    ``x``'s layout by default; ``x``, ``grad_out`` and ``out`` must pass :func:`usable` together).
    The four are ``(C,)``, or ``(N, C)`` with one row per sample (ghost batch norm's virtual
    batches), all alike."""
    _require(x, grad_out, out)
    n, c = x.shape[0], x.shape[1]
    samples = n if mean.dim() == 2 else 0
    _check_per_channel("input_grad", c, False, samples, mean=mean, a=a, b=b, k=k)
    if any(t.dim() != mean.dim() for t in (a, b, k)):
        fail(
            ValueError,
            "normlab.functional._kernels.input_grad",
            "mean, a, b and k",
            "all (C,) or all (N, C)",
            f"shapes {[tuple(t.shape) for t in (mean, a, b, k)]}",
            "expand the per-channel ones to one row per sample",
        )
    out = torch.empty_like(x) if out is None else out
    coefficients = [_channel_vector(t, x).reshape(-1, c) for t in (mean, a, b, k)]
    rowmap = _np.arange(n) if samples else _ZERO  # a coefficient row per sample, or one
    _input_grad_pass(grad_out, x, _rows(x), coefficients, rowmap, signs, out)
    return out


def _input_grad_pass(
    grad_out: Tensor,
    x: Tensor,
    rows: Any,
    coefficients: Any,
    rowmap: Any,
    signs: bool,
    out: Tensor,
) -> None:
    """The input-gradient loop of ``x``'s layout over its ``rows``: ``coefficients`` the four
    ``(rows of coefficients, C)`` arrays ``(mean, a, b, k)``; the rows split evenly among the
    entries of ``rowmap``, each naming the coefficients' row its rows read."""
    name = "_rows_input_grad" if storage_layout(x) == "first" else "_cl_input_grad"
    per = rows.shape[0] // len(rowmap)  # rows per entry of rowmap
    mean, a, b, k = coefficients
    _call(name, _rows(grad_out), rows, mean, signs, a, b, k, per, rowmap, _rows(out))


def abs_deviation_sums(
    x: Tensor, mean: Tensor | None, signs: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``(sum |x - mean|, sum sign(x - mean))`` per channel, float64, one read (requires
    :func:`usable`); the sign sums (L1 batch norm's backward needs them) only with ``signs`` on
    channels-last (or ``(N, C)``) storage, else ``None``. With ``mean=None`` on channels-last
    storage ``(sum x, None)`` instead (float32 partial sums over at most ``_CL_ROWS`` rows, in
    float64 across them: 0.6-0.7x the time of torch's sum over dims ``(0, 2, 3)`` there)."""
    _require(x)
    rows = _rows(x)
    c = x.shape[1]
    first = storage_layout(x) == "first"
    if mean is None and first:
        fail(
            ValueError,
            "normlab.functional._kernels.abs_deviation_sums",
            "mean",
            "a per-channel tensor for channels-first input (None: plain sums, channels-last only)",
            "None",
            "sum channels-first rows with torch (normlab.functional._fast.channel_sums)",
        )
    center = _channel_vector(torch.zeros(c) if mean is None else mean, x)
    if first:
        out = torch.empty(rows.shape[0], dtype=torch.float64)
        _call("_rows_abs_dev", rows, center, _BLOCK, out.numpy())
        return out.view(-1, c).sum(0), None
    block = _block_rows(c, x.element_size())
    out = torch.empty(2, -(-rows.shape[0] // block), c, dtype=torch.float64)
    mode = 0 if mean is None else (2 if signs else 1)
    _call("_cl_abs_dev", rows, center, mode, block, out.numpy())
    total = out.sum(1)
    return total[0], total[1] if mode == 2 else None


def group_tails(x: Tensor, k: int) -> tuple[Tensor, tuple[Any, ...]]:
    """``(sums, tails)`` of a channels-last (or ``(N, C)``) ``x`` in one read (requires
    :func:`usable` and ``1 <= k <=`` values per channel): the per-channel sums (float64;
    float32 partial sums over groups of ``_TAIL_ROWS`` rows) and what :func:`tail_deviations`
    needs to find each channel's ``k`` largest ``|x - mean|`` afterwards without reading more
    than a few groups: the ``min(k, groups)`` largest group maxima and smallest group minima
    with their group ids (of each superblock of ``_TAIL_GROUPS`` groups the two largest and two
    smallest enter), and each superblock's third largest maximum and third smallest minimum,
    which bound every group left out. A NaN reaches the sums (the tails skip it)."""
    _require(x)
    rows = _rows(x)
    m, c = rows.shape
    if storage_layout(x) == "first" or not 1 <= k <= m:
        fail(
            ValueError,
            "normlab.functional._kernels.group_tails",
            "x and k",
            "a channels-last or (N, C) tensor and 1 <= k <= values per channel",
            f"strides {x.stride()} for shape {tuple(x.shape)}, k {k}",
            "use the torch route for channels-first tensors; pass k = min(k, values per channel)",
        )
    groups = -(-m // _TAIL_ROWS)
    kk = min(k, groups)
    superblocks = -(-groups // _TAIL_GROUPS)
    # chunks of superblocks (in parallel), each with its own lists, merged in order
    per = -(-superblocks // min(superblocks, _TAIL_CHUNKS))
    chunks = -(-superblocks // per)
    sums = torch.empty(chunks, c, dtype=torch.float64)
    hv, lv = _np.empty((2, chunks, kk, c), rows.dtype)
    hg, lg = _np.empty((2, chunks, kk, c), _np.int32)
    third_hi, third_lo = _np.empty((2, superblocks, c), rows.dtype)
    rowwise = rows.nbytes >= _TAIL_ROWWISE_BYTES
    _call("_cl_tails", rows, per, rowwise, sums.numpy(), hv, hg, lv, lg, third_hi, third_lo)
    return sums[0], (hv[0], hg[0], lv[0], lg[0], third_hi, third_lo)


def tail_deviations(
    x: Tensor, center: Tensor, tails: tuple[Any, ...], k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, offsets, signs)``, each ``(C, k)``, sorted by value: the ``k`` largest
    ``|x - center|`` of each channel of a channels-last (or ``(N, C)``) ``x``, their offsets in
    ``x``'s storage and the signs of ``x - center`` there, from the ``tails`` that
    :func:`group_tails` returned for the same ``x`` and ``k``. The ``k`` largest ``|x - center|``
    lie among the ``k`` largest and the ``k`` smallest values, which lie in the groups with the
    largest maxima and smallest minima: only those groups are read (and every group of a
    superblock whose third value does not rule it out). ``center`` and ``values`` in ``x``'s
    dtype (what the torch route computes); equal values: the first found stays."""
    _require(x)
    rows = _rows(x)
    m, c = rows.shape
    _check_per_channel("tail_deviations", c, False, center=center)
    groups = -(-m // _TAIL_ROWS)
    shapes = [(min(k, groups), c)] * 4 + [(-(-groups // _TAIL_GROUPS), c)] * 2
    if not 1 <= k <= m or [t.shape for t in tails] != shapes:
        fail(
            ValueError,
            "normlab.functional._kernels.tail_deviations",
            "tails and k",
            f"what group_tails(x, {k}) returned, and 1 <= k <= {m}",
            f"k {k}, shapes {[t.shape for t in tails]}",
            "pass the tails group_tails returned for the same x and k",
        )
    values, signs = torch.empty(2, c, k, dtype=x.dtype)
    offsets = torch.empty(c, k, dtype=torch.int64)
    _call(
        "_cl_tail_search",
        rows,
        _channel_vector(center, x),
        *tails,
        values.numpy(),
        offsets.numpy(),
        signs.numpy(),
    )
    return values, offsets, signs


def instance_norm_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    need_x: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Instance norm's gradients on a channels-first contiguous ``x``, from the per-(sample,
    channel) ``mean`` and ``rstd`` (``(N, C)``, ``x``'s dtype: the group-norm kernel's): per row
    ``S1 = sum(dy)`` and ``S2 = sum(dy * (x - mean))`` (float64), then the row's input gradient
    ``a * dy - a * rstd^2 * S2 / L * (x - mean) - a * S1 / L`` (``a = weight * rstd``) while the
    row is still in cache. Returns ``(grad_x or None, grad_weight, grad_bias)``, the parameter
    gradients ``sum_n rstd * S2`` and ``sum_n S1`` per channel in float64 (requires
    :func:`usable`)."""
    _require(x, grad_out)
    n, c = x.shape[0], x.shape[1]
    _check_per_channel("instance_norm_backward", c, True, weight=weight)
    if storage_layout(x) != "first" or mean.numel() != n * c or rstd.numel() != n * c:
        fail(
            ValueError,
            "normlab.functional._kernels.instance_norm_backward",
            "x, mean and rstd",
            f"a channels-first contiguous x and ({n}, {c}) statistics",
            f"strides {x.stride()} for shape {tuple(x.shape)}, statistics of "
            f"{mean.numel()} and {rstd.numel()} values",
            "pass the mean and rstd native_group_norm returned for x",
        )
    rows = _rows(x)
    w = _np.ones(c, rows.dtype) if weight is None else _channel_vector(weight, x)
    out = torch.empty_like(x) if need_x else None
    sums = torch.empty(2, n * c, dtype=torch.float64)
    _call(
        "_rows_instance_grad",
        _rows(grad_out),
        rows,
        _channel_vector(mean.reshape(-1), x),
        _channel_vector(rstd.reshape(-1), x),
        w,
        _BLOCK,
        need_x,
        rows if out is None else _rows(out),  # not written without need_x
        sums.numpy(),
    )
    s1, s2 = sums.view(2, n, c)
    return out, (s2 * rstd.double()).sum(0), s1.sum(0)


_EMPTY = _np.empty(0)
_ZERO = _np.zeros(1, _np.int64)


def writable_buffers(*buffers: Tensor | None) -> bool:
    """Whether the epilogues may write these running-statistics buffers through numpy views:
    each ``None``, or a 1-D CPU float32/float64 tensor that requires no gradient."""
    return all(
        t is None
        or (
            t.device.type == "cpu"
            and t.dtype in FULL_PRECISION
            and t.dim() == 1
            and not t.requires_grad
        )
        for t in buffers
    )


def _params(like: Tensor, *params: Tensor | None) -> list[Any]:
    """Parameters as numpy arrays for an epilogue; ``None`` as an empty array of ``like``'s dtype
    (one of another dtype would make numba widen the arithmetic of the other branch)."""
    empty = _np.empty(0, like.numpy().dtype)
    return [empty if t is None else t.detach().numpy() for t in params]


def _bad_statistics(entry: str, what: str, expected: str, got: str) -> None:
    fail(
        ValueError,
        f"normlab.functional._kernels.{entry}",
        what,
        expected,
        got,
        "pass one row of statistics and one sample count per virtual batch, one value per "
        "channel in each parameter",
    )


def ghost_coefficients(
    stats: Tensor,
    sizes: list[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running: tuple[Tensor, Tensor, float, float] | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """Ghost batch norm's per-channel forward epilogue in one serial loop (each small torch op
    costs several us right after a pass over a large activation; this replaces ~25 of them).

    From each virtual batch's mean and biased variance (``stats``, ``(G, 2, C)`` in the data's
    dtype; ``sizes``: the G batches' sample counts) returns ``(scale, shift, updated)``: one row
    per sample of ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale``
    (folded in float64, stored in ``stats``' dtype), and whether ``running = (running_mean,
    running_var, momentum, bessel)`` was updated in place with the pooled batch's statistics
    (torch's rule, the variance times ``bessel``; the version counters move). ``updated`` is
    ``False`` -- nothing written -- when a result is not finite: the caller's torch route then
    decides and warns. ``stats[:, 1]`` then holds ``1 / sqrt(var + eps)`` in place of the
    variance (with the mean, what the backward keeps)."""
    groups, _, c = stats.shape
    buffers = () if running is None else running[:2]
    if (
        stats.shape[1] != 2
        or len(sizes) != groups
        or min(sizes, default=0) < 1
        or any(t is not None and t.shape != (c,) for t in (weight, bias, *buffers))
    ):
        _bad_statistics(
            "ghost_coefficients",
            "stats, sizes and the per-channel tensors",
            f"stats (G, 2, C), G positive sizes, weight, bias and running statistics ({c},)",
            f"stats {tuple(stats.shape)}, sizes {sizes}, "
            + ", ".join(
                str(None if t is None else tuple(t.shape)) for t in (weight, bias, *buffers)
            ),
        )
    n = sum(sizes)
    out = torch.empty(2 * n, c, dtype=stats.dtype)
    momentum, bessel = (0.0, 1.0) if running is None else running[2:]
    updated = _epilogue(
        "_ghost_epilogue",
        stats.numpy(),
        _np.asarray(sizes, _np.int64),
        *_params(stats, weight, bias),
        eps,
        momentum,
        bessel,
        *((_EMPTY, _EMPTY) if running is None else (t.numpy() for t in buffers)),
        out.numpy(),
    )
    if running is not None and updated:
        increment_version(buffers)
    return out[:n], out[n:], bool(updated) and running is not None


def ghost_backward(
    grad_out: Tensor,
    x: Tensor,
    stats: Tensor,
    sums: Tensor,
    sizes: list[int],
    weight: Tensor | None,
    need_x: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Ghost batch norm's backward after the sums: one serial epilogue turns each virtual
    batch's ``stats`` (``(G, 2, C)``: mean and ``1 / sqrt(var + eps)``) and ``sums``
    (``(G, 2, C)``: ``sum(dy * xhat)`` and ``sum(dy)``; ``sizes``: the batches' sample counts)
    into :func:`input_grad`'s coefficients, one row per virtual batch (each sample's rows read
    their batch's), then (``need_x``) the input gradient is written in one pass. Returns
    ``(grad_x, grad_weight, grad_bias)``, the parameters' gradients summed in float64 and stored
    in ``x``'s dtype. ``x`` and ``grad_out`` must pass :func:`usable` together."""
    _require(x, grad_out)
    groups, _, c = stats.shape
    n = x.shape[0]
    if (
        stats.dtype != x.dtype
        or sums.shape != stats.shape
        or c != x.shape[1]
        or len(sizes) != groups
        or min(sizes, default=0) < 1
        or sum(sizes) != n
        or (weight is not None and weight.shape != (c,))
    ):
        _bad_statistics(
            "ghost_backward",
            "stats, sums, sizes and weight",
            f"stats and sums (G, 2, {c}) of x's dtype, G positive sizes "
            f"adding up to {n}, weight ({c},)",
            f"stats {tuple(stats.shape)} {stats.dtype}, sums "
            f"{tuple(sums.shape)}, sizes {sizes}, weight "
            f"{None if weight is None else tuple(weight.shape)}",
        )
    coefficients = torch.empty(5, max(groups, 2), c, dtype=x.dtype)
    arrays = coefficients.numpy()
    _epilogue(
        "_ghost_grad_epilogue",
        stats.numpy(),
        sums.numpy(),
        _np.asarray(sizes, _np.int64),
        x.numel() // (n * c),  # positions per sample and channel
        *_params(stats, weight),
        arrays,
    )
    grad_x = None
    if need_x:
        grad_x = torch.empty_like(x)
        rowmap = _np.repeat(_np.arange(groups), sizes)  # each sample's virtual batch
        _input_grad_pass(grad_out, x, _rows(x), arrays[:4], rowmap, False, grad_x)
    return grad_x, coefficients[4, 0], coefficients[4, 1]


def lp_coefficients(
    mean: Tensor,
    dispersion: Tensor,
    count: int,
    constant: float,
    eps: float,
    within: float,
    weight: Tensor | None,
    bias: Tensor | None,
    running: tuple[Tensor, Tensor, float] | None = None,
) -> tuple[Tensor, bool, bool]:
    """Lp batch norm's per-channel forward epilogue in one serial loop (it replaces ~25 small
    torch ops, each costing several us right after a pass over a large activation).

    From the per-channel ``mean`` (the data's dtype) and ``dispersion`` (L1: ``sum |x - mu|``
    over ``count`` values, float64; L-infinity: the mean of the top-k deviations, the data's
    dtype, ``count`` 1) returns ``(coefficients, centred, updated)``: ``(4, C)`` in ``mean``'s
    dtype -- ``scale = dispersion / count * constant`` (computed in ``dispersion``'s dtype),
    ``denom = scale + eps``, ``a = weight / denom``, ``shift = bias - mean * a`` (as the torch
    route rounds them) --, whether every ``|mean| <= within * denom``, and whether
    ``running = (running_mean, running_scale, momentum)`` moved towards ``(mean, scale)`` (torch's
    ``lerp_`` in their dtype; version counters move). Nothing is written when a statistic is not
    finite (``updated`` is ``False``: the caller warns)."""
    c = mean.shape[0]
    buffers = () if running is None else running[:2]
    if mean.dim() != 1 or any(
        t is not None and t.shape != (c,) for t in (dispersion, weight, bias, *buffers)
    ):
        fail(
            ValueError,
            "normlab.functional._kernels.lp_coefficients",
            "mean, dispersion and the per-channel tensors",
            f"all ({c},)",
            ", ".join(
                str(None if t is None else tuple(t.shape))
                for t in (mean, dispersion, weight, bias, *buffers)
            ),
            "pass one value per channel",
        )
    out = torch.empty(4, c, dtype=mean.dtype)
    disp = dispersion.detach().numpy()
    divide = _np.array([count, constant], disp.dtype)
    consts = _np.array([eps, within, 1.0], out.numpy().dtype)
    if running is None:
        momentum, rm, rs = _np.ones(2), _EMPTY, _EMPTY
    else:
        rm, rs = (t.numpy() for t in buffers)
        momentum = _np.array([running[2], 1.0], rm.dtype)
    flags = _epilogue(
        "_lp_epilogue",
        mean.detach().numpy(),
        disp,
        divide,
        consts,
        *_params(out, weight, bias),
        momentum,
        rm,
        rs,
        out.numpy(),
    )
    if flags & 2:
        increment_version(buffers)
    return out, bool(flags & 1), bool(flags & 2)


def lp_grad_coefficients(
    denom: Tensor, weight: Tensor | None, sums: Tensor, factor: float, count: int
) -> Tensor:
    """Lp batch norm's per-channel backward epilogue in one serial loop: from ``denom``
    (``D``), ``sums`` (``(3, C)`` float64: ``S = sum(dy * (x - mu))``, ``sum(dy)``, the sum of the
    signs that carry the dispersion's gradient) returns ``(5, C)`` in ``denom``'s dtype:
    ``alpha = weight / D``, ``beta = -weight * S / D^2 * factor`` (L1: ``K / count``; L-infinity
    ``K / k``), ``shift = -(alpha * sum(dy) + beta * signs) / count``, and the weight's and the
    bias's gradients ``S / D`` and ``sum(dy)`` (float64 math)."""
    c = denom.shape[0]
    if denom.dim() != 1 or sums.shape != (3, c) or (weight is not None and weight.shape != (c,)):
        fail(
            ValueError,
            "normlab.functional._kernels.lp_grad_coefficients",
            "denom, sums and weight",
            f"denom ({c},), sums (3, {c}), weight ({c},)",
            f"{tuple(denom.shape)}, {tuple(sums.shape)}, "
            f"{None if weight is None else tuple(weight.shape)}",
            "pass one value per channel",
        )
    out = torch.empty(5, c, dtype=denom.dtype)
    _epilogue(
        "_lp_grad_epilogue",
        denom.detach().numpy(),
        *_params(denom, weight),
        sums.detach().double().numpy(),
        float(factor),
        count,
        out.numpy(),
    )
    return out


def renorm_coefficients(
    stats: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    r_max: float,
    d_max: float,
    running_mean: Tensor,
    running_std: Tensor,
    momentum: float,
) -> tuple[Tensor, bool]:
    """Batch renorm's per-channel training epilogue in one serial loop (it replaces ~30 small
    torch ops). From the batch's mean and biased variance (``stats``, ``(2, C)`` in the data's
    dtype) and the running statistics before this step returns ``(coefficients, updated)``:
    ``(7, C)`` in ``stats``' dtype -- the output's ``scale`` and ``shift``, the mean and
    ``1 / sqrt(var + eps)`` the backward keeps, ``weight * r`` and ``r``, ``d`` (Ioffe 2017,
    clipped to ``r_max``, ``d_max``) -- and whether the running mean and std moved towards the
    batch's (torch's update in their dtype; version counters move; not for non-finite
    statistics: the caller warns)."""
    c = stats.shape[1]
    if stats.shape != (2, c) or any(
        t is not None and t.shape != (c,) for t in (weight, bias, running_mean, running_std)
    ):
        fail(
            ValueError,
            "normlab.functional._kernels.renorm_coefficients",
            "stats and the per-channel tensors",
            f"stats (2, {c}) and ({c},) tensors",
            ", ".join(
                str(None if t is None else tuple(t.shape))
                for t in (stats, weight, bias, running_mean, running_std)
            ),
            "pass the batch's mean and variance and one value per channel",
        )
    out = torch.empty(7, c, dtype=stats.dtype)
    rm, rs = running_mean.numpy(), running_std.numpy()
    updated = _epilogue(
        "_renorm_epilogue",
        stats.detach().numpy(),
        *_params(out, weight, bias),
        _np.array([eps, r_max, d_max]),
        _np.array([momentum], rm.dtype),
        rm,
        rs,
        out.numpy(),
    )
    if updated:
        increment_version((running_mean, running_std))
    return out, bool(updated)
