"""Converters built from the one walker: norm conversion, batch-norm fusion, freezing."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

import normlab.nn as nl
from normlab._checks import fail
from normlab.nn.registry import available_norms, get_norm_layer
from normlab.surgery.walk import copy_norm_state, replace_modules

__all__ = [
    "convert_norm",
    "convert_sync_batchnorm",
    "foldable",
    "freeze_batchnorm",
    "fusable_pairs",
    "fuse_batchnorm",
]

log = logging.getLogger(__name__)

_BN_SPATIAL = {"BatchNorm1d": 1, "BatchNorm2d": 2, "BatchNorm3d": 3}
_TO_NORMLAB: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: nl.BatchNorm1d,
    nn.BatchNorm2d: nl.BatchNorm2d,
    nn.BatchNorm3d: nl.BatchNorm3d,
    nn.InstanceNorm1d: nl.InstanceNorm1d,
    nn.InstanceNorm2d: nl.InstanceNorm2d,
    nn.InstanceNorm3d: nl.InstanceNorm3d,
    nn.LayerNorm: nl.LayerNorm,
    nn.GroupNorm: nl.GroupNorm,
}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_NORMLAB.items()}


def _factory_kwargs(module: nn.Module) -> dict[str, Any]:
    """``device``/``dtype`` of ``module``'s tensors (for building its replacement)."""
    ref = next(iter((*module.parameters(), *module.buffers())), None)
    return {} if ref is None else {"device": ref.device, "dtype": ref.dtype}


def _bias_kwarg(module: nn.Module) -> dict[str, bool]:
    """torch's ``bias=False`` where an affine layer has no bias (only then: older torch lacks it)."""
    affine = bool(getattr(module, "affine", getattr(module, "elementwise_affine", False)))
    return {"bias": False} if affine and getattr(module, "bias", None) is None else {}


def _rebuild(src: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """An instance of ``cls`` with ``src``'s configuration, device, dtype and state."""
    kw = _factory_kwargs(src)
    if isinstance(src, nn.LayerNorm):
        dst = cls(src.normalized_shape, src.eps, src.elementwise_affine, src.bias is not None, **kw)
    elif isinstance(src, nn.GroupNorm):
        # normlab's GroupNorm takes num_features first, torch's num_groups first
        first, second = (
            (src.num_channels, src.num_groups)
            if issubclass(cls, nl.GroupNorm)
            else (src.num_groups, src.num_channels)
        )
        dst = cls(first, second, src.eps, src.affine, **{**kw, **_bias_kwarg(src)})
    else:
        norm = cast(_NormBase, src)
        dst = cls(
            norm.num_features,
            norm.eps,
            norm.momentum,
            norm.affine,
            norm.track_running_stats,
            **kw,
            **_bias_kwarg(src),
        )
    return copy_norm_state(src, dst)


def convert_norm(model: nn.Module, to: str, **kwargs: Any) -> nn.Module:
    """Return a copy of ``model`` with its norm layers converted; the caller's model is unchanged.

    * ``to="normlab"``: every ``torch.nn`` batch, instance, layer and group norm becomes the
      normlab layer with the same configuration and state (identical outputs).
    * ``to="torch"``: the reverse (``ChannelLayerNorm`` has no torch twin and is kept).
    * ``to=<registry name>`` (``"group"``, ``"layer"``, ``"instance"``, ...): every batch norm
      (torch's or normlab's) becomes ``get_norm_layer(to, C, spatial_dims=..., **kwargs)``; the
      per-channel affine parameters are copied where the new layer has them, running statistics
      are dropped (the new layer does not use them).

    Raises:
        ValueError: unknown ``to`` (the message lists the valid values).
    """
    if to == "normlab":
        table = _TO_NORMLAB
    elif to == "torch":
        table = _TO_TORCH
    elif isinstance(to, str) and to in available_norms():
        return replace_modules(
            model,
            lambda name, m: isinstance(m, _BatchNorm),
            lambda name, m: _from_batchnorm(cast(_BatchNorm, m), to, kwargs),
        )
    else:
        fail(
            ValueError,
            "convert_norm",
            "argument 'to'",
            f"'normlab', 'torch' or a registered norm {sorted(available_norms())}",
            repr(to),
            "pass one of the listed names",
        )
    if kwargs:
        fail(
            TypeError,
            "convert_norm",
            "keyword arguments with to='normlab'/'torch'",
            "none",
            str(sorted(kwargs)),
            "remove them: the configuration is copied from each layer",
        )
    return replace_modules(
        model, lambda name, m: type(m) in table, lambda name, m: _rebuild(m, table[type(m)])
    )


def _from_batchnorm(bn: _BatchNorm, to: str, kwargs: dict[str, Any]) -> nn.Module:
    spatial = next((v for k, v in _BN_SPATIAL.items() if isinstance(bn, getattr(nn, k))), 1)
    options: dict[str, Any] = (
        {} if to == "none" else {"eps": bn.eps, **_factory_kwargs(bn), **kwargs}
    )
    return copy_norm_state(bn, get_norm_layer(to, bn.num_features, spatial_dims=spatial, **options))


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Return a copy in which every plain batch norm (torch's or normlab's ``BatchNorm1d/2d/3d``)
    is a :class:`~normlab.nn.SyncBatchNorm` with the same configuration and state -- on CPU and
    GPU alike. Variants with their own semantics (ghost, noisy, renorm) are left alone."""
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

    def make(name: str, module: nn.Module) -> nn.Module:
        bn = cast(_BatchNorm, module)
        sync = nl.SyncBatchNorm(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            process_group=process_group,
            **_factory_kwargs(bn),
        )
        return copy_norm_state(bn, sync)

    return replace_modules(
        model,
        lambda name, m: (
            isinstance(m, plain)
            and not isinstance(m, nl.SyncBatchNorm)
            and type(m).forward
            in (nl.BatchNorm2d.forward, nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward)
        ),
        make,
    )


def freeze_batchnorm(
    model: nn.Module, *, trainable_affine: bool = False, only: Collection[str] | None = None
) -> nn.Module:
    """Return a copy in which every batch norm (or those named in ``only``) is a
    :class:`~normlab.nn.FrozenBatchNorm` with its current running statistics and affine map;
    ``model.train()`` no longer changes them."""

    def make(name: str, module: nn.Module) -> nn.Module:
        bn = cast(_BatchNorm, module)
        if bn.running_mean is None:
            fail(
                ValueError,
                "freeze_batchnorm",
                f"layer {name!r}",
                "a batch norm with running statistics",
                "track_running_stats=False",
                "train with track_running_stats=True, or recompute_population_stats first",
            )
        frozen = nl.FrozenBatchNorm(
            bn.num_features, bn.eps, trainable_affine=trainable_affine, **_factory_kwargs(bn)
        )
        return copy_norm_state(bn, frozen)

    return replace_modules(
        model,
        lambda name, m: isinstance(m, _BatchNorm) and (only is None or name in only),
        make,
    )


_FUSABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fusable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(producer, batch norm)`` names of every batch norm that directly follows a Conv/Linear
    inside an ``nn.Sequential`` (where registration order is data flow) and uses running
    statistics, so that it can be folded into the producer."""
    pairs = []
    for prefix, module in model.named_modules():
        if (
            not isinstance(module, nn.Sequential)
            or type(module).forward is not nn.Sequential.forward
        ):
            continue  # a subclass with its own forward may not run its children in order
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in itertools.pairwise(children):
            if foldable(a, b):
                pairs.append((_join(prefix, a_name), _join(prefix, b_name)))
    return pairs


def foldable(layer: nn.Module | None, norm: nn.Module | None) -> bool:
    """Whether batch norm ``norm`` can be folded into ``layer`` when ``layer``'s output feeds
    it: a Conv/Linear whose weight is a plain parameter (not weight norm / standardization,
    whose weight is computed) with one output per channel of a batch norm (not instance norm)
    that has running statistics."""
    return (
        isinstance(layer, _FUSABLE)
        and not parametrize.is_parametrized(layer)
        and not hasattr(layer, "weight_g")  # the old ``weight_norm`` hook
        and isinstance(norm, _BatchNorm)
        and not isinstance(norm, _InstanceNorm)
        and norm.running_mean is not None
        and norm.num_features
        == (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def fuse_batchnorm(model: nn.Module, pairs: Sequence[tuple[str, str]] | None = None) -> nn.Module:
    """Return an inference copy with every batch norm folded into the Conv/Linear before it.

    ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``
    (computed in float64), the batch norm replaced by ``nn.Identity``. Eval-only: outputs equal
    the eval-mode model's within float32 rounding. Pairs ``(layer, batch norm)`` are found by
    :func:`fusable_pairs` (inside ``nn.Sequential``), or given -- e.g. from a traced data flow,
    where the caller vouches that the layer's output feeds only that batch norm.

    Raises:
        ValueError: the model (or a batch norm in it) is in training mode: fusing would freeze
            whatever the running statistics are now; call ``model.eval()`` first.
    """
    training = [
        name for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training
    ]
    if training:
        fail(
            ValueError,
            "fuse_batchnorm",
            "every batch norm",
            "in eval mode",
            f"training mode in {training[:3]}{'...' if len(training) > 3 else ''}",
            "call model.eval() (and recompute_population_stats) before fusing",
        )
    pairs = fusable_pairs(model) if pairs is None else list(pairs)
    producers = dict(pairs)
    norms = {bn for _, bn in pairs}
    fused = replace_modules(
        model,
        lambda name, m: name in producers or name in norms,
        lambda name, m: nn.Identity() if name in norms else m,
    )
    with torch.no_grad():
        for producer, norm in pairs:
            _fold(
                cast(nn.Linear | _ConvNd, fused.get_submodule(producer)),
                cast(_BatchNorm, model.get_submodule(norm)),
            )
    log.info("fused %d batch norms", len(pairs))
    return fused


def _fold(layer: nn.Linear | _ConvNd, bn: _BatchNorm) -> None:
    running_mean, running_var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)
    scale = torch.rsqrt(running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = layer.weight
    view = [-1] + [1] * (weight.dim() - 1)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(shift)
    trainable = bool(weight.requires_grad)
    layer.weight = nn.Parameter((weight.double() * scale.view(view)).to(weight.dtype), trainable)
    layer.bias = nn.Parameter((bias * scale + shift).to(weight.dtype), trainable)
