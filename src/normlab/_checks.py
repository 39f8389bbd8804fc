"""Validation helpers shared by every layer and function.

Every failure raises :class:`ValueError` or :class:`TypeError` with one message shape::

    <owner>: <what> must be <expected>, got <received>. Fix: <what to do>.

so that a user can act on it without reading the source. Callers pass ``owner`` (the class or
function name the user called) and, where the generic fix is not specific enough, their own ``fix``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NoReturn

import torch

__all__ = [
    "check_bool",
    "check_channels",
    "check_channels_first",
    "check_divisible",
    "check_eps",
    "check_floating_tensor",
    "check_min_float",
    "check_momentum",
    "check_ndim",
    "check_nonempty_batch",
    "check_per_channel",
    "check_positive_int",
    "check_trailing_shape",
    "check_values_per_channel",
    "fail",
]


def fail(
    exc_type: type[Exception], owner: str, what: str, expected: str, got: str, fix: str
) -> NoReturn:
    """Raise ``exc_type`` with the house message shape (see the module docstring)."""
    raise exc_type(f"{owner}: {what} must be {expected}, got {got}. Fix: {fix}")


def check_positive_int(value: object, *, name: str, owner: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 1 (``bool`` is rejected).

    Anything ``operator.index`` accepts counts as an integer (e.g. ``numpy.int64``).
    """
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        fail(
            TypeError,
            owner,
            f"argument '{name}'",
            "a positive int",
            f"{type(value).__name__} {value!r}",
            f"pass an int such as {name}=64",
        )
    number = operator.index(value)  # type: ignore[arg-type]
    if number < 1:
        fail(
            ValueError,
            owner,
            f"argument '{name}'",
            "a positive int (>= 1)",
            repr(value),
            f"pass the number of {name.replace('num_', '')}, e.g. {name}=64",
        )
    return number


def check_bool(value: object, *, name: str, owner: str) -> bool:
    """Return ``value`` if it is a ``bool``."""
    if not isinstance(value, bool):
        fail(
            TypeError,
            owner,
            f"argument '{name}'",
            "True or False",
            f"{type(value).__name__} {value!r}",
            f"pass {name}=True or {name}=False",
        )
    return value


def check_eps(value: object, *, owner: str, name: str = "eps") -> float:
    """Return ``value`` as a float if it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(
            TypeError,
            owner,
            f"argument '{name}'",
            "a positive float",
            f"{type(value).__name__} {value!r}",
            f"pass a float such as {name}=1e-5",
        )
    if not (math.isfinite(value) and value > 0):
        fail(
            ValueError,
            owner,
            f"argument '{name}'",
            "a finite float > 0",
            repr(value),
            f"pass a small positive value such as {name}=1e-5 (it keeps the division away "
            "from zero for constant inputs)",
        )
    return float(value)


def check_momentum(value: object, *, owner: str, allow_none: bool = True) -> float | None:
    """Return ``value`` if it is ``None`` (cumulative average) or a float in [0, 1].

    ``momentum`` follows torch: the weight of the new batch,
    ``running = (1 - momentum) * running + momentum * batch``.
    """
    if value is None and allow_none:
        return None
    expected = "None or a float in [0, 1]" if allow_none else "a float in [0, 1]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(
            TypeError,
            owner,
            "argument 'momentum'",
            expected,
            f"{type(value).__name__} {value!r}",
            "pass a float such as momentum=0.1 (torch convention: weight of the new batch)",
        )
    if not (0.0 <= value <= 1.0):
        fix = (
            "pass a value in [0, 1], e.g. momentum=0.1 (torch convention: weight of the new batch)"
        )
        if 1.0 < value <= 100.0:
            fix += "; a percentage? divide by 100"
        fail(ValueError, owner, "argument 'momentum'", expected, repr(value), fix)
    return float(value)


def check_floating_tensor(x: object, *, owner: str, name: str = "input") -> torch.Tensor:
    """Return ``x`` if it is a real floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        fail(
            TypeError,
            owner,
            f"'{name}'",
            "a torch.Tensor",
            type(x).__name__,
            "convert it with torch.as_tensor(...)",
        )
    if not x.is_floating_point():
        fail(
            TypeError,
            owner,
            f"'{name}'",
            "a floating-point tensor",
            f"dtype {x.dtype}",
            f"convert it with {name}.float()",
        )
    return x


def check_matches_parameters(
    x: torch.Tensor, params: Sequence[torch.Tensor | None], *, owner: str
) -> None:
    """``x`` is on the parameters' device, and float64 on neither or both sides (float16 and
    bfloat16 input with float32 parameters is mixed precision, which the layers support)."""
    p = None
    for t in params:  # the first parameter (a layer's share both); not next(genexpr, None),
        if t is not None:  # which torch 2.8's dynamo cannot trace
            p = t
            break
    if p is not None:
        if p.device != x.device:
            fail(
                ValueError,
                owner,
                "'input'",
                f"on the layer's device {p.device}",
                f"a tensor on {x.device}",
                f"move one of them: input.to('{p.device}') or layer.to('{x.device}')",
            )
        if (x.dtype == torch.float64) != (p.dtype == torch.float64):
            fail(
                TypeError,
                owner,
                "'input'",
                f"of the parameters' dtype {p.dtype}",
                f"dtype {x.dtype}",
                "convert one of them: input.to(dtype) or layer.to(input.dtype)",
            )


def check_ndim(
    x: torch.Tensor, allowed: Sequence[int], *, layout: str, owner: str, fix: str | None = None
) -> None:
    """Check that ``x.dim()`` is one of ``allowed``; ``layout`` names the expected shapes."""
    if x.dim() not in allowed:
        ordered = sorted(allowed)
        if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
            dims = f"{ordered[0]}-D to {ordered[-1]}"
        else:
            dims = " or ".join(str(d) for d in ordered)
        fail(
            ValueError,
            owner,
            "the input",
            f"a {dims}-D tensor {layout}",
            f"a {x.dim()}-D tensor of shape {tuple(x.shape)}",
            fix or "reshape the input or pick the layer that matches its dimensionality",
        )


def check_channels(x: torch.Tensor, expected: int, *, owner: str, dim: int = 1) -> None:
    """Check that ``x.shape[dim]`` equals ``expected`` (the layer's ``num_features``)."""
    if x.shape[dim] != expected:
        fail(
            ValueError,
            owner,
            f"the input's size in dim {dim} (channels)",
            f"num_features={expected}",
            f"{x.shape[dim]} (input shape {tuple(x.shape)})",
            f"construct the layer with num_features={x.shape[dim]}, or check that channels "
            f"are in dim {dim}",
        )


def check_divisible(num_features: int, num_groups: int, *, owner: str) -> None:
    """Check that ``num_features`` is divisible by ``num_groups``."""
    if num_features % num_groups != 0:
        divisors = [g for g in range(1, num_features + 1) if num_features % g == 0]
        near = sorted(divisors, key=lambda g: (abs(g - num_groups), g))[:3]
        fail(
            ValueError,
            owner,
            "num_features % num_groups",
            "0",
            f"{num_features} % {num_groups} = {num_features % num_groups}",
            f"choose num_groups dividing {num_features}, e.g. one of {sorted(near)}",
        )


def check_values_per_channel(
    x: torch.Tensor, count: int, *, owner: str, what: str, fix: str | None = None
) -> None:
    """Refuse batch statistics from a single value: the variance would be 0 and the output the bias.

    torch raises ``ValueError`` here too ("Expected more than 1 value per channel when training").
    ``count`` is the number of values each statistic is computed from, ``what`` names them.
    """
    if count <= 1:
        fail(
            ValueError,
            owner,
            f"the number of {what} used for each statistic",
            "more than 1",
            f"{count} (input shape {tuple(x.shape)})",
            fix
            or "use a batch of at least 2 samples, call .eval() to use the running "
            "statistics, or use a batch-independent norm (LayerNorm, GroupNorm)",
        )


def check_per_channel(t: object, num_channels: int, *, name: str, owner: str) -> None:
    """Check that an optional per-channel tensor (weight, bias, running statistics) has shape (C,)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        fail(
            TypeError,
            owner,
            f"'{name}'",
            "a torch.Tensor or None",
            type(t).__name__,
            f"pass {name} as a 1-D tensor of size {num_channels}",
        )
    if tuple(t.shape) != (num_channels,):
        fail(
            ValueError,
            owner,
            f"the shape of '{name}'",
            f"({num_channels},), one value per channel",
            str(tuple(t.shape)),
            f"pass a 1-D tensor with {num_channels} elements, or None",
        )


def check_trailing_shape(x: torch.Tensor, shape: tuple[int, ...], *, owner: str) -> None:
    """Check that the trailing dims of ``x`` equal ``shape`` (layer norm's ``normalized_shape``)."""
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape) :]) != shape:
        fail(
            ValueError,
            owner,
            "the input's trailing dims",
            f"normalized_shape={shape}",
            f"input shape {tuple(x.shape)}",
            f"construct the layer with normalized_shape={tuple(x.shape[1:])} (or the dims you "
            "want normalized), or use ChannelLayerNorm to normalize over dim 1",
        )


def check_channels_first(
    x: object, *, owner: str, eps: object, **per_channel: torch.Tensor | None
) -> int:
    """Validate a floating ``(N, C, *)`` input, ``eps`` and per-channel tensors; return ``C``."""
    x = check_floating_tensor(x, owner=owner)
    check_ndim(
        x,
        range(2, 9),
        layout="(N, C, *)",
        owner=owner,
        fix="add a batch dim with input.unsqueeze(0)",
    )
    check_eps(eps, owner=owner)
    c = x.shape[1]
    for name, t in per_channel.items():
        check_per_channel(t, c, name=name, owner=owner)
    return c


def check_nonempty_batch(x: torch.Tensor, *, owner: str) -> None:
    """Refuse batch statistics of an empty batch: they are undefined (0 / 0) and would poison the
    running statistics. (torch returns an empty output and still counts the batch.)"""
    if x.shape[0] == 0:
        fail(
            ValueError,
            owner,
            "the batch size when using batch statistics",
            "at least 1",
            f"0 (input shape {tuple(x.shape)})",
            "skip empty batches before calling the layer, or call .eval() to use the running "
            "statistics",
        )


def check_min_float(
    value: object, *, name: str, owner: str, minimum: float, meaning: str, fix: str
) -> float:
    """Return ``value`` as a float if it is a finite number ``>= minimum`` (``bool`` rejected);
    ``meaning`` explains the bound in the message."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not minimum <= value < math.inf
    ):
        fail(
            ValueError,
            owner,
            f"argument '{name}'",
            f"a finite float >= {minimum:g} ({meaning})",
            repr(value),
            fix,
        )
    return float(value)


def check_choice(value: object, choices: tuple[str, ...], *, name: str, owner: str) -> str:
    """Return ``value`` if it is one of ``choices`` (strings), else raise a ValueError naming
    them."""
    if not isinstance(value, str) or value not in choices:
        fail(
            ValueError,
            owner,
            f"argument '{name}'",
            " or ".join(repr(c) for c in choices),
            repr(value),
            f"pass {name}={choices[0]!r}",
        )
    return value
