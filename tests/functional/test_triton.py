"""normlab's Triton kernels (functional/_triton.py) against the torch ops they stand in for.

Without a GPU (CI) the kernels run in Triton's interpreter on CPU tensors, inside
``accelerator_routes()`` (the root conftest.py sets ``TRITON_INTERPRET=1`` before triton's import);
a separate process checks that each kernel also compiles for NVIDIA GPUs (sm_80, sm_90), which
Triton does without a GPU. On a GPU, tests/test_cuda.py runs the layers through them.
"""

from __future__ import annotations

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
from normlab.functional._core import accelerator_routes
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
    make = nl.L1BatchNorm if p == "1" else nl.LinfBatchNorm
    layer = make(channels, affine=affine).to(dtype)
    ours, ref, launched = _both(_affine(layer), *_batch(channels, dtype, cl))
    assert launched == 2 * 2
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


def test_cumulative_average_factor_is_read_on_the_device() -> None:
    """``momentum=None``: the factor ``1 / (steps + 1)``, a 0-dim tensor on accelerators."""
    layer = nl.L1BatchNorm(4, momentum=None)
    x = _input((5, 4, 3), torch.float32)
    ours, ref, launched = _both(layer, x, _input(x.shape, torch.float32, 1), steps=3)
    assert launched == 3 * 2
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


def test_nonfinite_batch_keeps_running_statistics_with_kernels() -> None:
    x = _input((4, 3, 2, 2), torch.float32)
    x[1, 2, 0, 0] = float("nan")
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
        assert y[1, 2].isnan().all()  # (ghost: in the NaN's virtual batch only)
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


def test_a_kernel_that_fails_to_compile_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from normlab.functional import _triton_kernels

    class Broken:
        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                raise RuntimeError("PassManager::run failed")

            return launch

    monkeypatch.setattr(_triton_kernels, "renorm_step", Broken())
    monkeypatch.setattr(_triton, "_BROKEN", set())
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


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMLAB_TRITON", "0")
    _triton.available.cache_clear()
    try:
        assert not _triton.usable(torch.ones(3))
    finally:
        monkeypatch.delenv("NORMLAB_TRITON")
        _triton.available.cache_clear()
    assert _triton.usable(torch.ones(3))


_COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from normlab.functional import _triton_kernels as K

    def sig(kernel, pointers, ints=(), floats=(), constexprs=None):
        types = {name: pointers for name in kernel.arg_names}
        types.update({name: "i32" for name in ints})
        types.update({name: "fp32" for name in floats})
        types.update({name: "constexpr" for name in constexprs})
        return types

    for arch in (80, 90):
        for fp in ("fp32", "fp64"):
            p = "*" + fp
            cases = [
                (K.guarded_copy, sig(K.guarded_copy, p, ("n_check_a", "n_check_b", "n"), (),
                    {"WHEN_FINITE": False, "CHECK_B": True, "BLOCK": 1024})),
                (K.renorm_step, sig(K.renorm_step, p, ("n",),
                    ("r_max_hi", "r_max_lo", "d_max_hi", "d_max_lo", "momentum_hi",
                     "momentum_lo", "eps_hi", "eps_lo"),
                    {"HAS_WEIGHT": True, "HAS_BIAS": True, "LIMIT_TENSORS": True, "BLOCK": 1024})),
                (K.renorm_weight_grad, sig(K.renorm_weight_grad, p, ("n",), (), {"BLOCK": 1024})),
                (K.renorm_limits, {"schedule_ptr": "*fp64", "count_ptr": "*i64",
                    "out_ptr": "*fp64", "BLOCK": "constexpr"}),
                (K.lp_forward, {**sig(K.lp_forward, p, ("n", "count"),
                    ("constant_hi", "constant_lo", "eps_hi", "eps_lo", "momentum_hi",
                     "momentum_lo"),
                    {"HAS_WEIGHT": True, "RUNNING": True, "MOMENTUM_TENSOR": True,
                     "BLOCK": 1024}), "momentum_ptr": "*fp64"}),
                (K.lp_backward, sig(K.lp_backward, p, ("n", "count"), ("factor_hi", "factor_lo"),
                    {"HAS_WEIGHT": True, "BLOCK": 1024})),
                (K.standardize_rows, {**sig(K.standardize_rows, p, ("k",),
                    ("eps_hi", "eps_lo"), {"BLOCK": 1024}), "mean_ptr": "*fp64",
                    "rstd_ptr": "*fp64"}),
                (K.standardize_rows_backward, {**sig(K.standardize_rows_backward, p, ("k",), (),
                    {"BLOCK": 1024}), "mean_ptr": "*fp64", "rstd_ptr": "*fp64"}),
                (K.ghost_running_update, {**sig(K.ghost_running_update, p,
                    ("n", "groups", "size", "last_size"),
                    ("eps_hi", "eps_lo", "momentum_hi", "momentum_lo", "bessel_hi", "bessel_lo"),
                    {"MOMENTUM_TENSOR": True, "BLOCK": 1024}), "momentum_ptr": "*fp64"}),
            ]
            for kernel, types in cases:
                constants = {"WHEN_FINITE": False, "CHECK_B": True, "BLOCK": 1024,
                             "HAS_WEIGHT": True, "HAS_BIAS": True, "LIMIT_TENSORS": True,
                             "RUNNING": True, "MOMENTUM_TENSOR": True}
                constexprs = {(kernel.arg_names.index(k),): constants[k]
                              for k, v in types.items() if v == "constexpr"}
                src = ASTSource(fn=kernel, signature=types, constexprs=constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                assert "cubin" in compiled.asm, kernel
    print("compiled")
    """
)


def test_kernels_compile_for_nvidia_gpus() -> None:
    """Triton compiles each kernel to a cubin for sm_80 and sm_90 without a GPU (its own LLVM
    and ptxas), which the interpreter does not: loop-carried types, scalar arguments."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled" in done.stdout
