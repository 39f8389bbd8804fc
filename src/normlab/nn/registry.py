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
from normlab.nn.batch_variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm,
    MeanOnlyBatchNorm,
    NoisyBatchNorm,
)
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.lp_norm import L1BatchNorm, LinfBatchNorm
from normlab.nn.normalization import ChannelLayerNorm, GroupNorm, LayerNorm
from normlab.nn.stochastic import (
    AlphaDropout,
    Dropout,
    FeatureAlphaDropout,
    FeatureDropout1d,
    FeatureDropout2d,
    FeatureDropout3d,
)

__all__ = [
    "NormSpec",
    "available_dropouts",
    "available_norms",
    "default_num_groups",
    "get_dropout_layer",
    "get_norm_layer",
    "register_norm",
    "weight_transform_of",
]

NormFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormSpec:
    """A registered norm: its factory, which ``spatial_dims`` it supports, a one-line summary, and
    ``weight_transform``: what a model builder must apply to the layer *producing* the norm's input
    (``"standardize"``: :func:`normlab.surgery.standardize_weights`; ``"weight_norm"``:
    :func:`normlab.surgery.apply_weight_norm`), or ``None``."""

    name: str
    factory: NormFactory
    spatial_dims: tuple[int, ...]
    summary: str
    weight_transform: str | None = None
    accepts: type[nn.Module] | None = None


_REGISTRY: dict[str, NormSpec] = {}


def register_norm(
    name: str,
    *,
    summary: str,
    spatial_dims: tuple[int, ...] = (0, 1, 2, 3),
    weight_transform: str | None = None,
    accepts: type[nn.Module] | None = None,
) -> Callable[[NormFactory], NormFactory]:
    """Decorator registering ``factory(num_features, spatial_dims, **kwargs) -> nn.Module``.

    A factory that forwards ``**kwargs`` to a layer class names it in ``accepts``, so that
    unknown keywords are reported with the list of valid ones.
    """

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
        _REGISTRY[name] = NormSpec(name, factory, spatial_dims, summary, weight_transform, accepts)
        return factory

    return decorate


def weight_transform_of(name: str) -> str | None:
    """What a model builder applies to the producing layer for norm ``name`` (see :class:`NormSpec`).

    >>> weight_transform_of("ws_gn"), weight_transform_of("batch")
    ('standardize', None)
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        fail(
            ValueError,
            "weight_transform_of",
            "argument 'name'",
            f"one of {sorted(_REGISTRY)}",
            repr(name),
            "pass a registered norm name",
        )
    return spec.weight_transform


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
    accepted = _accepted_keywords(spec)
    unknown = sorted(set(kwargs) - set(accepted)) if accepted is not None else []
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


def _accepted_keywords(spec: NormSpec) -> list[str] | None:
    """Keywords ``get_norm_layer`` may pass to ``spec``'s factory (``None``: anything)."""
    params = inspect.signature(spec.factory).parameters
    own = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return own
    if spec.accepts is None:
        return None
    layer = inspect.signature(spec.accepts.__init__).parameters
    extra = [
        k
        for k, p in layer.items()
        if k not in ("self", "num_features")
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    return own + [k for k in extra if k not in own]


def default_num_groups(num_features: int, preferred: int = 32) -> int:
    """The largest divisor of ``num_features`` not above ``preferred`` (the GN paper uses 32).

    >>> default_num_groups(64), default_num_groups(48), default_num_groups(10)
    (32, 24, 10)
    """
    check_positive_int(num_features, name="num_features", owner="default_num_groups")
    return max(g for g in range(1, min(preferred, num_features) + 1) if num_features % g == 0)


def _groups(num_features: int, spatial_dims: int) -> int:
    """The default group count: up to 32 groups on feature maps (the GN paper); on dense
    features, groups of at least 16 (one feature per group would have no variance: the output
    would be the bias)."""
    preferred = 32 if spatial_dims else max(1, num_features // 16)
    return default_num_groups(num_features, preferred)


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
    groups = _groups(num_features, spatial_dims) if num_groups is None else num_groups
    return GroupNorm(num_features, groups, eps, affine, device=device, dtype=dtype)


@register_norm("none", summary="no normalization (identity); norm keywords are ignored")
def _none(num_features: int, spatial_dims: int, **ignored: Any) -> nn.Module:
    return nn.Identity()


_RENORM = {0: BatchRenorm1d, 1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}


@register_norm(
    "renorm", summary="batch renormalization (Ioffe 2017): BN corrected towards running statistics"
)
def _renorm(num_features: int, spatial_dims: int, **kwargs: Any) -> nn.Module:
    return _RENORM[spatial_dims](num_features, **kwargs)


@register_norm(
    "ghost",
    accepts=GhostBatchNorm,
    summary="ghost batch norm: BN over virtual batches (default 32 samples)",
)
def _ghost(
    num_features: int, spatial_dims: int, *, virtual_batch_size: int = 32, **kwargs: Any
) -> nn.Module:
    return GhostBatchNorm(num_features, virtual_batch_size, **kwargs)


@register_norm(
    "l1", accepts=L1BatchNorm, summary="L1 batch norm: divide by sqrt(pi/2) * mean |x - mu|"
)
def _l1(num_features: int, spatial_dims: int, **kwargs: Any) -> nn.Module:
    return L1BatchNorm(num_features, **kwargs)


@register_norm(
    "linf",
    accepts=LinfBatchNorm,
    summary="L-infinity batch norm: divide by C(n) * mean of the top-k |x - mu|",
)
def _linf(num_features: int, spatial_dims: int, **kwargs: Any) -> nn.Module:
    return LinfBatchNorm(num_features, **kwargs)


@register_norm(
    "noisy",
    accepts=NoisyBatchNorm,
    summary="batch norm + Santurkar et al.'s time-varying injected noise",
)
def _noisy(num_features: int, spatial_dims: int, **kwargs: Any) -> nn.Module:
    return NoisyBatchNorm(num_features, **kwargs)


@register_norm(
    "weight",
    weight_transform="weight_norm",
    summary="weight norm on the producing layer + mean-only batch norm",
)
def _weight(num_features: int, spatial_dims: int, **kwargs: Any) -> nn.Module:
    return MeanOnlyBatchNorm(num_features, **kwargs)


@register_norm(
    "ws_gn",
    weight_transform="standardize",
    summary="weight standardization on the producing layer + group norm",
)
def _ws_gn(
    num_features: int, spatial_dims: int, *, num_groups: int | None = None, **kwargs: Any
) -> nn.Module:
    groups = _groups(num_features, spatial_dims) if num_groups is None else num_groups
    return GroupNorm(num_features, groups, **kwargs)


# -- stochastic regularizers --------------------------------------------------------------------

_FEATURE = {1: FeatureDropout1d, 2: FeatureDropout2d, 3: FeatureDropout3d}
_DROPOUTS: dict[str, str] = {
    "none": "no dropout (identity)",
    "dropout": "dropout of single units (inverted by default)",
    "feature": "dropout of whole channels (spatial_dims >= 1)",
    "alpha": "alpha dropout for SELU networks (keeps mean 0 / variance 1)",
    "feature_alpha": "alpha dropout of whole channels",
}


def available_dropouts() -> dict[str, str]:
    """Names :func:`get_dropout_layer` accepts, with one-line summaries. (DropConnect replaces the
    Linear/Conv layer itself: ``normlab.nn.DropConnectLinear``/``DropConnectConv*d``.)"""
    return dict(_DROPOUTS)


def get_dropout_layer(name: str, p: float, *, spatial_dims: int = 0, **kwargs: Any) -> nn.Module:
    """Build the dropout layer named ``name`` with drop probability ``p``.

    >>> get_dropout_layer("feature", 0.1, spatial_dims=2)
    FeatureDropout2d(p=0.1, inverted=True)

    Raises:
        ValueError: unknown ``name``, or a feature dropout without ``spatial_dims``.
    """
    owner = "get_dropout_layer"
    if name not in _DROPOUTS:
        fail(
            ValueError,
            owner,
            "argument 'name'",
            f"one of {sorted(_DROPOUTS)}",
            repr(name),
            "pass one of the listed names",
        )
    if name == "none":
        return nn.Identity()
    if name == "dropout":
        return Dropout(p, **kwargs)
    if name == "alpha":
        return AlphaDropout(p, **kwargs)
    if name == "feature_alpha":
        return FeatureAlphaDropout(p, **kwargs)
    if spatial_dims not in _FEATURE:
        fail(
            ValueError,
            owner,
            "'spatial_dims' for 'feature' dropout",
            "1, 2 or 3",
            repr(spatial_dims),
            "use 'dropout' for (N, C) features",
        )
    return _FEATURE[spatial_dims](p, **kwargs)
