"""A batch norm whose statistics (and, by default, affine map) never change."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab._checks import check_eps, check_positive_int
from normlab.nn._base import InputChecks

__all__ = ["FrozenBatchNorm"]


class FrozenBatchNorm(InputChecks, nn.Module):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` in every mode.

    ``model.train()`` does not unfreeze it (pytorch#66073): it never uses batch statistics and
    never updates its buffers. With ``trainable_affine=True`` the affine map is learned (a
    ``Parameter``), otherwise it is a buffer too. Same tensor names as ``BatchNorm`` (without
    ``num_batches_tracked``); build one from a trained batch norm with
    :func:`normlab.surgery.freeze_batchnorm`.

    Example:
        >>> f = FrozenBatchNorm(3)
        >>> f.train()(torch.ones(2, 3)).tolist() == f.eval()(torch.ones(2, 3)).tolist()
        True
    """

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        trainable_affine: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_positive_int(num_features, name="num_features", owner=owner)
        self.eps = check_eps(eps, owner=owner)
        self.trainable_affine = bool(trainable_affine)
        kw = {"device": device, "dtype": dtype}
        ones, zeros = torch.ones(num_features, **kw), torch.zeros(num_features, **kw)  # type: ignore[arg-type]
        if trainable_affine:
            self.weight = nn.Parameter(ones.clone())
            self.bias = nn.Parameter(zeros.clone())
        else:
            self.register_buffer("weight", ones.clone())
            self.register_buffer("bias", zeros.clone())
        self.register_buffer("running_mean", zeros.clone())
        self.register_buffer("running_var", ones.clone())

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, trainable_affine={self.trainable_affine}"
