"""Batch norm with statistics synchronized across processes (``torch.distributed``, any backend).

torch's ``nn.SyncBatchNorm`` runs on GPUs only; this one works with gloo on CPU too. The forward
all-gathers every process's per-channel count, mean and centred second moment and merges them
exactly (Chan et al.), so every process normalizes with the statistics of the union of the
batches, whatever their sizes; the backward all-reduces the two per-channel sums the input
gradient needs. Outputs and input gradients equal a single-process batch norm on the concatenated
batch; parameter gradients are each process's share (their sum equals the single-process gradient;
``DistributedDataParallel`` then averages them as for any parameter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from normlab._checks import check_values_per_channel
from normlab.functional._core import Moments, channel_view_shape, update_running_stats_
from normlab.functional._fast import (
    batch_moments,
    centred_first,
    channel_grad_sums,
    input_grad,
    normalize_given,
)

__all__ = ["SyncError", "collective", "is_distributed", "sync_batch_norm_unchecked"]


def is_distributed(group: Any = None) -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class SyncError(RuntimeError):
    """A collective of synchronized batch statistics failed: a process died, or did not join
    within the process group's timeout."""


def collective(op: Callable[[], Any], group: Any, owner: str, what: str) -> None:
    """Run one collective; turn a backend failure (a dead or missing peer) into a
    :class:`SyncError` that says what happened and how long the wait may last."""
    try:
        op()
    except (RuntimeError, dist.DistError) as error:
        world = dist.get_world_size(group) if dist.is_initialized() else "?"
        raise SyncError(
            f"{owner}: the {what} across {world} processes failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). A process died or did not "
            "reach this layer within the process group's timeout. Fix: check the other "
            "processes' logs; the wait is bounded by init_process_group(timeout=datetime."
            "timedelta(seconds=...))."
        ) from error


def _global_moments(x: Tensor, group: Any, owner: str = "SyncBatchNorm") -> Moments:
    c = x.shape[1]
    if x.shape[0] > 0:
        mean, var = batch_moments(x)
        count = mean.new_full((c,), float(x.numel() // c))
        local = torch.stack([count, mean, var * count])
    else:
        local = torch.zeros(3, c, dtype=torch.float64, device=x.device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    collective(
        lambda: dist.all_gather(gathered, local, group=group),
        group,
        owner,
        "all-gather of the batch statistics",
    )
    merged = Moments(*gathered[0])
    for other in gathered[1:]:
        merged = merged.merge(Moments(*other))
    return merged


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        group: Any,
        owner: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        moments = _global_moments(x, group, owner)
        count = moments.count
        check_values_per_channel(
            x, int(count[0].item()), owner=owner, what="values per channel (over all processes)"
        )
        mean, var = moments.mean, moments.variance()
        invstd = torch.rsqrt(var + eps)
        y = normalize_given(x, weight, bias, mean, var, eps)  # the global statistics
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        ctx.owner = owner
        ctx.fast = x.dim() >= 3 and x.shape[0] > 0 and centred_first(x, mean, invstd)
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor, *_: Any
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, weight, mean, invstd, count = ctx.saved_tensors
        n = float(count[0].item())
        grad_out = grad_out.contiguous()
        if ctx.fast:  # group-norm backward sums + two bandwidth-bound passes
            mean_, invstd_ = mean.to(x.dtype), invstd.to(x.dtype)
            sum_dy_xhat, sum_dy = channel_grad_sums(grad_out, x, mean_, invstd_)
            local = torch.stack([sum_dy.double(), sum_dy_xhat.double()])
        else:  # float64 sums, exact for any layout and offset
            shape = channel_view_shape(x.dim(), x.shape[1])
            dims = [0, *range(2, x.dim())]
            xhat = (x.double() - mean.view(shape)) * invstd.view(shape)
            g = grad_out.double()
            local = torch.stack([g.sum(dims), (g * xhat).sum(dims)])  # (2, C)
        total = local.clone()
        collective(
            lambda: dist.all_reduce(total, group=ctx.group),
            ctx.group,
            ctx.owner,
            "all-reduce of the gradient sums",
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(
                grad_out, x, weight, mean.to(x.dtype), invstd.to(x.dtype), total[0], total[1], n
            )
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        return (
            grad_x,
            local[1].to(weight.dtype) if need_w and weight is not None else None,
            local[0].to(x.dtype) if need_b else None,
            None,
            None,
            None,
        )


def sync_batch_norm_unchecked(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    group: Any,
    owner: str,
) -> Tensor:
    """Batch statistics of the union of all processes' batches (training, or no running
    statistics); running statistics otherwise. Every process must call it (collective)."""
    y, mean, var, count = _SyncBatchNorm.apply(input, weight, bias, eps, group, owner)  # type: ignore[no-untyped-call]
    if training and running_mean is not None and running_var is not None:
        update_running_stats_(
            running_mean, running_var, mean, var, int(count[0].item()), momentum, owner
        )
    return y  # type: ignore[no-any-return]
