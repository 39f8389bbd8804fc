"""Normalization over the weights of a layer: weight standardization as a parametrization.

(Weight normalization is torch's own ``torch.nn.utils.parametrizations.weight_norm``; normlab adds
its data-dependent initialisation, :func:`normlab.surgery.init_weight_norm_`.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab._checks import check_eps
from normlab.functional.normalization import standardized_weight, standardized_weight_ops

__all__ = ["WeightStandardization"]


class WeightStandardization(nn.Module):
    """Parametrization ``W_hat[i] = (W[i] - mean(W[i])) / sqrt(var(W[i]) + eps)`` per output unit
    (Qiao et al. 2019), over the fan-in (``C_in * kernel``), biased variance, ``eps`` inside the
    square root. No learned parameters; identical in training and evaluation. Meant for the
    convolutions (or linear layers) in front of a group norm.

    Register it with ``torch.nn.utils.parametrize.register_parametrization(conv, "weight",
    WeightStandardization())``, or on a whole model with
    :func:`normlab.surgery.standardize_weights`.

    Example:
        >>> w = WeightStandardization()(torch.randn(4, 3, 3, 3) * 5 + 2)
        >>> bool(w.flatten(1).mean(1).abs().max() < 1e-5), bool((w.flatten(1).std(1, unbiased=False) - 1).abs().max() < 1e-4)
        (True, True)
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = check_eps(eps, owner=type(self).__name__)

    def forward(self, weight: Tensor) -> Tensor:
        # TorchScript skips this block unread (it could not compile the kernel's route)
        if not torch.jit.is_scripting():  # type: ignore[attr-defined]
            return standardized_weight(weight, self.eps)
        return standardized_weight_ops(weight, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
