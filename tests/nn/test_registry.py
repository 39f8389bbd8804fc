"""The name -> layer registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab.nn as nl
from normlab.nn import registry
from tests.nn.specs import SPECS


def test_every_registered_norm_has_a_contract_spec() -> None:
    """A layer that joins the registry must join tests/nn/specs.py (and so the contract suite)."""
    covered = {s.registry[0] for s in SPECS if s.registry is not None} | {"none"}
    assert set(nl.available_norms()) <= covered


@pytest.mark.parametrize(
    "spec", [s for s in SPECS if s.registry], ids=[s.id for s in SPECS if s.registry]
)
def test_registry_builds_the_spec_layer(spec) -> None:  # type: ignore[no-untyped-def]
    name, spatial = spec.registry
    built = nl.get_norm_layer(name, 6 if name == "group" else 3, spatial_dims=spatial)
    assert type(built) is type(spec.make())


@pytest.mark.parametrize(
    ("name", "spatial", "cls"),
    [
        ("batch", 0, nl.BatchNorm1d),
        ("batch", 1, nl.BatchNorm1d),
        ("batch", 2, nl.BatchNorm2d),
        ("batch", 3, nl.BatchNorm3d),
        ("instance", 1, nl.InstanceNorm1d),
        ("instance", 3, nl.InstanceNorm3d),
        ("layer", 0, nl.LayerNorm),
        ("layer", 2, nl.GroupNorm),
        ("group", 0, nl.GroupNorm),
        ("channel_layer", 1, nl.ChannelLayerNorm),
        ("none", 2, nn.Identity),
    ],
)
def test_names_and_dims(name: str, spatial: int, cls: type) -> None:
    layer = nl.get_norm_layer(name, 64, spatial_dims=spatial)
    assert type(layer) is cls
    x = torch.randn((4, 64) + (5,) * spatial)
    assert layer(x).shape == x.shape


def test_kwargs_are_passed_through() -> None:
    bn = nl.get_norm_layer("batch", 8, eps=1e-3, momentum=0.01, affine=False, dtype=torch.float64)
    assert (bn.eps, bn.momentum, bn.affine, bn.running_mean.dtype) == (
        1e-3,
        0.01,
        False,
        torch.float64,
    )
    gn = nl.get_norm_layer("group", 64, num_groups=4)
    assert gn.num_groups == 4
    assert nl.get_norm_layer("group", 48).num_groups == 24  # largest divisor <= 32
    assert nl.get_norm_layer("layer", 16, spatial_dims=2).num_groups == 1


def test_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"get_norm_layer: argument 'name' must be one of \['batch', "
        r"'channel_layer', 'ghost', 'group', 'instance', 'l1', 'layer', 'linf', 'noisy', 'none', "
        r"'renorm', 'weight', 'ws_gn'\], got 'btach'\. Fix",
    ):
        nl.get_norm_layer("btach", 8)
    with pytest.raises(
        ValueError,
        match=r"'spatial_dims' for norm 'instance' must be one of \[1, 2, 3\], "
        r"got 0\. Fix: instance norm needs positions",
    ):
        nl.get_norm_layer("instance", 8, spatial_dims=0)
    with pytest.raises(
        TypeError,
        match=r"the keyword arguments for norm 'layer' must be among \['eps', "
        r"'affine', 'device', 'dtype'\], got \['momentum'\]",
    ):
        nl.get_norm_layer("layer", 8, momentum=0.1)
    with pytest.raises(
        ValueError, match=r"register_norm: the norm name must be unused, got 'batch'"
    ):
        nl.register_norm("batch", summary="dup")(lambda c, s: nn.Identity())


def test_weight_transforms_for_model_builders() -> None:
    assert nl.weight_transform_of("ws_gn") == "standardize"
    assert nl.weight_transform_of("weight") == "weight_norm"
    assert nl.weight_transform_of("group") is None
    with pytest.raises(ValueError, match=r"weight_transform_of: argument 'name' must be one of"):
        nl.weight_transform_of("nope")


def test_forwarded_keywords_are_checked_against_the_layer() -> None:
    assert nl.get_norm_layer("ghost", 4, virtual_batch_size=8, momentum=0.2).virtual_batch_size == 8
    with pytest.raises(
        TypeError,
        match=r"the keyword arguments for norm 'ghost' must be among "
        r"\['virtual_batch_size', 'eps', 'momentum'.*\], got \['foo'\]",
    ):
        nl.get_norm_layer("ghost", 4, foo=1)


def test_none_ignores_norm_keywords() -> None:
    """Model builders pass their norm keywords whatever the norm; 'none' takes and drops them."""
    assert isinstance(nl.get_norm_layer("none", 8, eps=1e-3, affine=False), nn.Identity)


def test_unsupported_spatial_dims() -> None:
    with pytest.raises(
        ValueError,
        match=r"get_norm_layer: 'spatial_dims' for norm 'batch' must be one of \[0, 1, 2, 3\], got 5\. "
        r"Fix: use a norm that supports 5 dims",
    ):
        nl.get_norm_layer("batch", 8, spatial_dims=5)


def test_register_a_new_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @nl.register_norm("scaled", summary="test-only", spatial_dims=(0,))
    def _scaled(num_features: int, spatial_dims: int, *, factor: float = 2.0) -> nn.Module:
        return nl.LayerNorm(num_features, eps=factor * 1e-5)

    assert "scaled" in nl.available_norms()
    assert nl.get_norm_layer("scaled", 4, spatial_dims=0, factor=3.0).eps == pytest.approx(3e-5)


def test_group_norm_default_groups_never_hold_a_single_dense_feature() -> None:
    from normlab.nn import get_norm_layer

    # dense (N, C): groups of >= 16 features (one feature per group would output the bias)
    assert get_norm_layer("group", 16, spatial_dims=0).num_groups == 1
    assert get_norm_layer("group", 512, spatial_dims=0).num_groups == 32
    assert get_norm_layer("ws_gn", 64, spatial_dims=0).num_groups == 4
    assert get_norm_layer("group", 16, spatial_dims=2).num_groups == 16  # feature maps: the paper's
