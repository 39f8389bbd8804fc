"""L1 and L-infinity batch norm against float64 closed forms."""

from __future__ import annotations

import math

import pytest
import torch

import normlab.nn as nl
from normlab.functional.lp_norm import L1_CONSTANT, linf_constant


def _x(shape, seed=0, scale=2.0, shift=1.0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift


def test_constants() -> None:
    assert pytest.approx(1.2533141373155002512, abs=1e-15) == L1_CONSTANT
    assert linf_constant(128) == pytest.approx(
        0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(128))
    )


def test_l1_closed_form_and_running_dispersion() -> None:
    layer = nl.L1BatchNorm(3, momentum=0.5, dtype=torch.float64)
    x = _x((16, 3, 4, 4))
    y = layer.train()(x)
    mean = x.mean((0, 2, 3), keepdim=True)
    dispersion = L1_CONSTANT * (x - mean).abs().mean((0, 2, 3), keepdim=True)
    torch.testing.assert_close(y, (x - mean) / (dispersion + 1e-5))
    torch.testing.assert_close(layer.running_scale, 0.5 + 0.5 * dispersion.flatten())  # not 1/sigma
    torch.testing.assert_close(
        layer.eval()(x),
        (x - layer.running_mean.view(1, 3, 1, 1)) / (layer.running_scale.view(1, 3, 1, 1) + 1e-5),
    )


def test_l1_dispersion_estimates_the_std_of_gaussian_data() -> None:
    """C_L1 * mean|x - mu| / std -> 1; at n = 4096 the relative sd of mean|x-mu| is ~1.2 %."""
    x = _x((4096, 2), seed=1, scale=3.0)
    layer = nl.L1BatchNorm(2, momentum=1.0, dtype=torch.float64).train()
    layer(x)
    ratio = layer.running_scale / x.std(0)
    assert (ratio - 1).abs().max() < 0.02
    torch.testing.assert_close(
        torch.corrcoef(
            torch.stack([layer(x)[:, 0], nl.BatchNorm1d(2, dtype=torch.float64)(x)[:, 0]])
        )[0, 1],
        torch.tensor(1.0, dtype=torch.float64),
        atol=1e-12,
        rtol=0,
    )


def test_linf_top_k_closed_form() -> None:
    layer = nl.LinfBatchNorm(3, k=4, dtype=torch.float64)
    x = _x((8, 3, 5))
    y = layer.train()(x)
    mean = x.mean((0, 2), keepdim=True)
    per_channel = (x - mean).abs().transpose(0, 1).reshape(3, -1)
    top = per_channel.topk(4, dim=1).values.mean(1).view(1, 3, 1) * linf_constant(40)
    torch.testing.assert_close(y, (x - mean) / (top + 1e-5))


def test_santurkar_variant_uses_the_p_norm_before_centering() -> None:
    layer = nl.L1BatchNorm(2, center=False, gaussian_constant=False, dtype=torch.float64)
    x = _x((10, 2), shift=3.0)
    mean = x.mean(0)
    torch.testing.assert_close(layer.train()(x), (x - mean) / (x.abs().mean(0) + 1e-5))


def test_float16_stays_finite_where_the_variance_overflows() -> None:
    """|x| ~ 300: x**2 > 65504, the float16 variance is inf; the L1 dispersion is not."""
    x = (torch.randn(256, 4, generator=torch.Generator().manual_seed(2)) * 300).half()
    naive_var = ((x - x.mean(0)) ** 2).sum(0) / x.shape[0]  # float16 arithmetic throughout
    assert torch.isinf(naive_var).all()
    for layer in (nl.L1BatchNorm(4, dtype=torch.float16), nl.LinfBatchNorm(4, dtype=torch.float16)):
        y = layer.train()(x)
        assert y.dtype == torch.float16
        assert torch.isfinite(y).all()
        assert torch.isfinite(layer.running_scale).all()
    ref = (x.double() - x.double().mean(0)) / (
        L1_CONSTANT * (x.double() - x.double().mean(0)).abs().mean(0)
    )
    y = nl.L1BatchNorm(4, dtype=torch.float16).train()(x)
    assert (y.double() - ref).abs().max() < 1e-2


@pytest.mark.parametrize(("p", "cls_p"), [(1, "1"), ("inf", "inf"), (math.inf, "inf"), (2, "2")])
def test_lp_batch_norm_dispatches_on_p(p: object, cls_p: str) -> None:
    layer = nl.LpBatchNorm(3, p=p, dtype=torch.float64)
    assert layer._p == cls_p
    x = _x((12, 3))
    if cls_p == "2":  # the standard deviation, eps outside the square root
        mean = x.mean(0)
        torch.testing.assert_close(layer.train()(x), (x - mean) / (x.std(0, unbiased=False) + 1e-5))
    elif cls_p == "1":
        torch.testing.assert_close(
            layer.train()(x), nl.L1BatchNorm(3, dtype=torch.float64).train()(x)
        )


@pytest.mark.parametrize("p", [3, 0.5, "two", True, None])
def test_unsupported_p(p: object) -> None:
    with pytest.raises(
        ValueError,
        match=r"LpBatchNorm: argument 'p' must be 1, 2 or inf \(math\.inf or "
        r"'inf'\), got .*\. Fix: pick one of the supported norms",
    ):
        nl.LpBatchNorm(3, p=p)


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((6, 3, 5, 4), "nchw"),
        ((6, 3, 5, 4), "nhwc"),
        ((4, 3, 2, 3, 5), "ndhwc"),
        ((7, 3, 10), "ncl"),
        ((40, 3), "nc"),
        ((6, 3, 5, 4), "strided"),  # neither layout: one chunk, generic reductions
    ],
)
@pytest.mark.parametrize("offset", [3.0, 60.0], ids=["centred", "off-centre"])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_l1_matches_the_composite_formula(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    layout: str,
    offset: float,
    affine: bool,
) -> None:
    """The fused training L1 batch norm (own backward) equals autograd through the composite ops:
    output, input and parameter gradients, running statistics; keeps the layout; gradgradcheck.
    Chunks of 64 bytes: its chunked passes run over several chunks; "off-centre" (~30 divisors
    from zero) takes the centre-first output."""
    import importlib

    lp = importlib.import_module("normlab.functional.lp_norm")
    monkeypatch.setattr(lp, "_CHUNK_BYTES", 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset
    fmt = {"nhwc": torch.channels_last, "ndhwc": torch.channels_last_3d}.get(layout)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    if layout == "strided":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64) + 0.5
    chunked = lp._channel_chunks
    counts: list[int] = []
    monkeypatch.setattr(
        lp, "_channel_chunks", lambda *t: (r := chunked(*t), counts.append(len(r[0])))[0]
    )

    def run(fused: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(lp, "_fused", lambda *a: fused)
        layer = nl.L1BatchNorm(3, affine=affine, dtype=torch.float64)
        if affine:
            with torch.no_grad():
                layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
                layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
        xr = x.detach().clone().requires_grad_()
        y = layer.train()(xr)
        if fused and fmt is not None:
            assert y.is_contiguous(memory_format=fmt)
        grads = torch.autograd.grad(y, [xr, *layer.parameters()], gy)
        return [y, *grads, layer.running_mean, layer.running_scale]

    fused = run(True)
    assert counts
    assert (min(counts) > 1) == (layout != "strided")
    for a, b in zip(fused, run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    def fused_l1(x, w, b):  # type: ignore[no-untyped-def]
        return lp.L1BatchNormTrain.apply(x, w, b, 1e-5, lp.L1_CONSTANT)[0]

    w = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    small = x[(slice(0, 2), slice(None), *[slice(0, 3)] * (x.dim() - 2))]
    small = small.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fused_l1, (small, w, b))
    assert torch.autograd.gradgradcheck(fused_l1, (small, w, b))


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((6, 3, 16, 16), "nchw"),  # 256 positions: one block per row, 6 per channel
        ((3, 3, 600), "ncl"),  # blocks of 200 positions, 9 per channel
        ((2, 3, 16, 32), "nchw"),  # blocks of 256 positions, 4 per channel
        ((6, 3, 16, 16), "nhwc"),  # blocks of 64 rows, 24 per channel
        ((5, 3, 5, 7), "nchw"),  # 35 positions: no divisor in [64, 256], one block per row
        ((4, 3, 2, 6, 5), "ndhwc"),
        ((200, 3), "nc"),
        ((7, 3, 40), "ncl"),
    ],
)
@pytest.mark.parametrize(("k", "offset"), [(3, 0.0), (1, 0.0), (10, 60.0), (10_000, 0.0)])
def test_fused_linf_matches_the_composite_formula(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    layout: str,
    k: int,
    offset: float,
) -> None:
    """The fused training L-inf batch norm (block-pruned top-k search, own backward) equals
    autograd through the composite ops (a sort of every channel): output, gradients, running
    statistics, layout; k=1 (the maximum), k beyond the values per channel, far off-centre."""
    import importlib

    lp = importlib.import_module("normlab.functional.lp_norm")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1 + offset
    fmt = {"nhwc": torch.channels_last, "ndhwc": torch.channels_last_3d}.get(layout)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    gy = torch.randn(shape, generator=g, dtype=torch.float64) + 0.5
    calls: list[int] = []
    fused_apply = lp.LinfBatchNormTrain.apply

    def run(fused: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(lp, "_fused", lambda *a: fused)
        layer = nl.LinfBatchNorm(3, k=k, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
        xr = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        y = layer.train()(xr)
        if fmt is not None:
            assert y.is_contiguous(memory_format=fmt)
        grads = torch.autograd.grad(y, [xr, *layer.parameters()], gy)
        return [y, *grads, layer.running_mean, layer.running_scale]

    monkeypatch.setattr(
        lp.LinfBatchNormTrain, "apply", lambda *a: calls.append(1) or fused_apply(*a)
    )
    fused, composite = run(True), run(False)
    assert calls == [1]
    for a, b in zip(fused, composite, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_linf_gradcheck_and_gradgradcheck(channels_last: bool) -> None:
    import importlib

    lp = importlib.import_module("normlab.functional.lp_norm")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 3, 6, generator=g, dtype=torch.float64) + 1.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, generator=g, dtype=torch.float64, requires_grad=True)

    def fused_linf(x, w, b):  # type: ignore[no-untyped-def]
        return lp.LinfBatchNormTrain.apply(x, w, b, 1e-5, 0.4, 4)[0]

    assert torch.autograd.gradcheck(fused_linf, (x, w, b))
    assert torch.autograd.gradgradcheck(fused_linf, (x, w, b))


# torch's forward AD scripts its own decompositions on first use (torch's warning, not ours).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("cls", [nl.L1BatchNorm, nl.LinfBatchNorm])
def test_forward_mode_ad_uses_the_composite_ops(cls: type) -> None:
    """The fused training functions have no jvp: under forward-mode AD the composite ops serve
    (the tangent equals the float64 finite difference)."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(4)
    layer = cls(3, dtype=torch.float64).train()
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, v))).tangent
    h = 1e-6
    numeric = (layer(x + h * v) - layer(x - h * v)) / (2 * h)
    torch.testing.assert_close(tangent, numeric, rtol=1e-5, atol=1e-6)
