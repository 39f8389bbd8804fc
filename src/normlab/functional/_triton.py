"""Fused Triton kernels for the per-channel steps of the accelerator routes.

On a GPU every torch op is a kernel launch, and on small and mid-sized activations the launches,
not the bytes, set a layer's time (docs/benchmarks.md: on the H200 each cost its host ~40 us,
and batch renorm's training step took 31 ops where torch.nn's batch norm takes 3). The
per-channel arithmetic between the big passes reads and writes a few vectors of ``C`` values:
here each such step is one kernel (``_triton_kernels.py``) instead of ten to twenty ops -- the
running statistics' finiteness guard, batch renorm's ``r``, ``d``, folded affine map and limit
ramp, Lp batch norm's coefficients, ghost batch norm's pooled running update -- and so are
weight standardization (forward and backward), L-inf batch norm's top-k search, and L1 batch
norm's passes over the activation (its statistics read, ``sum |x - mu|`` with the sign sums its
backward needs, and its output and input gradient, each one pass where the torch ops take two to
five: on a GPU these layers' time at large shapes is their bytes).

Used for CUDA tensors when ``triton`` 3.4 or newer is importable (torch's CUDA builds bring it:
3.4 with torch 2.8) and not switched off with ``NORMLAB_TRITON=0``; never under ``torch.compile``
(inductor fuses the torch ops itself; compiled autograd included), ``torch.func`` transforms,
forward AD or jit tracing. Elsewhere (no triton, an older one, other devices) the callers run
their torch ops. If a kernel fails to compile for some argument types, a ``RuntimeWarning`` says
so once and the torch ops take over for those types. Kernels that write buffers autograd may have
saved move their version counters (:func:`moved`), as the torch ops would.

Tests run the kernels on the CPU in Triton's interpreter (:func:`interpreted`, inside
``accelerator_routes()``, with ``TRITON_INTERPRET=1`` set before triton's import), which needs
only the ``triton`` package.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import math
import os
import struct
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

_BLOCK = 1024  # channels per block of a kernel's loop
_INTERPRET = [False]  # set by interpreted(): CPU tensors run the kernels in the interpreter
_OFF = [False]  # set by off(): no kernels on any device
# (kernel, device type, argument types, meta-parameters) that failed to compile
_BROKEN: set[tuple[Any, ...]] = set()
LAUNCHES: collections.Counter[str] = collections.Counter()  # per kernel (benchmarks/launches.py)


# The oldest triton the kernels are checked with (tests/functional/test_triton.py in side
# environments, 2026-12-04): 3.4, 3.5.1, 3.6, 3.7.1, 3.8 and 3.9 compile every kernel for sm_80
# and sm_90 and pass the interpreter tests (3.4-3.6 with numpy < 2.3: their interpreter calls
# int() on 1-element arrays, which numpy 2.4 refuses). 3.4 is what torch 2.8's CUDA build
# (normlab's oldest torch) ships; under 3.0 158 of the 177 interpreter tests failed, and 3.1-3.3
# are unchecked.
_OLDEST = (3, 4)


def _release(version: str) -> tuple[int, ...]:
    """``"3.4.0+git1a2b"`` -> ``(3, 4, 0)``: the leading numbers of a version string."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


@functools.cache
def available() -> bool:
    """Whether ``triton`` is importable, at least the oldest version the kernels are checked
    with (3.4; older ones: the torch ops), and not switched off (``NORMLAB_TRITON=0``)."""
    if os.environ.get("NORMLAB_TRITON", "1") == "0":
        return False
    try:
        import triton

        if _release(triton.__version__) < _OLDEST:
            return False
        from normlab.functional import _triton_kernels  # noqa: F401
    except Exception:  # ImportError, or a triton that fails at import on this machine
        return False
    return True


def usable(*tensors: Tensor | None) -> bool:
    """Whether the kernels may run on these tensors now (``None`` entries skipped): all
    contiguous (the kernels index their storage) and on one CUDA device (or on the CPU inside
    :func:`interpreted`), eager (not compiling, tracing or under ``torch.func``), and triton
    :func:`available`."""
    if torch.compiler.is_compiling():  # first: nothing below is for dynamo to trace
        return False
    present = [t for t in tensors if t is not None]
    if not present:
        return False
    device = present[0].device
    if _OFF[0] or (device.type != "cuda" and not (device.type == "cpu" and _INTERPRET[0])):
        return False
    if not available() or (device.type == "cpu" and not _interpreter()):
        return False
    return (
        all(t.device == device and t.is_contiguous() for t in present)
        and not torch.jit.is_tracing()  # type: ignore[attr-defined, no-untyped-call]
        and not torch._C._are_functorch_transforms_active()
    )


def _interpreter() -> bool:
    """Whether triton builds its kernels for its interpreter (``TRITON_INTERPRET=1`` when it was
    first imported: triton's own library functions are built then too)."""
    from normlab.functional import _triton_kernels

    return type(_triton_kernels.guarded_copy).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def interpreted(on: bool = True) -> Iterator[None]:
    """Within this block, CPU tensors run the kernels in Triton's interpreter (for tests, with
    ``accelerator_routes()``), if triton was imported with ``TRITON_INTERPRET=1`` in the
    environment (the test suite's conftest sets it where no GPU is present). Not thread-safe."""
    _INTERPRET[0], before = on, _INTERPRET[0]
    try:
        yield
    finally:
        _INTERPRET[0] = before


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Within this block no kernel runs, on any device: the callers' torch ops (for tests and
    benchmarks of those routes). Not thread-safe."""
    _OFF[0], before = True, _OFF[0]
    try:
        yield
    finally:
        _OFF[0] = before


def _launch(
    name: str, device: torch.device, *args: Any, grid: tuple[int, ...] = (1,), **meta: Any
) -> bool:
    """Run kernel ``name`` on ``device`` (one program unless ``grid`` says); ``False`` (the
    caller runs its torch ops) if this kernel failed to compile for these argument types on this
    device type before, or does now (then a warning, once)."""
    if torch.compiler.is_compiling():  # (a custom backward under compiled autograd): torch ops
        return False
    from normlab.functional import _triton_kernels

    kernel = getattr(_triton_kernels, name)
    if _BROKEN and _key(name, device, args, meta) in _BROKEN:  # (no key to build, usually)
        return False
    if device.type != "cpu":  # no fused multiply-adds: the interpreter's arithmetic (numpy's)
        meta["enable_fp_fusion"] = False
    try:
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):  # triton launches on the current device
                kernel[grid](*args, BLOCK=_BLOCK, **meta)
        else:
            kernel[grid](*args, BLOCK=_BLOCK, **meta)
    except Exception as error:  # a compiler error here: fall back, say so once
        meta.pop("enable_fp_fusion", None)
        _BROKEN.add(_key(name, device, args, meta))
        warnings.warn(
            f"normlab: the Triton kernel {name} failed on {device.type} "
            f"({type(error).__name__}: {error}); normlab uses torch ops there instead (slower on "
            "small tensors; results equal up to rounding). Set NORMLAB_TRITON=0 to skip the "
            "kernels, and report the error with your torch and triton versions.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    LAUNCHES[name] += 1
    return True


def _key(name: str, device: torch.device, args: tuple[Any, ...], meta: dict[str, Any]) -> Any:
    """What a kernel's compilation depends on: its name, the device type, the arguments' types
    and the meta-parameters (``_BROKEN``'s entries)."""
    types = tuple(a.dtype if isinstance(a, Tensor) else type(a) for a in args)
    return (name, device.type, types, tuple(sorted(meta.items())))


def _halves(value: float) -> tuple[float, float]:
    """``value`` as two float32 numbers whose sum is it to ~48 bits: Triton passes Python floats
    to kernels as float32 (``_triton_kernels._join`` adds them back in float64)."""
    try:
        hi = _to_float32(value)
    except OverflowError:  # beyond float32's range: infinite there
        hi = math.copysign(math.inf, value)
    return hi, _to_float32(value - hi) if math.isfinite(hi) else 0.0


def _to_float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


def moved(*buffers: Tensor) -> None:
    """Move the version counters of ``buffers`` after a kernel wrote them, as the torch ops it
    replaces would: a graph that saved them then refuses to backpropagate through their old
    values instead of using the new ones silently."""
    torch.autograd.graph.increment_version(buffers)


def guarded_copy_(
    pairs: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    checks: tuple[Tensor, ...],
    when_finite: bool,
) -> bool:
    """In one kernel: ``dst.copy_(src)`` for both ``(dst, src)`` pairs (contiguous, ``C`` values
    each) if every value of the 1-D ``checks`` (one or two tensors) is finite (``when_finite``),
    or if one is not (``not when_finite``). ``False`` if it did not run (the caller's torch ops
    then do the same). The destinations' version counters do not move (as through ``.data``):
    callers that write buffers autograd may have saved move them (:func:`moved`)."""
    (dst_a, src_a), (dst_b, src_b) = pairs
    tensors = (dst_a, src_a, dst_b, src_b, *checks)
    if len(checks) not in (1, 2) or not usable(*tensors):
        return False
    n = dst_a.numel()
    if any(t.numel() != n for t in (src_a, dst_b, src_b)):
        return False
    check_b = checks[-1]
    return _launch(
        "guarded_copy",
        dst_a.device,
        checks[0],
        checks[0].numel(),
        check_b,
        check_b.numel(),
        dst_a,
        src_a,
        dst_b,
        src_b,
        n,
        WHEN_FINITE=when_finite,
        CHECK_B=len(checks) == 2,
    )


class RenormStep(torch.autograd.Function):
    """Batch renorm's per-channel step (``_triton_kernels.renorm_step``) as a differentiable map
    of ``(weight, bias)`` to the folded affine map ``(weight r, weight d + bias)``; the running
    statistics move inside the forward (if the variances are finite). Backward: ``grad_weight =
    grad_scale r + grad_shift d`` in one kernel, ``grad_bias = grad_shift``."""

    @staticmethod
    def forward(
        ctx: Any,
        weight: Tensor | None,
        bias: Tensor | None,
        stats: tuple[Tensor, Tensor, Tensor, Tensor],
        limits: tuple[float | Tensor, float | Tensor],
        momentum: float,
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        mean, var, running_mean, running_std = stats
        r_max, d_max = limits
        c = mean.numel()
        dtype = weight.dtype if weight is not None else mean.dtype
        scale, shift, r, d = torch.empty(4, c, dtype=dtype, device=mean.device).unbind()
        tensors = isinstance(r_max, Tensor)
        ran = _launch(
            "renorm_step",
            mean.device,
            mean,
            var,
            running_mean,
            running_std,
            weight if weight is not None else mean,
            bias if bias is not None else mean,
            r_max if tensors else mean,
            d_max if tensors else mean,
            scale,
            shift,
            r,
            d,
            c,
            *_halves(0.0 if tensors else float(r_max)),
            *_halves(0.0 if tensors else float(d_max)),
            *_halves(momentum),
            *_halves(eps),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            LIMIT_TENSORS=tensors,
        )
        if not ran:
            raise _NotRun
        moved(running_mean, running_std)
        ctx.save_for_backward(r, d)
        ctx.has_weight = weight is not None
        if weight is None:  # scale = r: no weight gradient for torch's kernel to reduce
            ctx.mark_non_differentiable(scale)
        return scale, shift

    @staticmethod
    def backward(
        ctx: Any, grad_scale: Tensor | None, grad_shift: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        r, d = ctx.saved_tensors
        need_weight, need_bias = ctx.needs_input_grad[:2]
        grad_weight = None
        if need_weight and ctx.has_weight:
            gs = torch.zeros_like(r) if grad_scale is None else grad_scale.contiguous()
            gb = torch.zeros_like(d) if grad_shift is None else grad_shift.contiguous()
            if torch.is_grad_enabled() or not _launch(
                "renorm_weight_grad",
                r.device,
                gs,
                gb,
                r,
                d,
                out := torch.empty_like(r),
                r.numel(),
            ):
                out = torch.addcmul(gs * r, gb, d)  # differentiable (double backward), or no kernel
            grad_weight = out
        grad_bias = grad_shift if need_bias else None
        return grad_weight, grad_bias, None, None, None, None


class _NotRun(Exception):
    """The renorm kernel did not run (it failed to compile here): the caller's torch ops run."""


def renorm_step(
    weight: Tensor | None,
    bias: Tensor | None,
    stats: tuple[Tensor, Tensor, Tensor, Tensor],
    limits: tuple[float | Tensor, float | Tensor],
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor] | None:
    """Batch renorm's folded affine map ``(weight r, weight d + bias)`` and the running
    statistics' update in one kernel (:class:`RenormStep`), or ``None`` where the kernel cannot run
    (the caller's torch ops then do both). ``stats``: the batch's mean and biased variance and
    the running mean and std, contiguous ``(C,)``; ``limits``: ``(r_max, d_max)``."""
    if not usable(*stats, weight, bias, *(t for t in limits if isinstance(t, Tensor))):
        return None
    if torch.autograd.forward_ad._current_level >= 0:  # no jvp rule for the kernel
        return None
    if isinstance(limits[0], Tensor) != isinstance(limits[1], Tensor):  # both read one way
        return None
    try:
        out: tuple[Tensor, Tensor] = RenormStep.apply(  # type: ignore[no-untyped-call]
            weight, bias, stats, limits, momentum, eps
        )
    except _NotRun:
        return None
    return out


def renorm_limits(schedule: Tensor, count: Tensor) -> Tensor | None:
    """Batch renorm's ``(r_max, d_max)`` as a ``(2,)`` float64 tensor, from the float64 schedule
    ``(r_max, d_max, warmup, r_end, d_end)`` and the step ``count`` (0-dim), in one kernel (or
    ``None``: the caller's torch ops)."""
    if not usable(schedule, count):
        return None
    out = torch.empty(2, dtype=torch.float64, device=schedule.device)
    return out if _launch("renorm_limits", schedule.device, schedule, count, out) else None


def lp_forward(
    mean: Tensor,
    dispersion: Tensor,
    count: int,
    constant: float,
    eps: float,
    weight: Tensor | None,
    running: tuple[Tensor, Tensor, float | Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Lp batch norm's per-channel forward step in one kernel: ``(scale, denom, a)`` in
    ``mean``'s dtype (``scale = dispersion / count * constant``, ``denom = scale + eps``, ``a =
    weight / denom``), and the running statistics ``running = (running_mean, running_scale,
    momentum)`` moved towards ``(mean, scale)`` if every statistic is finite; ``None`` where the
    kernel cannot run (then the caller's torch ops do both)."""
    buffers = () if running is None else running[:2]
    momentum = 0.0 if running is None else running[2]  # a tensor: a cumulative average's factor
    factor = momentum if isinstance(momentum, Tensor) else None
    if not usable(mean, dispersion, weight, *buffers, factor):
        return None
    c = mean.numel()
    scale, denom, a = torch.empty(3, c, dtype=mean.dtype, device=mean.device).unbind()
    ran = _launch(
        "lp_forward",
        mean.device,
        mean,
        dispersion,
        weight if weight is not None else mean,
        buffers[0] if buffers else mean,
        buffers[1] if buffers else mean,
        scale,
        denom,
        a,
        c,
        count,
        *_halves(constant),
        *_halves(eps),
        *_halves(0.0 if factor is not None else float(momentum)),
        factor if factor is not None else mean,
        HAS_WEIGHT=weight is not None,
        RUNNING=running is not None,
        MOMENTUM_TENSOR=factor is not None,
    )
    if not ran:
        return None
    if buffers:
        moved(*buffers)
    return scale, denom, a


def lp_backward(
    denom: Tensor,
    weight: Tensor | None,
    sums: tuple[Tensor, Tensor, Tensor],
    factor: float,
    count: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Lp batch norm's per-channel backward step in one kernel: ``(alpha, beta, shift,
    grad_weight)`` in ``denom``'s dtype from ``sums = (sum(dy (x - mu)), sum(dy), sum of the
    signs)`` (``_triton_kernels.lp_backward``), or ``None`` (the caller's torch ops)."""
    if not usable(denom, *sums, weight):
        return None
    c = denom.numel()
    out = torch.empty(4, c, dtype=denom.dtype, device=denom.device).unbind()
    ran = _launch(
        "lp_backward",
        denom.device,
        denom,
        weight if weight is not None else denom,
        *sums,
        *out,
        c,
        count,
        *_halves(factor),
        HAS_WEIGHT=weight is not None,
    )
    return (out[0], out[1], out[2], out[3]) if ran else None


def ghost_running_update_(
    means: list[Tensor],
    invstds: list[Tensor],
    sizes: list[int],
    count: int,
    eps: float,
    momentum: float | Tensor,
    running_mean: Tensor,
    running_var: Tensor,
) -> bool:
    """Ghost batch norm's running statistics from its virtual batches' saved means and ``1 /
    sqrt(var + eps)`` (virtual batches of ``sizes`` samples, all equal but the last; ``count``
    values per channel in the whole batch), pooled and applied in one kernel after one
    concatenation (``_triton_kernels.ghost_running_update``); ``False`` where it cannot run (the
    caller's torch ops then do it)."""
    factor = momentum if isinstance(momentum, Tensor) else None
    tensors = [*means, *invstds, running_mean, running_var]
    if not usable(*tensors, factor):
        return False
    if len(means) > 1 and any(s != sizes[0] for s in sizes[:-1]):
        return False
    stats = torch.cat([t.reshape(-1) for t in (*means, *invstds)])
    bessel = count / (count - 1) if count > 1 else 1.0
    ran = _launch(
        "ghost_running_update",
        running_mean.device,
        stats,
        running_mean,
        running_var,
        factor if factor is not None else running_mean,
        running_mean.numel(),
        len(means),
        sizes[0],
        sizes[-1],
        *_halves(eps),
        *_halves(0.0 if factor is not None else float(momentum)),
        *_halves(bessel),
        MOMENTUM_TENSOR=factor is not None,
    )
    if ran:
        moved(running_mean, running_var)
    return ran


class StandardizeRows(torch.autograd.Function):
    """Weight standardization (``_triton_kernels.standardize_rows``) with its own backward
    (``standardize_rows_backward``): one kernel each way, one program per output unit. Saves the
    weight and two float64 numbers per row. Double backward recomputes the torch ops
    differentiably."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, eps: float) -> Tensor:
        rows = weight.shape[0]
        k = weight.numel() // rows
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
        stats = torch.empty(2, rows, dtype=torch.float64, device=weight.device)
        if not _launch(
            "standardize_rows", weight.device, weight, out, *stats, k, *_halves(eps), grid=(rows,)
        ):
            raise _NotRun
        ctx.save_for_backward(weight, stats)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        weight, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: the torch ops, differentiably
            from normlab.functional.normalization import standardized_weight_ops

            with torch.enable_grad():
                y = standardized_weight_ops(weight, ctx.eps)
            return torch.autograd.grad(y, weight, grad, create_graph=True)[0], None
        rows = weight.shape[0]
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
        grad = grad.contiguous()
        k = weight.numel() // rows
        if not _launch(
            "standardize_rows_backward", weight.device, weight, grad, *stats, out, k, grid=(rows,)
        ):  # (ran in the forward, so it compiles here: only a new failure lands here)
            from normlab.functional.normalization import standardized_weight_ops

            with torch.enable_grad():
                w = weight.detach().requires_grad_()
                y = standardized_weight_ops(w, ctx.eps)
            return torch.autograd.grad(y, w, grad)[0], None
        return out, None


def standardize_rows(weight: Tensor, eps: float) -> Tensor | None:
    """Weight standardization of a contiguous weight (rows = output units) in one kernel each
    way (:class:`StandardizeRows`), or ``None`` where the kernel cannot run (the caller's torch
    ops then do it)."""
    if weight.dim() < 2 or weight.numel() == 0:
        return None
    if not usable(weight) or torch.autograd.forward_ad._current_level >= 0:
        return None
    try:
        out: Tensor = StandardizeRows.apply(weight, eps)  # type: ignore[no-untyped-call]
    except _NotRun:
        return None
    return out


_LINF_BLOCK = 64  # positions (channels-last: rows) per block of the L-inf search
_LINF_CHANNELS = 32  # channels per program of its first step on channels-last storage
_LINF_MAX_K = 64  # k above this: the torch ops (the selection's tile is K_PAD x 64 values)


def linf_top_deviations(x: Tensor, mean: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """L-inf batch norm's top-k search in two kernels (each block's largest ``|x - mean|``; then
    per channel its ``k`` best blocks and their ``k`` largest deviations): ``(values, storage
    offsets, signs of x - mean)``, each ``(C, k)``, as ``lp_norm._top_deviations``; or ``None``
    (the torch ops). Contiguous ``(N, C, *)`` input: blocks of positions, one program per
    channel and run of blocks; storage read as rows of ``C`` values (channels-last, ``(N, C)``,
    one position: :func:`_plan`): blocks of rows, one program per block of rows and tile of
    channels (reads along the contiguous channels)."""
    plan = _plan(x) if 1 <= k <= _LINF_MAX_K else None
    if plan is None or not usable(mean):
        return None
    data, rows, n, p = plan.data, plan.rows, plan.n, plan.p  # (rows: n = 1, p rows)
    c = x.shape[1]
    per_row = -(-p // _LINF_BLOCK)
    nb = n * per_row
    if nb < 1 or k > n * p or c > 65535:  # (CUDA's limit on a grid's second axis)
        return None
    centre = mean.to(x.dtype).contiguous()
    worst = torch.empty(c, nb, dtype=x.dtype, device=x.device)
    if rows:
        grid = (nb, -(-c // _LINF_CHANNELS))
        args: tuple[Any, ...] = (data, centre, worst, c, p, nb)
        meta = {"B": _LINF_BLOCK, "CT": _LINF_CHANNELS}
        if not _launch("linf_row_worst", x.device, *args, grid=grid, **meta):
            return None
    else:
        grid = (-(-nb // (_BLOCK // _LINF_BLOCK)), c)
        args = (data, centre, worst, c, p, per_row, nb)
        if not _launch("linf_block_worst", x.device, *args, B=_LINF_BLOCK, grid=grid):
            return None
    top = torch.empty(c, k, dtype=x.dtype, device=x.device)
    offsets = torch.empty(c, k, dtype=torch.int64, device=x.device)
    signs = torch.empty(c, k, dtype=x.dtype, device=x.device)
    meta = {"K_PAD": 1 << max(0, (k - 1).bit_length()), "B": _LINF_BLOCK, "ROWS": rows}
    args = (data, centre, worst, top, offsets, signs, c, p, per_row, nb, k)
    if not _launch("linf_select", x.device, *args, grid=(c,), **meta):
        return None
    return top, offsets, signs


_L1_PROGRAMS = 1024  # programs the L1 statistics read aims at (a few per SM of a large GPU)
_L1_SHARE = 8192  # values per program (at least) of the L1 statistics read
_GRID_AXIS = 65535  # CUDA's limit on a grid's second and third axes


class _Plan(NamedTuple):
    """How the L1 kernels read a tensor: ``data`` its storage as ``p`` rows of ``C`` values
    (``rows``: channels-last, ``(N, C)``, or contiguous with one position) or as ``(n, C,
    p)``; ``meta`` the tile sizes (rows: ``B`` rows by ``CT`` channels; else ``SR`` samples by
    ``PB`` positions, about ``_BLOCK`` values)."""

    data: Tensor
    rows: bool
    n: int
    p: int
    meta: dict[str, Any]


def _plan(x: Tensor, *like: Tensor | None) -> _Plan | None:
    """The L1 kernels' :class:`_Plan` for ``x``, or ``None`` (other strides or dtypes, kernels
    not usable, or past CUDA's grid limits); every tensor in ``like`` (``None`` skipped) must
    have ``x``'s shape and strides."""
    from normlab.functional._core import storage_layout  # (_core imports this module)

    layout = storage_layout(x)
    if x.dim() < 2 or layout is None or x.dtype not in (torch.float32, torch.float64):
        return None
    present = [t for t in like if t is not None]
    if any(t.shape != x.shape or t.stride() != x.stride() for t in present):
        return None
    n, c = x.shape[0], x.shape[1]
    p = x.numel() // max(1, n * c)
    if layout == "last" or p == 1:  # rows of C values (one position: the same storage)
        views = [_storage_view(t, True) for t in (x, *present)]
        rows = x.numel() // max(1, c)
        if not usable(*views) or rows > 2**31 - 1 - _LINF_BLOCK or c > _LINF_CHANNELS * _GRID_AXIS:
            return None  # (the kernels' rows are int32)
        meta = {"ROWS": True, "B": _LINF_BLOCK, "CT": _LINF_CHANNELS, "SR": 1, "PB": 1}
        return _Plan(views[0], True, 1, rows, meta)
    pb = min(_BLOCK, 1 << (p - 1).bit_length())  # positions per tile: a power of two >= p
    sr = _BLOCK // pb  # samples per tile
    if not usable(x, *present) or -(-p // pb) > _GRID_AXIS or -(-n // sr) * c > 2**31 - 1:
        return None
    meta = {"ROWS": False, "B": _LINF_BLOCK, "CT": _LINF_CHANNELS, "SR": sr, "PB": pb}
    return _Plan(x, False, n, p, meta)


def _storage_view(t: Tensor, rows: bool) -> Tensor:
    """``t`` as the L1 kernels index it: its ``(rows, C)`` view if ``rows``, else itself."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]) if rows else t


def l1_sums(x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(sum |x - mean|, sum sign(x - mean))`` per channel (float64) in one read of ``x``
    (channels-first, channels-last or ``(N, C)`` storage), or ``None`` (the caller's torch
    ops): L1 batch norm's statistics, with the sign sums its backward needs."""
    plan = _plan(x)
    if plan is None or not usable(mean):
        return None
    c, meta = x.shape[1], plan.meta
    if plan.rows:  # programs: tiles of channels by every splits-th block of rows
        tiles, items = -(-c // _LINF_CHANNELS), -(-plan.p // _LINF_BLOCK)
    else:  # programs: channels by every splits-th tile of samples and positions
        tiles, items = c, -(-plan.n // meta["SR"]) * -(-plan.p // meta["PB"])
    # values per program at least _L1_SHARE (a program reads CT channels on rows)
    values = plan.n * plan.p * (_LINF_CHANNELS if plan.rows else 1)
    splits = min(-(-_L1_PROGRAMS // tiles), -(-values // _L1_SHARE), items, _GRID_AXIS)
    part = torch.empty(2, splits, c, dtype=torch.float64, device=x.device)
    args = (plan.data, mean.contiguous(), part, c, plan.p, plan.n, splits)
    wide = x.dtype == torch.float64
    if not _launch("l1_sums", x.device, *args, grid=(tiles, splits), WIDE=wide, **meta):
        return None
    total = part.sum(1)
    return total[0], total[1]


def lp_pass(
    x: Tensor,
    mean: Tensor,
    a: Tensor,
    b: Tensor | None,
    k: Tensor | None = None,
    grad: Tensor | None = None,
) -> Tensor | None:
    """Lp batch norm's element-wise passes in one kernel each, in ``x``'s layout and dtype:
    the output ``(x - mean) * a + b`` (``b`` ``None``: no shift; L1 and L-inf), or with
    ``grad`` (``dy``, in ``x``'s layout) L1's input gradient ``a * dy + b * sign(x - mean) +
    k``; or ``None`` (the caller's torch ops)."""
    plan = _plan(x, grad)
    if plan is None or not usable(mean, a, b, k) or (grad is not None and (b is None or k is None)):
        return None
    c, meta = x.shape[1], plan.meta
    out = torch.empty_like(x)
    if plan.rows:
        grid = (-(-plan.p // _LINF_BLOCK), -(-c // _LINF_CHANNELS))
    else:
        grid = (-(-plan.n // meta["SR"]) * c, -(-plan.p // meta["PB"]))
    centre, scale = mean.contiguous(), a.contiguous()
    shift = centre if b is None else b.contiguous()  # (not read without HAS_B)
    extra = centre if k is None else k.contiguous()
    dy = plan.data if grad is None else _storage_view(grad, plan.rows)
    args = (plan.data, dy, centre, scale, shift, extra, _storage_view(out, plan.rows))
    flags = {"GRAD": grad is not None, "HAS_B": b is not None}
    if not _launch("lp_pass", x.device, *args, c, plan.p, plan.n, grid=grid, **flags, **meta):
        return None
    return out
