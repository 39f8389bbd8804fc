"""mc_predict and activation_statistics."""

from __future__ import annotations

import math

import torch
from torch import nn

import normlab.nn as nl
from normlab.analysis import activation_statistics, is_stochastic, mc_predict


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(64, 64),
        nl.Dropout(0.2, seed=1),
        nn.Linear(64, 3),
    )
    model.train()
    for _ in range(3):
        model(torch.randn(32, 5))
    return model


def test_mc_predict_samples_only_the_stochastic_layers_and_restores_state() -> None:
    model = _model()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 5)
    rng = torch.random.get_rng_state()
    pred = mc_predict(model, x, samples=4000, generator_seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # batch norm stayed in eval: no statistics update
    with torch.no_grad():
        eval_out = model.eval()(x)
    assert torch.all(pred.variance > 0)
    # inverted dropout keeps E[output] for the last (linear) layer's input; tolerance 5 sd/sqrt(n)
    assert torch.all(
        (pred.mean - eval_out).abs() < 5 * pred.variance.sqrt() / math.sqrt(4000) + 0.05
    )
    again = mc_predict(model, x, samples=50, generator_seed=0)
    assert torch.equal(again.mean, mc_predict(model, x, samples=50, generator_seed=0).mean)


def test_stochastic_layers_are_recognised() -> None:
    assert is_stochastic(nn.Dropout())
    assert is_stochastic(nn.AlphaDropout())
    assert is_stochastic(nl.Dropout())
    assert is_stochastic(nl.DropConnectLinear(3, 2))
    assert not is_stochastic(nn.BatchNorm1d(3))
    assert not is_stochastic(nl.NoisyBatchNorm(3))  # a norm: stays in eval


def test_activation_statistics_dead_and_saturated_units() -> None:
    torch.manual_seed(0)
    dead = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with torch.no_grad():
        dead[0].bias[:4] = -100.0  # half of the units never fire
    stats = activation_statistics(dead, torch.randn(64, 4))
    assert stats[0].dead == 0.5
    saturated = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    with torch.no_grad():
        saturated[0].weight.mul_(100)
    (tanh,) = activation_statistics(saturated, torch.randn(256, 4))
    assert tanh.saturated > 0.9
    assert tanh.name == "1"
    custom = activation_statistics(
        dead, torch.randn(8, 4), select=lambda name, m: isinstance(m, nn.Linear)
    )
    assert [s.kind for s in custom] == ["Linear"]
    assert dead.training  # mode restored (was train)
