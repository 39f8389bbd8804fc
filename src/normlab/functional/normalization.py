"""Batch-independent norms: layer norm (trailing dims or channels) and group norm."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab._checks import (
    check_channels_first,
    check_divisible,
    check_eps,
    check_floating_tensor,
    check_positive_int,
    check_trailing_shape,
    check_values_per_channel,
)
from normlab.functional import _triton
from normlab.functional._core import channels_last_format
from normlab.functional._fast import ChannelsLastGroupNorm, channels_last_groups_usable

__all__ = ["channel_layer_norm", "channel_layer_norm_unchecked", "group_norm", "layer_norm"]


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization (Ba, Kiros & Hinton, 2016) over the trailing ``normalized_shape`` dims.

    For each leading index, ``mu`` and the biased ``sigma^2`` are computed over the last
    ``len(normalized_shape)`` dims, and ``weight``/``bias`` of shape ``normalized_shape`` are applied
    element-wise (torch's semantics). Identical in training and evaluation.

    Raises:
        ValueError: the input's trailing dims differ from ``normalized_shape``; bad ``eps``.

    Example:
        >>> layer_norm(torch.tensor([[1.0, 3.0]]), (2,)).round(decimals=4)
        tensor([[-1.,  1.]])
    """
    owner = "normlab.functional.layer_norm"
    check_floating_tensor(input, owner=owner)
    check_eps(eps, owner=owner)
    shape = tuple(normalized_shape)
    check_trailing_shape(input, shape, owner=owner)
    return F.layer_norm(input, shape, weight, bias, eps)


def channel_layer_norm(
    input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float = 1e-5
) -> Tensor:
    """Layer norm over the channel dim of an ``(N, C, *)`` tensor, at every position.

    For each ``(n, *position)``, ``mu`` and the biased ``sigma^2`` are over the ``C`` channels;
    ``weight``/``bias`` are per channel. This is ConvNeXt's "channels-first LayerNorm" (asked for in
    pytorch#71465) and equals ``LayerNorm(C)`` applied to ``input.movedim(1, -1)``. Identical in
    training and evaluation.

    Computed by torch's layer-norm kernel on ``input.movedim(1, -1)``: free for channels-last
    input, one transposed copy for channels-first input. The output has channels-last strides
    in both cases (as with the permute-based layer norms in timm and ConvNeXt).

    Example:
        >>> channel_layer_norm(torch.tensor([[[1.0], [3.0]]])).round(decimals=4)
        tensor([[[-1.],
                 [ 1.]]])
    """
    owner = "normlab.functional.channel_layer_norm"
    c = check_channels_first(input, owner=owner, eps=eps, weight=weight, bias=bias)
    return channel_layer_norm_unchecked(input, c, weight, bias, eps)


def channel_layer_norm_unchecked(
    input: Tensor, num_channels: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """:func:`channel_layer_norm` for callers that validated the arguments (the module)."""
    # Channels innermost is what torch's layer-norm kernel wants: for channels-last input the
    # moved view is contiguous and nothing is copied; for channels-first input torch copies once.
    # Measured faster than the two-pass core over dim 1 (benchmarks/layers.py).
    return F.layer_norm(input.movedim(1, -1), (num_channels,), weight, bias, eps).movedim(-1, 1)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
) -> Tensor:
    """Group normalization (Wu & He, 2018): per sample, over each group of channels and positions.

    The ``C`` channels of an ``(N, C, *)`` input are split into ``num_groups`` contiguous groups;
    ``mu`` and the biased ``sigma^2`` are computed per ``(n, group)`` over the group's channels and
    all positions; ``weight``/``bias`` are per channel (not per group). ``num_groups=1`` is layer
    norm over ``(C, *)`` with a per-channel affine; ``num_groups=C`` is instance norm.

    Raises:
        ValueError: ``C`` not divisible by ``num_groups``; bad shapes or ``eps``.

    Example:
        >>> group_norm(torch.tensor([[1.0, 3.0]]), 1).round(decimals=4)
        tensor([[-1.,  1.]])
    """
    owner = "normlab.functional.group_norm"
    c = check_channels_first(input, owner=owner, eps=eps, weight=weight, bias=bias)
    check_positive_int(num_groups, name="num_groups", owner=owner)
    check_divisible(c, num_groups, owner=owner)
    if input.numel():  # an empty input has nothing to normalize
        check_values_per_channel(
            input,
            c // num_groups * math.prod(input.shape[2:]),
            owner=owner,
            what="values per group",
            fix="use fewer groups, or LayerNorm over more features; one value has no variance",
        )
    if channels_last_groups_usable(input, weight, bias):  # large, channels-last: no copies
        return ChannelsLastGroupNorm.apply(input, weight, bias, num_groups, eps)[0]  # type: ignore[no-any-return, no-untyped-call]
    y = F.group_norm(input, num_groups, weight, bias, eps)
    fmt = channels_last_format(input)
    if fmt is not None and not y.is_contiguous(memory_format=fmt):
        y = y.contiguous(memory_format=fmt)  # CUDA's kernel returns channels-first; the CPU's not
    return y


def standardized_weight(weight: Tensor, eps: float) -> Tensor:
    """Weight standardization (Qiao et al. 2019): ``W_hat[i] = (W[i] - mean(W[i])) / sqrt(var(W[i])
    + eps)`` per output unit ``i`` (the first dim), over the fan-in, biased variance. One Triton
    kernel each way on GPUs (:func:`normlab.functional._triton.standardize_rows`: ~20 torch ops
    fewer per training step), else :func:`standardized_weight_ops`."""
    traced: object = weight  # (a Proxy is no Tensor to the type checker)
    if isinstance(traced, torch.fx.Proxy):  # torch.fx tracing: the ops (jit tracing: usable())
        return standardized_weight_ops(weight, eps)
    fused = _triton.standardize_rows(weight, eps)
    return fused if fused is not None else standardized_weight_ops(weight, eps)


def standardized_weight_ops(weight: Tensor, eps: float) -> Tensor:
    """:func:`standardized_weight` in torch ops."""
    flat = weight.flatten(1)  # (out, fan_in)
    var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
    return ((flat - mean) * torch.rsqrt(var + eps)).view_as(weight)
