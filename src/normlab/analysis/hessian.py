"""Curvature of the training loss: Hessian-vector products, top eigenvalues, trace, spectral density.

Solvers see only an ``hvp`` on flat float64 vectors (house rule 9), so they are tested on
quadratics with known spectra. The operator is built on the loss *in an explicit batch-norm
mode*: PyHessian and most tools force eval mode, whose curvature can differ from the one SGD
sees (batch statistics) by an order of magnitude (shared/reference/anchor-measurements.md).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from normlab._checks import check_choice, check_positive_int, fail
from normlab.analysis._common import LossFn, check_bn_mode, flat, measuring, unflat

__all__ = [
    "Eigenvalues",
    "Lanczos",
    "SpectralDensity",
    "Trace",
    "dense_hessian",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "lanczos",
    "spectral_density",
    "top_eigenvalues",
    "trace_estimate",
]

HVP = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Eigenvalues:
    """Top eigenvalues (largest first) with a bound on each one's error: for a symmetric operator
    there is an eigenvalue within ``error_bound[i]`` of ``values[i]`` (the Ritz residual)."""

    values: tuple[float, ...]
    error_bound: tuple[float, ...]
    matvecs: int


@dataclass(frozen=True)
class Trace:
    """Trace estimate with its estimated standard error and the number of matvecs used."""

    value: float
    std_error: float
    matvecs: int
    method: str


@dataclass(frozen=True)
class SpectralDensity:
    """Eigenvalue density from stochastic Lanczos quadrature: ``nodes`` (Ritz values) and
    ``weights`` (summing to 1), and a Gaussian-smoothed ``density`` on ``grid``."""

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    matvecs: int


# -- solvers on an hvp ------------------------------------------------------------------------


class Lanczos(NamedTuple):
    """Result of :func:`lanczos`: Ritz values (ascending) and the tridiagonal's eigenvectors, the
    last off-diagonal ``beta`` and ``perturbation``, an estimate of how far the products are from
    an exactly symmetric operator (rounding of float32 products, finite-difference error); the
    orthonormal ``basis`` (steps, n) of the Krylov space and the ``diagonal`` ``q_j . H q_j``."""

    values: Tensor
    vectors: Tensor
    beta: Tensor
    perturbation: float
    basis: Tensor
    diagonal: Tensor


def lanczos(
    hvp: HVP,
    n: int,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    start: Tensor | None = None,
) -> Lanczos:
    """``steps`` Lanczos iterations with full reorthogonalization from a random (or given) unit
    vector.

    In exact arithmetic ``q_i . H q_j = 0`` for ``i < j - 1``; the size of these coefficients
    (computed anyway by the reorthogonalization) measures the perturbation of the products, which
    the Ritz residual alone does not see.
    """
    q = (
        start.double().clone()
        if start is not None
        else torch.randn(n, generator=generator, dtype=torch.float64)
    )
    steps = min(steps, n)  # a Krylov space has at most n dimensions
    basis = torch.empty(steps, n, dtype=torch.float64)
    torch.div(q, q.norm(), out=basis[0])
    alphas, betas = [], []
    beta = torch.tensor(0.0, dtype=torch.float64)
    off_band = 0.0
    for j in range(steps):
        w = hvp(basis[j])
        stacked = basis[: j + 1]  # full reorthogonalization, twice for safety
        coefficients = stacked @ w
        alpha = coefficients[-1]
        alphas.append(alpha)
        off_band += float((coefficients[:-2] ** 2).sum())
        w = w - stacked.T @ coefficients
        w = w - stacked.T @ (stacked @ w)
        beta = w.norm()
        if j == steps - 1 or beta < 1e-12 * max(1.0, float(abs(alpha))):
            break
        betas.append(beta)
        torch.div(w, beta, out=basis[j + 1])
    m = len(alphas)
    t = torch.diag(torch.stack(alphas))
    if m > 1:
        off = torch.stack(betas[: m - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    return Lanczos(
        values, vectors, beta, math.sqrt(2 * off_band), basis[:m].clone(), torch.stack(alphas)
    )


def top_eigenvalues(
    hvp: HVP,
    n: int,
    k: int = 1,
    *,
    steps: int | None = None,
    seed: int = 0,
    method: Literal["lanczos", "power"] = "lanczos",
    tol: float = 1e-6,
) -> Eigenvalues:
    """The ``k`` algebraically largest eigenvalues of the symmetric operator ``hvp``.

    ``"lanczos"`` (default): ``steps`` iterations (default ``min(n, 3k + 20)``), full
    reorthogonalization; error bound ``|beta_m * s_{m,i}|`` (the Ritz residual) plus the
    estimated perturbation of the products (:class:`Lanczos`). ``"power"``: power iteration with
    deflation, stopping when the Rayleigh quotient changes by less than ``tol`` (relative); its
    bound is the residual norm ``||H v - lambda v||``.
    """
    check_positive_int(k, name="k", owner="top_eigenvalues")
    check_choice(method, ("lanczos", "power"), name="method", owner="top_eigenvalues")
    generator = torch.Generator().manual_seed(seed)
    if method == "power":
        return _power(hvp, n, k, generator, tol, steps or 100)
    m = min(n, steps or 3 * k + 20)
    run = lanczos(hvp, n, m, generator=generator)
    order = torch.argsort(run.values, descending=True)[:k]
    bounds = (run.beta * run.vectors[-1, order]).abs() + run.perturbation
    return Eigenvalues(tuple(run.values[order].tolist()), tuple(bounds.tolist()), len(run.values))


def _power(
    hvp: HVP, n: int, k: int, generator: torch.Generator, tol: float, max_steps: int
) -> Eigenvalues:
    found: list[Tensor] = []
    values, bounds, matvecs = [], [], 0
    for _ in range(k):
        v = torch.randn(n, generator=generator, dtype=torch.float64)
        lam = torch.tensor(0.0, dtype=torch.float64)
        for _ in range(max_steps):
            for u in found:  # deflation: stay orthogonal to the eigenvectors found
                v = v - torch.dot(u, v) * u
            v = v / v.norm()
            hv = hvp(v)
            matvecs += 1
            new = torch.dot(v, hv)
            done = abs(new - lam) <= tol * max(abs(float(new)), 1e-12)
            lam, v_next = new, hv
            if done:
                break
            v = v_next
        values.append(float(lam))
        bounds.append(float((hvp(v) - lam * v).norm()))
        matvecs += 1
        found.append(v / v.norm())
    return Eigenvalues(tuple(values), tuple(bounds), matvecs)


def trace_estimate(
    hvp: HVP,
    n: int,
    matvecs: int = 60,
    *,
    seed: int = 0,
    method: Literal["deflated", "hutch++", "hutchinson"] = "deflated",
) -> Trace:
    """Trace of the operator from ``matvecs`` products.

    ``"deflated"`` (default): 60 % of the products run Lanczos, whose Krylov space holds the
    dominant eigendirections -- their trace ``sum q_j . H q_j`` is exact and costs no extra
    product -- and Hutchinson estimates the rest on ``(I - QQ^T) H (I - QQ^T)``. A Hessian's few
    outlying eigenvalues carry most of its trace and nearly all of Hutchinson's variance, so
    this beats ``"hutch++"`` (Meyer et al. 2021: a random sketch ``Q = orth(H G)`` from a third of
    the products, a third more for ``tr(Q^T H Q)``) at equal cost. ``"hutchinson"``: plain
    Rademacher averages. The standard error comes from the spread of the Hutchinson samples
    (0 when the Krylov space is the whole space).
    """
    check_positive_int(matvecs, name="matvecs", owner="trace_estimate")
    check_choice(
        method, ("deflated", "hutch++", "hutchinson"), name="method", owner="trace_estimate"
    )
    generator = torch.Generator().manual_seed(seed)

    def rademacher(cols: int) -> Tensor:
        return torch.randint(0, 2, (n, cols), generator=generator, dtype=torch.float64) * 2 - 1

    def apply(block: Tensor) -> Tensor:
        return torch.stack([hvp(block[:, i]) for i in range(block.shape[1])], dim=1)

    def residual(q: Tensor, exact: float, samples: int, name: str) -> Trace:
        g = rademacher(samples)
        g_perp = g - q @ (q.T @ g)
        values = (g_perp * apply(g_perp)).sum(0)
        spread = float(values.std() / math.sqrt(samples)) if samples > 1 else math.inf
        return Trace(exact + float(values.mean()), spread, matvecs, name)

    if method == "deflated" and matvecs >= 3:
        steps = min(n, max(1, round(0.6 * matvecs)))
        run = lanczos(hvp, n, steps, generator=generator)
        exact = float(run.diagonal.sum())
        if run.basis.shape[0] >= n:  # the Krylov space is everything: the trace is exact
            return Trace(exact, 0.0, run.basis.shape[0], "deflated")
        return residual(run.basis.T, exact, matvecs - run.basis.shape[0], "deflated")
    if method == "hutchinson" or matvecs < 3 or n <= 3:
        g = rademacher(matvecs)
        samples = (g * apply(g)).sum(0)
        return Trace(
            float(samples.mean()),
            float(samples.std() / math.sqrt(matvecs)) if matvecs > 1 else math.inf,
            matvecs,
            "hutchinson",
        )
    third = max(1, matvecs // 3)
    q, _ = torch.linalg.qr(apply(rademacher(third)))  # (n, third)
    return residual(q, float(torch.trace(q.T @ apply(q))), matvecs - 2 * third, "hutch++")


def spectral_density(
    hvp: HVP,
    n: int,
    *,
    steps: int = 30,
    starts: int = 4,
    seed: int = 0,
    grid_points: int = 200,
    width: float | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019): ``starts`` Lanczos runs of ``steps``
    iterations; nodes are Ritz values, weights the squared first components, averaged. The smooth
    ``density`` uses Gaussians of ``width`` (default 1 % of the spectral range)."""
    generator = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(starts):
        run = lanczos(hvp, n, min(n, steps), generator=generator)
        nodes.append(run.values)
        weights.append(run.vectors[0] ** 2 / starts)
    node, weight = torch.cat(nodes), torch.cat(weights)
    low, high = float(node.min()), float(node.max())
    span = max(high - low, 1e-12)
    sigma = width or 0.01 * span
    grid = torch.linspace(low - 0.05 * span, high + 0.05 * span, grid_points, dtype=torch.float64)
    density = (
        weight[None, :] * torch.exp(-((grid[:, None] - node[None, :]) ** 2) / (2 * sigma**2))
    ).sum(1)
    density /= sigma * math.sqrt(2 * math.pi)
    return SpectralDensity(node, weight, grid, density, starts * min(n, steps))


def _hvp_options(options: dict[str, Any]) -> dict[str, Any]:
    """``hvp=``/``fd_eps=``/``stochastic=`` of the high-level functions, for
    :func:`hessian_vector_product` (whose ``method`` is the HVP method)."""
    allowed = {"hvp", "fd_eps", "stochastic"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        fail(
            TypeError,
            "hessian",
            "keyword arguments",
            f"among {sorted(allowed)}",
            repr(unknown),
            "pass hvp='autograd'|'finite_difference', fd_eps=..., stochastic='eval'|'fixed'",
        )
    out = dict(options)
    if "hvp" in out:
        out["method"] = out.pop("hvp")
    return out


# -- the Hessian of a model's loss --------------------------------------------------------------


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    bn_mode: str = "train",
    method: Literal["autograd", "finite_difference"] = "autograd",
    fd_eps: float = 1e-4,
    stochastic: Literal["fixed", "eval"] = "eval",
) -> Callable[[Callable[[HVP, int], Any]], Any]:
    """Run a solver on the Hessian of the sample-weighted mean loss over ``data``.

    Returns ``run(solver)``, which calls ``solver(hvp, n)`` inside the measurement context (see
    :func:`normlab.analysis._common.measuring`) and restores the model afterwards; ``hvp`` maps a
    flat float64 vector to ``H v``. ``method="autograd"`` uses double backward;
    ``"finite_difference"``: ``(grad(theta + eps v) - grad(theta - eps v)) / (2 eps)``.
    """
    owner = "hessian_vector_product"
    if method not in ("autograd", "finite_difference"):
        fail(
            ValueError,
            owner,
            "argument 'method' (hvp= in hessian_eigenvalues/trace/density)",
            "'autograd' or 'finite_difference'",
            repr(method),
            "pass method='autograd'",
        )

    def run(solver: Callable[[HVP, int], Any]) -> Any:
        with measuring(
            model, loss_fn, data, bn_mode=bn_mode, stochastic=stochastic, owner=owner
        ) as m:
            params = m.params
            n = sum(p.numel() for p in params)

            # (weight, differentiable gradients, indices of the parameters they belong to)
            Graph = tuple[float, list[Tensor], list[int]]
            cached: list[Graph] = []

            def graphs() -> Iterator[Graph]:
                """(weight, create_graph gradient) per batch, one batch at a time. A single
                batch's graph is built once and kept for every product (as PyHessian does); a
                loader's are rebuilt per product, so only one graph is alive at a time."""
                if cached:
                    yield from cached
                    return
                for batch in m.batches:
                    loss = m.loss(batch)
                    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                    # gradients that are constant in the parameters have no second derivative
                    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                    graph = (m.weight(batch), [grads[i] for i in used], used)
                    if len(m.batches) == 1:
                        cached.append(graph)
                    yield graph

            def hvp_autograd(v: Tensor) -> Tensor:
                vs = unflat(v, params)
                total: Tensor | None = None
                for weight, grads, used in graphs():
                    if not used:
                        continue
                    hv = torch.autograd.grad(
                        grads,
                        params,
                        grad_outputs=[vs[i] for i in used],
                        allow_unused=True,
                        retain_graph=True,
                    )
                    part = flat(hv, params)
                    total = part.mul_(weight) if total is None else total.add_(part, alpha=weight)
                return total if total is not None else torch.zeros(n, dtype=torch.float64)

            def hvp_fd(v: Tensor) -> Tensor:
                saved = [p.detach().clone() for p in params]
                step = fd_eps / max(float(v.norm()), 1e-30)
                try:
                    grads = []
                    for sign in (1.0, -1.0):
                        with torch.no_grad():
                            for p, s, d in zip(
                                params, saved, unflat(v * sign * step, params), strict=True
                            ):
                                p.copy_(s + d)
                        grads.append(flat(m.value_and_grad()[1], params))
                finally:
                    with torch.no_grad():
                        for p, s in zip(params, saved, strict=True):
                            p.copy_(s)
                return (grads[0] - grads[1]) / (2 * step)

            return solver(hvp_autograd if method == "autograd" else hvp_fd, n)

    return run


def dense_hessian(
    model: nn.Module, loss_fn: LossFn, batch: Any, *, bn_mode: str = "train"
) -> Tensor:
    """The full Hessian (float64, ``(n, n)`` over the trainable parameters in ``parameters()``
    order) of the loss on one ``(x, y)`` batch, by ``torch.autograd.functional.hessian`` on a
    float64 copy of the model -- an oracle for small models (n^2 memory, n backward passes).

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> dense_hessian(model, nn.functional.mse_loss, (x, torch.zeros(2, 1)))  # 2 X^T X / N
        tensor([[1., 0.],
                [0., 4.]], dtype=torch.float64)
    """
    check_bn_mode(bn_mode, "dense_hessian")
    ref = copy.deepcopy(model).double().train(bn_mode == "train")
    named = [(name, p.shape) for name, p in ref.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for p in ref.parameters() if p.requires_grad])
    x, y = batch
    x = x.double() if isinstance(x, Tensor) and x.is_floating_point() else x
    y = y.double() if isinstance(y, Tensor) and y.is_floating_point() else y

    def loss(t: Tensor) -> Tensor:
        params, start = {}, 0
        for name, shape in named:
            size = shape.numel()
            params[name] = t[start : start + size].view(shape)
            start += size
        return loss_fn(torch.func.functional_call(ref, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, theta)  # type: ignore[no-untyped-call,no-any-return]


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    k: int = 1,
    *,
    bn_mode: str = "train",
    steps: int | None = None,
    seed: int = 0,
    method: Literal["lanczos", "power"] = "lanczos",
    **options: Any,
) -> Eigenvalues:
    """Top-``k`` eigenvalues of the training-loss Hessian on ``data`` (a batch or a loader), with
    ``bn_mode`` explicit (default ``"train"``: batch statistics, running statistics untouched).
    ``options``: ``hvp="autograd"`` (double backward, default) or ``"finite_difference"``,
    ``fd_eps``, ``stochastic="eval"`` (dropout off) or ``"fixed"`` (one fixed mask).

    Example:
        >>> model = nn.Linear(3, 1)
        >>> data = (torch.randn(16, 3), torch.randn(16, 1))
        >>> ev = hessian_eigenvalues(model, nn.functional.mse_loss, data)
        >>> ev.values[0] > 0
        True
    """
    run = hessian_vector_product(model, loss_fn, data, bn_mode=bn_mode, **_hvp_options(options))
    return run(lambda hvp, n: top_eigenvalues(hvp, n, k, steps=steps, seed=seed, method=method))  # type: ignore[no-any-return]


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    matvecs: int = 60,
    bn_mode: str = "train",
    seed: int = 0,
    method: Literal["deflated", "hutch++", "hutchinson"] = "deflated",
    **options: Any,
) -> Trace:
    """Trace of the training-loss Hessian (Lanczos-deflated Hutchinson by default, see
    :func:`trace_estimate`), with its standard error."""
    run = hessian_vector_product(model, loss_fn, data, bn_mode=bn_mode, **_hvp_options(options))
    return run(lambda hvp, n: trace_estimate(hvp, n, matvecs, seed=seed, method=method))  # type: ignore[no-any-return]


def hessian_density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    bn_mode: str = "train",
    steps: int = 30,
    starts: int = 4,
    seed: int = 0,
    **options: Any,
) -> SpectralDensity:
    """Spectral density of the training-loss Hessian by stochastic Lanczos quadrature."""
    run = hessian_vector_product(model, loss_fn, data, bn_mode=bn_mode, **_hvp_options(options))
    return run(lambda hvp, n: spectral_density(hvp, n, steps=steps, starts=starts, seed=seed))  # type: ignore[no-any-return]
