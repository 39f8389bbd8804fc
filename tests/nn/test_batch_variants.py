"""Batch renorm, ghost, noisy and mean-only batch norm against references written from the papers."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nl


def _x(shape, seed, shift=0.0, dtype=torch.float64):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1 + shift).to(dtype)


def _brn_reference(batches, gamma, beta, eps, alpha, limits):  # type: ignore[no-untyped-def]
    """Ioffe 2017, Algorithm 1, in float64, one step per batch: outputs, gradients, (mu, sigma)."""
    mu, sigma = (
        torch.zeros(gamma.shape, dtype=torch.float64),
        torch.ones(gamma.shape, dtype=torch.float64),
    )
    results = []
    for (x, gy), (r_max, d_max) in zip(batches, limits, strict=True):
        x = x.clone().requires_grad_()
        g, b = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims)
        std = torch.sqrt(((x - mean.view(shape)) ** 2).mean(dims) + eps)
        r = (std / sigma).clamp(1 / r_max, r_max).detach()
        d = ((mean - mu) / sigma).clamp(-d_max, d_max).detach()
        xhat = (x - mean.view(shape)) / std.view(shape) * r.view(shape) + d.view(shape)
        y = g.view(shape) * xhat + b.view(shape)
        grads = torch.autograd.grad(y, (x, g, b), gy)
        mu = mu + alpha * (mean.detach() - mu)
        sigma = sigma + alpha * (std.detach() - sigma)
        results.append((y.detach(), grads, mu.clone(), sigma.clone()))
    return results


def _route(monkeypatch: pytest.MonkeyPatch, route: str) -> object:
    """Input layout for a route: "plain" (torch's kernel), "fast-nchw" (normlab's channels-first
    path, forced on small input), "channels-last". Batch renorm must (not) call normlab's
    batch-norm function accordingly: checked when the test ends. "device-nchw" and
    "device-channels-last": the routes taken on accelerators (:func:`accelerator_routes`), which
    must call the accelerators' step (torch's training-mode kernel)."""
    from normlab.functional import _core, _fast, batch_variants

    if route.startswith("device"):
        _route_contexts.enter_context(_core.accelerator_routes())
    if route == "fast-nchw":
        monkeypatch.setattr(_fast, "_MIN_NUMEL", 1)
        monkeypatch.setattr(_fast, "_MIN_ROW", 1)
    calls: list[int] = []

    class Spy(_fast.BatchNormTrain):
        @classmethod
        def apply(cls, *args):  # type: ignore[no-untyped-def, override]
            calls.append(1)
            return super().apply(*args)

    device_calls: list[int] = []
    on_device = batch_variants._renorm_on_device

    def device_spy(*args):  # type: ignore[no-untyped-def]
        device_calls.append(1)
        return on_device(*args)

    monkeypatch.setattr(batch_variants, "BatchNormTrain", Spy)
    monkeypatch.setattr(batch_variants, "_renorm_on_device", device_spy)
    expected = (route in ("fast-nchw", "channels-last"), route.startswith("device"))
    _route_checks.append(lambda: (bool(calls), bool(device_calls)) == expected)
    return torch.channels_last if route.endswith("channels-last") else torch.contiguous_format


_route_checks: list[object] = []
_route_contexts = contextlib.ExitStack()  # the accelerator routes, left when the test ends


@pytest.fixture(autouse=True)
def _check_routes() -> object:
    _route_checks.clear()
    with _route_contexts:
        yield
    assert all(check() for check in _route_checks), "batch renorm took the wrong route"  # type: ignore[operator]


ROUTES = ["plain", "fast-nchw", "channels-last", "device-nchw", "device-channels-last"]


@pytest.mark.parametrize("route", ROUTES)
def test_batch_renorm_matches_the_paper_algorithm_with_its_schedule(
    monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """On every route (torch's kernel; one statistics pass feeding normlab's batch-norm function
    on channels-first and channels-last input)."""
    fmt = _route(monkeypatch, route)
    layer = nl.BatchRenorm2d(
        3,
        momentum=0.3,
        r_max=2.0,
        d_max=0.4,
        warmup_steps=2,
        r_max_steps=6,
        d_max_steps=4,
        dtype=torch.float64,
    )
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    # non-stationary batches (mean and scale drifting up, then collapsing), so that r and d hit
    # their upper clips, then their lower ones
    batches = [
        (
            _x((4, 3, 3, 3), s, shift=0.7 * s) * (1 + 0.3 * s)
            if s < 5
            else _x((4, 3, 3, 3), s, shift=-2.0 * s) * 0.25,
            _x((4, 3, 3, 3), 100 + s),
        )
        for s in range(8)
    ]
    limits = []
    for step in range(8):
        r = 1.0 if step < 2 else min(2.0, 1 + (step - 2) / 4)
        d = 0.0 if step < 2 else min(0.4, 0.4 * (step - 2) / 2)
        limits.append((r, d))
    reference = _brn_reference(
        batches, layer.weight.detach(), layer.bias.detach(), 1e-5, 0.3, limits
    )
    clipped = 0
    for (x, gy), (y_ref, grads_ref, mu, sigma), lim in zip(batches, reference, limits, strict=True):
        assert layer.current_limits() == pytest.approx(lim)
        xr = x.contiguous(memory_format=fmt).requires_grad_()  # type: ignore[call-overload]
        y = layer.train()(xr)
        assert y.is_contiguous(memory_format=fmt)  # type: ignore[call-overload]
        grads = torch.autograd.grad(y, (xr, layer.weight, layer.bias), gy)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        for a, b in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(layer.running_mean, mu)
        torch.testing.assert_close(layer.running_std, sigma)
        clipped += int(lim[0] < 2.0 and lim[0] > 1.0)
    assert clipped > 0
    assert int(layer.num_batches_tracked) == 8


@pytest.mark.parametrize("route", ["fast-nchw", "channels-last", "device-nchw"])
def test_batch_renorm_second_derivatives(monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    fmt = _route(monkeypatch, route)
    from normlab.functional.batch_variants import batch_renorm_unchecked

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 2, 3, generator=g, dtype=torch.float64) + 2).contiguous(
        memory_format=fmt  # type: ignore[call-overload]
    )
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    stats = (torch.full((3,), 1.0, dtype=torch.float64), torch.full((3,), 0.3, dtype=torch.float64))

    def renorm(x, w, b):  # type: ignore[no-untyped-def]
        # r and d stay clipped (r_max 1.5, d_max 0.2) under gradcheck's perturbations: constants,
        # as the layer treats them, so the numerical derivative is the analytical one
        mu, sigma = (t.clone() for t in stats)
        return batch_renorm_unchecked(x, mu, sigma, w, b, True, 0.1, 1e-5, 1.5, 0.2, "test")

    x.requires_grad_()
    assert torch.autograd.gradcheck(renorm, (x, w, b))
    assert torch.autograd.gradgradcheck(renorm, (x, w, b))


def test_batch_renorm_is_batch_norm_during_the_warm_up() -> None:
    ours = nl.BatchRenorm2d(4, momentum=0.1, dtype=torch.float64)  # 5000 warm-up steps
    ref = nn.BatchNorm2d(4, momentum=0.1, dtype=torch.float64)
    for s in range(3):
        x = _x((5, 4, 3, 3), s, shift=s).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y, yr = ours.train()(x), ref.train()(xr)
        assert torch.equal(y, yr) or torch.allclose(y, yr, rtol=1e-12, atol=1e-12)
        gy = _x((5, 4, 3, 3), 50 + s)
        for a, b in zip(
            torch.autograd.grad(y, (x, ours.weight), gy),
            torch.autograd.grad(yr, (xr, ref.weight), gy),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)


def test_batch_renorm_eval_uses_mean_and_std() -> None:
    layer = nl.BatchRenorm1d(3, momentum=0.5, dtype=torch.float64)
    for s in range(3):
        layer.train()(_x((8, 3), s))
    x = _x((5, 3), 9)
    expected = layer.weight * (x - layer.running_mean) / layer.running_std + layer.bias
    torch.testing.assert_close(layer.eval()(x), expected.detach())
    torch.testing.assert_close(layer.running_var, layer.running_std**2 - layer.eps)


def test_batch_renorm_schedule_travels_with_the_state_dict() -> None:
    a = nl.BatchRenorm1d(3, r_max=2.5, d_max=1.0, warmup_steps=1, r_max_steps=10, d_max_steps=5)
    for s in range(4):
        a.train()(_x((8, 3), s, dtype=torch.float32))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = nl.BatchRenorm1d(3)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.current_limits() == a.current_limits()
    assert b.current_limits()[0] == pytest.approx(1 + 1.5 * 3 / 9)


def test_batch_renorm_population_statistics() -> None:
    from normlab.surgery import recompute_population_stats

    model = nn.Sequential(nn.Linear(4, 3, bias=False), nl.BatchRenorm1d(3))
    x = _x((64, 4), 1, dtype=torch.float32)
    recompute_population_stats(model, [x[:40], x[40:]])
    with torch.no_grad():
        h = model[0](x).double()
    torch.testing.assert_close(model[1].running_mean.double(), h.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        model[1].running_std.double(), torch.sqrt(h.var(0) + 1e-5), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("n", "chunks"), [(12, [4, 4, 4]), (14, [4, 4, 4, 2]), (13, [4, 4, 5]), (4, [4])]
)
def test_ghost_batches_and_running_statistics(n: int, chunks: list[int]) -> None:
    layer = nl.GhostBatchNorm(3, virtual_batch_size=4, momentum=0.5, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    x = _x((n, 3, 5), 0).requires_grad_()
    y = layer.train()(x)
    parts, start = [], 0
    xr = x.detach().clone().requires_grad_()
    for size in chunks:
        parts.append(
            F.batch_norm(xr[start : start + size], None, None, layer.weight, layer.bias, True)
        )
        start += size
    ref = torch.cat(parts)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = _x((n, 3, 5), 1)
    torch.testing.assert_close(
        torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ref, xr, gy)[0], rtol=1e-9, atol=1e-9
    )
    full = x.detach()
    torch.testing.assert_close(layer.running_mean, 0.5 * full.mean((0, 2)))
    torch.testing.assert_close(layer.running_var, 0.5 + 0.5 * full.var((0, 2), unbiased=True))
    test = _x((2, 3, 5), 3)
    expected = F.batch_norm(
        test, layer.running_mean, layer.running_var, layer.weight, layer.bias, False
    )
    torch.testing.assert_close(layer.eval()(test), expected)


def test_ghost_without_running_stats_uses_virtual_batches_in_eval() -> None:
    layer = nl.GhostBatchNorm(
        2, virtual_batch_size=2, track_running_stats=False, affine=False
    ).eval()
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0], [10.0, 10.0], [14.0, 14.0]])
    assert torch.allclose(
        layer(x), torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]]), atol=1e-4
    )


def test_noisy_batch_norm_noise_distribution() -> None:
    """Santurkar et al.'s recipe: per step mu_t ~ U(-.5, .5), sigma_t ~ U(1, 1.25); per element
    m ~ U(mu_t +- .1), s ~ N(sigma_t, .1). Tolerances from the sample size (n = 4e4 per step)."""
    layer = nl.NoisyBatchNorm(4, seed=3)
    step_means, step_scales = [], []
    for _ in range(200):
        s, m = layer.draw_noise((100, 4, 10, 10), torch.device("cpu"), torch.float64)
        assert m.max() - m.min() <= 0.2 + 1e-12  # one step's m spans at most 2 x 0.1
        assert abs(s.std().item() - 0.1) < 5 * 0.1 / math.sqrt(2 * s.numel())  # sd of the sd
        step_means.append(m.mean().item())
        step_scales.append(s.mean().item())
    means, scales = torch.tensor(step_means), torch.tensor(step_scales)
    assert means.min() >= -0.5
    assert means.max() <= 0.5
    assert scales.min() >= 1.0 - 0.01
    assert scales.max() <= 1.25 + 0.01
    # over 200 steps the step distributions are U(-.5, .5) and U(1, 1.25): mean and spread
    assert abs(means.mean().item()) < 4 * math.sqrt(1 / 12 / 200)
    assert abs(means.std().item() - math.sqrt(1 / 12)) < 0.06
    assert abs(scales.mean().item() - 1.125) < 4 * 0.25 * math.sqrt(1 / 12 / 200)


def test_noisy_batch_norm_draws_the_same_stream_whatever_the_default_dtype() -> None:
    """The noise comes from float32 draws (as the compiled layer draws them), so the default
    dtype does not change which numbers a seed gives."""
    reference = nl.NoisyBatchNorm(2, seed=7).draw_noise(
        (3, 2, 4), torch.device("cpu"), torch.float64
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = nl.NoisyBatchNorm(2, seed=7).draw_noise((3, 2, 4), torch.device("cpu"), torch.float64)
    finally:
        torch.set_default_dtype(previous)
    for a, b in zip(got, reference, strict=True):
        assert torch.equal(a, b)


def test_noisy_batch_norm_mechanics() -> None:
    x = _x((16, 4, 5, 5), 0, dtype=torch.float32)
    layer, plain = nl.NoisyBatchNorm(4, seed=7), nn.BatchNorm2d(4)
    y = layer.train()(x)
    assert layer._noise is None  # nothing activation-sized kept between steps
    s, m = nl.NoisyBatchNorm(4, seed=7).draw_noise(x.shape, x.device, x.dtype)  # the same draw
    torch.testing.assert_close(y, s * plain.train()(x) + m)
    assert not torch.equal(layer(x), y)  # a new draw every step: time-varying
    layer.hold_noise = True
    held = layer(x)
    torch.testing.assert_close(layer(x), held)  # held across calls (e.g. landscape probes)
    expected = F.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False
    )
    torch.testing.assert_close(layer.eval()(x), expected)  # no noise at test time
    again = nl.NoisyBatchNorm(4, seed=7).train()
    torch.testing.assert_close(again(x), y)  # seeded: reproducible
    channel = nl.NoisyBatchNorm(4, per="channel").train()
    channel.hold_noise = True
    channel(x)
    assert channel._noise is not None
    assert channel._noise[0].shape == (16, 4, 1, 1)


@pytest.mark.parametrize(
    "shape",
    [(4, 3, 5, 6), (2, 3, 3, 3), (2, 3, 2, 3, 4), (2, 3, 3, 3, 3)],
    ids=["2d", "2d-c=h=w", "3d", "3d-c=d=h=w"],  # C == H == W: stored and noise shapes equal
)
def test_noisy_batch_norm_channels_last_noise_is_the_stream_in_memory_order(
    shape: tuple[int, ...],
) -> None:
    """Channels-last input: the per-element noise is the generator's stream laid out in memory
    order ((N, *spatial, C) draws, permuted), the output stays channels-last and equals
    ``s * batch_norm(x) + m`` with that noise."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = _x(shape, 0, dtype=torch.float32).contiguous(memory_format=fmt)
    layer = nl.NoisyBatchNorm(3, seed=5).train()
    y = layer(x)
    assert y.is_contiguous(memory_format=fmt)
    g = torch.Generator().manual_seed(5)
    u_mu, u_sigma = (torch.rand((), generator=g, dtype=torch.float64).item() for _ in "ms")
    mu, sigma = -0.5 + u_mu, 1.0 + 0.25 * u_sigma
    stored = (shape[0], *shape[2:], shape[1])
    back = (0, len(shape) - 1, *range(1, len(shape) - 1))
    m = torch.empty(stored).uniform_(mu - 0.1, mu + 0.1, generator=g).permute(back)
    s = torch.empty(stored).normal_(sigma, 0.1, generator=g).permute(back)
    plain = F.batch_norm(x, None, None, layer.weight, layer.bias, True)
    torch.testing.assert_close(y, s * plain + m)


def test_mean_only_batch_norm() -> None:
    layer = nl.MeanOnlyBatchNorm(3, momentum=0.5, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    x = _x((8, 3, 4), 0).requires_grad_()
    y = layer.train()(x)
    torch.testing.assert_close(y.mean((0, 2)), layer.bias.detach())
    torch.testing.assert_close(y.std((0, 2)), x.detach().std((0, 2)))  # only the mean changes
    (g,) = torch.autograd.grad(y, x, _x((8, 3, 4), 1))
    torch.testing.assert_close(
        g.sum((0, 2)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(layer.running_mean, 0.5 * x.detach().mean((0, 2)))
    test = _x((2, 3, 4), 2)
    torch.testing.assert_close(
        layer.eval()(test),
        (test - layer.running_mean.view(1, 3, 1) + layer.bias.view(1, 3, 1)).detach(),
    )


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (
            lambda: nl.BatchRenorm2d(3, r_max=0.5),
            ValueError,
            r"BatchRenorm2d: argument 'r_max' must be a finite float >= 1 \(r is clipped to \[1/r_max, "
            r"r_max\]\), got 0\.5\. Fix: pass e\.g\. r_max=3\.0",
        ),
        (
            lambda: nl.BatchRenorm2d(3, d_max=-1),
            ValueError,
            r"argument 'd_max' must be a finite float >= 0",
        ),
        (
            lambda: nl.BatchRenorm2d(3, warmup_steps=100, r_max_steps=50),
            ValueError,
            r"argument 'r_max_steps' must be >= warmup_steps=100 \(the ramp starts after the warm-up\), got 50",
        ),
        (
            lambda: nl.BatchRenorm2d(3, warmup_steps=-1),
            ValueError,
            r"argument 'warmup_steps' must be an int >= 0",
        ),
        (
            lambda: nl.GhostBatchNorm(3, virtual_batch_size=1),
            ValueError,
            r"GhostBatchNorm: argument 'virtual_batch_size' must be at least 2 \(statistics of one sample "
            r"have zero variance\), got 1\. Fix",
        ),
        (
            lambda: nl.NoisyBatchNorm(3, per="pixel"),
            ValueError,
            r"argument 'per' must be 'element' or 'channel', got 'pixel'",
        ),
        (
            lambda: nl.NoisyBatchNorm(3, std_range=(2.0, 1.0)),
            ValueError,
            r"argument 'std_range' must be \(low, high\) with low <= high",
        ),
        (
            lambda: nl.NoisyBatchNorm(3, mean_spread=-0.1),
            ValueError,
            r"NoisyBatchNorm: argument 'mean_spread' must be a number >= 0 \(a half-width / a "
            r"standard deviation\), got -0\.1\. Fix: pass e\.g\. mean_spread=0\.1",
        ),
        (
            lambda: nl.NoisyBatchNorm(3, std_spread=float("nan")),
            ValueError,
            r"argument 'std_spread' must be a number >= 0 .*, got nan\. Fix: pass e\.g\. std_sp",
        ),
    ],
)
def test_errors(make, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match):
        make()


def test_ghost_needs_a_full_virtual_batch_in_training() -> None:
    with pytest.raises(
        ValueError,
        match=r"GhostBatchNorm: the batch size must be at least "
        r"virtual_batch_size=4, got 3 \(input shape \(3, 3\)\)\. Fix: use larger batches",
    ):
        nl.GhostBatchNorm(3, virtual_batch_size=4).train()(torch.randn(3, 3))


@pytest.mark.parametrize(
    "route", ["fast-nchw", "fast-nchw-mixed", "fast-nchw-off-centre", "channels-last"]
)
@pytest.mark.parametrize("n", [12, 13, 14])
def test_ghost_fast_routes_match_the_grouped_route(
    monkeypatch: pytest.MonkeyPatch, route: str, n: int
) -> None:
    """Large NCHW virtual batches get normlab's own statistics per virtual batch, channels-last
    ones torch's kernel, each written into a slice of one output, with pooled running
    statistics ("mixed": the 2-sample remainder of n=14 is too small for normlab's statistics and
    takes torch's kernel; "off-centre": ~30 std off zero, torch's exactly centred reductions):
    outputs, gradients and buffers equal the grouped route's (tested against F.batch_norm
    above)."""
    from normlab.functional import _fast

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layer = nl.GhostBatchNorm(3, virtual_batch_size=4, momentum=0.5, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
        x = x.detach().clone().requires_grad_()
        y = layer.train()(x)
        grads = torch.autograd.grad(y, [x, layer.weight, layer.bias], _x(tuple(x.shape), 1))
        return (y, *grads, layer.running_mean, layer.running_var)

    x = _x((n, 3, 5, 2), 0)
    if route.endswith("off-centre"):
        x = x + 30 * x.std()
    reference = run(x)
    groups: list[int] = []
    if route.startswith("fast-nchw"):
        moments = _fast._batch_moments
        monkeypatch.setattr(_fast, "_MIN_NUMEL", x[:4].numel() if route.endswith("mixed") else 1)
        monkeypatch.setattr(_fast, "_MIN_ROW", 1)
        monkeypatch.setattr(
            _fast, "_batch_moments", lambda t: (groups.append(t.shape[0]), moments(t))[1]
        )
        assert _fast.use_fast_batch_stats(x[:4])
        got = run(x)
        sizes = {12: [4, 4, 4], 13: [4, 4, 5], 14: [4, 4, 4, 2]}[n]
        assert groups == [s for s in sizes if not route.endswith("mixed") or s >= 4]
    else:
        got = run(x.contiguous(memory_format=torch.channels_last))
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("route", ["fast-nchw", "channels-last"])
def test_ghost_per_group_gradients_and_second_derivatives(
    monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """gradcheck / gradgradcheck of the per-virtual-batch function on both of its layouts (NCHW:
    normlab's statistics per group, thresholds lowered so that these small groups take it)."""
    from normlab.functional import _fast

    if route == "fast-nchw":
        monkeypatch.setattr(_fast, "_MIN_NUMEL", 1)
        monkeypatch.setattr(_fast, "_MIN_ROW", 1)
    layer = nl.GhostBatchNorm(3, virtual_batch_size=2, dtype=torch.float64).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    x = torch.randn(5, 3, 2, 3, generator=g, dtype=torch.float64) + 2
    fmt = torch.channels_last if route == "channels-last" else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    x.requires_grad_()
    spy = _fast._per_group_forward
    calls: list[int] = []
    monkeypatch.setattr(_fast, "_per_group_forward", lambda *a: (calls.append(1), spy(*a))[1])

    from normlab.functional.batch_variants import ghost_batch_norm_unchecked

    def ghost(x, w, b):  # type: ignore[no-untyped-def]
        return ghost_batch_norm_unchecked(x, None, None, w, b, True, 0.1, 1e-5, 2, "test")

    assert torch.autograd.gradcheck(ghost, (x, layer.weight, layer.bias))
    assert torch.autograd.gradgradcheck(ghost, (x, layer.weight, layer.bias))
    assert ghost(x, layer.weight, layer.bias).is_contiguous(memory_format=fmt)
    assert calls  # the per-group function ran


@pytest.mark.parametrize(
    ("warmup", "r_end", "d_end"), [(0, 0, 0), (0, 3, 5), (2, 2, 2), (2, 2, 6), (3, 7, 3), (0, 0, 4)]
)
def test_renorm_limits_in_tensor_ops_equal_the_host_schedule(
    warmup: int, r_end: int, d_end: int
) -> None:
    """The ramp used under torch.compile and on accelerators (six tensor ops, zero-length ramps
    dividing by zero) gives the host's float schedule at every step."""
    layer = nl.BatchRenorm2d(
        2, r_max=3.0, d_max=5.0, warmup_steps=warmup, r_max_steps=r_end, d_max_steps=d_end
    )
    for step in range(10):
        layer.num_batches_tracked.fill_(step)
        traced = layer._traced_limits()
        assert traced.dtype == torch.float64
        assert traced.tolist() == pytest.approx(layer.current_limits(), rel=1e-15, abs=1e-15)
