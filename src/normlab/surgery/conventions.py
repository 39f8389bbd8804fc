"""Keras/TensorFlow <-> torch batch-norm conventions (shared/reference/keras-conventions.md).

Keras' ``momentum`` is the *decay* of the moving average (``moving = m * moving + (1 - m) * batch``,
default 0.99); torch's is the *weight of the new batch* (default 0.1). Keras' ``epsilon`` defaults to
1e-3, torch's to 1e-5. Keras stores ``moving_variance`` as an average of **biased** batch variances,
torch's ``running_var`` of unbiased ones; the inference formula is the same, so the values are loaded
unchanged and eval outputs are identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab._checks import check_eps, check_momentum, fail

__all__ = ["keras_to_torch_momentum", "load_keras_batchnorm", "torch_to_keras_momentum"]

_KERAS_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")


def keras_to_torch_momentum(momentum: float) -> float:
    """Keras' decay ``m`` -> torch's new-batch weight ``1 - m`` (0.99 -> 0.01, *not* torch's 0.1).

    >>> round(keras_to_torch_momentum(0.99), 10)
    0.01
    """
    value = check_momentum(momentum, owner="keras_to_torch_momentum", allow_none=False)
    return 1.0 - cast(float, value)


def torch_to_keras_momentum(momentum: float) -> float:
    """torch's new-batch weight ``m`` -> Keras' decay ``1 - m`` (0.1 -> 0.9).

    >>> torch_to_keras_momentum(0.1)
    0.9
    """
    value = check_momentum(momentum, owner="torch_to_keras_momentum", allow_none=False)
    return 1.0 - cast(float, value)


def load_keras_batchnorm(
    layer: nn.Module,
    weights: Mapping[str, Any] | Sequence[Any],
    *,
    epsilon: float = 1e-3,
    momentum: float | None = None,
) -> nn.Module:
    """Load a Keras ``BatchNormalization`` layer's weights into a torch/normlab batch norm.

    ``weights`` is ``layer.get_weights()`` (``[gamma, beta, moving_mean, moving_variance]``, with
    gamma/beta absent for ``scale=False``/``center=False``) or a mapping with those names. Sets
    ``layer.eps = epsilon`` (Keras' default 1e-3) and, if given, ``layer.momentum`` from Keras'
    ``momentum``. Afterwards ``layer.eval()(x)`` equals Keras' inference output
    ``(x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta`` (channels in dim 1).
    Works **in place** on ``layer`` and returns it; nothing is changed if it raises.

    Raises:
        TypeError: ``layer`` is not a batch norm.
        ValueError: missing or wrongly shaped arrays; gamma/beta given for a layer without them.
    """
    owner = "load_keras_batchnorm"
    if not isinstance(layer, _BatchNorm) or layer.running_mean is None:
        fail(
            TypeError,
            owner,
            "'layer'",
            "a batch norm with running statistics",
            type(layer).__name__,
            "pass e.g. normlab.nn.BatchNorm2d(C) or torch.nn.BatchNorm2d(C)",
        )
    eps = check_eps(epsilon, owner=owner, name="epsilon")
    if momentum is not None and (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0 <= momentum <= 1
    ):
        fail(
            ValueError,
            owner,
            "argument 'momentum'",
            "Keras' momentum (a decay) in [0, 1], or None",
            repr(momentum),
            "pass the Keras layer's momentum, e.g. momentum=0.99",
        )
    arrays = _named(weights, owner)
    c = layer.num_features
    targets = {
        "gamma": layer.weight,
        "beta": layer.bias,
        "moving_mean": layer.running_mean,
        "moving_variance": layer.running_var,
    }
    values: dict[str, Tensor] = {}
    for name, array in arrays.items():  # validate everything before writing anything
        tensor = torch.as_tensor(np.asarray(array), dtype=torch.float64).flatten()
        if tensor.shape != (c,):
            fail(
                ValueError,
                owner,
                f"the shape of {name!r}",
                f"({c},)",
                str(tuple(tensor.shape)),
                "pass the weights of a Keras layer with the same number of channels",
            )
        if targets[name] is None:
            fail(
                ValueError,
                owner,
                f"{name!r}",
                "absent for a layer without it",
                "an array",
                "build the layer with affine=True (and bias=True)",
            )
        values[name] = tensor
    with torch.no_grad():
        for name, target in targets.items():
            if target is None:
                continue
            if name in values:
                target.copy_(values[name])
            else:  # Keras scale=False / center=False
                target.fill_(1.0 if name == "gamma" else 0.0)
    layer.eps = eps
    if momentum is not None:
        layer.momentum = 1.0 - float(momentum)
    return layer


def _named(weights: Mapping[str, Any] | Sequence[Any], owner: str) -> dict[str, Any]:
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(_KERAS_NAMES))
        if unknown or not {"moving_mean", "moving_variance"} <= set(weights):
            fail(
                ValueError,
                owner,
                "the weight names",
                f"among {list(_KERAS_NAMES)} with moving_mean and moving_variance",
                str(sorted(weights)),
                "use Keras' names, or pass layer.get_weights()",
            )
        return dict(weights)
    items = list(weights)
    layouts = {4: _KERAS_NAMES, 3: None, 2: _KERAS_NAMES[2:]}
    if len(items) not in layouts:
        fail(
            ValueError,
            owner,
            "the number of arrays",
            "2, 3 or 4 ([gamma], [beta], moving_mean, moving_variance)",
            str(len(items)),
            "pass Keras' layer.get_weights()",
        )
    if len(items) == 3:
        fail(
            ValueError,
            owner,
            "a list of 3 arrays",
            "unambiguous",
            "3 arrays (gamma or beta missing?)",
            "pass a dict with Keras' names instead",
        )
    return dict(zip(cast(tuple[str, ...], layouts[len(items)]), items, strict=True))
