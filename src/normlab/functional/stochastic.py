"""Stochastic regularization and self-normalizing units: dropout, alpha dropout, SELU.

``p`` is always the probability of **dropping** a unit (torch's convention); ``1 - p`` is kept.
Every function takes ``training`` as a required keyword and an optional ``generator``; without a
generator torch's global RNG is used. Masks are drawn as ``uniform < keep`` -- exactly
Bernoulli(keep), and about 3x faster on CPU than torch's ``bernoulli_`` (benchmarks/stochastic.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab._checks import fail
from normlab.functional import _rng

__all__ = [
    "SELU_ALPHA",
    "SELU_LAMBDA",
    "alpha_dropout",
    "alpha_dropout_affine",
    "check_probability",
    "dropout",
    "feature_dropout",
    "keep_mask",
    "selu",
]

#: SELU's alpha_01 and lambda_01 (Klambauer et al. 2017), exact to the digits float64 holds:
#: alpha = -sqrt(2/pi) / (exp(1/2) erfc(1/sqrt 2) - 1) = 1.6732632423543772848170429916717...,
#: lambda = 1.0507009873554804934193349852946... (mpmath, 40 digits; tests/nn/test_stochastic.py).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_LAMBDA = 1.0507009873554804934193349852946


def check_probability(p: object, *, owner: str, name: str = "p") -> float:
    """Return ``p`` as a float if it is a number in [0, 1] (``bool`` rejected)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        fail(
            TypeError,
            owner,
            f"argument '{name}'",
            "a float in [0, 1] (the drop probability)",
            f"{type(p).__name__} {p!r}",
            f"pass e.g. {name}=0.5",
        )
    if not 0.0 <= p <= 1.0:
        fix = f"pass the probability of dropping a unit, e.g. {name}=0.5"
        if 1.0 < p <= 100.0:
            fix += "; a percentage? divide by 100"
        fail(
            ValueError,
            owner,
            f"argument '{name}'",
            "a float in [0, 1] (the drop probability)",
            repr(p),
            fix,
        )
    return float(p)


def keep_mask(
    shape: tuple[int, ...] | torch.Size,
    keep: float,
    like: Tensor,
    generator: torch.Generator | None,
    after: Tensor | None = None,
) -> Tensor:
    """Bernoulli(keep) mask of ``shape`` with ``like``'s dtype and device (from ``generator``, or
    torch's global RNG), drawn after the draw ``after`` under ``torch.compile`` (see
    :mod:`normlab.functional._rng`)."""
    # uniform < keep is Bernoulli(keep) exactly, and ~3x faster on CPU than bernoulli_
    return (_rng.rand(shape, generator, device=like.device, after=after) < keep).to(like.dtype)


def dropout(
    x: Tensor,
    p: float = 0.5,
    *,
    training: bool,
    inverted: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Dropout (Srivastava et al. 2014): drop each unit with probability ``p``.

    * ``inverted=True`` (default, torch's): training keeps a unit with probability ``1 - p`` and
      scales it by ``1 / (1 - p)`` (``p = 1``: all zeros), evaluation is the identity.
    * ``inverted=False`` (the paper's formulation): training keeps units unscaled, evaluation
      multiplies by ``1 - p`` ("weight scaling").

    Both keep the expectation of training outputs equal to the evaluation output.

    >>> dropout(torch.ones(4), 0.5, training=False, inverted=False)
    tensor([0.5000, 0.5000, 0.5000, 0.5000])
    """
    keep = 1.0 - p
    if not training:
        return x if inverted else x * keep
    if p == 0.0:
        return x
    mask = keep_mask(x.shape, keep, x, generator)
    return x * mask / keep if inverted and keep > 0 else x * mask


def feature_dropout(
    x: Tensor,
    p: float = 0.5,
    *,
    training: bool,
    inverted: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Channel-wise dropout of an ``(N, C, *)`` tensor: whole channels of a sample are dropped
    together (``Dropout1d/2d/3d`` in torch); scaling as in :func:`dropout`."""
    keep = 1.0 - p
    if not training:
        return x if inverted else x * keep
    if p == 0.0:
        return x
    mask = keep_mask((x.shape[0], x.shape[1], *([1] * (x.dim() - 2))), keep, x, generator)
    if inverted and keep > 0:
        mask.div_(keep)  # scale the small (N, C, 1, ...) mask, not the activations
    return x * mask


def alpha_dropout_affine(
    p: float, fixed_mean: float = 0.0, fixed_var: float = 1.0
) -> tuple[float, float]:
    """The ``(a, b)`` that keep mean ``fixed_mean`` and variance ``fixed_var`` after dropping
    units to ``alpha' = -lambda * alpha`` with probability ``p`` (Klambauer et al. 2017)::

        a = sqrt(nu / (q ((1 - q)(alpha' - mu)^2 + nu))),   b = mu - a (q mu + (1 - q) alpha')

    with ``q = 1 - p``. torch's ``AlphaDropout`` only has the ``(0, 1)`` fixed point.

    >>> [round(v, 9) for v in alpha_dropout_affine(0.2)]
    [0.878903583, 0.309039962]
    """
    q = 1.0 - p
    alpha_prime = -SELU_LAMBDA * SELU_ALPHA
    a = math.sqrt(fixed_var / (q * ((1.0 - q) * (alpha_prime - fixed_mean) ** 2 + fixed_var)))
    b = fixed_mean - a * (q * fixed_mean + (1.0 - q) * alpha_prime)
    return a, b


def alpha_dropout(
    x: Tensor,
    p: float = 0.5,
    *,
    training: bool,
    feature: bool = False,
    fixed_mean: float = 0.0,
    fixed_var: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Alpha dropout: dropped units become SELU's negative saturation ``alpha' = -lambda*alpha``
    (not 0), then ``y = a * x_tilde + b`` restores the mean and variance
    (:func:`alpha_dropout_affine`), so a self-normalizing network stays at its fixed point.
    ``feature=True`` drops whole channels. Identity in evaluation. ``p = 1`` drops everything: no
    affine map can restore a variance then, and the output is the constant ``fixed_mean``."""
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return torch.full_like(x, fixed_mean)
    a, b = alpha_dropout_affine(p, fixed_mean, fixed_var)
    shape = (x.shape[0], x.shape[1], *([1] * (x.dim() - 2))) if feature else x.shape
    keep = keep_mask(shape, 1.0 - p, x, generator)
    # y = a * (x * m + alpha' * (1 - m)) + b = x * (a m) + (a alpha' + b - a alpha' m): one pass
    alpha_prime = -SELU_LAMBDA * SELU_ALPHA
    shift = keep * (-a * alpha_prime) + (a * alpha_prime + b)
    return torch.addcmul(shift, x, keep.mul_(a))


def selu(x: Tensor) -> Tensor:
    """``lambda * x`` for ``x > 0``, ``lambda * alpha * (exp(x) - 1)`` otherwise, with
    :data:`SELU_ALPHA`, :data:`SELU_LAMBDA` (torch's kernel, which uses the same constants).

    >>> selu(torch.tensor([0.0, 1.0]))
    tensor([0.0000, 1.0507])
    """
    return F.selu(x)
