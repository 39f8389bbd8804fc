"""Weight standardization and weight normalization on whole models, and weight norm's
data-dependent initialisation (Salimans & Kingma 2016)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from normlab._batches import InputFn, iter_inputs
from normlab._checks import fail
from normlab.nn.init import lecun_normal_
from normlab.nn.weight import WeightStandardization
from normlab.surgery._state import preserved
from normlab.surgery.walk import replace_modules

__all__ = [
    "apply_weight_norm",
    "init_self_normalizing_",
    "init_weight_norm_",
    "standardize_weights",
    "weight_layers",
]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Linear and Conv1d/2d/3d in ``model`` (the model itself included)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _WEIGHTED)]


def _with_parametrization(model: nn.Module, owner: str, add: Any) -> nn.Module:
    if not weight_layers(model):
        fail(
            ValueError,
            owner,
            "the model",
            "a module with Linear or Conv1d/2d/3d weights",
            f"{type(model).__name__} without one",
            "apply it to a model (or layer) that has weights to normalize",
        )

    def make(name: str, module: nn.Module) -> nn.Module:
        add(module)
        return module

    return replace_modules(model, lambda name, m: isinstance(m, _WEIGHTED), make)


def standardize_weights(model: nn.Module, *, eps: float = 1e-5) -> nn.Module:
    """Return a copy of ``model`` with :class:`~normlab.nn.WeightStandardization` on the weight of
    every Linear and Conv1d/2d/3d (not only 2-D convolutions). Pair it with group norm
    (``get_norm_layer("ws_gn", C)``).

    Raises:
        ValueError: the model has no Linear/Conv layer.
    """
    return _with_parametrization(
        model,
        "standardize_weights",
        lambda m: parametrize.register_parametrization(m, "weight", WeightStandardization(eps)),
    )


def apply_weight_norm(model: nn.Module) -> nn.Module:
    """Return a copy with weight normalization ``w = g * v / ||v||`` (per output unit, torch's
    ``parametrizations.weight_norm``) on every Linear and Conv1d/2d/3d. The function is unchanged
    (``g = ||v||``); call :func:`init_weight_norm_` for the paper's data-dependent initialisation.

    Raises:
        ValueError: the model has no Linear/Conv layer.
    """
    return _with_parametrization(model, "apply_weight_norm", lambda m: weight_norm(m, dim=0))


def _is_weight_normed(module: nn.Module) -> bool:
    params = getattr(module, "parametrizations", None)
    return params is not None and "weight" in params and hasattr(params.weight, "original0")


def _weight_norm_params(module: nn.Module) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(g, v, bias)`` of a weight-normed layer."""
    params = cast(Any, module).parametrizations.weight
    return params.original0, params.original1, cast(Tensor | None, getattr(module, "bias", None))


def init_weight_norm_(
    model: nn.Module,
    batch: Any,
    *,
    input_fn: InputFn | None = None,
    init_scale: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """Salimans & Kingma's data-dependent initialisation of every weight-normed layer, in place.

    Directions ``v ~ N(0, 0.05^2)``; then one forward pass of ``batch`` in which each layer, in
    order, measures its pre-activations ``t = v.x / ||v||`` (mean ``mu`` and population std
    ``sigma`` per output unit, over the batch and positions) and sets ``g = init_scale / sigma``
    and ``b = -mu * init_scale / sigma``, passing the normalized output on, so that later layers are
    initialised on normalized inputs. Afterwards every layer's pre-activations on ``batch`` have
    mean 0 and std ``init_scale`` (a layer without bias: std only). Dropout is off during the pass;
    modes, hooks and ``requires_grad`` are restored. Returns ``model``.

    Raises:
        ValueError: no weight-normed layer (call :func:`apply_weight_norm` first).
    """
    owner = "init_weight_norm_"
    layers = [m for _, m in weight_layers(model) if _is_weight_normed(m)]
    if not layers:
        fail(
            ValueError,
            owner,
            "the model",
            "a model with weight-normed layers",
            "none",
            "call normlab.surgery.apply_weight_norm(model) first",
        )
    args = next(iter_inputs(batch, owner=owner, input_fn=input_fn, num_batches=1))
    generator = torch.Generator().manual_seed(seed)

    def initialise(module: nn.Module, inputs: tuple[Any, ...], out: Tensor) -> Tensor:
        dims = [0, *range(2, out.dim())]
        mean = out.mean(dims)
        std = out.var(dims, correction=0).add(1e-10).sqrt()
        scale = init_scale / std
        g, _, bias = _weight_norm_params(module)
        with torch.no_grad():
            g.copy_(scale.view(g.shape))
            if bias is not None:
                bias.copy_(-mean * scale)
        shape = [1, -1] + [1] * (out.dim() - 2)  # per output unit
        if bias is not None:
            return (out - mean.view(shape)) * scale.view(shape)
        return out * scale.view(shape)

    with preserved(model) as handles, torch.no_grad():
        model.eval()
        for module in layers:
            g, v, bias = _weight_norm_params(module)
            v.copy_(torch.randn(v.shape, generator=generator).to(v) * 0.05)
            g.fill_(1.0)
            if bias is not None:
                bias.zero_()
            handles.append(module.register_forward_hook(initialise))
        model(*args)
    return model


def init_self_normalizing_(model: nn.Module, *, seed: int | None = None) -> nn.Module:
    """In place: LeCun-normal weights (``N(0, 1/fan_in)``) and zero biases for every Linear and
    Conv1d/2d/3d -- the initialisation SELU networks need to stay at their fixed point. Returns
    ``model``.

    Raises:
        ValueError: the model has no Linear/Conv layer.
    """
    layers = weight_layers(model)
    if not layers:
        fail(
            ValueError,
            "init_self_normalizing_",
            "the model",
            "a module with Linear or Conv1d/2d/3d weights",
            f"{type(model).__name__} without one",
            "apply it to the network whose layers feed the SELUs",
        )
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in layers:
            weight = cast(Tensor, layer.weight)
            lecun_normal_(weight, generator=generator)
            bias = getattr(layer, "bias", None)
            if isinstance(bias, Tensor):
                bias.zero_()
    return model
