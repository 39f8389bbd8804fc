"""Identities between norms, and native kernels proven equal to the shared composite core."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab.functional as NF
import normlab.nn as nl


def _x(shape, seed=0, dtype=torch.float64):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)


def _affine(layer: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
    return layer


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 6, 11), (2, 6, 3, 4, 5)])
def test_group_norm_with_one_channel_per_group_is_instance_norm(shape: tuple[int, ...]) -> None:
    """normlab's GroupNorm(G=C) against torch's own instance norm (normlab's instance norm is
    itself computed by the group-norm kernel, so it is not the oracle here)."""
    gn = _affine(nl.GroupNorm(6, 6, dtype=torch.float64))
    inorm = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}[len(shape)]
    in_ = inorm(6, affine=True, dtype=torch.float64)
    in_.load_state_dict(gn.state_dict())
    x = _x(shape)
    torch.testing.assert_close(gn(x), in_(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 6, 11)])
def test_group_norm_with_one_group_is_layer_norm_over_c_and_positions(
    shape: tuple[int, ...],
) -> None:
    gn = nl.GroupNorm(6, 1, affine=False, dtype=torch.float64)
    ln = nn.LayerNorm(shape[1:], elementwise_affine=False, dtype=torch.float64)
    x = _x(shape)
    torch.testing.assert_close(gn(x), ln(x), rtol=1e-12, atol=1e-12)


def test_native_kernels_equal_the_composite_core() -> None:
    """House rule 3: where a native kernel computes the same thing, it is called -- and proven."""
    x = _x((4, 6, 9, 8))
    w, b = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    cases = {
        "batch": (NF.batch_norm(x, None, None, w, b, training=True), [0, 2, 3]),
        "instance": (NF.instance_norm(x, None, None, w, b, training=True), [2, 3]),
        "channel_layer": (NF.channel_layer_norm(x, w, b), [1]),
        "channel_layer_cl": (
            NF.channel_layer_norm(x.contiguous(memory_format=torch.channels_last), w, b),
            [1],
        ),
    }
    for name, (out, dims) in cases.items():
        torch.testing.assert_close(
            out, NF.normalize(x, dims, w, b, eps=1e-5)[0], rtol=1e-12, atol=1e-12, msg=name
        )
    gn = NF.group_norm(x, 3, w, b)
    xg = x.view(4, 3, 2, 9, 8)  # (N, G, C // G, H, W)
    ref = NF.normalize(xg, [2, 3, 4], eps=1e-5)[0].view_as(x) * w.view(1, 6, 1, 1) + b.view(
        1, 6, 1, 1
    )
    torch.testing.assert_close(gn, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_layer_norm_is_layer_norm_on_moved_channels(channels_last: bool) -> None:
    x = _x((3, 5, 4, 6))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cln = _affine(nl.ChannelLayerNorm(5, dtype=torch.float64))
    ln = nn.LayerNorm(5, dtype=torch.float64)
    ln.load_state_dict(cln.state_dict())
    y = cln(x)
    torch.testing.assert_close(y, ln(x.movedim(1, -1)).movedim(-1, 1), rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last)  # channels innermost, no copy back


def test_layer_and_group_norm_do_not_depend_on_the_rest_of_the_batch() -> None:
    x = _x((5, 6, 4, 4))
    for layer in (
        nl.GroupNorm(6, 2),
        nl.ChannelLayerNorm(6),
        nl.LayerNorm((6, 4, 4)),
        nl.InstanceNorm2d(6),
    ):
        layer = layer.double()
        torch.testing.assert_close(layer(x)[1:3], layer(x[1:3]), rtol=1e-12, atol=1e-12)


def test_batch_norm_dense_is_per_activation_conv_is_per_channel() -> None:
    """The lecture: vectors mu, sigma like the activations for dense layers; one scalar per
    channel for convolutions."""
    dense = nl.BatchNorm1d(4, momentum=1.0, dtype=torch.float64).train()
    x = _x((10, 4))
    dense(x)
    torch.testing.assert_close(dense.running_mean, x.mean(0))
    conv = nl.BatchNorm2d(4, momentum=1.0, dtype=torch.float64).train()
    xc = _x((10, 4, 3, 3))
    conv(xc)
    torch.testing.assert_close(conv.running_mean, xc.mean((0, 2, 3)))
    assert conv.running_mean.shape == (4,)


def test_batch_norm_eval_is_the_closed_form_affine_map() -> None:
    bn = _affine(nl.BatchNorm2d(3, dtype=torch.float64))
    bn.train()
    for s in range(3):
        bn(_x((4, 3, 5, 5), seed=s))
    bn.eval()
    x = _x((2, 3, 5, 5), seed=9)
    shape = (1, 3, 1, 1)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    expected = x * scale.view(shape) + (bn.bias - bn.running_mean * scale).view(shape)
    torch.testing.assert_close(bn(x), expected.detach(), rtol=1e-12, atol=1e-12)


def test_running_var_converges_to_the_unbiased_variance_of_a_fixed_stream() -> None:
    bn = nl.BatchNorm1d(2, momentum=None, dtype=torch.float64).train()
    batches = [_x((8, 2), seed=s) for s in range(20)]
    for x in batches:
        bn(x)
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in batches]).mean(0))
    torch.testing.assert_close(bn.running_mean, torch.cat(batches).mean(0))
