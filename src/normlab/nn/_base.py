"""Shared anatomy of normlab's norm modules.

Where ``torch.nn`` has the layer, normlab's class **subclasses it** (``isinstance(m,
nn.BatchNorm2d)`` holds, so ``torch.optim.swa_utils.update_bn``, ``convert_sync_batchnorm``, fusion
utilities and users' ``isinstance`` checks treat it as the torch layer) and keeps torch's parameters,
buffers, ``state_dict`` keys, ``reset_parameters`` and ``extra_repr``. normlab adds validation of
the constructor arguments and the input (errors that say what to do) and its own ``forward``.
Under ``torch.fx`` symbolic tracing and ``torch.jit.trace`` the torch ``forward`` runs instead, which
computes the same thing and is traceable.

``__init__`` validates, then lets torch create parameters and buffers with ``device``/``dtype`` and
call ``reset_parameters()``; absent tensors are registered as ``None``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from normlab._checks import (
    check_bool,
    check_channels,
    check_eps,
    check_floating_tensor,
    check_matches_parameters,
    check_momentum,
    check_ndim,
    check_positive_int,
)
from normlab.functional._core import on_accelerator

__all__ = [
    "AffineNorm",
    "InputChecks",
    "RunningStatsNorm",
    "bias_kwarg",
    "check_norm_args",
    "is_traced",
]

# (input, running_mean, running_var, weight, bias, training, momentum, eps, owner) -> output
NormFn = Callable[
    [
        Tensor,
        Tensor | None,
        Tensor | None,
        Tensor | None,
        Tensor | None,
        bool,
        float | Tensor,
        float,
        str,
    ],
    Tensor,
]


def momentum_factor(momentum: float | None, count: Tensor | None, training: bool) -> float | Tensor:
    """The weight of this call's batch in the running average (before the counter ``count``
    increments): ``momentum``; for cumulative averages (``momentum=None``) ``1 / (count + 1)``,
    a 0-dim tensor under ``torch.compile`` (reading the counter as a number would be a
    data-dependent guard, which stops ``fullgraph=True`` compilation; torch.nn's batch norm fails
    there) and on accelerators (there it would be a host sync); 0 where nothing is updated (no
    counter, or evaluation)."""
    if momentum is not None:
        return momentum
    if count is None or not training:
        return 0.0
    if torch.compiler.is_compiling() or on_accelerator(count):
        return (count + 1).double().reciprocal()
    return 1.0 / (int(count) + 1)


def check_norm_args(
    owner: str,
    num_features: object,
    eps: object,
    momentum: object = 0.1,
    affine: object = True,
    track_running_stats: object = True,
    *,
    allow_none_momentum: bool = True,
) -> tuple[int, float, float | None, bool, bool]:
    """Validate the vocabulary every norm shares; return it normalized
    ``(num_features, eps, momentum, affine, track_running_stats)``."""
    return (
        check_positive_int(num_features, name="num_features", owner=owner),
        check_eps(eps, owner=owner),
        check_momentum(momentum, owner=owner, allow_none=allow_none_momentum),
        check_bool(affine, name="affine", owner=owner),
        check_bool(track_running_stats, name="track_running_stats", owner=owner),
    )


def bias_kwarg(bias: bool) -> dict[str, bool]:
    """torch's keyword-only ``bias`` switch, passed only when used (older torch lacks it)."""
    return {} if bias else {"bias": False}


def is_traced(input: object) -> bool:
    """Whether ``input`` is being traced by ``torch.fx`` or ``torch.jit.trace``."""
    return isinstance(input, torch.fx.Proxy) or bool(torch.jit.is_tracing())  # type: ignore[attr-defined, no-untyped-call]


class InputChecks:
    """``_check_input``: a floating tensor with one of ``_ndims`` dims and ``num_features`` channels."""

    _ndims: tuple[int, ...] = tuple(range(2, 9))
    _layout: str = "(N, C, *)"
    num_features: int

    def _channel_dim(self, input: Tensor) -> int:
        """The dim of ``input`` that holds the channels (1 unless a subclass accepts unbatched input)."""
        return 1

    def _check_input(self, input: Tensor) -> None:
        owner = type(self).__name__
        check_floating_tensor(input, owner=owner)
        check_matches_parameters(
            input, [getattr(self, "weight", None), getattr(self, "bias", None)], owner=owner
        )
        check_ndim(input, self._ndims, layout=self._layout, owner=owner)
        check_channels(input, self.num_features, owner=owner, dim=self._channel_dim(input))


class AffineNorm(InputChecks, nn.Module):
    """A norm over ``(N, C, *)`` input with an optional per-channel affine map (``weight``, ``bias``),
    for layers that ``torch.nn`` does not have."""

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
        self.num_features, self.eps, _, self.affine, _ = check_norm_args(
            type(self).__name__, num_features, eps, affine=affine
        )
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

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class RunningStatsNorm(InputChecks, _NormBase):
    """Validation and the training call shared by batch and instance norm (torch's ``_NormBase``).

    The constructor's defaults are batch norm's; instance norm overrides them.

    Running statistics follow torch exactly: ``running_mean`` starts at 0, ``running_var`` at 1;
    each training step with ``track_running_stats=True`` sets
    ``running = (1 - momentum) * running + momentum * batch`` (unbiased batch variance) and
    increments ``num_batches_tracked``; ``momentum=None`` uses ``1 / num_batches_tracked``, the
    cumulative average of all batches seen.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        owner = type(self).__name__
        check_norm_args(owner, num_features, eps, momentum, affine, track_running_stats)
        check_bool(bias, name="bias", owner=owner)
        super().__init__(
            int(num_features),
            float(eps),
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            **bias_kwarg(bias),
        )

    def _momentum_factor(self) -> float | Tensor:
        """:func:`momentum_factor` of this module."""
        return momentum_factor(self.momentum, self.num_batches_tracked, self.training)

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
