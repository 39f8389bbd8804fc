"""Batch-independent norm modules: ``LayerNorm``, ``ChannelLayerNorm``, ``GroupNorm``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from normlab._checks import (
    check_bool,
    check_divisible,
    check_eps,
    check_floating_tensor,
    check_matches_parameters,
    check_positive_int,
    check_trailing_shape,
    fail,
)
from normlab.functional.normalization import channel_layer_norm_unchecked, group_norm, layer_norm
from normlab.nn._base import AffineNorm, InputChecks, bias_kwarg, is_traced

__all__ = ["ChannelLayerNorm", "GroupNorm", "LayerNorm"]


class LayerNorm(nn.LayerNorm):
    """Layer norm (Ba, Kiros & Hinton, 2016) over the trailing dims: a drop-in ``torch.nn.LayerNorm``.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\odot \\gamma + \\beta

    Mean and biased variance are taken over the last ``len(normalized_shape)`` dims of each sample;
    ``weight``/``bias`` have shape ``normalized_shape`` (element-wise affine). Identical in training
    and evaluation; any batch size, including 1.

    Args:
        normalized_shape: size (int) or sizes of the trailing dims to normalize over.
        eps: added to the variance inside the square root. Default: 1e-5.
        elementwise_affine: learn ``weight`` (init 1) and ``bias`` (init 0). Default: ``True``.
        bias: with ``elementwise_affine``, also learn ``bias``. Default: ``True``.
        device, dtype: where and in which dtype to create the parameters.

    Shape:
        Input ``(*, *normalized_shape)``; output of the same shape.

    Raises:
        ValueError: the input's trailing dims differ from ``normalized_shape``; bad sizes or eps.

    Note:
        For convolutional features ``nn.LayerNorm([C, H, W])`` has a per-element affine map; the
        layer norm of the group-norm paper (per-channel affine, any spatial size) is
        ``GroupNorm(C, num_groups=1)``, and the per-position norm over channels is
        :class:`ChannelLayerNorm`.

        The class subclasses ``torch.nn.LayerNorm``.

    Example:
        >>> LayerNorm(4)(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        owner = type(self).__name__
        shape = (
            (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        )
        if not shape:
            fail(
                ValueError,
                owner,
                "argument 'normalized_shape'",
                "a non-empty int or sequence",
                repr(normalized_shape),
                "pass the size of the last dim, e.g. normalized_shape=64",
            )
        for size in shape:
            check_positive_int(size, name="normalized_shape", owner=owner)
        check_eps(eps, owner=owner)
        check_bool(elementwise_affine, name="elementwise_affine", owner=owner)
        check_bool(bias, name="bias", owner=owner)
        super().__init__(
            [int(v) for v in shape], float(eps), elementwise_affine, bias, device, dtype
        )

    def forward(self, input: Tensor) -> Tensor:
        if is_traced(input):
            return torch.layer_norm(
                input,
                self.normalized_shape,
                self.weight,
                self.bias,
                self.eps,
                torch.backends.cudnn.enabled,
            )
        owner = type(self).__name__
        check_floating_tensor(input, owner=owner)
        check_matches_parameters(input, [self.weight, self.bias], owner=owner)
        check_trailing_shape(input, self.normalized_shape, owner=owner)
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, eps=self.eps)


class ChannelLayerNorm(AffineNorm):
    """Layer norm over the channels of an ``(N, C, *)`` tensor, at every position.

    .. math:: y_{n,:,p} = \\frac{x_{n,:,p} - \\mathrm{E}_c[x_{n,c,p}]}
              {\\sqrt{\\mathrm{Var}_c[x_{n,c,p}] + \\epsilon}} \\odot \\gamma + \\beta

    The "channels-first LayerNorm" of ConvNeXt (pytorch#71465): equal to ``LayerNorm(C)`` applied
    to ``input.movedim(1, -1)`` and moved back. Identical in training and evaluation; ``(N, C)``
    input is plain ``LayerNorm(C)``.

    Args:
        num_features: ``C``.
        eps: added to the variance inside the square root. Default: 1e-5.
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0). Default: ``True``.
        device, dtype: where and in which dtype to create the parameters.

    Shape:
        Input ``(N, C, *)``; output of the same shape, with channels-last strides (the channels
        are innermost in memory, as with permute-based layer norms).

    Example:
        >>> ChannelLayerNorm(3)(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, affine, device=device, dtype=dtype)
        self.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        if not is_traced(input):
            self._check_input(input)
        return channel_layer_norm_unchecked(
            input, self.num_features, self.weight, self.bias, self.eps
        )


class GroupNorm(InputChecks, nn.GroupNorm):
    """Group norm (Wu & He, 2018): per sample over groups of channels and all positions.

    .. math:: y = \\frac{x - \\mathrm{E}_g[x]}{\\sqrt{\\mathrm{Var}_g[x] + \\epsilon}} \\gamma_c + \\beta_c

    The ``C`` channels are split into ``num_groups`` contiguous groups of ``C // num_groups``;
    statistics are per ``(sample, group)``, the affine map per channel. ``num_groups=1`` is the
    layer norm of the paper, ``num_groups=C`` is instance norm. Identical in training and
    evaluation, independent of the batch size.

    Unlike ``torch.nn.GroupNorm(num_groups, num_channels)``, ``num_features`` comes first, as in
    every normlab norm; the class subclasses ``torch.nn.GroupNorm`` (``num_channels`` and
    ``num_groups`` are there too) and the ``state_dict`` (``weight``, ``bias``) is the same.

    Args:
        num_features: ``C``.
        num_groups: number of groups; must divide ``C``. The paper's default is 32.
        eps: added to the variance inside the square root. Default: 1e-5.
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0). Default: ``True``.
        device, dtype: where and in which dtype to create the parameters.
        bias: with ``affine``, also learn ``bias`` (keyword-only, as in torch). Default: ``True``.

    Shape:
        Input ``(N, C, *)``; output of the same shape and memory format.

    Raises:
        ValueError: ``num_features % num_groups != 0`` (the message lists valid group counts).

    Example:
        >>> GroupNorm(8, num_groups=4)(torch.randn(2, 8, 3, 3)).shape
        torch.Size([2, 8, 3, 3])
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        owner = type(self).__name__
        check_positive_int(num_features, name="num_features", owner=owner)
        check_positive_int(num_groups, name="num_groups", owner=owner)
        check_divisible(num_features, num_groups, owner=owner)
        check_eps(eps, owner=owner)
        check_bool(affine, name="affine", owner=owner)
        check_bool(bias, name="bias", owner=owner)
        super().__init__(
            int(num_groups),
            int(num_features),
            float(eps),
            affine,
            device,
            dtype,
            **bias_kwarg(bias),
        )
        self.num_features = int(num_features)

    def forward(self, input: Tensor) -> Tensor:
        if is_traced(input):
            return torch.group_norm(
                input,
                self.num_groups,
                self.weight,
                self.bias,
                self.eps,
                torch.backends.cudnn.enabled,
            )
        self._check_input(input)
        return group_norm(input, self.num_groups, self.weight, self.bias, eps=self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
            f"affine={self.affine}"
        )
