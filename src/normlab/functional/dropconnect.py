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
deterministic. The per-sample training mode draws its masks chunk by chunk (at most
``CHUNK_ELEMENTS`` mask entries, ``chunk * out * in``, at a time) from a generator seeded once per
call, and the backward pass draws the same masks again: memory O(chunk * out * in) instead of the N
masked weight copies autograd would keep; compute O(N * out * in) -- there is no way around that
many random bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab._checks import fail
from normlab.functional import _rng
from normlab.functional._core import channels_last_format, compiling
from normlab.functional.stochastic import keep_mask

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


def _chunk_size(n: int, weight: Tensor) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // max(1, weight.numel())))


def _masked_chunk(
    xs: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: float,
    conv: ConvOp | None,
    groups: int,
    generator: torch.Generator,
) -> Tensor:
    """Pre-activations of a chunk of ``k`` samples, each with its own weight (and bias) mask.

    Masks are drawn from ``generator`` in a fixed order (weights, then bias), so the backward
    pass can draw them again instead of keeping them."""
    k = xs.shape[0]
    masked = weight.unsqueeze(0) * keep_mask((k, *weight.shape), keep, weight, generator)
    if conv is None:  # linear: (k, out, in) @ (k, in, 1)
        u = torch.bmm(masked, xs.unsqueeze(2)).squeeze(2)  # (k, out)
    else:  # one grouped convolution, every sample with its own kernel
        out_channels = weight.shape[0]
        stacked = xs.reshape(1, k * xs.shape[1], *xs.shape[2:])  # (1, k * C_in, *)
        u = conv(stacked, masked.reshape(k * out_channels, *weight.shape[1:]), None, k * groups)
        u = u.reshape(k, out_channels, *u.shape[2:])  # (k, C_out, *)
    if bias is not None:
        b = bias.unsqueeze(0) * keep_mask((k, bias.shape[0]), keep, bias, generator)
        u = u + b.view(k, -1, *([1] * (u.dim() - 2)))
    return u


def _per_sample_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: float,
    seed: int,
    conv: ConvOp | None,
    groups: int,
) -> Tensor:
    generator = torch.Generator(device=x.device).manual_seed(seed)
    chunk = _chunk_size(x.shape[0], weight)
    with torch.no_grad():
        outputs = [
            _masked_chunk(x[i : i + chunk], weight, bias, keep, conv, groups, generator)
            for i in range(0, x.shape[0], chunk)
        ]
    return torch.cat(outputs)


def _per_sample_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: float,
    seed: int,
    conv: ConvOp | None,
    groups: int,
    need_x: bool,
    functional: bool = False,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """The same masks drawn again, back-propagated one chunk at a time (``functional``: with
    ``torch.func.vjp``, for custom ops, inside which autograd does not record)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    chunk = _chunk_size(x.shape[0], weight)
    if functional:
        grads_x, grads_w, grads_b = [], [], []
        for i in range(0, x.shape[0], chunk):

            def masked(xs: Tensor, w: Tensor, *b: Tensor) -> Tensor:
                return _masked_chunk(xs, w, b[0] if b else None, keep, conv, groups, generator)

            primals = (x[i : i + chunk], weight) + (() if bias is None else (bias,))
            _, pullback = torch.func.vjp(masked, *primals)  # type: ignore[misc]
            gx, gw, *gb = pullback(grad[i : i + chunk])
            grads_x.append(gx)
            grads_w.append(gw)
            grads_b += gb
        total_b = None if bias is None else torch.stack(grads_b).sum(0)
        return torch.cat(grads_x), torch.stack(grads_w).sum(0), total_b
    w = weight.detach().requires_grad_()
    b = None if bias is None else bias.detach().requires_grad_()
    grad_x = torch.empty_like(x) if need_x else None
    with torch.enable_grad():
        for i in range(0, x.shape[0], chunk):
            xs = x[i : i + chunk].detach().requires_grad_(grad_x is not None)
            u = _masked_chunk(xs, w, b, keep, conv, groups, generator)
            u.backward(grad[i : i + chunk])  # type: ignore[no-untyped-call]
            if grad_x is not None and xs.grad is not None:
                grad_x[i : i + chunk] = xs.grad
    assert w.grad is not None
    return grad_x, w.grad, None if b is None else b.grad


class _PerSampleDropConnect(torch.autograd.Function):
    """Per-sample masks without keeping them: the forward pass draws them chunk by chunk from a
    seeded generator; the backward pass draws the same masks again and back-propagates one chunk
    at a time. Memory: one chunk's masks and graph, not N masked weight copies."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        keep: float,
        seed: int,
        conv: ConvOp | None,
        groups: int,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.keep, ctx.seed, ctx.conv, ctx.groups = keep, seed, conv, groups
        return _per_sample_forward(x, weight, bias, keep, seed, conv, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        grad_x, grad_w, grad_b = _per_sample_backward(
            grad, x, weight, bias, ctx.keep, ctx.seed, ctx.conv, ctx.groups, ctx.needs_input_grad[0]
        )
        return (
            grad_x,
            grad_w if ctx.needs_input_grad[1] else None,
            grad_b if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


# -- the same under torch.compile: custom ops (dynamo cannot create the per-call generator) ------


@torch.library.custom_op("normlab::dropconnect_per_sample", mutates_args=())
def _per_sample_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: float,
    seed: Tensor,
    conv_key: int,
    groups: int,
) -> Tensor:
    conv = None if conv_key < 0 else _rng.lookup(conv_key)
    return _per_sample_forward(x, weight, bias, keep, int(seed), conv, groups)


@_per_sample_op.register_fake
def _(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: float,
    seed: Tensor,
    conv_key: int,
    groups: int,
) -> Tensor:
    if conv_key < 0:
        return F.linear(x, weight, bias)
    return _rng.lookup(conv_key)(x, weight, bias, groups)  # type: ignore[no-any-return]


@torch.library.custom_op("normlab::dropconnect_per_sample_backward", mutates_args=())
def _per_sample_backward_op(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: float,
    seed: Tensor,
    conv_key: int,
    groups: int,
) -> list[Tensor]:
    conv = None if conv_key < 0 else _rng.lookup(conv_key)
    grad_x, grad_w, grad_b = _per_sample_backward(
        grad, x, weight, bias, keep, int(seed), conv, groups, True, functional=True
    )
    assert grad_x is not None
    return [grad_x, grad_w] + ([] if grad_b is None else [grad_b])


@_per_sample_backward_op.register_fake
def _(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: float,
    seed: Tensor,
    conv_key: int,
    groups: int,
) -> list[Tensor]:
    return [torch.empty_like(x), torch.empty_like(weight)] + (
        [] if bias is None else [torch.empty_like(bias)]
    )


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias, keep, seed, conv_key, groups = inputs
    ctx.save_for_backward(x, weight, bias, seed)
    ctx.keep, ctx.conv_key, ctx.groups = keep, conv_key, groups


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, bias, seed = ctx.saved_tensors
    grads = _per_sample_backward_op(grad, x, weight, bias, ctx.keep, seed, ctx.conv_key, ctx.groups)
    return grads[0], grads[1], grads[2] if bias is not None else None, None, None, None, None


_per_sample_op.register_autograd(_backward, setup_context=_setup)


def _per_sample(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: float,
    conv: ConvOp | None,
    groups: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Pre-activations with an independent weight (and bias) mask for every sample."""
    if compiling():
        seed = _rng.randint(2**62, generator, device=x.device)
        key = -1 if conv is None else _rng.register(conv)
        y: Tensor = _per_sample_op(x, weight, bias, keep, seed, key, groups)
    else:
        seed_value = _rng.host_seed(generator)
        y = _PerSampleDropConnect.apply(x, weight, bias, keep, seed_value, conv, groups)  # type: ignore[no-untyped-call]
    fmt = channels_last_format(x)  # the grouped convolution's output is channels-first
    return y if fmt is None else y.contiguous(memory_format=fmt)


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
            mask = keep_mask(tuple(weight.shape), keep, weight, generator)
            masked_b = None
            if bias is not None:  # drawn after the weight mask, compiled too
                masked_b = bias * keep_mask(tuple(bias.shape), keep, bias, generator, after=mask)
            return _apply(activation, op(x, weight * mask, masked_b))
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
        noise: Tensor | None = None
        for start in range(0, samples, step):
            z = min(step, samples - start)
            noise = _rng.randn(
                (z, *mu.shape), generator, dtype=mu.dtype, device=mu.device, after=noise
            )
            total = total + _apply(activation, mu + sigma * noise).sum(0)
        return total / samples
    if compiling():
        fail(
            NotImplementedError,
            "dropconnect",
            "inference='mc' under torch.compile",
            "an eager call (it runs `samples` full forward passes, which the compiler would unroll)",
            "a compiled call",
            "use inference='gaussian' (the paper's moment matching) or 'mean' in compiled models",
        )
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
