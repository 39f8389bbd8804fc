"""DropConnect (Wan, Zeiler, Zhang, LeCun & Fergus, ICML 2013): Bernoulli masks on the **weights**.

Training computes ``a((M * W) v + m_b * b)`` with a mask ``M`` drawn independently for every
sample (the paper) or once per batch (cheaper, a weaker regularizer); masked weights are not
rescaled, as in the paper. Inference:

* ``"mean"``: ``a(q (W v + b))`` with keep probability ``q = 1 - p`` -- weight scaling, what dropout
  uses; not justified for DropConnect under a nonlinearity;
* ``"gaussian"``: the paper's moment matching: each pre-activation is Gaussian with
  ``mu = q (W v + b)`` and ``sigma^2 = q (1 - q) ((W * W)(v * v) + b * b)``; draw ``samples``
  values, apply the activation, average (pytorch#131688 asks for this; nobody ships it);
* ``"mc"``: average ``a(.)`` over ``samples`` forward passes with sampled masks.

Sampled inference uses a generator seeded with ``seed`` at every call, so evaluation is
deterministic. Memory of the per-sample training mode: a chunk of at most ``CHUNK_ELEMENTS`` mask
entries (``chunk * out * in``) at a time, plus what autograd saves for those chunks -- there is no
way around O(N * out * in) random bits, but there is no N-fold weight copy in memory at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CHUNK_ELEMENTS", "Activation", "dropconnect", "gaussian_relu_mean"]

Activation = Callable[[Tensor], Tensor] | None
Mode = Literal["sample", "batch"]
Inference = Literal["mean", "gaussian", "mc"]
#: ``conv(x, weight, bias, groups)`` -- a convolution with its stride, padding and dilation bound.
ConvOp = Callable[[Tensor, Tensor, Tensor | None, int], Tensor]

#: Mask entries generated at once by the per-sample training mode (16 MiB of float32).
CHUNK_ELEMENTS = 1 << 22


def gaussian_relu_mean(mu: Tensor, sigma: Tensor) -> Tensor:
    """``E[relu(u)]`` for ``u ~ N(mu, sigma^2)``: ``mu Phi(mu/sigma) + sigma phi(mu/sigma)`` --
    the exact value the ``"gaussian"`` inference estimates by sampling under a ReLU.

    >>> round(gaussian_relu_mean(torch.tensor(0.0), torch.tensor(1.0)).item(), 6)
    0.398942
    """
    z = mu / sigma
    cdf = 0.5 * torch.erfc(-z / math.sqrt(2.0))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return mu * cdf + sigma * pdf


def _apply(activation: Activation, u: Tensor) -> Tensor:
    return u if activation is None else activation(u)


def _mask(
    shape: tuple[int, ...], keep: float, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(
        keep, generator=generator
    )


def _per_sample(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: float,
    conv: ConvOp | None,
    groups: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Pre-activations with an independent weight (and bias) mask for every sample, in chunks."""
    n = x.shape[0]
    chunk = max(1, min(n, CHUNK_ELEMENTS // max(1, weight.numel())))
    outputs = []
    for start in range(0, n, chunk):
        xs = x[start : start + chunk]
        k = xs.shape[0]
        masked = weight.unsqueeze(0) * _mask((k, *weight.shape), keep, weight, generator)
        if conv is None:  # linear: (k, out, in) @ (k, in, 1)
            u = torch.bmm(masked, xs.unsqueeze(2)).squeeze(2)  # (k, out)
        else:  # one grouped convolution, every sample with its own kernel
            out_channels = weight.shape[0]
            stacked = xs.reshape(1, k * xs.shape[1], *xs.shape[2:])  # (1, k * C_in, *)
            u = conv(stacked, masked.reshape(k * out_channels, *weight.shape[1:]), None, k * groups)
            u = u.reshape(k, out_channels, *u.shape[2:])  # (k, C_out, *)
        if bias is not None:
            b = bias.unsqueeze(0) * _mask((k, bias.shape[0]), keep, bias, generator)
            u = u + b.view(k, -1, *([1] * (u.dim() - 2)))
        outputs.append(u)
    return torch.cat(outputs)


def dropconnect(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    p: float,
    *,
    training: bool,
    conv: ConvOp | None = None,
    groups: int = 1,
    mode: Mode = "sample",
    inference: Inference = "mean",
    activation: Activation = None,
    samples: int = 1000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DropConnect for ``F.linear`` (``conv=None``) or a convolution ``conv(x, w, b, groups)``,
    then ``activation``. See the module docstring for the modes.

    >>> w = torch.ones(2, 3)
    >>> dropconnect(torch.ones(1, 3), w, None, 0.5, training=False)  # mean: q * W v
    tensor([[1.5000, 1.5000]])
    """

    def op(x_: Tensor, w_: Tensor, b_: Tensor | None) -> Tensor:
        return F.linear(x_, w_, b_) if conv is None else conv(x_, w_, b_, groups)

    keep = 1.0 - p
    if training:
        if p == 0.0:
            return _apply(activation, op(x, weight, bias))
        if mode == "batch":
            masked_w = weight * _mask(tuple(weight.shape), keep, weight, generator)
            masked_b = (
                None if bias is None else bias * _mask(tuple(bias.shape), keep, bias, generator)
            )
            return _apply(activation, op(x, masked_w, masked_b))
        return _apply(activation, _per_sample(x, weight, bias, keep, conv, groups, generator))
    if inference == "mean":
        return _apply(activation, keep * op(x, weight, bias))
    if inference == "gaussian":
        mu = keep * op(x, weight, bias)
        var = (
            keep * (1.0 - keep) * op(x * x, weight * weight, None if bias is None else bias * bias)
        )
        sigma = var.clamp_min(0.0).sqrt()
        total = torch.zeros_like(mu)
        step = max(1, min(samples, CHUNK_ELEMENTS // max(1, mu.numel())))
        for start in range(0, samples, step):
            z = min(step, samples - start)
            noise = torch.randn(
                (z, *mu.shape), dtype=mu.dtype, device=mu.device, generator=generator
            )
            total = total + _apply(activation, mu + sigma * noise).sum(0)
        return total / samples
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    for _ in range(samples):
        total = total + dropconnect(
            x,
            weight,
            bias,
            p,
            training=True,
            conv=conv,
            groups=groups,
            mode=mode,
            activation=activation,
            generator=generator,
        )
    return total / samples
