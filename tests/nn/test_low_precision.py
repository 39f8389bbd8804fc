"""float16/bfloat16 inputs: statistics accumulate in float32 (issue #3's numerics rule)."""

from __future__ import annotations

import pytest
import torch

import normlab.nn as nl

LAYERS = [
    ("batch2d", lambda dt: nl.BatchNorm2d(4, dtype=dt), [0, 2, 3], 0),
    ("batch1d", lambda dt: nl.BatchNorm1d(4, dtype=dt), [0, 2], 0),
    ("instance", lambda dt: nl.InstanceNorm2d(4, affine=True, dtype=dt), [2, 3], 0),
    ("group", lambda dt: nl.GroupNorm(4, 2, dtype=dt), [2], 2),
    ("layer", lambda dt: nl.LayerNorm((4, 16, 16), dtype=dt), [1, 2, 3], 0),
    ("channel_layer", lambda dt: nl.ChannelLayerNorm(4, dtype=dt), [1], 0),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("make", "dims", "groups"), [c[1:] for c in LAYERS], ids=[c[0] for c in LAYERS]
)
def test_low_precision_output_is_accurate(make, dims, groups, dtype) -> None:  # type: ignore[no-untyped-def]
    """Offset 100, std 1: summing 4096 such values in bfloat16 (8-bit mantissa) would lose the
    statistics entirely; accumulated in float32 the output error is the output's own rounding."""
    shape = (16, 4, 16, 16) if dims != [0, 2] else (64, 4, 16)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 100).to(dtype)
    y = make(dtype).train()(x)
    assert y.dtype == dtype
    x64 = x.double().reshape(shape[0], groups, -1) if groups else x.double()
    mean = x64.mean(dims, keepdim=True)
    var = ((x64 - mean) ** 2).mean(dims, keepdim=True)
    ref = ((x64 - mean) / torch.sqrt(var + 1e-5)).reshape(shape)
    rel = torch.linalg.vector_norm(y.double() - ref) / torch.linalg.vector_norm(ref)
    assert rel < 1e-2  # a few output ulps (bfloat16: 2**-8 = 3.9e-3)


def test_running_statistics_of_bfloat16_input() -> None:
    bn = nl.BatchNorm2d(4, momentum=1.0).train()  # float32 buffers, bfloat16 activations
    x = (torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1)) + 100).bfloat16()
    bn(x)
    torch.testing.assert_close(bn.running_mean, x.float().mean((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bn.running_var, x.float().var((0, 2, 3)), rtol=1e-2, atol=1e-3)


def test_bfloat16_buffers_are_updated() -> None:
    bn = nl.BatchNorm2d(4, momentum=1.0, dtype=torch.bfloat16).train()
    x = (torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(2)) + 100).bfloat16()
    bn(x)
    assert bn.running_mean.dtype == torch.bfloat16
    torch.testing.assert_close(
        bn.running_mean.float(), x.float().mean((0, 2, 3)), rtol=1e-2, atol=0.5
    )
    assert int(bn.num_batches_tracked) == 1


def _torch_counterparts():  # type: ignore[no-untyped-def]
    from tests.nn.specs import SPECS

    return [s for s in SPECS if s.torch_make is not None]


@pytest.mark.parametrize("spec", _torch_counterparts(), ids=lambda s: s.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_matches_torch(spec, dtype) -> None:  # type: ignore[no-untyped-def]
    """Under CPU autocast (bfloat16) every layer returns the dtype torch.nn's returns, with close
    values, and running statistics stay float32 and move as torch's do."""
    shape = spec.shapes[-1]
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    assert_autocast_matches_torch(spec.make(), spec.torch_make(), x, torch.bfloat16)


def assert_autocast_matches_torch(
    ours: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype
) -> None:
    """A training and an eval call of ``ours`` and the torch.nn layer ``ref`` (given ``ours``'s
    state) under autocast to ``dtype`` on ``x``'s device: the same output dtype, close values,
    float32 buffers that moved alike (tests/test_cuda.py runs it on CUDA)."""
    ref.load_state_dict(ours.state_dict())
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        with torch.autocast(x.device.type, dtype=dtype):
            y, yr = ours(x), ref(x)
        assert y.dtype == yr.dtype
        torch.testing.assert_close(y.float(), yr.float(), rtol=2e-2, atol=2e-2)
    for (name, b), br in zip(ours.named_buffers(), ref.buffers(), strict=True):
        assert b.dtype == br.dtype, name
        if b.is_floating_point():
            assert b.dtype == torch.float32, name
            torch.testing.assert_close(b, br, rtol=1e-2, atol=1e-2)
