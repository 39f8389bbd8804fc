"""Santurkar probes (closed forms on a quadratic, Taylor consistency with the Hessian) and
filter-normalized loss slices (against a hand loop on copies of the model)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nl
from normlab.analysis._common import without_norm_affine
from normlab.analysis.hessian import hessian_vector_product
from normlab.analysis.landscape import (
    DEFAULT_MULTIPLIERS,
    Every,
    landscape_probe,
    loss_surface,
    random_directions,
)


class Quadratic(nn.Module):
    """``L(theta) = 1/2 theta^T A theta``: every probe has a closed form."""

    def __init__(self, a: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.theta @ self.a @ self.theta


def _identity(out: torch.Tensor, y: object) -> torch.Tensor:
    return out


def test_probes_on_a_quadratic_have_their_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = b @ b.T + torch.eye(6, dtype=torch.float64)
    model = Quadratic(a, torch.randn(6, generator=g, dtype=torch.float64))
    theta = model.theta.detach().clone()
    probe = landscape_probe(model, _identity, (torch.zeros(1), None), lr=0.01)
    grad = a @ theta
    etas = [0.01 * m for m in DEFAULT_MULTIPLIERS]
    assert probe.step_sizes == pytest.approx(etas)
    expected = [float(0.5 * (theta - e * grad) @ a @ (theta - e * grad)) for e in etas]
    assert probe.losses == pytest.approx(expected, rel=1e-12)
    assert probe.loss == pytest.approx(float(0.5 * theta @ a @ theta), rel=1e-12)
    assert probe.grad_norm == pytest.approx(float(grad.norm()), rel=1e-12)
    changes = [e * float((a @ grad).norm()) for e in etas]
    assert probe.grad_changes == pytest.approx(changes, rel=1e-10)
    assert probe.gradient_predictiveness == pytest.approx((changes[0], changes[-1]), rel=1e-10)
    assert probe.loss_range == (min(probe.losses), max(probe.losses))
    beta = float((a @ grad).norm() / grad.norm())  # ||A g^|| at every step size
    assert probe.beta_smoothness == pytest.approx(beta, rel=1e-10)
    assert torch.equal(model.theta.detach(), theta)


def _bn_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nl.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def _batch(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_beta_smoothness_at_small_steps_is_the_hessian_along_the_gradient(bn_mode: str) -> None:
    model, batch = _bn_mlp(), _batch()
    model.train()
    model(batch[0])  # running statistics differ from batch statistics
    probe = landscape_probe(model, F.cross_entropy, batch, step_sizes=[1e-6], bn_mode=bn_mode)
    params = list(model.parameters())
    ref = copy.deepcopy(model).train(bn_mode == "train")
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = 0.0
    grad = torch.autograd.grad(F.cross_entropy(ref(batch[0]), batch[1]), list(ref.parameters()))
    g = torch.cat([t.reshape(-1) for t in grad])
    run = hessian_vector_product(model, F.cross_entropy, batch, bn_mode=bn_mode)
    hg = run(lambda hvp, n: hvp(g / g.norm()))
    assert probe.beta_smoothness == pytest.approx(float(hg.norm()), rel=1e-4)
    dense = run(lambda hvp, n: torch.stack([hvp(e) for e in torch.eye(n, dtype=torch.float64)]))
    assert probe.beta_smoothness <= float(torch.linalg.eigvalsh(dense).abs().max()) * (1 + 1e-4)
    # second-order Taylor of the loss along -g
    eta = 1e-3
    taylor = probe.loss - eta * float(g @ g) + 0.5 * eta**2 * float(g @ run(lambda hvp, n: hvp(g)))
    near = landscape_probe(model, F.cross_entropy, batch, step_sizes=[eta], bn_mode=bn_mode)
    assert near.losses[0] == pytest.approx(taylor, abs=10 * eta**3 * float(g.norm()) ** 3)
    assert [p.grad for p in params] == [None] * len(params)


def test_a_full_probe_costs_nine_passes_and_keeps_dropout_masks_fixed() -> None:
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    batch = (torch.randn(32, 5), torch.randint(0, 3, (32,)))
    probe = landscape_probe(model, F.cross_entropy, batch, lr=1e-9)  # tiny steps: masks must match
    assert len(calls) == probe.passes == 9
    assert max(probe.grad_changes) < 1e-5 * probe.grad_norm  # a new mask would change g by O(g)
    handle.remove()
    assert model.training


def test_parameter_filter_leaves_out_biases_and_norm_affine() -> None:
    model, batch = _bn_mlp(), _batch()
    full = landscape_probe(model, F.cross_entropy, batch, lr=0.1)
    weights_only = landscape_probe(
        model, F.cross_entropy, batch, lr=0.1, parameters=without_norm_affine
    )
    ref = copy.deepcopy(model)
    grads = torch.autograd.grad(F.cross_entropy(ref(batch[0]), batch[1]), list(ref.parameters()))
    norm = torch.cat(
        [g.reshape(-1) for g, p in zip(grads, ref.parameters(), strict=True) if p.dim() > 1]
    ).norm()
    assert weights_only.grad_norm == pytest.approx(float(norm), rel=1e-10)
    assert full.grad_norm > weights_only.grad_norm


def test_every_records_on_its_steps_with_the_current_learning_rate() -> None:
    model, batch = _bn_mlp(), _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    probes = Every(
        3, lambda b: landscape_probe(model, F.cross_entropy, b, lr=opt.param_groups[0]["lr"])
    )
    for step in range(7):
        probes(step, batch)
        opt.param_groups[0]["lr"] *= 0.5
    assert [s for s, _ in probes.records] == [0, 3, 6]
    assert probes.records[1][1].step_sizes[0] == pytest.approx(0.5 * 0.2 * 0.5**3)


def test_probe_leaves_the_model_as_it_was_even_when_the_loss_raises() -> None:
    model, batch = _bn_mlp(), _batch()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    landscape_probe(model, F.cross_entropy, batch, lr=0.5)
    calls = []

    def flaky(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        landscape_probe(model, flaky, batch, lr=0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert model[1].momentum == 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"landscape_probe: the step sizes must be given by exactly one of 'lr'"),
        (
            {"lr": 0.1, "step_sizes": [0.1]},
            r"exactly one of 'lr' .* got lr=0\.1, step_sizes=\[0\.1\]",
        ),
        ({"lr": -1.0}, r"argument 'lr' must be a positive finite number, got -1\.0"),
        (
            {"step_sizes": [0.1, 0.0]},
            r"'step_sizes' must be a non-empty sequence of positive finite",
        ),
        ({"step_sizes": []}, r"'step_sizes' must be a non-empty sequence"),
        (
            {"lr": 0.1, "stochastic": "random"},
            r"argument 'stochastic' must be 'eval' \(dropout off\) or 'fixed'",
        ),
    ],
)
def test_probe_errors(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        landscape_probe(_bn_mlp(), F.cross_entropy, _batch(), **kwargs)


def test_every_rejects_a_bad_period() -> None:
    with pytest.raises(ValueError, match="every"):
        Every(0, lambda b: None)


# -- loss surfaces ------------------------------------------------------------------------------


def _cnn() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nl.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4, 5),
    )


def _images(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def _hand_surface(model, directions, coords, data, train):  # type: ignore[no-untyped-def]
    """The loop loss-landscapes runs, on a copy (float64 accumulation for the reference)."""
    out = torch.empty(len(coords), len(coords), dtype=torch.float64)
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            ref = copy.deepcopy(model).train(train)
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    p += a * directions[0].get(name, 0) + b * directions[1].get(name, 0)
                out[i, j] = F.cross_entropy(ref(data[0]), data[1]).item()
    return out


@pytest.mark.parametrize(("bn_mode", "memory_format"), [("train", "auto"), ("eval", "preserve")])
def test_surface_matches_a_hand_loop_and_leaves_the_model_alone(
    bn_mode: str, memory_format: str
) -> None:
    model, data = _cnn(), _images()
    model.train()
    model(data[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    surface = loss_surface(
        model,
        F.cross_entropy,
        data,
        steps=5,
        distance=0.5,
        bn_mode=bn_mode,
        memory_format=memory_format,
        progress=lambda done, total: rows.append((done, total)),
    )
    assert rows == [(i, 5) for i in range(1, 6)]
    coords = surface.coordinates[0].tolist()
    assert coords == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5])
    hand = _hand_surface(model, surface.directions, coords, data, bn_mode == "train")
    torch.testing.assert_close(surface.loss, hand, rtol=1e-5, atol=1e-6)
    assert surface.loss[2, 2].item() == surface.center_loss
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())  # the channels-last hooks are gone


def test_one_dimensional_surface_over_a_loader_is_the_sample_weighted_mean() -> None:
    model, (x, y) = _cnn(), _images(30)
    direction = random_directions(model, 1, seed=5)
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    both = loss_surface(model, F.cross_entropy, loader, direction, steps=3, bn_mode="eval")
    parts = [
        loss_surface(model, F.cross_entropy, b, direction, steps=3, bn_mode="eval").loss
        for b in loader
    ]
    torch.testing.assert_close(both.loss, (20 * parts[0] + 10 * parts[1]) / 30)


def test_filter_normalized_directions() -> None:
    model = _cnn()
    (d,) = random_directions(model, 1, seed=1)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if p.dim() > 1:
            torch.testing.assert_close(
                d[name].reshape(p.shape[0], -1).norm(dim=1),
                p.detach().reshape(p.shape[0], -1).norm(dim=1),
            )
        else:
            assert torch.count_nonzero(d[name]) == 0, name  # biases and BN affine stay put
    (w,) = random_directions(model, 1, bias_and_norm="weights")
    assert torch.equal(w["1.weight"], params["1.weight"].detach())
    (r,) = random_directions(model, 1, bias_and_norm="random", normalization="layer")
    assert r["0.bias"].norm().item() == pytest.approx(params["0.bias"].norm().item(), rel=1e-5)
    assert r["0.weight"].norm().item() == pytest.approx(params["0.weight"].norm().item(), rel=1e-5)
    big = nn.Linear(100, 100)
    (raw,) = random_directions(big, 1, normalization="none", seed=2)
    n = raw["weight"].numel()  # Gaussian, not U[0, 1) (loss-landscapes#4): mean 0, std 1
    assert abs(raw["weight"].mean().item()) < 5 / n**0.5
    assert raw["weight"].std().item() == pytest.approx(1.0, abs=5 / (2 * n) ** 0.5)
    a, b = random_directions(model, 2, seed=9)
    assert not torch.equal(a["0.weight"], b["0.weight"])
    assert torch.equal(random_directions(model, 2, seed=9)[1]["0.weight"], b["0.weight"])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"directions": 3}, ValueError, r"argument 'directions' must be 1 or 2 .*, got 3"),
        (
            {"directions": [{"nope": torch.zeros(1)}]},
            ValueError,
            r"direction key 'nope' must be the name of a trainable parameter",
        ),
        (
            {"directions": [{"5.bias": torch.zeros(2)}]},
            ValueError,
            r"direction '5\.bias' must be of shape \(5,\), got shape \(2,\)",
        ),
        (
            {"directions": [torch.zeros(3)]},
            TypeError,
            r"each direction must be a \{parameter name: tensor\} dict",
        ),
        (
            {"distance": 0.0},
            ValueError,
            r"argument 'distance' must be a positive finite number, got 0\.0",
        ),
        ({"steps": 0}, ValueError, r"steps"),
        (
            {"memory_format": "nhwc"},
            ValueError,
            r"argument 'memory_format' must be 'auto' or 'preserve', got 'nhwc'",
        ),
        (
            {"normalization": "unit"},
            ValueError,
            r"argument 'normalization' must be 'filter' or 'layer' or 'none'",
        ),
        (
            {"bias_and_norm": "ignore"},
            ValueError,
            r"argument 'bias_and_norm' must be 'zero' or 'weights' or 'random'",
        ),
    ],
)
def test_surface_errors(kwargs: dict, exc: type, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(exc, match=match):
        loss_surface(_cnn(), F.cross_entropy, _images(), **kwargs)


class Tied(nn.Module):
    """An encoder and a decoder sharing one weight, the decoder weight-normalized."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4, bias=False)
        self.dec = nn.Linear(4, 6, bias=False)
        self.dec.weight = nn.Parameter(self.enc.weight.detach().T.clone())
        self.shared = nn.Linear(6, 6)
        self.again = self.shared  # the same module twice: its parameters appear once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(self.dec(torch.tanh(self.enc(self.shared(x)))))


def test_tied_and_parametrized_parameters_are_swapped_everywhere() -> None:
    torch.manual_seed(0)
    model = Tied().double()
    nn.utils.parametrizations.weight_norm(model.dec)
    data = (torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64))
    names = [n for n, _ in model.named_parameters()]
    assert "again.weight" not in names  # deduplicated: only the swap must reach both uses
    probe = landscape_probe(model, F.mse_loss, data, step_sizes=[0.3])
    ref = copy.deepcopy(model)
    grads = torch.autograd.grad(F.mse_loss(ref(data[0]), data[1]), list(ref.parameters()))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), grads, strict=True):
            p -= 0.3 * g
    assert probe.losses[0] == pytest.approx(F.mse_loss(ref(data[0]), data[1]).item(), rel=1e-12)
    assert isinstance(model.shared.weight, nn.Parameter)
    assert model.again.weight is model.shared.weight


@pytest.mark.parametrize("norm", [nl.L1BatchNorm, nl.LinfBatchNorm, nl.GhostBatchNorm])
def test_every_batch_statistics_layer_follows_bn_mode(norm) -> None:  # type: ignore[no-untyped-def]
    """Layers without running_var (Lp norms) or with their own rules must use batch statistics in
    train mode too -- a regression: they were left in eval mode, so their probes were a plain
    network's."""
    torch.manual_seed(0)
    layer = norm(8, 4) if norm is nl.GhostBatchNorm else norm(8)
    model = nn.Sequential(nn.Linear(5, 8), layer, nn.Tanh(), nn.Linear(8, 3)).double()
    batch = _batch(16)
    probe = landscape_probe(model, F.cross_entropy, batch, step_sizes=[0.1])
    ref = copy.deepcopy(model).train()
    for m in ref.modules():
        if hasattr(m, "momentum"):
            m.momentum = 0.0
    assert probe.loss == pytest.approx(F.cross_entropy(ref(batch[0]), batch[1]).item(), rel=1e-12)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    landscape_probe(model, F.cross_entropy, batch, step_sizes=[0.1])
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
