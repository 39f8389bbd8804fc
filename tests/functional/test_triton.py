"""normlab's Triton kernels (functional/_triton.py) against the torch ops they stand in for.

Without a GPU (CI) the kernels run in Triton's interpreter on CPU tensors, inside
``accelerator_routes()`` (the root conftest.py sets ``TRITON_INTERPRET=1`` before triton's import);
a separate process checks that each kernel also compiles for NVIDIA GPUs (sm_80, sm_90), which
Triton does without a GPU. On a GPU, tests/test_cuda.py runs the layers through them.
"""

from __future__ import annotations

import collections
import copy
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator

import pytest
import torch

import normlab.nn as nl
from normlab.functional import _triton
from normlab.functional._core import accelerator_routes, storage_layout
from normlab.functional.normalization import standardized_weight

if not (_triton.available() and _triton._interpreter()):
    pytest.skip("needs triton, imported with TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True)
def _routes() -> Iterator[None]:
    with accelerator_routes(), _triton.interpreted():
        yield


def _pair(c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=g), torch.randn(c, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("c", [5, 2500], ids=["one-block", "three-blocks"])
@pytest.mark.parametrize("when_finite", [True, False])
@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf", "second-check"])
def test_guarded_copy_copies_exactly_when_the_checks_say(
    c: int, when_finite: bool, bad: str | None
) -> None:
    dst_a, src_a = _pair(c, 0)
    dst_b, src_b = _pair(c, 1)
    dst_b = dst_b.double()
    before = (dst_a.clone(), dst_b.clone())
    checks = (torch.rand(c) + 0.1, torch.rand(7, dtype=torch.float64))
    if bad is not None:
        value = float(bad) if bad != "second-check" else float("nan")
        checks[1 if bad == "second-check" else 0][-1] = value  # the last block's last value
    ran = _triton.guarded_copy_(((dst_a, src_a), (dst_b, src_b)), checks, when_finite=when_finite)
    assert ran
    copied = (bad is None) == when_finite
    expected = (src_a.float(), src_b) if copied else before
    torch.testing.assert_close(dst_a, expected[0], rtol=0, atol=0)  # rounded as .to() rounds
    torch.testing.assert_close(dst_b, expected[1], rtol=0, atol=0)


def test_guarded_copy_declines_what_it_cannot_do() -> None:
    dst, src = torch.zeros(4, 2), torch.ones(4, 2)
    strided = (dst[:, 0], src[:, 0])
    assert not _triton.guarded_copy_((strided, strided), (torch.ones(4),), when_finite=True)
    assert torch.equal(dst, torch.zeros(4, 2))
    with _triton.interpreted(False):  # CPU tensors outside the interpreter block
        assert not _triton.usable(torch.ones(3))
    assert not _triton.usable(None)


def _run(layer: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(gy)
    grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    return [y.detach(), x.grad, *grads, *(b.clone() for b in layer.buffers())]


def _both(
    layer: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, steps: int = 2
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Training steps of two copies of ``layer``: with the kernels and with the torch ops; and
    how many kernels the first copy launched."""
    twin = copy.deepcopy(layer)
    launched = sum(_triton.LAUNCHES.values())
    ours = [t for _ in range(steps) for t in _run(layer, x, gy)]
    launched = sum(_triton.LAUNCHES.values()) - launched
    with _triton.interpreted(False):
        ref = [t for _ in range(steps) for t in _run(twin, x, gy)]
    return ours, ref, launched


def _input(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)


def _affine(layer: torch.nn.Module) -> torch.nn.Module:
    """``layer`` with its weight and bias (if any) drawn away from 1 and 0."""
    if getattr(layer, "weight", None) is not None:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1.0, 1.0)
    return layer


def _batch(channels: int, dtype: torch.dtype, cl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An input and an output gradient, (4, channels, 3, 2), channels-last if ``cl``."""
    x = _input((4, channels, 3, 2), dtype)
    gy = _input(x.shape, dtype, 1)
    fmt = torch.channels_last if cl else torch.contiguous_format
    return x.contiguous(memory_format=fmt), gy.contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels", [3, 1100])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels-last"])
def test_batch_renorm_with_kernels_equals_torch_ops(
    dtype: torch.dtype, affine: bool, channels: int, cl: bool
) -> None:
    """Outputs, input and parameter gradients, and buffers over two steps in which ``r`` and
    ``d`` are clipped (running statistics far from the batch's, limits ramping)."""
    layer = nl.BatchRenorm2d(
        channels, affine=affine, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=3
    ).to(dtype)
    with torch.no_grad():  # r and d clipped above, below and not at all, by channel
        third = torch.arange(channels) % 3
        layer.running_mean.copy_(torch.tensor([3.0, -1.0, 1.0])[third])
        layer.running_std.copy_(torch.tensor([0.5, 20.0, 3.0])[third])
    ours, ref, launched = _both(_affine(layer), *_batch(channels, dtype, cl))
    # limits, step and weight gradient (if any) per step
    assert launched == 2 * (3 if affine else 2)
    # the kernels compute in float64 and round once; the ops round at each step
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels", [3, 1100])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("p", ["1", "inf"])
def test_lp_batch_norm_with_kernels_equals_torch_ops(
    p: str, dtype: torch.dtype, affine: bool, channels: int, cl: bool
) -> None:
    """L1 and L-infinity batch norm: outputs, gradients and running statistics over two steps,
    the per-channel forward and backward steps each one kernel."""
    if channels > 1024 and (p == "inf" or not cl):
        pytest.skip(
            "the interpreter runs one program per channel (L-inf's search) or per sample and "
            "channel (L1 on channels-first storage) one by one (20-90 s); the per-channel "
            "steps' two blocks are covered by L1's channels-last case (the same kernels)"
        )
    make = nl.L1BatchNorm if p == "1" else nl.LinfBatchNorm
    layer = make(channels, affine=affine).to(dtype)
    ours, ref, launched = _both(_affine(layer), *_batch(channels, dtype, cl))
    # per step the forward and backward steps and the output; L-inf's top-k search (two
    # kernels), L1's statistics read and input gradient
    assert launched == 2 * 5
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [8, 7, 2], ids=["even", "ragged", "one-virtual-batch"])
@pytest.mark.parametrize("channels", [3, 1100])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_ghost_running_statistics_with_kernel_equal_torch_ops(
    dtype: torch.dtype, batch: int, channels: int, cl: bool, momentum: float | None
) -> None:
    """The virtual batches' statistics pooled and applied in one kernel (a ragged batch: the
    last virtual batch larger, 3 = 2 + the lone sample)."""
    layer = nl.GhostBatchNorm(channels, virtual_batch_size=2, momentum=momentum).to(dtype)
    x = _input((batch, channels, 3, 2), dtype) * torch.arange(1, batch + 1).view(-1, 1, 1, 1)
    gy = _input(x.shape, dtype, 1)
    if cl:
        x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
    ours, ref, launched = _both(layer, x, gy, steps=3)
    assert launched == 3
    # the running variance comes from float32 1 / sqrt(var + eps) on both routes
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(8, 3, 3, 3), (4, 300, 2, 2), (5, 7)], ids=["conv", "fan-in-1200", "linear"]
)
def test_weight_standardization_with_kernels_equals_torch_ops(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """Standardized weight and its gradient: one kernel each way, against the torch ops (and,
    in float64, gradcheck and gradgradcheck through the kernels)."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for kernels in (True, False):
        w = weight.clone().requires_grad_()
        launched = sum(_triton.LAUNCHES.values())
        with _triton.interpreted(kernels):
            y = standardized_weight(w, 1e-5)
            y.backward(grad)
        assert sum(_triton.LAUNCHES.values()) - launched == (2 if kernels else 0)
        results.append((y.detach(), w.grad))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)
    if dtype == torch.float64:
        w = weight[:3, :4].contiguous().requires_grad_()
        assert torch.autograd.gradcheck(lambda w: standardized_weight(w, 1e-5), (w,))
        assert torch.autograd.gradgradcheck(lambda w: standardized_weight(w, 1e-5), (w,))


def test_weight_standardized_convolution_with_kernels_equals_torch_ops() -> None:
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", nl.WeightStandardization())
    x = _input((2, 3, 5, 5), torch.float32)
    ours, ref, launched = _both(conv, x, _input((2, 4, 5, 5), torch.float32, 1))
    assert launched == 2 * 2
    # the weight's gradient (~50 in size) through float32 ops: rounding ~1e-6 of that
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "k", "layout"),
    [
        ((4, 3, 5, 3), 10, "first"),
        ((3, 2, 10, 10), 1, "first"),
        ((2, 3, 130), 17, "first"),
        ((50, 6), 7, "last"),
        ((1, 2, 64), 64, "first"),
        ((4, 3, 5, 3), 10, "last"),
        ((3, 40, 10, 10), 1, "last"),
        ((2, 33, 13, 5), 17, "last"),
        ((1, 2, 8, 8), 64, "last"),
        ((7, 5, 3, 3, 2), 9, "last"),
        ((90, 4, 1, 1), 5, "first"),
    ],
    ids=[
        "15-positions",
        "k1",
        "k17-ragged-blocks",
        "2d",
        "k-equals-values",
        "cl-15-positions",
        "cl-k1-two-channel-tiles",
        "cl-k17-ragged-rows",
        "cl-k-equals-values",
        "cl-3d",
        "one-position-as-rows",
    ],
)
def test_linf_search_kernels_find_the_top_deviations(
    dtype: torch.dtype, shape: tuple[int, ...], k: int, layout: str
) -> None:
    """The two search kernels against the torch ops' search: the same k largest deviations per
    channel, at the same storage offsets, with the same signs (random data: no ties). On
    channels-last (and ``(N, C)``) storage blocks of rows, 32 channels per program of the first
    kernel (40 and 33 channels: a second, partial tile); 130 rows: a ragged last block."""
    from normlab.functional.lp_norm import _top_deviations

    x = _input(shape, dtype) * torch.linspace(0.5, 4.0, shape[1], dtype=dtype).view(
        1, -1, *([1] * (len(shape) - 2))
    )
    if layout == "last" and x.dim() > 2:
        x = x.contiguous(memory_format=_LAST[x.dim()])
    assert storage_layout(x) == layout
    mean = x.transpose(0, 1).reshape(shape[1], -1).mean(1)
    before = collections.Counter(_triton.LAUNCHES)
    fused = _triton.linf_top_deviations(x, mean, k)
    assert fused is not None
    rows = layout == "last" or x.numel() == shape[0] * shape[1]  # (one position: rows too)
    first = "linf_row_worst" if rows else "linf_block_worst"
    assert _triton.LAUNCHES - before == collections.Counter([first, "linf_select"])
    with _triton.interpreted(False):
        ref = _top_deviations(x, mean, k)
    for got, want in ((fused, ref),):
        order_got, order_want = got[1].argsort(1), want[1].argsort(1)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(
                a.gather(1, order_got), b.gather(1, order_want), rtol=0, atol=0
            )
    # the offsets address the values: |x - mean| there is the deviation
    flat = torch.as_strided(x, (x.numel(),), (1,))
    centre = mean.to(dtype).view(-1, 1)
    torch.testing.assert_close((flat[fused[1]] - centre).abs(), fused[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((4, 3, 5, 3), "first"),
        ((2, 3, 1500), "first"),
        ((300, 3, 7), "first"),
        ((9, 4, 1, 1), "first"),
        ((50, 6), "last"),
        ((3, 40, 10, 10), "last"),
        ((2, 33, 13, 5), "last"),
        ((7, 5, 3, 3, 2), "last"),
        ((6, 5, 1, 2), "last"),
    ],
    ids=[
        "nchw",
        "positions-over-1024",
        "128-samples-per-tile",
        "one-position",
        "2d",
        "cl-two-channel-tiles",
        "cl-ragged-rows",
        "cl-3d",
        "cl-size-one-dim",
    ],
)
@pytest.mark.parametrize("share", [8192, 7], ids=["one-split", "many-splits"])
@pytest.mark.parametrize("ties", [False, True], ids=["gaussian", "at-the-centre"])
def test_l1_kernels_equal_torch_ops(
    dtype: torch.dtype,
    shape: tuple[int, ...],
    layout: str,
    share: int,
    ties: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """L1 batch norm's statistics read (``sum |x - mean|`` and the sign sums, split among
    programs: with a share of 7 values each most channels' values are cut into many ragged
    pieces) and its element-wise passes (output with and without shift, input gradient)
    against the torch ops, layout kept; values exactly at the centre have sign 0. Tiles: 7
    positions take 8 lanes each of 128 samples (300: a ragged last tile); one position and a
    size-one dimension read the storage as rows of channels."""
    monkeypatch.setattr(_triton, "_L1_SHARE", share)
    x = _input(shape, dtype)
    gy = _input(shape, dtype, 1)
    if layout == "last" and x.dim() > 2:
        x, gy = (t.contiguous(memory_format=_LAST[x.dim()]) for t in (x, gy))
    assert storage_layout(x) == layout
    c = shape[1]
    view = [1, c] + [1] * (x.dim() - 2)
    mean = x.mean([0, *range(2, x.dim())])
    if ties:  # integers around a centre of 0: a fifth of the values exactly at it (sign 0)
        x = x.round().clamp(-2, 2)
        mean = torch.zeros(c, dtype=dtype)
    a, b, k = (_input((c,), dtype, seed) for seed in (2, 3, 4))
    before = collections.Counter(_triton.LAUNCHES)
    sums = _triton.l1_sums(x, mean)
    y = _triton.lp_pass(x, mean, a, b)
    y0 = _triton.lp_pass(x, mean, a, None)
    dx = _triton.lp_pass(x, mean, a, b, k, grad=gy)
    assert _triton.LAUNCHES - before == collections.Counter(["l1_sums"] + ["lp_pass"] * 3)
    assert sums is not None
    assert y is not None
    assert y0 is not None
    assert dx is not None
    z = x - mean.view(view)
    dims = [0, *range(2, x.dim())]
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}
    torch.testing.assert_close(sums[0], z.abs().double().sum(dims), **tol)
    torch.testing.assert_close(sums[1], z.sign().double().sum(dims), rtol=0, atol=0)
    a, b, k = (t.view(view) for t in (a, b, k))
    torch.testing.assert_close(y, z * a + b, **tol)
    torch.testing.assert_close(y0, z * a, **tol)
    torch.testing.assert_close(dx, a * gy + b * z.sign() + k, **tol)
    assert y.stride() == y0.stride() == dx.stride() == x.stride()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_l1_kernels_on_nonfinite_channels(value: str) -> None:
    """A NaN or an infinity in one channel: that channel's deviation sum is not finite (NaN
    counts no sign), the others are the torch ops'."""
    x = _input((4, 3, 5, 3), torch.float32)
    x[2, 1, 1, 1] = float(value)
    mean = x.mean([0, 2, 3])
    sums = _triton.l1_sums(x, mean)
    assert sums is not None
    assert not sums[0][1].isfinite()
    z = (x - mean.view(1, -1, 1, 1))[:, [0, 2]]
    torch.testing.assert_close(
        sums[0][[0, 2]], z.abs().double().sum([0, 2, 3]), rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(sums[1][[0, 2]], z.sign().double().sum([0, 2, 3]), rtol=0, atol=0)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_linf_search_kernels_on_nonfinite_channels(value: str, cl: bool) -> None:
    """A channel with a NaN or an infinity: valid offsets (the backward writes there), NaN
    values as the torch ops give them; the other channels untouched. The layer's step then
    matches the torch ops' (gradients NaN in that channel only)."""
    x = _input((4, 3, 5, 3), torch.float32)
    x[2, 1, 1, 1] = float(value)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    mean = x.transpose(0, 1).reshape(3, -1).mean(1)
    fused = _triton.linf_top_deviations(x, mean, 5)
    assert fused is not None
    assert int(fused[1].min()) >= 0
    assert int(fused[1].max()) < x.numel()
    assert not fused[0][1].isfinite().any()
    assert fused[0][[0, 2]].isfinite().all()
    layer = nl.LinfBatchNorm(3, k=5)
    ours, ref, launched = _both(layer, x, _input(x.shape, torch.float32, 1), steps=1)
    assert launched == 5  # the search's two kernels, the forward step, output, backward step
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_cumulative_average_factor_is_read_on_the_device() -> None:
    """``momentum=None``: the factor ``1 / (steps + 1)``, a 0-dim tensor on accelerators."""
    layer = nl.L1BatchNorm(4, momentum=None)
    x = _input((5, 4, 3), torch.float32)
    ours, ref, launched = _both(layer, x, _input(x.shape, torch.float32, 1), steps=3)
    assert launched == 3 * 5  # statistics read, forward step, output, backward step, gradient
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", [0, 2, 3, 5, 7, 9, 50])
@pytest.mark.parametrize(
    "ramp", [(3, 7, 9), (5, 5, 5), (0, 0, 4)], ids=["ramps", "at-once", "d-first"]
)
def test_renorm_limits_kernel_equals_schedule(step: int, ramp: tuple[int, int, int]) -> None:
    warmup, r_end, d_end = ramp
    layer = nl.BatchRenorm2d(
        2, r_max=3.0, d_max=5.0, warmup_steps=warmup, r_max_steps=r_end, d_max_steps=d_end
    )
    layer.num_batches_tracked.fill_(step)
    fused = _triton.renorm_limits(layer.renorm_schedule, layer.num_batches_tracked)
    assert fused is not None
    with accelerator_routes(False):  # the CPU's numbers: the schedule in Python floats
        expected = torch.tensor(layer.current_limits(), dtype=torch.float64)
    torch.testing.assert_close(fused, expected, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nonfinite_batch_keeps_running_statistics_with_kernels(value: str) -> None:
    x = _input((4, 3, 2, 2), torch.float32)
    x[1, 2, 0, 0] = float(value)
    layers = (
        nl.BatchNorm2d(3),
        nl.BatchRenorm2d(3, warmup_steps=0),
        nl.GhostBatchNorm(3, virtual_batch_size=2),
        nl.L1BatchNorm(3),
        nl.LinfBatchNorm(3, k=2),
    )
    for layer in layers:
        before = [b.clone() for b in layer.buffers()][:2]
        launched = sum(_triton.LAUNCHES.values())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning on the device routes: no host sync
            y = layer(x)
        assert sum(_triton.LAUNCHES.values()) > launched
        assert not y[1, 2].isfinite().any()  # (ghost: in the NaN's virtual batch only)
        assert y[:, :2].isfinite().all()
        for kept, now in zip(before, list(layer.buffers())[:2], strict=True):
            assert torch.equal(kept, now), type(layer).__name__


def test_batch_norm_guard_with_kernel_equals_torch_ops() -> None:
    layer = nl.BatchNorm2d(5)
    x = _input((6, 5, 3, 3), torch.float32)
    gy = _input(x.shape, torch.float32, 1)
    ours, ref, launched = _both(layer, x, gy)
    assert launched == 2
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_renorm_kernel_gradients_match_finite_differences() -> None:
    """gradcheck and gradgradcheck through the kernels' route (momentum 0: the running
    statistics, hence ``r`` and ``d``, stay fixed between the checks' calls)."""
    layer = nl.BatchRenorm2d(
        3, momentum=0.0, r_max=1.2, d_max=0.3, warmup_steps=0, r_max_steps=0, d_max_steps=0
    ).double()
    with torch.no_grad():
        layer.running_mean.fill_(0.7)
        layer.running_std.fill_(0.8)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1.0, 1.0)
    x = _input((4, 3, 2, 2), torch.float64).requires_grad_()
    params = (layer.weight, layer.bias)

    def f(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    launched = sum(_triton.LAUNCHES.values())
    assert torch.autograd.gradcheck(f, (x, *params))
    assert sum(_triton.LAUNCHES.values()) > launched  # the kernels ran
    assert torch.autograd.gradgradcheck(f, (x, *params))


def _break(monkeypatch: pytest.MonkeyPatch, kernel: str, message: str) -> None:
    """Kernel ``kernel`` fails at every launch with ``message`` (as a compiler error would), and
    no kernel is yet known broken."""
    from normlab.functional import _triton_kernels

    class Broken:
        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                raise RuntimeError(message)

            return launch

    monkeypatch.setattr(_triton_kernels, kernel, Broken())
    monkeypatch.setattr(_triton, "_BROKEN", set())


def test_a_kernel_that_fails_to_compile_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _break(monkeypatch, "renorm_step", "PassManager::run failed")
    layer = nl.BatchRenorm2d(3, warmup_steps=0)
    x = _input((4, 3, 2, 2), torch.float32)
    gy = _input(x.shape, torch.float32, 1)
    twin = copy.deepcopy(layer)
    with pytest.warns(
        RuntimeWarning, match=r"Triton kernel renorm_step failed on cpu.*NORMLAB_TRITON=0"
    ):
        ours = _run(layer, x, gy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the torch ops from now on, silently
        ours += _run(layer, x, gy)
    with _triton.interpreted(False):
        ref = _run(twin, x, gy) + _run(twin, x, gy)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nl.BatchRenorm2d(3, warmup_steps=0),
        lambda: nl.GhostBatchNorm(3, virtual_batch_size=4),
        lambda: nl.L1BatchNorm(3),
    ],
    ids=["renorm", "ghost", "l1"],
)
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch-ops"])
def test_kernels_move_version_counters_as_the_ops_do(make: object, kernels: bool) -> None:
    """A graph that saved the running statistics (an eval forward), then a training step that
    updates them: backward through the old graph fails on both routes, as torch.nn's does,
    instead of using the new values silently."""
    layer = make()  # type: ignore[operator]
    x = _input((8, 3, 4, 4), torch.float32)
    with _triton.interpreted(kernels):
        versions = [b._version for b in layer.buffers()]
        y_eval = layer.eval()(x)
        layer.train()(x * 3 + 5)
        moved = [b._version for b in layer.buffers()]
    assert moved[:2] != versions[:2]
    if isinstance(layer, nl.L1BatchNorm):  # its eval output keeps no running statistic
        y_eval.sum().backward()
    else:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y_eval.sum().backward()


@pytest.mark.parametrize(
    "limits",
    [(1.5, 0.5), (1.5, "tensor"), ("tensor", 0.5), ("tensor", "tensor")],
    ids=["floats", "d-tensor", "r-tensor", "tensors"],
)
def test_renorm_limits_given_as_numbers_or_tensors(limits: tuple[object, object]) -> None:
    """The functional route with either limit a number or a 0-dim tensor: the kernel reads both
    one way (two numbers or two tensors) and leaves mixed pairs to the torch ops."""
    from normlab.functional.batch_variants import batch_renorm_unchecked

    given = [
        torch.tensor(v, dtype=torch.float64) if t == "tensor" else t
        for t, v in zip(limits, (1.5, 0.5), strict=True)
    ]
    x = _input((8, 4, 3, 3), torch.float32)
    results = []
    for kernels in (True, False):
        rm, rs = torch.tensor([3.0, -1.0, 1.0, 0.0]), torch.tensor([0.5, 20.0, 3.0, 1.0])
        launched = _triton.LAUNCHES["renorm_step"]
        with _triton.interpreted(kernels):
            y = batch_renorm_unchecked(
                x, rm, rs, torch.ones(4), torch.zeros(4), True, 0.1, 1e-5, *given, "t"
            )
        mixed = isinstance(given[0], torch.Tensor) != isinstance(given[1], torch.Tensor)
        assert _triton.LAUNCHES["renorm_step"] - launched == (1 if kernels and not mixed else 0)
        results.append((y, rm, rs))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_renorm_kernel_keeps_nan_as_torch_clamp_does() -> None:
    """``r`` and ``d`` of a NaN mean, and of a zero running std with the mean on it (0 / 0):
    NaN, as ``torch.clamp`` gives (Triton's min and max would drop it)."""
    mean, var = torch.tensor([0.5, float("nan")]), torch.tensor([1.0, 1.0])
    rm, rs = torch.tensor([0.5, 0.0]), torch.tensor([0.0, 1.0])
    limits = (torch.tensor(3.0, dtype=torch.float64), torch.tensor(5.0, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy: 0 / 0
        fused = _triton.renorm_step(
            None, None, (mean, var, rm.clone(), rs.clone()), limits, 0.1, 1e-5
        )
    assert fused is not None
    d = ((mean - rm) / rs).clamp(-limits[1], limits[1])
    assert fused[1].isnan().tolist() == d.isnan().tolist() == [True, True]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated:DeprecationWarning")
def test_no_kernel_runs_under_transforms_and_tracing() -> None:
    """torch.compile (inductor fuses the torch ops), torch.func transforms, forward AD and jit
    tracing take the torch ops; TorchScript and torch.fx compile weight standardization's."""
    import torch.autograd.forward_ad as fwAD

    w = _input((4, 3, 3, 3), torch.float32)
    layer = nl.BatchRenorm2d(3, warmup_steps=0)
    x = _input((4, 3, 2, 2), torch.float32)
    launched = sum(_triton.LAUNCHES.values())
    torch.func.grad(lambda w: standardized_weight(w, 1e-5).square().sum())(w)
    with fwAD.dual_level():
        standardized_weight(fwAD.make_dual(w, torch.ones_like(w)), 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.trace(layer, (x,), check_trace=False)
    ws = nl.WeightStandardization()
    for converted in (torch.jit.script(ws), torch.fx.symbolic_trace(ws)):
        torch.testing.assert_close(converted(w), standardized_weight(w, 1e-5), rtol=1e-5, atol=1e-6)
    launched_eager = sum(_triton.LAUNCHES.values()) - launched
    assert launched_eager == 2  # the two eager references just above, forward only
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    compiled(x.requires_grad_()).sum().backward()
    assert sum(_triton.LAUNCHES.values()) - launched == launched_eager


def test_launch_refuses_while_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """A custom backward traced by compiled autograd: no kernel, no warning, nothing marked
    broken (the caller's torch ops run)."""
    monkeypatch.setattr(_triton, "_BROKEN", set())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    r, d, out = torch.ones(3), torch.ones(3), torch.empty(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _triton._launch("renorm_weight_grad", r.device, r, r, r, d, out, 3)
    assert not _triton._BROKEN


@pytest.mark.parametrize("kernel", ["renorm_weight_grad", "standardize_rows_backward"])
def test_a_backward_kernel_that_fails_falls_back(
    monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    _break(monkeypatch, kernel, "out of resources")
    if kernel == "renorm_weight_grad":
        layer: torch.nn.Module = _affine(nl.BatchRenorm2d(3, warmup_steps=0))
        x, gy = _batch(3, torch.float32, False)
    else:
        layer = torch.nn.Conv2d(3, 4, 3, padding=1)
        torch.nn.utils.parametrize.register_parametrization(
            layer, "weight", nl.WeightStandardization()
        )
        x, gy = _input((2, 3, 5, 5), torch.float32), _input((2, 4, 5, 5), torch.float32, 1)
    twin = copy.deepcopy(layer)
    with pytest.warns(RuntimeWarning, match=f"Triton kernel {kernel} failed"):
        ours = _run(layer, x, gy)
    with _triton.interpreted(False):
        ref = _run(twin, x, gy)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize(
    "missing", ["gradient-pass", "output-pass", "backward-step"], ids=lambda m: f"no-{m}"
)
def test_l1_steps_mix_kernels_and_torch_ops(
    monkeypatch: pytest.MonkeyPatch, cl: bool, missing: str
) -> None:
    """L1 batch norm with one of its kernels unavailable (the wrapper returns ``None``): the
    forward's sign sums (from the kernel) still serve a backward on the torch ops, and a
    torch-ops coefficient step (float64 shift for float32 data) still feeds the gradient kernel
    -- the same values as the torch ops throughout, the input's layout kept."""
    real_pass = _triton.lp_pass

    def lp_pass(*args: object, grad: torch.Tensor | None = None) -> torch.Tensor | None:
        if (missing == "gradient-pass") == (grad is not None) and missing != "backward-step":
            return None
        return real_pass(*args, grad=grad)  # type: ignore[arg-type]

    monkeypatch.setattr(_triton, "lp_pass", lp_pass)
    if missing == "backward-step":
        monkeypatch.setattr(_triton, "lp_backward", lambda *args: None)
    layer = _affine(nl.L1BatchNorm(3))
    x, gy = _batch(3, torch.float32, cl)
    ours, ref, launched = _both(layer, x, gy)
    assert launched == 2 * 4  # the other four kernels, once per step
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    xr = x.clone().requires_grad_()
    layer(xr).backward(gy)
    assert xr.grad is not None
    assert xr.grad.stride() == x.stride()
    assert _triton.LAUNCHES  # (the stand-ins above returned None without launching)


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMLAB_TRITON", "0")
    _triton.available.cache_clear()
    try:
        assert not _triton.usable(torch.ones(3))
    finally:
        monkeypatch.delenv("NORMLAB_TRITON")
        _triton.available.cache_clear()
    assert _triton.usable(torch.ones(3))


@pytest.mark.parametrize(
    ("version", "numbers"),
    [("3.4.0", (3, 4, 0)), ("3.10.1+git1a2b3c", (3, 10, 1)), ("3.5.0rc1", (3, 5, 0)), ("4", (4,))],
)
def test_release_numbers_of_a_version(version: str, numbers: tuple[int, ...]) -> None:
    assert _triton._release(version) == numbers


def test_a_triton_older_than_the_checked_ones_leaves_the_torch_ops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Below 3.4 (unchecked; 3.0's interpreter failed most tests) no kernel runs."""
    import triton

    monkeypatch.setattr(triton, "__version__", "3.3.1")
    _triton.available.cache_clear()
    try:
        assert not _triton.usable(torch.ones(3))
        monkeypatch.setattr(triton, "__version__", "3.4.0")
        _triton.available.cache_clear()
        assert _triton.usable(torch.ones(3))
    finally:
        monkeypatch.undo()
        _triton.available.cache_clear()
    assert _triton.usable(torch.ones(3))


_COMPILE = textwrap.dedent(
    """
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from normlab.functional import _triton_kernels as K

    INTS = {"n", "k", "count", "groups", "size", "last_size", "n_check_a", "n_check_b", "c",
            "p", "per_row", "nb", "splits"}
    SIZES = {"BLOCK": 1024, "B": 64, "K_PAD": 16, "CT": 32, "SR": 4, "PB": 256}
    FLOAT64 = {  # pointers to float64 (or int64) data, by kernel
        "renorm_step": {"r_max_ptr": "*fp64", "d_max_ptr": "*fp64"},
        "renorm_limits": {"schedule_ptr": "*fp64", "count_ptr": "*i64", "out_ptr": "*fp64"},
        "lp_forward": {"momentum_ptr": "*fp64"},
        "ghost_running_update": {"momentum_ptr": "*fp64"},
        "standardize_rows": {"mean_ptr": "*fp64", "rstd_ptr": "*fp64"},
        "standardize_rows_backward": {"mean_ptr": "*fp64", "rstd_ptr": "*fp64"},
        "linf_select": {"offsets_ptr": "*i64"},
        "l1_sums": {"part_ptr": "*fp64"},
    }
    KERNELS = [
        "guarded_copy", "renorm_step", "renorm_weight_grad", "renorm_limits", "lp_forward",
        "lp_backward", "ghost_running_update", "standardize_rows", "standardize_rows_backward",
        "linf_block_worst", "linf_row_worst", "linf_select", "l1_sums", "lp_pass",
    ]

    def compile(name, data, arch, flags, ones):
        kernel = getattr(K, name)
        kernel_sizes = {k: v for k, v in SIZES.items() if k in kernel.arg_names}
        types, constants = {}, {**kernel_sizes, **flags}
        for arg in kernel.arg_names:
            if arg in constants:
                types[arg] = "constexpr"
            elif arg in INTS:
                types[arg] = "constexpr" if ones else "i32"  # triton specializes ints equal to 1
                constants.update({arg: 1} if ones else {})
            elif arg.endswith(("_hi", "_lo")):
                types[arg] = "fp32"
            else:
                types[arg] = FLOAT64.get(name, {}).get(arg, data)
        constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
        src = ASTSource(fn=kernel, signature=types, constexprs=constexprs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False}
        )
        assert "cubin" in compiled.asm, (name, flags)

    done = 0
    for name in KERNELS:
        switches = [a for a in getattr(K, name).arg_names if a.isupper() and a not in SIZES]
        for values in itertools.product([True, False], repeat=len(switches)):
            compile(name, "*fp32", 90, dict(zip(switches, values)), ones=False)
            done += 1
        every = dict.fromkeys(switches, True)
        compile(name, "*bf16", 90, every, ones=True)
        compile(name, "*fp64", 80, every, ones=False)
        done += 2
        if "K_PAD" in getattr(K, name).arg_names:  # the tile's extremes: k = 1 and k = 64
            for pad in (1, 64):
                compile(name, "*fp32", 90, {**every, "K_PAD": pad}, ones=False)
                done += 1
    print("compiled", done)
    """
)


def test_kernels_compile_for_nvidia_gpus() -> None:
    """Triton compiles each kernel to a cubin without a GPU (its own LLVM and ptxas), which the
    interpreter does not: loop-carried types, scalar arguments. Every combination of each
    kernel's switches for sm_90 (float32 data), then all switches on with bfloat16 data and the
    integer arguments equal to 1 (which triton specializes: L-inf's count always is), and for
    sm_80 with float64 data."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled" in done.stdout
