"""Name -> norm-layer registry, so that every model can take ``norm="group"``.

>>> type(get_norm_layer("batch", 16)).__name__, type(get_norm_layer("batch", 16, spatial_dims=0)).__name__
('BatchNorm2d', 'BatchNorm1d')
>>> get_norm_layer("group", 64)
GroupNorm(64, num_groups=32, eps=1e-05, affine=True)

Later layers join with :func:`register_norm`; each factory receives ``num_features`` and
``spatial_dims`` (0 for dense ``(N, C)`` features, 1/2/3 for ``(N, C, *spatial)``) plus the
keyword arguments given to :func:`get_norm_layer`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from normlab._checks import check_positive_int, fail
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.normalization import ChannelLayerNorm, GroupNorm, LayerNorm

__all__ = ["NormSpec", "available_norms", "default_num_groups", "get_norm_layer", "register_norm"]

NormFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormSpec:
    """A registered norm: its factory, which ``spatial_dims`` it supports, and a one-line summary."""

    name: str
    factory: NormFactory
    spatial_dims: tuple[int, ...]
    summary: str


_REGISTRY: dict[str, NormSpec] = {}


def register_norm(
    name: str, *, summary: str, spatial_dims: tuple[int, ...] = (0, 1, 2, 3)
) -> Callable[[NormFactory], NormFactory]:
    """Decorator registering ``factory(num_features, spatial_dims, **kwargs) -> nn.Module``."""

    def decorate(factory: NormFactory) -> NormFactory:
        if name in _REGISTRY:
            fail(
                ValueError,
                "register_norm",
                "the norm name",
                "unused",
                repr(name),
                f"choose a name other than {sorted(_REGISTRY)}",
            )
        _REGISTRY[name] = NormSpec(name, factory, spatial_dims, summary)
        return factory

    return decorate


def available_norms() -> dict[str, str]:
    """Registered names and their one-line summaries."""
    return {name: spec.summary for name, spec in sorted(_REGISTRY.items())}


def get_norm_layer(
    name: str, num_features: int, *, spatial_dims: int = 2, **kwargs: Any
) -> nn.Module:
    """Build the norm layer registered as ``name`` for ``num_features`` channels.

    Args:
        name: one of :func:`available_norms` (``"batch"``, ``"layer"``, ``"instance"``,
            ``"group"``, ``"channel_layer"``, ``"none"``, and what later modules register).
        num_features: ``C``, the channels (features) of the input.
        spatial_dims: 0 for dense ``(N, C)`` input, 1, 2 or 3 for ``(N, C, *spatial)``. Default 2.
        **kwargs: passed to the layer (``eps``, ``momentum``, ``affine``, ``num_groups``,
            ``device``, ``dtype``, ...).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones); ``spatial_dims`` the norm
            does not support.
        TypeError: a keyword the layer does not accept (the message lists the accepted ones).
    """
    owner = "get_norm_layer"
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        fail(
            ValueError,
            owner,
            "argument 'name'",
            f"one of {sorted(_REGISTRY)}",
            repr(name),
            "pass one of the registered names (see normlab.nn.available_norms())",
        )
    if spatial_dims not in spec.spatial_dims:
        fail(
            ValueError,
            owner,
            f"'spatial_dims' for norm {name!r}",
            f"one of {list(spec.spatial_dims)}",
            repr(spatial_dims),
            "instance norm needs positions to normalize over; use 'layer' or 'batch' for (N, C) "
            "features"
            if name == "instance"
            else f"use a norm that supports {spatial_dims} dims",
        )
    params = inspect.signature(spec.factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            fail(
                TypeError,
                owner,
                f"the keyword arguments for norm {name!r}",
                f"among {accepted}",
                str(unknown),
                "remove them or pick another norm",
            )
    return spec.factory(num_features, spatial_dims, **kwargs)


def default_num_groups(num_features: int, preferred: int = 32) -> int:
    """The largest divisor of ``num_features`` not above ``preferred`` (the GN paper uses 32).

    >>> default_num_groups(64), default_num_groups(48), default_num_groups(10)
    (32, 24, 10)
    """
    check_positive_int(num_features, name="num_features", owner="default_num_groups")
    return max(g for g in range(1, min(preferred, num_features) + 1) if num_features % g == 0)


_BATCH = {0: BatchNorm1d, 1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_INSTANCE = {1: InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d}


@register_norm("batch", summary="batch norm: per channel over the batch (and positions)")
def _batch(
    num_features: int,
    spatial_dims: int,
    *,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    track_running_stats: bool = True,
    device: Any = None,
    dtype: Any = None,
) -> nn.Module:
    return _BATCH[spatial_dims](
        num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
    )


@register_norm(
    "instance",
    spatial_dims=(1, 2, 3),
    summary="instance norm: per sample and channel over the positions",
)
def _instance(
    num_features: int,
    spatial_dims: int,
    *,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    track_running_stats: bool = False,
    device: Any = None,
    dtype: Any = None,
) -> nn.Module:
    return _INSTANCE[spatial_dims](
        num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
    )


@register_norm("layer", summary="layer norm: per sample over all features (channels and positions)")
def _layer(
    num_features: int,
    spatial_dims: int,
    *,
    eps: float = 1e-5,
    affine: bool = True,
    device: Any = None,
    dtype: Any = None,
) -> nn.Module:
    if spatial_dims == 0:
        return LayerNorm(num_features, eps, elementwise_affine=affine, device=device, dtype=dtype)
    return GroupNorm(num_features, 1, eps, affine, device=device, dtype=dtype)


@register_norm("channel_layer", summary="layer norm over the channels at every position")
def _channel_layer(
    num_features: int,
    spatial_dims: int,
    *,
    eps: float = 1e-5,
    affine: bool = True,
    device: Any = None,
    dtype: Any = None,
) -> nn.Module:
    return ChannelLayerNorm(num_features, eps, affine, device=device, dtype=dtype)


@register_norm("group", summary="group norm: per sample over channel groups and positions")
def _group(
    num_features: int,
    spatial_dims: int,
    *,
    num_groups: int | None = None,
    eps: float = 1e-5,
    affine: bool = True,
    device: Any = None,
    dtype: Any = None,
) -> nn.Module:
    groups = default_num_groups(num_features) if num_groups is None else num_groups
    return GroupNorm(num_features, groups, eps, affine, device=device, dtype=dtype)


@register_norm("none", summary="no normalization (identity); norm keywords are ignored")
def _none(num_features: int, spatial_dims: int, **ignored: Any) -> nn.Module:
    return nn.Identity()
