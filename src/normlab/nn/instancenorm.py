"""Instance normalization modules: drop-in replacements for ``torch.nn.InstanceNorm1d/2d/3d``."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm as _TorchInstanceNorm

from normlab.functional.batch_norm import instance_norm_unchecked
from normlab.nn._base import RunningStatsNorm, is_traced

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _InstanceNorm(RunningStatsNorm, _TorchInstanceNorm):
    """Instance norm (Ulyanov et al., 2016): each sample and channel over its positions.

    .. math:: y_{nc} = \\frac{x_{nc} - \\mathrm{E}[x_{nc}]}{\\sqrt{\\mathrm{Var}[x_{nc}] + \\epsilon}}
              \\gamma_c + \\beta_c

    The paper's layer (defaults ``affine=False``, ``track_running_stats=False``, as in torch)
    computes the same thing in training and evaluation. With ``track_running_stats=True`` it
    keeps running averages of the per-instance statistics in training and normalizes with them in
    evaluation (torch's semantics). Computed by the group-norm kernel with one channel per group,
    which runs at memory speed where torch's instance norm does not (see the README table).

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: weight of the new batch in the running average, in [0, 1], or ``None`` for a
            cumulative average. Default: 0.1.
        affine: learn a per-channel ``weight`` and ``bias``. Default: ``False``.
        track_running_stats: keep running statistics for evaluation. Default: ``False``.
        device, dtype: where and in which dtype to create parameters and buffers.
        bias: with ``affine``, also learn ``bias`` (keyword-only, as in torch). Default: ``True``.

    Raises:
        ValueError: a wrong number of dims or channels; a single position per instance when
            instance statistics are used (the variance would be 0).

    Note:
        Differences from torch, both deliberate: ``momentum=None`` means the cumulative average
        (torch silently never updates), and ``num_batches_tracked`` counts training steps (torch
        leaves it at 0). The channel count must equal ``num_features`` even without affine or
        running statistics (torch only warns). The class subclasses the ``torch.nn`` one.
    """

    _spatial: int = 1

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )

    def _channel_dim(self, input: Tensor) -> int:
        return 1 if input.dim() == self._spatial + 2 else 0

    def forward(self, input: Tensor) -> Tensor:
        if is_traced(input):  # torch.fx / torch.jit.trace: record torch's op (batched input)
            return torch.instance_norm(
                input,
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                self.training or not self.track_running_stats,
                float(self._momentum_factor()),  # a float outside torch.compile
                self.eps,
                torch.backends.cudnn.enabled,
            )
        self._check_input(input)
        batched = input.dim() == self._spatial + 2
        y = self._normalize_with(instance_norm_unchecked, input if batched else input.unsqueeze(0))
        return y if batched else y.squeeze(0)


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    __doc__ = (
        (_InstanceNorm.__doc__ or "")
        + """
    Shape:
        Input ``(N, C, L)`` or unbatched ``(C, L)``; output of the same shape.

    Example:
        >>> InstanceNorm1d(3)(torch.randn(2, 3, 10)).shape
        torch.Size([2, 3, 10])
    """
    )
    _spatial = 1
    _ndims = (2, 3)
    _layout = "(N, C, L) or unbatched (C, L)"


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    __doc__ = (
        (_InstanceNorm.__doc__ or "")
        + """
    Shape:
        Input ``(N, C, H, W)`` or unbatched ``(C, H, W)``; output of the same shape, channels-first
        contiguous (as torch's) also for channels-last input.

    Example:
        >>> InstanceNorm2d(3)(torch.randn(2, 3, 5, 5)).shape
        torch.Size([2, 3, 5, 5])
    """
    )
    _spatial = 2
    _ndims = (3, 4)
    _layout = "(N, C, H, W) or unbatched (C, H, W)"


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    __doc__ = (
        (_InstanceNorm.__doc__ or "")
        + """
    Shape:
        Input ``(N, C, D, H, W)`` or unbatched ``(C, D, H, W)``.

    Example:
        >>> InstanceNorm3d(3)(torch.randn(2, 3, 4, 4, 4)).shape
        torch.Size([2, 3, 4, 4, 4])
    """
    )
    _spatial = 3
    _ndims = (4, 5)
    _layout = "(N, C, D, H, W) or unbatched (C, D, H, W)"
