"""RunConfig validation and the reference models built from the registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normlab.experiments.config import RunConfig
from normlab.experiments.models import build_model, count_parameters
from normlab.nn import DropConnectLinear


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"data": "cifar"}, r"RunConfig: argument 'data' must be 'digits' or"),
        ({"norm": "batchnorm"}, r"argument 'norm' must be"),
        ({"arch": "resnet"}, r"argument 'arch' must be 'mlp' or 'vgg' or 'dln', got 'resnet'"),
        ({"lr": 0.0}, r"argument 'lr' must be a positive finite number, got 0\.0"),
        ({"lr": math.inf}, r"argument 'lr' must be a positive finite number"),
        ({"dropout": "dropout"}, r"argument 'p' must be > 0 with dropout='dropout', got 0\.0"),
        (
            {"bn_momentum": 0.99, "ema_momenta": (0.0,)},
            r"'bn_momentum' and 'ema_momenta' must be in \(0, 1\]",
        ),
        ({"steps": 0}, r"steps"),
        (
            {"norm": "instance", "arch": "mlp"},
            r"argument 'norm' must be a norm that works on feature vectors .* got norm='instance' "
            r"with arch='mlp'.*use arch='vgg' or norm='layer'",
        ),
        (
            {"dropout": "dropconnect", "p": 0.5, "arch": "vgg"},
            r"argument 'dropout' must be 'dropout' or 'alpha' with arch='vgg'.*use arch='mlp'",
        ),
        ({"p": 1.0}, r"'p' and 'momentum' must be in \[0, 1\)"),
    ],
)
def test_config_rejects_bad_values(changes: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        RunConfig(**changes)


def test_config_round_trip_and_run_id() -> None:
    cfg = RunConfig(ema_momenta=(0.1, 0.9), norm="group", seed=3)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.run_id == RunConfig(ema_momenta=(0.1, 0.9), norm="group", seed=3).run_id
    assert cfg.run_id != RunConfig(ema_momenta=(0.1, 0.9), norm="group", seed=4).run_id
    assert cfg.run_id.startswith("digits-mlp-group-lr0.1-s3-")
    with pytest.raises(ValueError, match=r"the config's keys must be among .* got \['colour'\]"):
        RunConfig.from_dict({**cfg.to_dict(), "colour": "red"})


NORMS = [
    "none",
    "batch",
    "layer",
    "group",
    "renorm",
    "ghost",
    "l1",
    "linf",
    "weight",
    "ws_gn",
    "noisy",
    "instance",
]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(
    ("arch", "shape"),
    [("mlp", (1, 8, 8)), ("vgg", (1, 8, 8)), ("vgg", (1, 40)), ("dln", (1, 8, 8))],
)
def test_every_norm_fits_every_model(norm: str, arch: str, shape: tuple[int, ...]) -> None:
    if norm == "instance" and arch != "vgg":
        pytest.skip("instance norm needs positions (conv layers): RunConfig rejects it")
    cfg = RunConfig(arch=arch, norm=norm, width=16, depth=2, batch_size=128)
    model = build_model(cfg, shape, 10)
    model.train()
    out = model(torch.randn(32, *shape))
    assert out.shape == (32, 10)
    assert torch.isfinite(out).all()
    if arch == "dln":
        assert not any(isinstance(m, (nn.ReLU, nn.Tanh)) for m in model.modules())


def test_initialisation_is_seeded_and_leaves_the_global_rng() -> None:
    state = torch.random.get_rng_state()
    a = build_model(RunConfig(seed=1), (1, 8, 8), 10)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model(RunConfig(seed=1), (1, 8, 8), 10)
    c = build_model(RunConfig(seed=2), (1, 8, 8), 10)
    assert torch.equal(a[1].weight, b[1].weight)
    assert not torch.equal(a[1].weight, c[1].weight)


@pytest.mark.parametrize(
    ("init", "std"),
    [
        ("glorot", lambda i, o: (2 / (i + o)) ** 0.5),
        ("he", lambda i, o: (2 / i) ** 0.5),
        ("lecun", lambda i, o: (1 / i) ** 0.5),
    ],
)
def test_initialisation_scales(init: str, std) -> None:  # type: ignore[no-untyped-def]
    model = build_model(RunConfig(init=init, width=512, depth=2, init_scale=2.0), (1, 16, 16), 10)
    w = model[4].weight  # the 512 x 512 hidden layer: 262144 weights, sample std within 1 %
    assert w.std().item() == pytest.approx(2.0 * std(512, 512), rel=0.01)
    assert model[4].bias is None  # a norm follows: no bias


def test_dropconnect_replaces_the_hidden_linear_layers() -> None:
    model = build_model(RunConfig(dropout="dropconnect", p=0.5, norm="none"), (1, 8, 8), 10)
    kinds = [type(m) for m in model]
    assert kinds.count(DropConnectLinear) == 3
    assert kinds.count(nn.ReLU) == 0  # the activation is inside each DropConnect layer
    assert isinstance(model[1].activation, nn.ReLU)
    assert type(model[-1]) is nn.Linear
    assert count_parameters(model) == 64 * 128 + 128 + 2 * (128 * 128 + 128) + 128 * 10 + 10


def test_batch_renorm_schedule_is_scaled_to_the_run() -> None:
    # with the paper's 5000-step warm-up a 1000-step run would be plain batch norm throughout
    model = build_model(RunConfig(norm="renorm", steps=1600), (1, 8, 8), 10)
    norms = [m for m in model.modules() if hasattr(m, "renorm_schedule")]
    assert norms
    for norm in norms:
        r_max, d_max, warmup, r_end, d_end = norm.renorm_schedule.tolist()
        assert (r_max, d_max, warmup, r_end, d_end) == (3.0, 5.0, 100.0, 800.0, 500.0)


@pytest.mark.parametrize("dropout", ["dropout", "dropconnect"])
def test_a_deep_linear_network_stays_linear_with_dropout(dropout: str) -> None:
    model = build_model(RunConfig(arch="dln", dropout=dropout, p=0.3, depth=2), (1, 8, 8), 10)
    kinds = [type(m).__name__ for m in model]
    assert ("Dropout" in kinds) == (dropout == "dropout")
    assert kinds.count("DropConnectLinear") == (2 if dropout == "dropconnect" else 0)
    model.eval()  # eval: dropout off, DropConnect's deterministic inference; linear in x
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(
        model(2 * x) - model(torch.zeros_like(x)), 2 * (model(x) - model(torch.zeros_like(x)))
    )
