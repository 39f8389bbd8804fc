"""Batch normalization modules: drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from normlab.functional.batch_norm import batch_norm_unchecked
from normlab.nn._base import RunningStatsNorm, is_traced

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm(RunningStatsNorm, _TorchBatchNorm):
    """Batch norm (Ioffe & Szegedy, 2015) over all dims but the channel dim 1.

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\gamma + \\beta

    Training (``module.train()``): mean and biased variance of the current batch, per channel,
    over ``N`` and every trailing dim; with ``track_running_stats=True`` the running buffers are
    updated (``running = (1 - momentum) * running + momentum * batch``, unbiased batch variance;
    ``momentum=None`` gives the cumulative average). Evaluation (``module.eval()``): the running
    statistics -- or, with ``track_running_stats=False``, the batch statistics again.

    The lecture's test-time rule (mu and sigma computed once over the whole training set after
    training) is ``normlab.surgery.recompute_population_stats``; it fills these same buffers.

    Args:
        num_features: ``C``, the number of channels (features).
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: weight of the new batch in the running average, in [0, 1], or ``None`` for a
            cumulative average. Default: 0.1 (torch convention; Keras' 0.99 is ``1 - 0.01``).
        affine: learn a per-channel ``weight`` (gamma, init 1) and ``bias`` (beta, init 0).
        track_running_stats: keep ``running_mean``, ``running_var``, ``num_batches_tracked``.
        device, dtype: where and in which dtype to create parameters and buffers.
        bias: with ``affine``, also learn ``bias`` (keyword-only, as in torch). Default: ``True``.

    Raises:
        ValueError: at construction for ``num_features < 1``, ``eps <= 0``, ``momentum`` outside
            [0, 1]; in ``forward`` for a wrong number of dims or channels, and for a single value
            per channel when batch statistics are used (batch size 1 on dense input): the
            variance would be 0. torch raises a ``ValueError`` here too; normlab's message says
            what to do (bigger batch, ``.eval()``, or a batch-independent norm). Nothing is
            updated when it raises.

    Note:
        The forward pass normalizes with the **biased** batch variance; ``running_var`` stores the
        **unbiased** one (n / (n - 1), with n = values per channel), as torch does. The class
        subclasses the ``torch.nn`` one, so ``isinstance`` checks and torch's tools see a torch
        batch norm. Deliberate difference: an empty batch in training raises (torch returns an
        empty output and still counts the batch).
    """

    def forward(self, input: Tensor) -> Tensor:
        if is_traced(input):  # torch.fx / torch.jit.trace: record torch's op, no Python checks
            batch_stats = self.training or self.running_mean is None
            buffers = not self.training or self.track_running_stats
            return torch.batch_norm(
                input,
                self.weight,
                self.bias,
                self.running_mean if buffers else None,
                self.running_var if buffers else None,
                batch_stats,
                float(self._momentum_factor()),  # a float outside torch.compile
                self.eps,
                torch.backends.cudnn.enabled,
            )
        self._check_input(input)
        return self._normalize_with(batch_norm_unchecked, input)


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    __doc__ = (
        (_BatchNorm.__doc__ or "")
        + """
    Shape:
        Input ``(N, C)`` (per-activation statistics over the batch) or ``(N, C, L)`` (per-channel
        statistics over the batch and the ``L`` positions); output of the same shape.

    Example:
        >>> bn = BatchNorm1d(3)
        >>> bn(torch.randn(8, 3)).shape
        torch.Size([8, 3])
    """
    )
    _ndims = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    __doc__ = (
        (_BatchNorm.__doc__ or "")
        + """
    Shape:
        Input ``(N, C, H, W)``; one scalar mean and variance per channel over ``N, H, W``;
        output of the same shape and memory format.

    Example:
        >>> bn = BatchNorm2d(3)
        >>> bn(torch.randn(4, 3, 5, 5)).shape
        torch.Size([4, 3, 5, 5])
    """
    )
    _ndims = (4,)
    _layout = "(N, C, H, W)"


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    __doc__ = (
        (_BatchNorm.__doc__ or "")
        + """
    Shape:
        Input ``(N, C, D, H, W)``; statistics per channel over ``N, D, H, W``.

    Example:
        >>> bn = BatchNorm3d(3)
        >>> bn(torch.randn(2, 3, 4, 4, 4)).shape
        torch.Size([2, 3, 4, 4, 4])
    """
    )
    _ndims = (5,)
    _layout = "(N, C, D, H, W)"
