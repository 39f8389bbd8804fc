"""Hessian solvers against known spectra and the dense float64 Hessian of a small MLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nl
from normlab.analysis.hessian import (
    dense_hessian,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    lanczos,
    spectral_density,
    top_eigenvalues,
    trace_estimate,
)


def _quadratic(n: int = 60, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.cat(
        [
            torch.tensor([50.0, 20.0, 10.0, -3.0], dtype=torch.float64),
            torch.logspace(0, -3, n - 4, dtype=torch.float64),
        ]
    )
    a = q @ torch.diag(spectrum) @ q.T
    return (lambda v: a @ v), spectrum, a


def test_lanczos_top_eigenvalues_and_their_bounds() -> None:
    hvp, spectrum, _ = _quadratic()
    ev = top_eigenvalues(hvp, 60, k=3, steps=40)
    torch.testing.assert_close(
        torch.tensor(ev.values, dtype=torch.float64), spectrum[:3], rtol=1e-9, atol=1e-9
    )
    for value, bound, true in zip(ev.values, ev.error_bound, spectrum[:3].tolist(), strict=True):
        assert abs(value - true) <= bound + 1e-12
    few = top_eigenvalues(hvp, 60, k=1, steps=6)  # a small budget: the bound still covers the error
    assert abs(few.values[0] - 50.0) <= few.error_bound[0] + 1e-9


def test_power_iteration_with_deflation() -> None:
    hvp, _, _ = _quadratic()
    ev = top_eigenvalues(hvp, 60, k=2, method="power", tol=1e-10, steps=500)
    assert ev.values[0] == pytest.approx(50.0, rel=1e-6)
    assert ev.values[1] == pytest.approx(20.0, rel=1e-5)
    assert abs(ev.values[0] - 50.0) <= ev.error_bound[0] + 1e-9


@pytest.mark.parametrize("method", ["deflated", "hutch++", "hutchinson"])
def test_trace_estimates_cover_the_truth(method: str) -> None:
    hvp, spectrum, _ = _quadratic()
    true = spectrum.sum().item()
    for seed in range(10):
        t = trace_estimate(hvp, 60, matvecs=30, seed=seed, method=method)
        assert t.method == method
        assert abs(t.value - true) <= 4 * t.std_error + 1e-9


def _median_error(hvp, true: float, method: str) -> float:  # type: ignore[no-untyped-def]
    errors = [
        abs(trace_estimate(hvp, 60, 30, seed=s, method=method).value - true) for s in range(10)
    ]
    return sorted(errors)[5]


def test_deflation_beats_hutch_plus_plus_beats_hutchinson() -> None:
    hvp, spectrum, _ = _quadratic()  # a few outliers and a decaying bulk, like a Hessian
    true = spectrum.sum().item()
    deflated, plus, plain = (
        _median_error(hvp, true, m) for m in ("deflated", "hutch++", "hutchinson")
    )
    assert deflated < 0.75 * plus
    assert plus < 0.5 * plain


def test_a_krylov_space_that_spans_everything_gives_the_exact_trace() -> None:
    hvp, spectrum, _ = _quadratic(n=10)
    t = trace_estimate(hvp, 10, matvecs=25)
    assert t.value == pytest.approx(spectrum.sum().item(), rel=1e-12)
    assert t.std_error == 0.0


def test_lanczos_asked_for_more_steps_than_dimensions_stops_at_the_dimension() -> None:
    hvp, spectrum, _ = _quadratic(n=10)
    run = lanczos(hvp, 10, 25, generator=torch.Generator().manual_seed(1))
    assert run.basis.shape == (10, 10)
    torch.testing.assert_close(run.basis @ run.basis.T, torch.eye(10, dtype=torch.float64))
    torch.testing.assert_close(run.values, spectrum.sort().values, rtol=1e-9, atol=1e-9)


def test_the_bound_covers_the_rounding_of_float32_products() -> None:
    _, spectrum, a = _quadratic()
    a32 = a.float()
    ev = top_eigenvalues(lambda v: (a32 @ v.float()).double(), 60, k=2, steps=40)
    for value, bound, true in zip(ev.values, ev.error_bound, spectrum[:2].tolist(), strict=True):
        assert abs(value - true) > 1e-9  # float32 products: the Ritz residual alone is too small
        assert abs(value - true) <= bound


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda h: trace_estimate(h, 60, method="exact"),
            r"trace_estimate: argument 'method' must be 'deflated' or 'hutch\+\+' or 'hutchinson', got 'exact'",
        ),
        (lambda h: trace_estimate(h, 60, matvecs=0), r"matvecs"),
        (
            lambda h: top_eigenvalues(h, 60, method="arnoldi"),
            r"top_eigenvalues: argument 'method' must be 'lanczos' or 'power', got 'arnoldi'",
        ),
    ],
)
def test_solver_errors(call, match) -> None:  # type: ignore[no-untyped-def]
    hvp, _, _ = _quadratic()
    with pytest.raises(ValueError, match=match):
        call(hvp)


def test_spectral_density_moments() -> None:
    hvp, spectrum, _ = _quadratic()
    density = spectral_density(hvp, 60, steps=30, starts=8)
    assert density.weights.sum().item() == pytest.approx(1.0, abs=1e-9)
    mean = (density.weights * density.nodes).sum().item()
    assert (
        abs(mean - spectrum.mean().item())
        < 0.5 * spectrum.abs().max().item() / 8**0.5 / 60**0.5 * 3
    )
    assert density.nodes.max().item() == pytest.approx(50.0, rel=1e-6)
    dx = (density.grid[1] - density.grid[0]).item()
    assert (density.density.sum() * dx).item() == pytest.approx(1.0, abs=0.02)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nl.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()


def test_dense_hessian_of_least_squares_is_2_xtx_over_n() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    model = nn.Linear(4, 1).double()
    h = dense_hessian(model, F.mse_loss, (x, torch.randn(20, 1, generator=g, dtype=torch.float64)))
    xb = torch.cat([x, torch.ones(20, 1, dtype=torch.float64)], 1)  # weight, then bias
    torch.testing.assert_close(h, 2 * xb.T @ xb / 20)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_model_hessian_matches_the_dense_hessian(bn_mode: str) -> None:
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(32, 3, generator=g, dtype=torch.float64),
        torch.randn(32, 2, generator=g, dtype=torch.float64),
    )
    model.train()
    model(x)  # give the running statistics something
    dense = dense_hessian(model, F.mse_loss, (x, y), bn_mode=bn_mode)
    eig = torch.linalg.eigvalsh(dense)
    n = dense.shape[0]
    ev = hessian_eigenvalues(model, F.mse_loss, (x, y), k=2, bn_mode=bn_mode, steps=n)
    torch.testing.assert_close(
        torch.tensor(ev.values, dtype=torch.float64), eig.flip(0)[:2], rtol=1e-8, atol=1e-10
    )
    tr = hessian_trace(model, F.mse_loss, (x, y), matvecs=3 * n, bn_mode=bn_mode)
    assert tr.value == pytest.approx(torch.trace(dense).item(), rel=1e-8)  # Q spans everything
    fd = hessian_eigenvalues(
        model, F.mse_loss, (x, y), bn_mode=bn_mode, steps=n, hvp="finite_difference", fd_eps=1e-5
    )
    assert fd.values[0] == pytest.approx(eig[-1].item(), rel=1e-6)


def test_finite_differences_agree_with_autograd() -> None:
    model = _mlp()
    data = (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    exact = hessian_vector_product(model, F.mse_loss, data)(lambda hvp, n: hvp(v))
    approx = hessian_vector_product(
        model, F.mse_loss, data, method="finite_difference", fd_eps=1e-5
    )(lambda hvp, n: hvp(v))
    torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-6)


def test_a_loader_is_the_sample_weighted_mean() -> None:
    model = _mlp()
    g = torch.Generator().manual_seed(2)
    x, y = (
        torch.randn(30, 3, generator=g, dtype=torch.float64),
        torch.randn(30, 2, generator=g, dtype=torch.float64),
    )
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]  # unequal batches
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=torch.float64)
    per_batch = [
        hessian_vector_product(model, F.mse_loss, b, bn_mode="eval")(lambda hvp, n: hvp(v))
        for b in loader
    ]
    both = hessian_vector_product(model, F.mse_loss, loader, bn_mode="eval")(lambda hvp, n: hvp(v))
    torch.testing.assert_close(both, (20 * per_batch[0] + 10 * per_batch[1]) / 30)
    density = hessian_density(model, F.mse_loss, loader, bn_mode="eval", steps=10, starts=2)
    assert density.weights.sum().item() == pytest.approx(1.0)


def test_nothing_about_the_model_changes_even_on_error() -> None:
    model = _mlp()
    model.train()
    model[3].weight.requires_grad_(False)
    data = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    model(data[0]).sum().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    modes, rng = [m.training for m in model.modules()], torch.random.get_rng_state()
    hessian_eigenvalues(model, F.mse_loss, data, steps=5)
    hessian_trace(model, F.mse_loss, data, matvecs=6, bn_mode="eval")

    def broken(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        hessian_eigenvalues(model, broken, data)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == modes
    assert not model[3].weight.requires_grad
    assert torch.equal(torch.random.get_rng_state(), rng)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda m, d: hessian_eigenvalues(m, F.mse_loss, []),
            ValueError,
            r"hessian_vector_product: 'data' must be at least one \(input, target\) batch, got no batch",
        ),
        (
            lambda m, d: hessian_eigenvalues(m, lambda o, y: (o - y) ** 2, d),
            ValueError,
            r"the loss must be a scalar tensor, got Tensor of shape \(8, 2\)\. Fix: reduce it",
        ),
        (
            lambda m, d: hessian_eigenvalues(m.requires_grad_(False), F.mse_loss, d),
            ValueError,
            r"the model's parameters must be at least one with requires_grad=True, got none",
        ),
        (
            lambda m, d: hessian_eigenvalues(m, F.mse_loss, (d[0][:1], d[1][:1])),
            ValueError,
            r"a batch for bn_mode='train' must be one on which every batch norm can compute batch "
            r"statistics, got .* Fix: use bn_mode='eval'",
        ),
        (
            lambda m, d: hessian_trace(m, F.mse_loss, d, eps=1e-3),
            TypeError,
            r"hessian: keyword arguments must be among \['fd_eps', 'hvp', 'stochastic'\], got \['eps'\]",
        ),
        (
            lambda m, d: hessian_eigenvalues(m, F.mse_loss, d, hvp="exact"),
            ValueError,
            r"argument 'method' \(hvp= in hessian_eigenvalues/trace/density\) must be 'autograd' or 'finite_difference', got 'exact'",
        ),
        (
            lambda m, d: hessian_eigenvalues(m, F.mse_loss, d, bn_mode="inference"),
            ValueError,
            r"argument 'bn_mode' must be 'train' \(batch statistics, the function SGD optimizes\) or 'eval'",
        ),
    ],
)
def test_errors(call, exc, match) -> None:  # type: ignore[no-untyped-def]
    data = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    with pytest.raises(exc, match=match):
        call(_mlp(), data)
