"""DropConnect: mask mechanics, the paper's moment formulas, Gaussian inference vs Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import normlab.nn as nl
from normlab.functional.dropconnect import gaussian_relu_mean


def _layer(in_f: int, out_f: int, p: float, **kw) -> nl.DropConnectLinear:  # type: ignore[no-untyped-def]
    layer = nl.DropConnectLinear(in_f, out_f, p=p, dtype=torch.float64, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(
            torch.randn(layer.weight.shape, generator=g, dtype=torch.float64) / math.sqrt(in_f)
        )
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(out_f, generator=g, dtype=torch.float64) * 0.1)
    return layer


def test_mask_rate_and_per_sample_masks() -> None:
    torch.manual_seed(0)
    layer = nl.DropConnectLinear(1000, 50, bias=False, p=0.3, mode="batch", dtype=torch.float64)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    x = torch.ones(8, 1000, dtype=torch.float64)
    y = layer.train()(x)  # y[n, o] = number of kept weights of unit o
    rate = 1 - y[0].mean().item() / 1000
    assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 50_000)
    assert torch.equal(y[0], y[7])  # one mask for the batch
    layer.mode = "sample"
    y = layer(x)
    assert not torch.equal(y[0], y[7])  # a mask per sample
    assert abs(1 - y.mean().item() / 1000 - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 400_000)


def test_pre_activation_moments_match_the_paper() -> None:
    """Over 2e4 sampled masks: mean q W v and variance q (1 - q) (W*W)(v*v) (bias included)."""
    torch.manual_seed(1)
    p, q = 0.4, 0.6
    layer = _layer(64, 5, p, mode="sample")
    v = torch.randn(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u = layer.train()(v.expand(20_000, 64).contiguous())  # one mask per row
    w, b = layer.weight.detach(), layer.bias.detach()
    mean = q * (w @ v + b)
    var = q * (1 - q) * ((w * w) @ (v * v) + b * b)
    n = u.shape[0]
    assert torch.all((u.mean(0) - mean).abs() < 5 * torch.sqrt(var / n))
    assert torch.all((u.var(0) - var).abs() < 5 * var * math.sqrt(2 / n) * 1.5)


def test_gaussian_inference_agrees_with_monte_carlo_and_differs_from_weight_scaling() -> None:
    """Under a ReLU: Gaussian moment matching (1e5 draws) ~ its closed form ~ the Monte-Carlo mean
    over 2e4 sampled masks; plain weight scaling relu(q W v) is off where q W v is near 0."""
    torch.manual_seed(3)
    layer = _layer(400, 20, 0.5, activation=nn.ReLU(), samples=100_000)
    v = torch.randn(1, 400, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layer.eval()
    gaussian = layer(v)
    q = 0.5
    w, b = layer.weight.detach(), layer.bias.detach()
    mu = q * (v @ w.T + b)
    sigma = torch.sqrt(q * (1 - q) * ((v * v) @ (w * w).T + b * b))
    exact = gaussian_relu_mean(mu, sigma)
    assert torch.all((gaussian - exact).abs() < 5 * sigma / math.sqrt(100_000))
    layer.train()
    mc = layer(v.expand(20_000, 400).contiguous()).mean(0, keepdim=True)
    assert torch.all((mc - exact).abs() < 5 * sigma / math.sqrt(20_000) + 0.02 * sigma)  # + CLT gap
    layer.eval()
    layer.inference = "mean"
    scaled = layer(v)
    near_zero = (mu.abs() < 0.5 * sigma).squeeze(0)
    assert near_zero.any()
    assert torch.all((gaussian - scaled).squeeze(0)[near_zero] > 0.2 * sigma.squeeze(0)[near_zero])


def test_eval_is_deterministic_and_p_zero_is_linear() -> None:
    layer = _layer(10, 4, 0.5, activation=nn.Tanh(), samples=50)
    x = torch.randn(3, 10, dtype=torch.float64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.inference = "mc"
    assert torch.equal(layer(x), layer(x))
    zero = _layer(10, 4, 0.0, activation=nn.Tanh())
    torch.testing.assert_close(
        zero.train()(x), torch.tanh(nn.functional.linear(x, zero.weight, zero.bias))
    )


def test_per_sample_conv_equals_linear_for_1x1_kernels() -> None:
    """The grouped-convolution path draws the same masks as the linear path: same outputs."""
    lin = _layer(6, 4, 0.5)
    conv = nl.DropConnectConv2d(6, 4, 1, p=0.5, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.view(4, 6, 1, 1))
        conv.bias.copy_(lin.bias)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.manual_seed(9)
    y_lin = lin.train()(x)
    torch.manual_seed(9)
    y_conv = conv.train()(x.view(5, 6, 1, 1))
    torch.testing.assert_close(y_conv.view(5, 4), y_lin)


def test_conv_gaussian_inference_matches_its_moments() -> None:
    torch.manual_seed(0)
    conv = nl.DropConnectConv1d(3, 2, 3, padding=1, p=0.3, samples=40_000, dtype=torch.float64)
    x = torch.randn(1, 3, 6, dtype=torch.float64)
    y = conv.eval()(x)  # no activation: the Gaussian mean is mu = q conv(x, W)
    mu = 0.7 * nn.functional.conv1d(x, conv.weight, conv.bias, padding=1)
    var = 0.21 * (nn.functional.conv1d(x * x, conv.weight**2, conv.bias**2, padding=1))
    assert torch.all((y - mu).abs() < 5 * torch.sqrt(var / 40_000))


def test_gradients_flow_to_weights_and_inputs() -> None:
    layer = _layer(8, 3, 0.5, activation=nn.ReLU())
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    layer.train()(x).sum().backward()
    assert layer.weight.grad is not None
    assert x.grad is not None


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (
            lambda: nl.DropConnectLinear(3, 2, p=2.0),
            ValueError,
            r"DropConnectLinear: argument 'p' must be a float in \[0, 1\]",
        ),
        (
            lambda: nl.DropConnectLinear(3, 2, inference="sample"),
            ValueError,
            r"DropConnectLinear: argument 'inference' must be one of \['mean', 'gaussian', 'mc'\], got "
            r"'sample'\. Fix: pass inference='gaussian'",
        ),
        (
            lambda: nl.DropConnectLinear(3, 2, mode="element"),
            ValueError,
            r"argument 'mode' must be one of \['sample', 'batch'\]",
        ),
        (
            lambda: nl.DropConnectLinear(3, 2, activation="relu"),
            TypeError,
            r"argument 'activation' must be a callable",
        ),
        (
            lambda: nl.DropConnectLinear(3, 2, samples=0),
            ValueError,
            r"argument 'samples' must be a positive int",
        ),
        (
            lambda: nl.DropConnectConv2d(3, 2, 3, padding_mode="reflect"),
            ValueError,
            r"DropConnectConv2d: argument 'padding_mode' must be 'zeros'",
        ),
    ],
)
def test_errors(make, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match):
        make()


def test_per_sample_masks_keep_no_weight_copies_for_backward() -> None:
    """The backward pass draws the masks again: autograd keeps x, W and b only."""
    layer = _layer(64, 32, 0.5)
    x = torch.randn(128, 64, dtype=torch.float64, requires_grad=True)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer.train()(x)
    assert saved <= x.numel() + layer.weight.numel() + layer.bias.numel()
    y.square().sum().backward()
    assert x.grad is not None


def test_per_sample_gradients_match_an_explicit_loop() -> None:
    """Gradients of the recomputing backward equal autograd through explicitly masked weights."""
    layer = _layer(6, 3, 0.5)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(4)
    y = layer.train()(x)
    gx, gw, gb = torch.autograd.grad(y.square().sum(), (x, layer.weight, layer.bias))
    from normlab.functional import dropconnect as dc

    torch.manual_seed(4)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    g = torch.Generator().manual_seed(seed)
    xr = x.detach().requires_grad_()
    w, b = layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()
    ref = dc._masked_chunk(xr, w, b, 0.5, None, 1, g)  # chunk = whole batch here
    torch.testing.assert_close(ref, y)
    for a, r in zip((gx, gw, gb), torch.autograd.grad(ref.square().sum(), (xr, w, b)), strict=True):
        torch.testing.assert_close(a, r)
    assert dc.CHUNK_ELEMENTS // 18 >= 5  # the whole batch was indeed one chunk


def test_chunked_per_sample_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    from normlab.functional import dropconnect as dc

    monkeypatch.setattr(dc, "CHUNK_ELEMENTS", 36)  # weight 3x6: 2 samples per chunk
    layer = _layer(6, 3, 0.5)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y = layer.train()(x)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, layer.weight))
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    xr, w = x.detach().requires_grad_(), layer.weight.detach().requires_grad_()
    ref = torch.cat(
        [
            dc._masked_chunk(xr[i : i + 2], w, layer.bias.detach(), 0.5, None, 1, g)
            for i in range(0, 5, 2)
        ]
    )
    torch.testing.assert_close(ref, y)
    for a, r in zip((gx, gw), torch.autograd.grad(ref.square().sum(), (xr, w)), strict=True):
        torch.testing.assert_close(a, r)
