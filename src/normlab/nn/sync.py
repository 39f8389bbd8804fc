"""Synchronized batch norm that also runs on CPU (gloo)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from normlab.functional.batch_norm import batch_norm_unchecked
from normlab.functional.sync import is_distributed, sync_batch_norm_unchecked
from normlab.nn._base import RunningStatsNorm, is_traced

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(RunningStatsNorm, _TorchBatchNorm):
    """Batch norm whose batch statistics are those of the union of all processes' batches.

    In training (and without running statistics), with an initialised ``torch.distributed``
    process group of more than one process, every process all-gathers the per-channel count, mean
    and centred second moment of its batch and merges them exactly; the backward pass all-reduces
    the two per-channel sums of the input gradient. Outputs and input gradients equal a
    single-process batch norm on the concatenated batch -- per-process batch sizes may differ, one
    process may hold a single sample -- and every process ends with the same running statistics.
    Works with gloo on CPU (torch's ``nn.SyncBatchNorm`` needs a GPU) and with any other backend;
    every process must call it (it is a collective). Outside a process group, or in evaluation
    with running statistics, it is exactly ``BatchNorm``. Parameter gradients are each process's
    share; ``DistributedDataParallel`` averages them like any other.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as in
            ``BatchNorm``.
        process_group: the group to synchronize over. Default: the whole world.

    Shape:
        ``(N, C, *)``.

    Note:
        Double backward (``create_graph=True``) through the synchronized path is not supported.

    Example:
        >>> SyncBatchNorm(4)(torch.randn(8, 4, 3)).shape  # no process group: plain batch norm
        torch.Size([8, 4, 3])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:  # torch's forward (tracing) calls it
        pass

    def forward(self, input: Tensor) -> Tensor:
        if is_traced(input):
            return super().forward(input)
        self._check_input(input)
        batch_stats = self.training or self.running_mean is None
        if batch_stats and is_distributed(self.process_group):
            return self._normalize_with(self._synced, input)
        return self._normalize_with(batch_norm_unchecked, input)

    def _synced(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        training: bool,
        momentum: float | Tensor,
        eps: float,
        owner: str,
    ) -> Tensor:
        return sync_batch_norm_unchecked(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            self.process_group,
            owner,
        )
