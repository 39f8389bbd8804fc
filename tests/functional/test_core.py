"""The shared statistics core against float64 closed forms."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

import normlab.functional as NF
import normlab.nn as nl
from normlab.functional import NonFiniteStatisticsWarning
from normlab.functional._core import (
    _NoGradContext,
    apply_function,
    channel_affine,
    channel_view_shape,
    channels_last_format,
    stats_dtype,
)
from normlab.functional._fast import use_fast_batch_stats


def _ref_moments(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    x64 = x.double()
    mean = x64.mean(dims, keepdim=True)
    return mean, ((x64 - mean) ** 2).mean(dims, keepdim=True)


@pytest.mark.parametrize("dims", [[0], [1], [0, 2, 3], [2, 3], [1, 2, 3]])
def test_moments_match_float64(dims: list[int]) -> None:
    x = torch.randn(5, 4, 3, 7, generator=torch.Generator().manual_seed(0)) * 3 + 2
    mean, var = NF.moments(x, dims)
    ref_mean, ref_var = _ref_moments(x, dims)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)


def test_moments_with_large_offset_are_accurate_where_naive_fails() -> None:
    """mean 1e4, std 1 in float32: the corrected two-pass variance keeps ~5 digits; E[x^2]-E[x]^2 none."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 3, generator=g, dtype=torch.float64) + 1e4).float()
    _, var = NF.moments(x, [0])
    _, ref_var = _ref_moments(x, [0])
    assert ((var.double() - ref_var).abs() / ref_var).max() < 1e-4
    naive = (x * x).mean(0) - x.mean(0) ** 2
    assert ((naive.double() - ref_var.flatten()).abs() / ref_var.flatten()).max() > 1e-1


def test_normalize_is_the_closed_form() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    w, b = (
        torch.rand(3, generator=g, dtype=torch.float64),
        torch.randn(3, generator=g, dtype=torch.float64),
    )
    y, mean, var = NF.normalize(x, [0, 2], w, b, eps=1e-3)
    ref_mean, ref_var = _ref_moments(x, [0, 2])
    expected = (x - ref_mean) / torch.sqrt(ref_var + 1e-3) * w.view(1, 3, 1) + b.view(1, 3, 1)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


def test_normalize_is_twice_differentiable() -> None:
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w: NF.normalize(x, [0], w, None, eps=1e-3)[0]  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_low_precision_statistics_accumulate_in_float32() -> None:
    assert stats_dtype(torch.bfloat16) == torch.float32
    assert stats_dtype(torch.float16) == torch.float32
    assert stats_dtype(torch.float64) == torch.float64
    x = (torch.randn(2048, 2, generator=torch.Generator().manual_seed(2)) + 50).bfloat16()
    y, mean, var = NF.normalize(x, [0], eps=1e-5)
    assert y.dtype == torch.bfloat16
    assert mean.dtype == var.dtype == torch.float32
    _, ref_var = _ref_moments(x, [0])
    assert ((var.double() - ref_var).abs() / ref_var).max() < 1e-4


def test_pool_moments_equals_moments_of_the_union() -> None:
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 1
    groups_mean, groups_var = NF.moments(x, [1])  # 6 equal groups of 10
    mean, var = NF.pool_moments(groups_mean.squeeze(1), groups_var.squeeze(1), 0)
    torch.testing.assert_close(mean, x.mean())
    torch.testing.assert_close(var, x.var(unbiased=False))


def test_update_running_stats_follows_torch_rule() -> None:
    rm, rv = torch.zeros(2), torch.ones(2)
    mean, var = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])  # biased, over 4 values
    NF.update_running_stats_(rm, rv, mean, var, 4, 0.25)
    torch.testing.assert_close(rm, 0.25 * mean)
    torch.testing.assert_close(rv, 0.75 + 0.25 * var * 4 / 3)


@pytest.mark.parametrize("route", ["numpy", "torch"])
def test_update_running_stats_routes_agree_and_move_version_counters(route: str) -> None:
    """The eager CPU route computes the rule in float64 numpy and stores it with ``copy_``; the
    torch route (statistics that require grad, ``torch.compile``, other dtypes) in the buffers'
    dtype: the same values to float32 rounding, and both bump the buffers' version counters (so
    autograd notices them). Non-finite statistics are not applied, with a warning."""
    g = torch.Generator().manual_seed(7)
    rm, rv = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5
    mean = torch.randn(5, generator=g, dtype=torch.float64)
    var = torch.rand(5, generator=g, dtype=torch.float64)
    want_m = 0.9 * rm.double() + 0.1 * mean
    want_v = 0.9 * rv.double() + 0.1 * var * 9 / 8
    if route == "torch":
        mean.requires_grad_()  # keeps it off the numpy route
    versions = rm._version, rv._version
    NF.update_running_stats_(rm, rv, mean, var, 9, 0.1)
    torch.testing.assert_close(rm.double(), want_m, rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(rv.double(), want_v, rtol=2e-7, atol=1e-7)
    assert rm._version > versions[0]
    assert rv._version > versions[1]
    before = rm.clone(), rv.clone()
    with pytest.warns(NonFiniteStatisticsWarning):
        NF.update_running_stats_(rm, rv, mean.detach(), var * float("nan"), 9, 0.1)
    assert rm.equal(before[0])
    assert rv.equal(before[1])


def test_channel_view_shape() -> None:
    assert channel_view_shape(3, 5) == [1, 5, 1]
    assert channel_view_shape(2, 5, channel_dim=0) == [5, 1]


def _oracle(x: torch.Tensor, dims: list[int], groups: int = 0) -> torch.Tensor:
    """Independent float64 closed form: (x - mean) / sqrt(biased var + 1e-5) over ``dims``."""
    x64 = x.double()
    if groups:
        x64 = x64.reshape(x.shape[0], groups, -1)  # (N, G, C // G * H * W)
    mean, var = _ref_moments(x64, dims)
    return ((x64 - mean) / torch.sqrt(var + 1e-5)).reshape(x.shape)


LAYERS = [
    ("batch1d", lambda: nl.BatchNorm1d(3), (64, 3), [0], 0),
    ("batch2d-fast", lambda: nl.BatchNorm2d(3), (32, 3, 128, 128), [0, 2, 3], 0),
    ("batch2d-native", lambda: nl.BatchNorm2d(3), (16, 3, 32, 32), [0, 2, 3], 0),
    ("batch2d-small", lambda: nl.BatchNorm2d(3), (4, 3, 5, 5), [0, 2, 3], 0),
    ("instance", lambda: nl.InstanceNorm2d(3), (4, 3, 32, 32), [2, 3], 0),
    ("layer", lambda: nl.LayerNorm((3, 32, 32)), (4, 3, 32, 32), [1, 2, 3], 0),
    ("channel_layer", lambda: nl.ChannelLayerNorm(64), (4, 64, 8, 8), [1], 0),
    ("group", lambda: nl.GroupNorm(8, 2), (4, 8, 16, 16), [2], 2),
]


@pytest.mark.parametrize(
    ("name", "make", "shape", "dims", "groups"), LAYERS, ids=[c[0] for c in LAYERS]
)
def test_every_layer_is_accurate_with_a_large_offset(name, make, shape, dims, groups) -> None:  # type: ignore[no-untyped-def]
    """Issue #3: mean 1e4, std 1 in float32 -> relative L2 error of the output < 1e-3, where the
    naive E[x^2] - E[x]^2 variance fails the same bound."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 1e4).float()
    ref = _oracle(x, dims, groups)
    layer = make().train()
    if name == "batch2d-fast":  # the case must exercise normlab's own statistics path
        assert use_fast_batch_stats(x, layer.weight, layer.bias, layer.running_mean)
    y = layer(x)
    rel = lambda out: torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref)  # noqa: E731
    assert rel(y) < 1e-3
    xg = x.reshape(x.shape[0], groups, -1) if groups else x
    mean = xg.mean(dims, keepdim=True)
    naive_var = ((xg * xg).mean(dims, keepdim=True) - mean * mean).clamp_min(0)
    naive = ((xg - mean) / torch.sqrt(naive_var + 1e-5)).reshape(x.shape)
    assert rel(naive) > 1e-3


@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (2, 4, 3, 2, 2), (3, 4, 5)])
@pytest.mark.parametrize("fmt", ["first", "last"])
@pytest.mark.parametrize("params", ["both", "scale", "shift", "none"])
@pytest.mark.parametrize("into", [False, True], ids=["new", "out"])
def test_channel_affine_every_route_and_layout(
    shape: tuple[int, ...], fmt: str, params: str, into: bool
) -> None:
    """``x * scale + shift`` per channel against the broadcast formula in float64, on the
    batch-norm kernel's route (channels-first) and the broadcast route (channels-last), out of
    place and into ``out``; the layout is kept."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if fmt == "last" and len(shape) > 3:
        x = x.contiguous(
            memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        )
    scale = (
        torch.rand(4, generator=g, dtype=torch.float64) + 0.5
        if params in ("both", "scale")
        else None
    )
    shift = (
        torch.randn(4, generator=g, dtype=torch.float64) if params in ("both", "shift") else None
    )
    view = (1, 4, *([1] * (len(shape) - 2)))
    expected = x * (1.0 if scale is None else scale.view(view))
    expected = expected + (0.0 if shift is None else shift.view(view))
    out = torch.full_like(x, float("nan")) if into else None
    got = channel_affine(x, scale, shift, out=out)
    if into:
        assert got is out
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert channels_last_format(got) == channels_last_format(x)


class _Scale(torch.autograd.Function):
    """y = 2 x, recording which context its forward got."""

    contexts: ClassVar[list[object]] = []

    @staticmethod
    def forward(ctx, x, factor):  # type: ignore[no-untyped-def]
        _Scale.contexts.append(ctx)
        ctx.save_for_backward(x)
        ctx.mark_non_differentiable(factor)
        ctx.factor = 2.0
        return x * ctx.factor, factor

    @staticmethod
    def backward(ctx, grad, _grad_factor):  # type: ignore[no-untyped-def]
        return grad * ctx.factor, None


@pytest.mark.parametrize(
    ("grad_mode", "requires_grad", "autograd"),
    [(True, True, True), (False, True, False), (True, False, False)],
)
def test_apply_function_skips_autograd_only_when_no_gradient_is_needed(
    grad_mode: bool, requires_grad: bool, autograd: bool
) -> None:
    """apply_function runs the autograd function (a graph, a real context) when grad mode is on
    and a tensor argument requires grad; else its forward directly, with a context that says no
    input needs a gradient. The output is the same either way."""
    _Scale.contexts.clear()
    x = torch.randn(5, requires_grad=requires_grad)
    factor = torch.ones(1)
    with torch.set_grad_enabled(grad_mode):
        y, _ = apply_function(_Scale, x, factor)
    torch.testing.assert_close(y, 2 * x.detach(), rtol=0, atol=0)
    (ctx,) = _Scale.contexts
    assert (y.grad_fn is not None) is autograd
    assert isinstance(ctx, _NoGradContext) is not autograd
    if autograd:
        y.sum().backward()
        torch.testing.assert_close(x.grad, torch.full((5,), 2.0))
    else:
        assert ctx.needs_input_grad == (False, False)
