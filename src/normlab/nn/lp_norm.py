"""L1 and L-infinity (top-k) batch norm modules."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from normlab._checks import check_bool, check_positive_int, fail
from normlab.functional.lp_norm import P, lp_batch_norm_unchecked
from normlab.nn._base import InputChecks, check_norm_args, momentum_factor

__all__ = ["L1BatchNorm", "LinfBatchNorm", "LpBatchNorm"]


class _LpBatchNorm(InputChecks, nn.Module):
    _p: P = "1"
    running_mean: Tensor | None
    running_scale: Tensor | None
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
        *,
        k: int = 10,
        center: bool = True,
        gaussian_constant: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        (self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats) = (
            check_norm_args(owner, num_features, eps, momentum, affine, track_running_stats)
        )
        self.k = check_positive_int(k, name="k", owner=owner)
        self.center = check_bool(center, name="center", owner=owner)
        self.gaussian_constant = check_bool(
            gaussian_constant, name="gaussian_constant", owner=owner
        )
        kw = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **kw))  # type: ignore[arg-type]
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))  # type: ignore[arg-type]
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **kw))  # type: ignore[arg-type]
            self.register_buffer("running_scale", torch.ones(num_features, **kw))  # type: ignore[arg-type]
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_scale", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        factor = momentum_factor(self.momentum, self.num_batches_tracked, self.training)
        y = lp_batch_norm_unchecked(
            input,
            self.running_mean,
            self.running_scale,
            self.weight,
            self.bias,
            self.training,
            factor,
            self.eps,
            self._p,
            self.k,
            self.center,
            self.gaussian_constant,
            type(self).__name__,
        )
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        extra = f", k={self.k}" if self._p == "inf" else ""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}{extra}, center={self.center}, "
            f"gaussian_constant={self.gaussian_constant}"
        )


class L1BatchNorm(_LpBatchNorm):
    """L1 batch norm (Hoffer et al. 2018): ``y = (x - mu_B) / (sqrt(pi/2) * mean|x - mu_B| + eps)``
    ``* weight + bias``, per channel over the batch (and positions).

    ``sqrt(pi/2) * mean|x - mu|`` estimates the standard deviation of Gaussian data, so the layer
    behaves like batch norm -- but needs no squares: it stays finite in float16 where the variance
    overflows (|x| > ~256). Running averages of the mean and of the dispersion (``running_scale``,
    not its reciprocal) are used in evaluation. ``center=False, gaussian_constant=False`` is
    Santurkar et al.'s variant (``mean|x|`` before shifting the mean, no constant).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as in
            ``BatchNorm``; ``eps`` is added to the dispersion (outside, as in the reference code).
        center, gaussian_constant: see above. Defaults: ``True``.

    Shape:
        ``(N, C, *)``.

    Example:
        >>> L1BatchNorm(3)(torch.randn(16, 3, 4, 4)).shape
        torch.Size([16, 3, 4, 4])
    """

    _p: P = "1"


class LinfBatchNorm(_LpBatchNorm):
    """L-infinity / top-k batch norm (Hoffer et al. 2018): ``y = (x - mu_B) / (C(n) *``
    ``mean(top_k |x - mu_B|) + eps) * weight + bias``, per channel.

    The mean of the ``k`` largest deviations (``k=1``: the maximum) is more robust than the
    maximum alone; ``C(n) = (1 + sqrt(pi ln 4)) / 2 / sqrt(2 ln n)`` (``n`` values per channel)
    brings it to the order of the standard deviation -- about 1.1-1.4 sigma for Gaussian data,
    not 1, by design (``weight`` absorbs it). Running averages of the mean and of the dispersion
    are used in evaluation.

    Args:
        k: number of largest deviations averaged. Default: 10.
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as in
            :class:`L1BatchNorm`.
        center, gaussian_constant: as in :class:`L1BatchNorm`.

    Example:
        >>> LinfBatchNorm(3, k=5)(torch.randn(16, 3, 4, 4)).shape
        torch.Size([16, 3, 4, 4])
    """

    _p: P = "inf"


def _p_key(p: object) -> P | None:
    """``"1"``, ``"2"`` or ``"inf"`` for the accepted spellings of ``p``; ``None`` otherwise."""
    if isinstance(p, str):
        return {"1": "1", "2": "2", "inf": "inf"}.get(p)  # type: ignore[return-value]
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        return None
    return {1.0: "1", 2.0: "2", math.inf: "inf"}.get(float(p))  # type: ignore[return-value]


class LpBatchNorm(_LpBatchNorm):
    """Batch norm normalized by an Lp dispersion, ``p`` in {1, 2, inf}: ``p=1`` is
    :class:`L1BatchNorm`, ``p=inf`` :class:`LinfBatchNorm` (top-``k``), ``p=2`` divides by the
    standard deviation with ``eps`` outside the square root (Hoffer's L2 baseline). Santurkar et
    al.'s Lp layers are ``center=False, gaussian_constant=False``.

    Raises:
        ValueError: ``p`` not in {1, 2, inf}.

    Example:
        >>> LpBatchNorm(3, p=2)(torch.randn(8, 3)).shape
        torch.Size([8, 3])
    """

    def __init__(self, num_features: int, p: float | str = 1, **kwargs: Any) -> None:
        key = _p_key(p)
        if key is None:
            fail(
                ValueError,
                type(self).__name__,
                "argument 'p'",
                "1, 2 or inf (math.inf or 'inf')",
                repr(p),
                "pick one of the supported norms, e.g. p=1",
            )
        self._p = key
        super().__init__(num_features, **kwargs)

    def extra_repr(self) -> str:
        return f"p={self._p}, {super().extra_repr()}"
