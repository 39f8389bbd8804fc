"""Dropout, channel dropout, alpha dropout and SELU modules."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab._checks import check_bool, fail
from normlab.functional import _rng
from normlab.functional._core import on_accelerator
from normlab.functional.stochastic import (
    alpha_dropout,
    check_probability,
    dropout,
    feature_dropout,
    selu,
)
from normlab.nn._base import is_traced

__all__ = [
    "SELU",
    "AlphaDropout",
    "Dropout",
    "FeatureAlphaDropout",
    "FeatureDropout1d",
    "FeatureDropout2d",
    "FeatureDropout3d",
    "StochasticModule",
]


class StochasticModule(nn.Module):
    """Base of normlab's stochastic layers: ``p`` (drop probability), an optional ``seed`` for a
    generator of the layer's own (else torch's global RNG), and the marker ``stochastic = True``
    that :func:`normlab.analysis.mc_predict` uses to find layers to keep sampling."""

    stochastic = True

    def __init__(self, p: float = 0.5, *, seed: int | None = None) -> None:
        super().__init__()
        self.p = check_probability(p, owner=type(self).__name__)
        self.seed = seed
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def _generator(self, input: Tensor) -> torch.Generator | None:
        """The generator this call draws from: the layer's own (a CPU generator); on an
        accelerator a fresh generator of that device seeded from it at each call (the same seed
        gives the same masks there; a different stream from the CPU's). Eager only there."""
        if self.generator is None or not self.training or not on_accelerator(input):
            return self.generator  # (evaluation draws nothing: the generator stays put)
        if torch.compiler.is_compiling():
            fail(
                ValueError,
                type(self).__name__,
                "a seeded layer compiled for an accelerator",
                "eager mode, or seed=None",
                f"torch.compile with input on {input.device}",
                "use seed=None (torch's global RNG) in models compiled for accelerators",
            )
        return _rng.device_generator(self.generator, input.device)

    def extra_repr(self) -> str:
        return f"p={self.p}" + ("" if self.seed is None else f", seed={self.seed}")


class Dropout(StochasticModule):
    """Dropout (Srivastava et al. 2014): each unit is dropped with probability ``p`` in training.

    ``inverted=True`` (default, torch's): kept units are scaled by ``1 / (1 - p)`` in training,
    evaluation is the identity. ``inverted=False`` (the paper's formulation): training keeps units
    unscaled and evaluation multiplies by ``1 - p``. Either way a training output's expectation is
    the evaluation output. ``p = 0`` is the identity, ``p = 1`` outputs zeros in training.

    Args:
        p: drop probability in [0, 1]. Default: 0.5.
        inverted: see above. Default: ``True``.
        seed: seed of the layer's own generator (reproducible masks; on accelerators drawn
            there from a generator it seeds at each call, in eager mode); ``None``: torch's
            global RNG and fused kernel.

    Example:
        >>> Dropout(0.5).eval()(torch.ones(3))
        tensor([1., 1., 1.])
    """

    def __init__(self, p: float = 0.5, inverted: bool = True, *, seed: int | None = None) -> None:
        super().__init__(p, seed=seed)
        self.inverted = check_bool(inverted, name="inverted", owner=type(self).__name__)

    def forward(self, input: Tensor) -> Tensor:
        return dropout(
            input,
            self.p,
            training=self.training,
            inverted=self.inverted,
            generator=self._generator(input),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, inverted={self.inverted}"


class _FeatureDropout(Dropout):
    """Channel-wise dropout: every channel of every sample is dropped as a whole with probability
    ``p`` (adjacent activations of a feature map are correlated, so element-wise dropout barely
    regularizes them). Scaling as in :class:`Dropout`. The input must have the documented rank --
    torch's ``Dropout2d`` silently does 1-D dropout on 3-D input (pytorch#77081)."""

    _spatial = 2

    def forward(self, input: Tensor) -> Tensor:
        if not is_traced(input) and input.dim() != self._spatial + 2:
            fail(
                ValueError,
                type(self).__name__,
                "the input",
                f"a {self._spatial + 2}-D tensor (N, C{', *spatial' if self._spatial else ''})",
                f"shape {tuple(input.shape)}",
                f"use FeatureDropout{input.dim() - 2}d for {input.dim()}-D input, or add a batch "
                "dim with input.unsqueeze(0)"
                if input.dim() > 2
                else "use Dropout for (N, C) input",
            )
        return feature_dropout(
            input,
            self.p,
            training=self.training,
            inverted=self.inverted,
            generator=self._generator(input),
        )


class FeatureDropout1d(_FeatureDropout):
    __doc__ = _FeatureDropout.__doc__
    _spatial = 1


class FeatureDropout2d(_FeatureDropout):
    __doc__ = _FeatureDropout.__doc__
    _spatial = 2


class FeatureDropout3d(_FeatureDropout):
    __doc__ = _FeatureDropout.__doc__
    _spatial = 3


class AlphaDropout(StochasticModule):
    """Alpha dropout (Klambauer et al. 2017) for self-normalizing networks: dropped units become
    SELU's saturation value ``alpha' = -lambda * alpha``, then ``a * x + b`` restores mean
    ``fixed_mean`` and variance ``fixed_var`` (default 0 and 1, SELU's fixed point; torch's
    ``AlphaDropout`` has only that one). Identity in evaluation. Use it with SELU -- plain dropout
    breaks self-normalization.

    Args:
        p: drop probability. The paper recommends small rates (0.05-0.1). Default: 0.5 (torch's).
        fixed_mean, fixed_var: the moments to keep. Defaults: 0 and 1.
        seed: as in :class:`Dropout`.

    Example:
        >>> AlphaDropout(0.1).eval()(torch.ones(2))
        tensor([1., 1.])
    """

    _feature = False

    def __init__(
        self,
        p: float = 0.5,
        fixed_mean: float = 0.0,
        fixed_var: float = 1.0,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(p, seed=seed)
        if not fixed_var > 0:
            fail(
                ValueError,
                type(self).__name__,
                "argument 'fixed_var'",
                "> 0",
                repr(fixed_var),
                "pass the variance of the fixed point, e.g. fixed_var=1.0",
            )
        self.fixed_mean, self.fixed_var = float(fixed_mean), float(fixed_var)

    def forward(self, input: Tensor) -> Tensor:
        return alpha_dropout(
            input,
            self.p,
            training=self.training,
            feature=self._feature,
            fixed_mean=self.fixed_mean,
            fixed_var=self.fixed_var,
            generator=self._generator(input),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fixed_mean={self.fixed_mean}, fixed_var={self.fixed_var}"


class FeatureAlphaDropout(AlphaDropout):
    """:class:`AlphaDropout` that drops whole channels of ``(N, C, *)`` input (for SELU conv nets)."""

    _feature = True


class SELU(nn.SELU):
    """Scaled exponential linear unit (Klambauer et al. 2017) with the exact constants
    (:data:`~normlab.functional.stochastic.SELU_ALPHA`, ``SELU_LAMBDA``): mean 0 and variance 1
    of standard-normal input map to mean 0 and variance 1. Needs LeCun-normal weights
    (:func:`normlab.nn.init.lecun_normal_`, or ``init_self_normalizing_`` on a model) and
    standardized inputs; pair it with :class:`AlphaDropout`. Subclasses ``torch.nn.SELU``.

    Example:
        >>> SELU()(torch.tensor([1.0]))
        tensor([1.0507])
    """

    def forward(self, input: Tensor) -> Tensor:
        return selu(input)
