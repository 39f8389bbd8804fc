"""DropConnect layers: Linear and Conv1d/2d/3d with Bernoulli masks on their weights."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab._checks import check_positive_int, fail
from normlab.functional import _rng
from normlab.functional.dropconnect import Inference, Mode, dropconnect
from normlab.functional.stochastic import check_probability

__all__ = ["DropConnectConv1d", "DropConnectConv2d", "DropConnectConv3d", "DropConnectLinear"]

_MODES = ("sample", "batch")
_INFERENCE = ("mean", "gaussian", "mc")


class _DropConnect:
    """Options shared by the DropConnect layers (see :mod:`normlab.functional.dropconnect`)."""

    stochastic = True
    p: float
    mode: Mode
    inference: Inference
    samples: int
    seed: int
    activation: Callable[[Tensor], Tensor] | None
    training: bool

    def _configure(
        self, p: float, mode: str, inference: str, activation: Any, samples: int, seed: int | None
    ) -> None:
        owner = type(self).__name__
        self.p = check_probability(p, owner=owner)
        if mode not in _MODES:
            fail(
                ValueError,
                owner,
                "argument 'mode'",
                f"one of {list(_MODES)}",
                repr(mode),
                "pass mode='sample' (a mask per sample, the paper) or mode='batch' (cheaper)",
            )
        if inference not in _INFERENCE:
            fail(
                ValueError,
                owner,
                "argument 'inference'",
                f"one of {list(_INFERENCE)}",
                repr(inference),
                "pass inference='gaussian' (the paper's moment matching), 'mean' or 'mc'",
            )
        if activation is not None and not callable(activation):
            fail(
                TypeError,
                owner,
                "argument 'activation'",
                "a callable (e.g. nn.ReLU()) or None",
                type(activation).__name__,
                "pass activation=nn.ReLU()",
            )
        self.mode, self.inference = cast(Mode, mode), cast(Inference, inference)
        self.activation = activation
        self.samples = check_positive_int(samples, name="samples", owner=owner)
        self.seed = 0 if seed is None else int(seed)

    def _dropconnect(
        self, input: Tensor, weight: Tensor, bias: Tensor | None, conv: Any = None, groups: int = 1
    ) -> Tensor:
        # Sampled inference reseeds at every call, so evaluation is deterministic (the "mean"
        # inference draws nothing: no generator, which also keeps it compilable).
        sampled = not self.training and self.inference != "mean"
        generator = None
        if sampled:  # torch.compile cannot create a generator in the graph: one made while tracing
            generator = _rng.seeded(self.seed, input.device)
        return dropconnect(
            input,
            weight,
            bias,
            self.p,
            training=self.training,
            conv=conv,
            groups=groups,
            mode=self.mode,
            inference=self.inference,
            activation=self.activation,
            samples=self.samples,
            # compiled, a stand-in for a generator made while tracing (normlab.functional._rng);
            # the type as a string: torch 2.8's dynamo cannot trace a union object
            generator=cast("torch.Generator | None", generator),
        )

    def _extra(self) -> str:
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return (
            f", p={self.p}, mode={self.mode!r}, inference={self.inference!r}, "
            f"samples={self.samples}{act}"
        )


class DropConnectLinear(_DropConnect, nn.Linear):
    """DropConnect (Wan et al. 2013) on a linear layer, followed by ``activation``.

    Training: ``activation((M * W) x + m_b * b)`` with every weight (and bias) kept with
    probability ``1 - p`` -- a mask per sample (``mode="sample"``, the paper; computed in chunks,
    never N weight copies at once) or per batch (``mode="batch"``). No rescaling in training.
    Evaluation (``inference``): ``"mean"`` scales the weights by ``1 - p``; ``"gaussian"`` is the
    paper's moment-matching inference -- pre-activations ``u ~ N(q W x, q (1 - q)(W*W)(x*x))``
    (bias included), ``samples`` draws through ``activation``, averaged; ``"mc"`` averages
    ``samples`` passes with sampled masks. The activation is part of the layer because the
    Gaussian inference averages *after* it. Subclasses ``nn.Linear`` (same parameters).

    Args:
        in_features, out_features, bias, device, dtype: as in ``nn.Linear``.
        p: drop probability of each weight. Default: 0.5.
        mode: ``"sample"`` or ``"batch"``. Default: ``"sample"``.
        inference: ``"mean"``, ``"gaussian"`` or ``"mc"``. Default: ``"gaussian"``.
        activation: callable applied to the pre-activations (e.g. ``nn.ReLU()``), or ``None``.
        samples: draws for ``"gaussian"``/``"mc"`` inference. Default: 1000.
        seed: seed of the sampled inference (reset at every call). Default: 0.

    Raises:
        ValueError: ``p`` outside [0, 1]; an unknown ``mode`` or ``inference``.

    Example:
        >>> layer = DropConnectLinear(4, 3, p=0.5, activation=nn.ReLU())
        >>> layer(torch.randn(8, 4)).shape
        torch.Size([8, 3])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        p: float = 0.5,
        *,
        mode: str = "sample",
        inference: str = "gaussian",
        activation: Any = None,
        samples: int = 1000,
        seed: int | None = 0,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._configure(p, mode, inference, activation, samples, seed)

    def forward(self, input: Tensor) -> Tensor:
        return self._dropconnect(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + self._extra()


class _DropConnectConv(_DropConnect):
    """DropConnect on a convolution, followed by ``activation``; the same modes and inference as
    :class:`DropConnectLinear` (Gaussian inference: ``mu = q conv(x, W)``, ``sigma^2 =
    q (1 - q) conv(x*x, W*W)``). Per-sample masks run as one grouped convolution per chunk of
    samples (every sample its own kernel). Subclasses the ``nn.ConvNd`` of its rank (same
    arguments and parameters, ``padding_mode`` must be ``"zeros"``), plus ``p``, ``mode``,
    ``inference``, ``activation``, ``samples``, ``seed`` as in :class:`DropConnectLinear`."""

    _conv: Callable[..., Tensor]
    stride: Any
    padding: Any
    dilation: Any
    groups: int
    weight: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        p: float = 0.5,
        *,
        mode: str = "sample",
        inference: str = "gaussian",
        activation: Any = None,
        samples: int = 1000,
        seed: int | None = 0,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if padding_mode != "zeros":
            fail(
                ValueError,
                type(self).__name__,
                "argument 'padding_mode'",
                "'zeros'",
                repr(padding_mode),
                "pad the input yourself (F.pad) before the layer",
            )
        super().__init__(  # type: ignore[call-arg]
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self._configure(p, mode, inference, activation, samples, seed)

    def forward(self, input: Tensor) -> Tensor:
        conv = partial(
            _grouped, self._conv, stride=self.stride, padding=self.padding, dilation=self.dilation
        )
        return self._dropconnect(input, self.weight, self.bias, conv=conv, groups=self.groups)

    def extra_repr(self) -> str:
        return str(super().extra_repr()) + self._extra()  # type: ignore[misc]


def _grouped(
    fn: Callable[..., Tensor],
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    groups: int,
    *,
    stride: Any,
    padding: Any,
    dilation: Any,
) -> Tensor:
    return fn(x, w, b, stride, padding, dilation, groups)


class DropConnectConv1d(_DropConnectConv, nn.Conv1d):
    __doc__ = (
        (_DropConnectConv.__doc__ or "")
        + """

    Example:
        >>> DropConnectConv1d(2, 3, 3, padding=1)(torch.randn(4, 2, 5)).shape
        torch.Size([4, 3, 5])
    """
    )
    _conv = staticmethod(F.conv1d)


class DropConnectConv2d(_DropConnectConv, nn.Conv2d):
    __doc__ = (
        (_DropConnectConv.__doc__ or "")
        + """

    Example:
        >>> DropConnectConv2d(2, 3, 3, padding=1)(torch.randn(4, 2, 5, 5)).shape
        torch.Size([4, 3, 5, 5])
    """
    )
    _conv = staticmethod(F.conv2d)


class DropConnectConv3d(_DropConnectConv, nn.Conv3d):
    __doc__ = (
        (_DropConnectConv.__doc__ or "")
        + """

    Example:
        >>> DropConnectConv3d(2, 3, 3, padding=1)(torch.randn(2, 2, 4, 4, 4)).shape
        torch.Size([2, 3, 4, 4, 4])
    """
    )
    _conv = staticmethod(F.conv3d)
