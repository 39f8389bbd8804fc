"""Parity with torch.nn: forward, input and parameter gradients, running statistics after several
training steps, eval output, and checkpoints loading both ways -- float32 and float64, odd sizes,
channels_last, and shapes large enough to take normlab's fast batch-statistics path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab.nn as nl
from normlab.functional import _fast
from normlab.functional._fast import use_fast_batch_stats
from tests.nn.specs import SPECS, LayerSpec

TOL = {torch.float32: {"rtol": 1e-4, "atol": 2e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}

# (normlab factory, torch factory, shapes): odd sizes, plus shapes that take the fast path.
BIG = [
    (
        lambda **kw: nl.BatchNorm1d(7, **kw),
        lambda **kw: nn.BatchNorm1d(7, **kw),
        [(9, 7), (16, 7, 301)],
    ),
    (
        lambda **kw: nl.BatchNorm2d(5, **kw),
        lambda **kw: nn.BatchNorm2d(5, **kw),
        [(3, 5, 7, 9), (8, 5, 33, 31)],
    ),
    (
        lambda **kw: nl.BatchNorm2d(5, momentum=None, **kw),
        lambda **kw: nn.BatchNorm2d(5, momentum=None, **kw),
        [(8, 5, 33, 31)],
    ),
    (
        lambda **kw: nl.BatchNorm2d(5, affine=False, **kw),
        lambda **kw: nn.BatchNorm2d(5, affine=False, **kw),
        [(8, 5, 33, 31)],
    ),
    (
        lambda **kw: nl.BatchNorm3d(4, **kw),
        lambda **kw: nn.BatchNorm3d(4, **kw),
        [(2, 4, 3, 5, 7), (3, 4, 9, 17, 19)],
    ),
    (
        lambda **kw: nl.InstanceNorm2d(5, affine=True, track_running_stats=True, **kw),
        lambda **kw: nn.InstanceNorm2d(5, affine=True, track_running_stats=True, **kw),
        [(3, 5, 7, 9), (8, 5, 33, 31)],
    ),
    (
        lambda **kw: nl.InstanceNorm1d(5, affine=True, **kw),
        lambda **kw: nn.InstanceNorm1d(5, affine=True, **kw),
        [(3, 5, 11)],
    ),
    (lambda **kw: nl.GroupNorm(6, 2, **kw), lambda **kw: nn.GroupNorm(2, 6, **kw), [(3, 6, 7, 9)]),
    (lambda **kw: nl.LayerNorm((5, 7), **kw), lambda **kw: nn.LayerNorm((5, 7), **kw), [(3, 5, 7)]),
]


@pytest.fixture(autouse=True)
def fast_for_big(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the moderate BIG shapes take the fast path (its default limits are tuned for speed)."""
    monkeypatch.setattr(_fast, "_MIN_NUMEL", 1 << 15)
    monkeypatch.setattr(_fast, "_MIN_ROW", 16)


SPEC_CASES = [(s.make, s.torch_make, list(s.shapes)) for s in SPECS if s.torch_make is not None]
CASES = [(mk, tmk, shape) for mk, tmk, shapes in [*SPEC_CASES, *BIG] for shape in shapes]
CASE_IDS = [f"case{i}-{'x'.join(map(str, shape))}" for i, (_, _, shape) in enumerate(CASES)]


def _pair(make, torch_make, dtype):  # type: ignore[no-untyped-def]
    ours, ref = make(dtype=dtype), torch_make(dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=dtype) + 0.5)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _x(shape, dtype, seed, channels_last=False):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _assert_as_accurate(ours: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor | None) -> None:
    """``ours`` agrees with torch's ``ref`` -- or, for float32 reductions (parameter gradients,
    running statistics, whose summation order differs), is at least as close to the float64
    ``truth`` as torch is, up to a factor 4 plus one part in 1e6 of the value's scale."""
    if truth is None or ours.dtype != torch.float32:
        torch.testing.assert_close(ours, ref, **TOL[ours.dtype])
        return
    truth = truth.to(ours.device)
    err_ours = (ours.double() - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    scale = truth.abs().max().item()
    assert err_ours <= 4 * err_ref + 1e-6 * scale + 1e-7, (err_ours, err_ref, scale)


def _states(*modules: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [
        {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
        for m in modules
    ]


def _check_parity(ours: nn.Module, ref: nn.Module, shape, dtype, channels_last=False) -> None:  # type: ignore[no-untyped-def]
    truth = copy.deepcopy(ref).double() if dtype == torch.float32 else None
    modules = [m for m in (ours, ref, truth) if m is not None]
    for step in range(4):  # several training steps: running statistics must follow torch's
        xs = [_x(shape, dtype, seed=step, channels_last=channels_last) for _ in modules]
        if truth is not None:
            xs[-1] = xs[-1].double()
        gys = [_x(shape, x.dtype, seed=50 + step, channels_last=channels_last) for x in xs]
        outs, grads = [], []
        for m, x, gy in zip(modules, xs, gys, strict=False):
            x.requires_grad_()
            y = m.train()(x)
            outs.append(y)
            grads.append(torch.autograd.grad(y, [x, *m.parameters()], gy))
        torch.testing.assert_close(outs[0], outs[1], **TOL[dtype])
        torch.testing.assert_close(grads[0][0], grads[1][0], **TOL[dtype])  # input gradient
        for i in range(1, len(grads[0])):  # parameter gradients: reductions
            _assert_as_accurate(grads[0][i], grads[1][i], grads[2][i] if truth else None)
        states = _states(*modules)
        for key, value in states[0].items():
            _assert_as_accurate(value, states[1][key], states[2][key] if truth else None)
    x = _x(shape, dtype, seed=99, channels_last=channels_last)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), **TOL[dtype])


@pytest.mark.parametrize(("make", "torch_make", "shape"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_with_torch(make, torch_make, shape, dtype) -> None:  # type: ignore[no-untyped-def]
    ours, ref = _pair(make, torch_make, dtype)
    _check_parity(ours, ref, shape, dtype)


@pytest.mark.parametrize(
    ("make", "torch_make", "shape"),
    [c for c in CASES if len(c[2]) == 4],
    ids=[i for c, i in zip(CASES, CASE_IDS, strict=False) if len(c[2]) == 4],
)
def test_parity_channels_last(make, torch_make, shape) -> None:  # type: ignore[no-untyped-def]
    ours, ref = _pair(make, torch_make, torch.float32)
    _check_parity(ours, ref, shape, torch.float32, channels_last=True)
    x = _x(shape, torch.float32, 0, channels_last=True).requires_grad_()
    for training in (True, False):  # channels-last in, channels-last out (torch's instance norm
        y = ours.train(training)(x)  # returns channels-first)
        assert y.is_contiguous(memory_format=torch.channels_last)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert gx.is_contiguous(memory_format=torch.channels_last)


def test_big_cases_take_the_fast_path() -> None:
    """The BIG shapes above exercise normlab's own batch-statistics path, not torch's kernel."""
    fast = [
        shape
        for _, _, shapes in BIG
        for shape in shapes
        if use_fast_batch_stats(torch.empty(shape), None, None)
    ]
    assert {(16, 7, 301), (8, 5, 33, 31), (3, 4, 9, 17, 19)} <= set(fast)


@pytest.mark.parametrize(
    "spec",
    [s for s in SPECS if s.torch_make is not None],
    ids=[s.id for s in SPECS if s.torch_make is not None],
)
def test_checkpoints_load_both_ways(spec: LayerSpec) -> None:
    """A checkpoint written by either library loads into the other with identical outputs."""
    shape = spec.shapes[0]
    for src_make, dst_make in ((spec.torch_make, spec.make), (spec.make, spec.torch_make)):
        assert src_make is not None
        assert dst_make is not None
        src, dst = src_make(), dst_make()
        src.train()
        for seed in range(3):
            src(_x(shape, torch.float32, seed))
        with torch.no_grad():
            for p in src.parameters():
                p.mul_(1.5).add_(0.25)
        dst.load_state_dict(src.state_dict())
        x = _x(shape, torch.float32, 9)
        torch.testing.assert_close(dst.eval()(x), src.eval()(x), **TOL[torch.float32])
        torch.testing.assert_close(dst.train()(x), src.train()(x), **TOL[torch.float32])


def test_old_checkpoint_without_num_batches_tracked_loads() -> None:
    """torch checkpoints older than version 2 lack num_batches_tracked; both libraries accept them."""
    state = nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    bn = nl.BatchNorm2d(3)
    bn.load_state_dict(state)
    assert bn.num_batches_tracked is not None
    assert int(bn.num_batches_tracked) == 0


def test_instance_norm_momentum_none_is_cumulative_average() -> None:
    """Deliberate difference from torch (which never updates): the average of all batches seen."""
    layer = nl.InstanceNorm1d(2, momentum=None, track_running_stats=True).train()
    batches = [_x((4, 2, 9), torch.float64, s) for s in range(3)]
    for x in batches:
        layer(x.float())
    means = torch.stack([x.mean(2).mean(0) for x in batches])
    variances = torch.stack([x.var(2, unbiased=True).mean(0) for x in batches])
    torch.testing.assert_close(layer.running_mean.double(), means.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var.double(), variances.mean(0), rtol=1e-5, atol=1e-5)
    assert int(layer.num_batches_tracked) == 3


def test_num_batches_tracked_counts_training_steps() -> None:
    ours, ref = nl.BatchNorm2d(3).train(), nn.BatchNorm2d(3).train()
    for s in range(3):
        x = _x((4, 3, 5, 5), torch.float32, s)
        ours(x)
        ref(x)
    ours.eval()(x)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
