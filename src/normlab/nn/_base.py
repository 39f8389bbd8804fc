"""Shared anatomy of normlab's norm modules (torch's ``_NormBase`` layout and semantics).

``__init__`` validates and stores the arguments, creates parameters and buffers with ``device`` and
``dtype``, then calls ``reset_parameters()``; absent tensors are registered as ``None``. Parameter
and buffer names equal torch's (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so checkpoints load both ways between normlab and ``torch.nn``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from normlab._checks import (
    check_bool,
    check_channels,
    check_eps,
    check_floating_tensor,
    check_momentum,
    check_ndim,
    check_positive_int,
)

__all__ = ["AffineNorm", "RunningStatsNorm"]

# (input, running_mean, running_var, weight, bias, training, momentum, eps, owner) -> output
NormFn = Callable[
    [Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, bool, float, float, str],
    Tensor,
]


class AffineNorm(nn.Module):
    """A norm over ``(N, C, *)`` input with an optional per-channel affine map (``weight``, ``bias``).

    Subclasses set ``_ndims`` (accepted input dims) and ``_layout`` (their names, for messages).
    """

    _ndims: tuple[int, ...] = tuple(range(2, 9))
    _layout: str = "(N, C, *)"
    num_features: int
    eps: float
    affine: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_positive_int(num_features, name="num_features", owner=owner)
        self.eps = check_eps(eps, owner=owner)
        self.affine = check_bool(affine, name="affine", owner=owner)
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """``weight = 1``, ``bias = 0`` (the identity map)."""
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input(self, input: Tensor) -> None:
        owner = type(self).__name__
        check_floating_tensor(input, owner=owner)
        check_ndim(input, self._ndims, layout=self._layout, owner=owner)
        check_channels(input, self.num_features, owner=owner, dim=self._channel_dim(input))

    def _channel_dim(self, input: Tensor) -> int:
        """The dim of ``input`` that holds the channels (1 unless a subclass accepts unbatched input)."""
        return 1

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class RunningStatsNorm(AffineNorm):
    """An :class:`AffineNorm` that can track running statistics for inference.

    Running statistics follow torch exactly: ``running_mean`` starts at 0, ``running_var`` at 1;
    each training step with ``track_running_stats=True`` sets
    ``running = (1 - momentum) * running + momentum * batch`` (unbiased batch variance) and
    increments ``num_batches_tracked``; ``momentum=None`` uses ``1 / num_batches_tracked``, the
    cumulative average of all batches seen.
    """

    _version = 2
    momentum: float | None
    track_running_stats: bool
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, affine, device=device, dtype=dtype)
        owner = type(self).__name__
        self.momentum = check_momentum(momentum, owner=owner)
        self.track_running_stats = check_bool(
            track_running_stats, name="track_running_stats", owner=owner
        )
        if track_running_stats:
            self.register_buffer(
                "running_mean", torch.zeros(num_features, device=device, dtype=dtype)
            )
            self.register_buffer(
                "running_var", torch.ones(num_features, device=device, dtype=dtype)
            )
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """``running_mean = 0``, ``running_var = 1``, ``num_batches_tracked = 0``."""
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and the affine parameters."""
        self.reset_running_stats()
        super().reset_parameters()

    def _normalize_with(self, fn: NormFn, input: Tensor) -> Tensor:
        """Call ``fn`` (a ``*_norm_unchecked`` function) with this module's state; count the batch.

        The counter moves only after ``fn`` returned, so a call that raises changes nothing.
        """
        y = fn(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self._momentum_factor(),
            self.eps,
            type(self).__name__,
        )
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return y

    def _momentum_factor(self) -> float:
        """The weight of this call's batch in the running average (before the counter increments)."""
        if self.momentum is not None:
            return self.momentum
        if self.num_batches_tracked is None:
            return 0.0
        return 1.0 / (int(self.num_batches_tracked) + 1)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints written before torch added `num_batches_tracked` (version < 2) lack it.
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
