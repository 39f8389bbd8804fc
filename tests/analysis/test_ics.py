"""Santurkar's ICS measure against a hand computation on copies of the model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nl
from normlab.analysis.ics import internal_covariate_shift


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nl.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(24, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (24,), generator=g
    )


def _layer_grad(model: nn.Module, batch, layer: str, train: bool) -> torch.Tensor:  # type: ignore[no-untyped-def]
    ref = copy.deepcopy(model).train(train)
    named = dict(ref.named_parameters())
    wanted = [p for n, p in named.items() if n.rpartition(".")[0] == layer]
    grads = torch.autograd.grad(F.cross_entropy(ref(batch[0]), batch[1]), wanted)
    return torch.cat([g.reshape(-1) for g in grads])


def _moved(model: nn.Module, deltas: dict[str, torch.Tensor], layers: list[str]) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.rpartition(".")[0] in layers:
                p += deltas[name]
    return out


def test_ics_matches_the_definition() -> None:
    model, batch = _mlp(), _batch()
    lr = 0.3
    ics = internal_covariate_shift(model, F.cross_entropy, batch, update=lr)
    order = ["0", "1", "3", "5"]
    assert [layer.name for layer in ics.layers] == order
    assert ics.passes == 4
    ref = copy.deepcopy(model).train()
    grads = torch.autograd.grad(F.cross_entropy(ref(batch[0]), batch[1]), list(ref.parameters()))
    deltas = {n: -lr * g for (n, _), g in zip(ref.named_parameters(), grads, strict=True)}
    for i, layer in enumerate(order):
        g = _layer_grad(model, batch, layer, True)
        g_after = _layer_grad(_moved(model, deltas, order[:i]), batch, layer, True)
        shift = ics[layer]
        assert shift.l2 == pytest.approx(float((g - g_after).norm()), rel=1e-9, abs=1e-15)
        cos = float(g @ g_after / (g.norm() * g_after.norm()))
        assert shift.cosine == pytest.approx(cos, rel=1e-9)
        assert shift.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
    assert ics.layers[0].l2 == 0.0
    assert ics.layers[0].cosine == 1.0
    assert ics.layers[-1].l2 > 0


def test_ics_is_zero_for_a_single_layer_and_when_earlier_layers_do_not_move() -> None:
    single = nn.Linear(4, 2)
    data = (torch.randn(8, 4), torch.randn(8, 2))
    (only,) = internal_covariate_shift(single, F.mse_loss, data, update=1.0).layers
    assert (only.l2, only.cosine) == (0.0, 1.0)
    model, batch = _mlp(), _batch()
    last = list(model[5].parameters())
    earlier = [p for p in model.parameters() if all(p is not q for q in last)]
    opt = torch.optim.SGD(
        [{"params": earlier, "lr": 0.0}, {"params": last, "lr": 0.5}], momentum=0.9
    )
    ics = internal_covariate_shift(model, F.cross_entropy, batch, update=opt)
    assert [layer.l2 for layer in ics.layers] == [0.0] * 4
    assert [layer.cosine for layer in ics.layers] == pytest.approx([1.0] * 4, abs=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda ps: torch.optim.Adam(ps, lr=0.01),
    ],
)
def test_an_optimizer_step_is_simulated_and_undone(make) -> None:  # type: ignore[no-untyped-def]
    model, batch = _mlp(), _batch()
    opt = make(model.parameters())
    for _ in range(2):  # give the optimizer state (momentum buffers, Adam moments)
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()  # the user's .grad is left in place
    grads = [p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    params = {k: v.clone() for k, v in model.state_dict().items()}
    via_optimizer = internal_covariate_shift(model, F.cross_entropy, batch, update=opt)
    # the same step taken for real, on copies
    twin_model = copy.deepcopy(model)
    twin = make(twin_model.parameters())
    twin.load_state_dict(copy.deepcopy(state))
    twin_model.train()
    for m in twin_model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = 0.0
    twin.zero_grad()
    F.cross_entropy(twin_model(batch[0]), batch[1]).backward()
    before = {n: p.detach().clone() for n, p in twin_model.named_parameters()}
    twin.step()
    deltas = {n: p.detach() - before[n] for n, p in twin_model.named_parameters()}
    via_deltas = internal_covariate_shift(model, F.cross_entropy, batch, update=deltas)
    for a, b in zip(via_optimizer.layers, via_deltas.layers, strict=True):
        assert a.l2 == pytest.approx(b.l2, rel=1e-9, abs=1e-15)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    after = opt.state_dict()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(
                torch.as_tensor(after["state"][key][name]), torch.as_tensor(tensor)
            ), name


@pytest.mark.parametrize(
    ("update", "exc", "match"),
    [
        (
            "fast",
            TypeError,
            r"argument 'update' must be a learning rate, a torch\.optim\.Optimizer or a \{name: step\} mapping, got str",
        ),
        (
            {"9.weight": torch.zeros(1)},
            ValueError,
            r"the keys of 'update' must be names of trainable parameters, got \['9\.weight'\]",
        ),
        (
            {"0.bias": torch.zeros(3)},
            ValueError,
            r"update\['0\.bias'\] must be of shape \(8,\), got shape \(3,\)",
        ),
    ],
)
def test_ics_errors(update, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match):
        internal_covariate_shift(_mlp(), F.cross_entropy, _batch(), update=update)
