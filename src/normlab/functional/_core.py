"""The statistics core shared by every norm: *reduce over these dims, then normalize*.

Every normalization in normlab is one instance of

.. math::

    \\mu = \\operatorname{mean}_D(x), \\quad \\sigma^2 = \\operatorname{mean}_D\\big((x-\\mu)^2\\big),
    \\quad y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} \\cdot \\gamma + \\beta

for a set of reduced dims ``D`` (batch norm: all but the channel dim; layer norm: the trailing
dims; instance norm: the spatial dims; group norm: a channel group and the spatial dims). This module
holds the pieces every variant shares; the layers either call :func:`normalize` directly or a native
kernel that computes the same thing (and a test proves the equality).

Numerics (the fine print every variant inherits):

* the variance used to normalize is the **biased** one (divide by the count); the running variance
  stored for inference is the **unbiased** one, as in torch (see :func:`update_running_stats_`);
* ``eps`` is added to the variance inside the square root;
* statistics of float16/bfloat16 inputs are accumulated in float32 (:func:`stats_dtype`);
* moments are computed with the *corrected two-pass* algorithm (Chan, Golub & LeVeque 1983): the
  naive ``E[x^2] - E[x]^2`` loses every digit when ``|mean| >> std`` (e.g. mean 1e4, std 1 in
  float32), the corrected two-pass result is accurate to a few ulps of the *centered* values.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normlab.functional import _triton

__all__ = [
    "FULL_PRECISION",
    "Moments",
    "NonFiniteStatisticsWarning",
    "accelerator_routes",
    "all_finite",
    "apply_affine",
    "apply_function",
    "bessel_factor",
    "channel_affine",
    "channel_view_shape",
    "channels_last_format",
    "compiling",
    "finite_statistics",
    "keepdim_shape",
    "moments",
    "normalize",
    "on_accelerator",
    "on_device_only",
    "pool_moments",
    "relayout",
    "stats_dtype",
    "storage_layout",
    "store_if_finite_",
    "store_running_stats_",
    "update_running_stats_",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# The dtypes the CPU fast routes read as raw memory (numpy, numba): no low-precision type there.
FULL_PRECISION = (torch.float32, torch.float64)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 for float16/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def storage_layout(x: Tensor) -> str | None:
    """How ``x``'s storage runs, for code that reads it directly: ``"first"`` (contiguous
    ``(N, C, *)`` with positions: rows of positions per sample and channel), ``"last"`` (channels
    innermost: channels-last, or a contiguous ``(N, C)`` matrix: rows of ``C`` values), or
    ``None`` (other strides).

    >>> storage_layout(torch.ones(2, 3, 4)), storage_layout(torch.ones(2, 3)), storage_layout(torch.ones(2, 3, 4)[..., ::2])
    ('first', 'last', None)
    """
    if channels_last_format(x) is not None or (x.dim() == 2 and x.is_contiguous()):
        return "last"
    return "first" if x.is_contiguous() and x.dim() > 2 else None


def channels_last_format(x: Tensor) -> torch.memory_format | None:
    """``torch.channels_last`` (4-D) or ``torch.channels_last_3d`` (5-D) if ``x`` is stored that
    way (and not also channels-first contiguous, as with one channel or 1x1 maps), else ``None``:
    what a layer's output should keep.

    >>> channels_last_format(torch.ones(2, 3, 4, 4).contiguous(memory_format=torch.channels_last))
    torch.channels_last
    """
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    fmt = formats.get(x.dim())
    if fmt is None or x.is_contiguous() or not x.is_contiguous(memory_format=fmt):
        return None
    return fmt


class _Relayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, fmt: torch.memory_format) -> Tensor:
        ctx.source = channels_last_format(x) or torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.contiguous(memory_format=ctx.source), None


def relayout(x: Tensor, fmt: torch.memory_format) -> Tensor:
    """``x.contiguous(memory_format=fmt)`` whose gradient comes back in ``x``'s own layout (the
    plain conversion hands the gradient on in ``fmt``): for kernels that need channels-first
    input inside a layer that keeps channels-last tensors channels-last both ways. Compiled, the
    plain conversion (the compiler chooses layouts itself)."""
    if torch.compiler.is_compiling():
        return x.contiguous(memory_format=fmt)
    return _Relayout.apply(x, fmt)  # type: ignore[no-any-return, no-untyped-call]


def channel_view_shape(ndim: int, num_channels: int, channel_dim: int = 1) -> list[int]:
    """Shape that broadcasts a per-channel vector against an ``ndim``-D tensor.

    >>> channel_view_shape(4, 8)
    [1, 8, 1, 1]
    """
    shape = [1] * ndim
    shape[channel_dim] = num_channels
    return shape


def apply_affine(
    y: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int = 1
) -> Tensor:
    """``y * weight + bias`` with per-channel ``weight``/``bias`` (either may be ``None``)."""
    if weight is not None:
        shape = channel_view_shape(y.dim(), weight.numel(), channel_dim)
        if bias is not None:
            return torch.addcmul(bias.view(shape), y, weight.view(shape))
        return y * weight.view(shape)
    if bias is not None:
        return y + bias.view(channel_view_shape(y.dim(), bias.numel(), channel_dim))
    return y


def channel_affine(
    x: Tensor, scale: Tensor | None, shift: Tensor | None, out: Tensor | None = None
) -> Tensor:
    """``x * scale + shift`` per channel (dim 1; ``None``: 1, 0), in one pass at bandwidth, any
    layout kept: through torch's eval-mode batch-norm kernel (zero mean, unit variance, eps 0;
    ~2.5x faster on CPU channels-first tensors than a broadcast multiply-add), or on channels-last
    tensors with parameters of their dtype a multiply-add broadcast along the contiguous channels
    (5-25% faster there than the kernel). On accelerators always the broadcast multiply-add: one
    kernel launch, where the batch-norm route takes five (the zero and unit statistics, and
    CUDA's kernel copies the one and inverts the other). Out of place, or into ``out`` (of
    ``x``'s shape and layout; no autograd).

    >>> channel_affine(torch.ones(1, 2, 1), torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.0]))
    tensor([[[2.5000],
             [3.0000]]])
    """
    if on_accelerator(x):
        view = channel_view_shape(x.dim(), x.shape[1])
        a, b = (None if t is None else t.to(x.dtype).view(view) for t in (scale, shift))
        if a is not None and b is not None:
            return torch.addcmul(b, x, a, out=out)
        if a is not None:
            return torch.mul(x, a, out=out)
        if b is not None:
            return torch.add(x, b, out=out)
        return x.clone() if out is None else out.copy_(x)
    if (
        channels_last_format(x) is not None
        and (out is None or channels_last_format(out) is not None)
        and all(t is None or (t.dtype == x.dtype and t.dim() == 1) for t in (scale, shift))
    ):
        rows = x.movedim(1, -1)  # (N, *spatial, C), contiguous
        target = None if out is None else out.movedim(1, -1)
        if scale is not None and shift is not None:
            result = torch.addcmul(shift, rows, scale, out=target)
        elif scale is not None:
            result = torch.mul(rows, scale, out=target)
        elif shift is not None:
            result = torch.add(rows, shift, out=target)
        else:
            result = rows.clone() if target is None else target.copy_(rows)
        return result.movedim(-1, 1) if out is None else out
    zeros = x.new_zeros(x.shape[1])
    if out is None:
        return torch.batch_norm(
            x, scale, shift, zeros, torch.ones_like(zeros), False, 0.0, 0.0, False
        )
    unused = x.new_empty(0)
    torch.ops.aten.native_batch_norm.out(
        x,
        scale,
        shift,
        zeros,
        torch.ones_like(zeros),
        False,
        0.0,
        0.0,
        out=out,
        save_mean=unused,
        save_invstd=unused.clone(),
    )
    return out


def _centered_moments(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(x - mean, mean, biased var)`` in the stats dtype, by the corrected two-pass algorithm."""
    dims = tuple(dims)
    xs = x.to(stats_dtype(x.dtype))
    shift = xs.mean(dims, keepdim=True)  # first pass: close to the mean
    centered = xs - shift  # exact up to rounding of the centered values (Sterbenz)
    correction = centered.mean(dims, keepdim=True)  # second pass: the residual of the first
    centered = centered - correction
    return centered, shift + correction, centered.square().mean(dims, keepdim=True)


def moments(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean and **biased** variance of ``x`` over ``dims`` (kept as size-1 dims).

    Accumulated in :func:`stats_dtype` with the corrected two-pass algorithm.

    >>> x = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    >>> mean, var = moments(x, [0])
    >>> mean.tolist(), var.tolist()
    ([[3.0, 5.0]], [[4.0, 4.0]])
    """
    _, mean, var = _centered_moments(x, dims)
    return mean, var


def normalize(
    x: Tensor,
    dims: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float,
    channel_dim: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``x`` over ``dims`` and apply a per-channel affine map: the reference every norm meets.

    Returns ``(y, mean, var)``: ``y`` in ``x.dtype``; ``mean`` and the **biased** ``var`` kept as
    size-1 dims, in :func:`stats_dtype`. Differentiable to any order (plain autograd ops), including
    through the statistics.

    >>> y, mean, var = normalize(torch.tensor([[1.0], [3.0]]), [0], eps=0.0)
    >>> y.flatten().tolist(), mean.item(), var.item()
    ([-1.0, 1.0], 2.0, 1.0)
    """
    centered, mean, var = _centered_moments(x, dims)
    y = apply_affine(centered * torch.rsqrt(var + eps), weight, bias, channel_dim)
    return y.to(x.dtype), mean, var


def pool_moments(
    mean: Tensor, var: Tensor, dim: int, counts: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Merge groups' means and biased variances along ``dim`` (Chan et al.'s rule), the groups of
    equal size unless ``counts`` (broadcastable to ``mean``) gives their sizes.

    ``var_total = mean_g(var_g) + mean_g((mean_g - mean_total)^2)`` (means weighted by the
    counts): exact, and stable because the second term only sees the spread of the group means.

    >>> m, v = pool_moments(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), 0)
    >>> m.item(), v.item()
    (1.0, 2.0)
    >>> m, v = pool_moments(torch.tensor([0.0, 3.0]), torch.tensor([0.0, 0.0]), 0, torch.tensor([2.0, 1.0]))
    >>> m.item(), v.item()
    (1.0, 2.0)
    """
    if counts is None:
        total = mean.mean(dim)
        return total, (var + (mean - total.unsqueeze(dim)).square()).mean(dim)
    weights = counts / counts.sum(dim, keepdim=True)
    total = (weights * mean).sum(dim)
    return total, (weights * (var + (mean - total.unsqueeze(dim)).square())).sum(dim)


class NonFiniteStatisticsWarning(RuntimeWarning):
    """A training batch gave NaN/Inf batch statistics; the layer's running statistics were left
    as they were (normlab's policy: never poison them silently, never stop the training loop --
    e.g. a mixed-precision step whose gradients the GradScaler will skip anyway). Under
    ``torch.compile`` and on accelerators the buffers are protected the same way but nothing is
    emitted: knowing would take a host sync (:func:`on_device_only`)."""


class _NoGradContext:
    """The ``ctx`` an autograd function's ``forward`` gets from :func:`apply_function` when no
    gradient will be needed: it accepts what a forward records for its backward and keeps
    nothing that would outlive the call."""

    def __init__(self, inputs: int) -> None:
        self.needs_input_grad = (False,) * inputs

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass

    def mark_non_differentiable(self, *tensors: Tensor) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def apply_function(function: type[torch.autograd.Function], *args: Any) -> Any:
    """``function.apply(*args)`` when a gradient will be needed (grad mode on and a tensor argument
    requiring grad), else ``function.forward`` called directly: the autograd machinery costs
    ~10-30 us per call right after a pass over a large activation (benchmarks/overhead.py).
    For the eager functions here only (not under ``torch.compile`` or ``torch.func``
    transforms, which their callers route elsewhere)."""
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return function.apply(*args)  # type: ignore[no-untyped-call]
    return function.forward(_NoGradContext(len(args)), *args)


def compiling() -> bool:
    """Inside ``torch.compile``: no host sync may decide control flow there."""
    return bool(torch.compiler.is_compiling())


# Set by accelerator_routes(): the CPU then takes the routes normlab takes on accelerators.
_PRETEND = [False]


@contextlib.contextmanager
def accelerator_routes(on: bool = True) -> Iterator[None]:
    """Within this block CPU tensors take the routes normlab takes on accelerators (no host syncs,
    no fast-extra loops, large chunks): for tests, which can then check those routes' arithmetic
    on a machine without a GPU (tests/test_cuda.py does, where CUDA is absent). ``on=False``
    restores the CPU's own routes inside such a block (for a reference). A process-wide switch,
    not thread-safe: another thread's CPU tensors take the accelerator routes meanwhile too (and
    so emit no ``NonFiniteStatisticsWarning``)."""
    _PRETEND[0], before = on, _PRETEND[0]
    try:
        yield
    finally:
        _PRETEND[0] = before


def on_accelerator(where: Tensor | torch.device | str) -> bool:
    """Whether a tensor (or device) takes normlab's routes for accelerators: any device but the
    CPU -- and the CPU inside :func:`accelerator_routes`."""
    device = where.device if isinstance(where, Tensor) else torch.device(where)
    return device.type != "cpu" or _PRETEND[0]


def on_device_only(t: Tensor) -> bool:
    """Whether decisions about ``t``'s values must stay on its device: under ``torch.compile``
    (a data-dependent branch breaks the graph) and on accelerators (reading a value back is a
    host sync, which drains the device's queue of work once per layer and step)."""
    return compiling() or on_accelerator(t)


def all_finite(*stats: Tensor, nonnegative: bool = False) -> Tensor:
    """A 0-dim bool tensor on the statistics' device: whether every value is finite, without a
    host sync. Their float64 sum's magnitude is below infinity exactly then (NaN compares false):
    three small kernels for one tensor where ``isfinite().all()`` takes five, two for
    ``nonnegative`` statistics (variances, scales: no ``-inf``, so the sum itself is compared).
    (Not ``sum * 0 == 0``: inductor folds ``x * 0`` to 0.) A float64 statistic whose values sum
    past 1.8e308 counts as non-finite (its running statistics then stay: the safe side)."""
    total = stats[0].detach().sum(dtype=torch.float64)
    for s in stats[1:]:
        total = total + s.detach().sum(dtype=torch.float64)
    return (total if nonnegative else total.abs()) < math.inf


def finite_statistics(*stats: Tensor, owner: str) -> bool:
    """Whether every batch statistic is finite; if not, warn with
    :class:`NonFiniteStatisticsWarning` naming ``owner`` (the caller then skips the update).

    Under ``torch.compile`` and on accelerators (:func:`on_device_only`) it answers ``True``
    without looking: the running-statistics updates mask non-finite values there instead
    (:func:`store_if_finite_`), without the warning.
    """
    if on_device_only(stats[0]):
        return True
    # NaN/Inf anywhere make the sum so: one reduction and one sync on the common, finite path
    # (an overflowing sum of finite values is caught by the exact count below)
    if len(stats) == 1:
        total = float(stats[0].detach().sum())
    else:
        total = sum(float(s.detach().sum()) for s in stats)
    if math.isfinite(total):
        return True
    bad = sum(int((~torch.isfinite(s.detach())).sum()) for s in stats)
    if bad:
        warnings.warn(
            NonFiniteStatisticsWarning(
                f"{owner}: {bad} batch statistic(s) are NaN or Inf (non-finite values in the "
                "training batch); the running statistics were NOT updated with this batch. Fix: "
                "find where the NaN/Inf comes from (the inputs, a too large learning rate, "
                "float16 overflow)."
            ),
            stacklevel=4,
        )
    return not bad


def bessel_factor(count: int) -> float:
    """``count / (count - 1)``: the biased variance of ``count`` values times it is the unbiased
    one (1 for a single value, which has no unbiased variance)."""
    return count / (count - 1) if count > 1 else 1.0


def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | Tensor,
    owner: str = "batch norm",
) -> None:
    """In place, torch's rule: ``running = (1 - momentum) * running + momentum * batch``.

    ``var`` is the biased batch variance over ``count`` values; the running variance receives the
    unbiased one, ``var * count / (count - 1)`` (Ioffe & Szegedy 2015, Alg. 2; torch's convention).
    ``mean``/``var`` may have any shape with ``running_mean.numel()`` elements and any float dtype.
    Non-finite batch statistics are not applied (:class:`NonFiniteStatisticsWarning`).
    A 0-dim tensor ``momentum`` (cumulative averages under ``torch.compile``) is applied as
    ``running + momentum * (batch - running)``.
    """
    bessel = bessel_factor(count)
    if not isinstance(momentum, Tensor) and _update_in_numpy_(
        running_mean, running_var, mean, var, bessel, momentum
    ):
        return
    with torch.no_grad():
        new_mean = mean.reshape(running_mean.shape).to(running_mean.dtype)
        new_var = (var.reshape(running_var.shape) * bessel).to(running_var.dtype)
        if isinstance(momentum, Tensor):
            m = momentum.to(running_mean.dtype)
            store_running_stats_(
                running_mean,
                running_var,
                running_mean + (new_mean - running_mean) * m,
                running_var + (new_var - running_var) * m,
                owner,
            )
            return
        store_running_stats_(
            running_mean,
            running_var,
            torch.add(running_mean * (1.0 - momentum), new_mean, alpha=momentum),
            torch.add(running_var * (1.0 - momentum), new_var, alpha=momentum),
            owner,
        )


def _update_in_numpy_(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    bessel: float,
    momentum: float,
) -> bool:
    """:func:`update_running_stats_`'s rule on CPU float32/float64 vectors, computed in float64
    numpy (an op of ~1 us there, where each torch op costs several us right after a pass over a
    large activation: the ~12 ops of the torch route were ~4 % of batch norm's forward on
    64x64x32x32) and stored by one ``copy_`` per buffer (version counters move as torch's would).
    Returns ``False`` -- nothing done -- elsewhere (autograd, other dtypes or devices,
    ``torch.compile``) and for non-finite results (the torch route then warns)."""
    if compiling():
        return False
    arrays = []
    for t in (running_mean, running_var, mean, var):
        if on_accelerator(t) or t.dtype not in FULL_PRECISION or t.requires_grad:
            return False
        arrays.append(t.numpy().reshape(-1).astype(np.float64, copy=False))
    old_mean, old_var, new_mean, new_var = arrays
    keep = 1.0 - momentum
    updated_mean = keep * old_mean + momentum * new_mean
    updated_var = keep * old_var + (momentum * bessel) * new_var
    if not math.isfinite(float(updated_var.sum() + updated_mean.sum())):
        return False
    # no autograd here (nothing requires grad): copy_ broadcasts the flat result into the buffer
    running_mean.copy_(torch.from_numpy(updated_mean.reshape(running_mean.shape)))
    running_var.copy_(torch.from_numpy(updated_var.reshape(running_var.shape)))
    return True


def store_running_stats_(
    running_mean: Tensor, running_var: Tensor, new_mean: Tensor, new_var: Tensor, owner: str
) -> None:
    """Copy ``new_mean``/``new_var`` into the running buffers -- unless ``new_var`` is not finite
    (a NaN/Inf in the batch makes it so): then the buffers keep their values
    (:func:`store_if_finite_`)."""
    store_if_finite_(
        ((running_mean, new_mean), (running_var, new_var)), new_var, owner=owner, nonnegative=True
    )


def store_if_finite_(
    updates: Sequence[tuple[Tensor, Tensor]],
    *stats: Tensor,
    owner: str,
    nonnegative: bool = False,
) -> None:
    """``buffer.copy_(new)`` for each ``(buffer, new)`` in ``updates`` if every tensor in
    ``stats`` is finite; else every buffer keeps its value. On the CPU it looks (one host sync)
    and warns with :class:`NonFiniteStatisticsWarning`; under ``torch.compile`` and on
    accelerators (:func:`on_device_only`) the choice is a ``torch.where`` on the device, with no
    sync and no warning (``nonnegative``: as in :func:`all_finite`)."""
    with torch.no_grad():
        if on_device_only(stats[0]):
            if len(updates) == 2 and _triton.guarded_copy_(
                (updates[0], updates[1]),
                tuple(s.detach().reshape(-1) for s in stats),
                when_finite=True,
            ):  # one kernel, not three or four
                _triton.moved(updates[0][0], updates[1][0])
                return
            ok = all_finite(*stats, nonnegative=nonnegative)
            for buffer, new in updates:  # one kernel per buffer
                torch.where(ok, new.to(buffer.dtype), buffer, out=buffer)
        elif finite_statistics(*stats, owner=owner):
            for buffer, new in updates:
                buffer.copy_(new)


@dataclass(frozen=True)
class Moments:
    """Exact streaming statistics of a set of values, per channel: count, mean and the sum of
    squared deviations from the mean (``m2``), all float64 (Chan, Golub & LeVeque's form).

    Any split of the data into batches, merged with :meth:`merge` in any order, gives the same
    result up to float64 rounding -- unlike averaging per-batch statistics with equal weights.

    >>> a = Moments.of(torch.tensor([[1.0], [3.0]]), [0])
    >>> b = Moments.of(torch.tensor([[5.0]]), [0])
    >>> m = a.merge(b)
    >>> m.count.item(), m.mean.item(), m.variance().item(), m.variance(unbiased=True).item()
    (3.0, 3.0, 2.6666666666666665, 4.0)
    """

    count: Tensor
    mean: Tensor
    m2: Tensor

    @staticmethod
    def of(x: Tensor, dims: Sequence[int]) -> Moments:
        """Moments of ``x`` over ``dims`` (the other dims keep separate statistics), in float64."""
        dims = tuple(dims)
        x64 = x.detach().double()
        count = x64.new_tensor(float(math.prod(x.shape[d] for d in dims)))
        mean = x64.mean(dims)
        centered = x64 - mean.view(keepdim_shape(x.shape, dims))
        m2 = (centered * centered).sum(dims)
        return Moments(count.expand_as(mean).clone(), mean, m2)

    @staticmethod
    def empty(shape: Sequence[int], device: torch.device | str | None = None) -> Moments:
        """No values seen yet (count 0)."""
        zeros = torch.zeros(tuple(shape), dtype=torch.float64, device=device)
        return Moments(zeros, zeros.clone(), zeros.clone())

    def merge(self, other: Moments) -> Moments:
        """The moments of the union of both sets of values (exact)."""
        count = self.count + other.count
        safe = count.clamp_min(1.0)  # both empty: every term below is 0
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / safe)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / safe)
        return Moments(count, mean, m2)

    def variance(self, unbiased: bool = False) -> Tensor:
        """Biased (divide by n) or unbiased (divide by n - 1) variance; 0 where undefined."""
        denom = self.count - 1 if unbiased else self.count
        return torch.where(denom > 0, self.m2 / denom.clamp_min(1), torch.zeros_like(self.m2))


def keepdim_shape(shape: Sequence[int], dims: Sequence[int]) -> list[int]:
    """``shape`` with the reduced ``dims`` set to 1 (for broadcasting a reduced statistic back).

    >>> keepdim_shape((8, 3, 5, 5), (0, 2, 3))
    [1, 3, 1, 1]
    """
    return [1 if d in dims else s for d, s in enumerate(shape)]
