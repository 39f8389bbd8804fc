"""Inputs a layer cannot take -- integer, complex, float64 against float32 parameters (and the
reverse), empty or zero-size -- give a clear TypeError/ValueError naming the layer, never a
crash inside a kernel; mixed precision (bfloat16/float16 input, float32 parameters) still works."""

from __future__ import annotations

import pytest
import torch

import normlab.nn as nl

LAYERS = {
    "BatchNorm2d": lambda: nl.BatchNorm2d(3),
    "InstanceNorm2d": lambda: nl.InstanceNorm2d(3, affine=True),
    "GroupNorm": lambda: nl.GroupNorm(3, num_groups=3),
    "LayerNorm": lambda: nl.LayerNorm([3, 2, 2]),
    "ChannelLayerNorm": lambda: nl.ChannelLayerNorm(3),
    "BatchRenorm2d": lambda: nl.BatchRenorm2d(3),
    "GhostBatchNorm": lambda: nl.GhostBatchNorm(3, 2),
    "L1BatchNorm": lambda: nl.L1BatchNorm(3),
    "NoisyBatchNorm": lambda: nl.NoisyBatchNorm(3),
    "SyncBatchNorm": lambda: nl.SyncBatchNorm(3),
}
X = torch.randn(4, 3, 2, 2)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", list(LAYERS))
def test_wrong_dtypes_are_named(name: str, training: bool) -> None:
    layer = LAYERS[name]().train(training)
    with pytest.raises(TypeError, match=rf"{name}: 'input' must be a floating-point tensor"):
        layer(torch.randint(0, 5, X.shape))
    with pytest.raises(TypeError, match=rf"{name}: 'input' must be a floating-point tensor"):
        layer(X.to(torch.complex64))
    with pytest.raises(
        TypeError,
        match=rf"{name}: 'input' must be of the parameters' dtype torch.float32, got dtype "
        r"torch.float64\. Fix: convert one of them",
    ):
        layer(X.double())
    with pytest.raises(
        TypeError, match=r"parameters' dtype torch.float64, got dtype torch.float32"
    ):
        LAYERS[name]().double().train(training)(X)
    assert layer(X.bfloat16()).dtype == torch.bfloat16  # mixed precision is fine


@pytest.mark.parametrize("name", list(LAYERS))
def test_empty_and_zero_size_inputs_are_named(name: str) -> None:
    layer = LAYERS[name]().train()
    for x in (X[:0], torch.randn(4, 3, 0, 2)):
        if name in ("GroupNorm", "ChannelLayerNorm") or (name == "LayerNorm" and not len(x)):
            # per-sample statistics over no values: nothing to compute, an empty output
            assert layer(x).shape == x.shape
            continue
        with pytest.raises((ValueError, TypeError), match=rf"^{name}: "):
            layer(x)


@pytest.mark.parametrize("name", list(LAYERS))
def test_an_input_on_another_device_is_named(name: str) -> None:
    layer = LAYERS[name]()  # parameters on the CPU; the meta device stands in for a GPU here
    with pytest.raises(
        ValueError,
        match=rf"{name}: 'input' must be on the layer's device cpu, got a tensor on meta\. Fix: "
        r"move one of them",
    ):
        layer(torch.empty(4, 3, 2, 2, device="meta"))
