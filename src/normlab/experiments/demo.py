"""The built-in demo: an MLP on the digits, with and without batch norm.

It is the setting of Ioffe & Szegedy's MNIST figure scaled down: three fully connected sigmoid
layers of 100 units, plain SGD, mini-batches of 60, inputs standardized with statistics of the
training split only. Both networks see identical initial weights (per layer shape) and batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab._checks import check_positive_int, fail
from normlab.data import load_digits_split
from normlab.nn import InputStandardizer, get_norm_layer

__all__ = ["DemoConfig", "DemoResult", "build_mlp", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo` (defaults finish in a few seconds on one core)."""

    epochs: int = 10
    batch_size: int = 60
    lr: float = 0.1
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    norms: tuple[str, ...] = ("none", "batch")
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.epochs, name="epochs", owner="DemoConfig")
        check_positive_int(self.batch_size, name="batch_size", owner="DemoConfig")
        if not self.lr > 0:
            fail(
                ValueError, "DemoConfig", "argument 'lr'", "> 0", repr(self.lr), "pass e.g. lr=0.1"
            )
        if self.activation not in _ACTIVATIONS:
            fail(
                ValueError,
                "DemoConfig",
                "argument 'activation'",
                f"one of {sorted(_ACTIVATIONS)}",
                repr(self.activation),
                "pick one of the listed activations",
            )


@dataclass(frozen=True)
class DemoResult:
    """Outcome of one network: test accuracy (eval mode) after each epoch, and wall time."""

    norm: str
    test_accuracy: tuple[float, ...] = field(default_factory=tuple)
    final_train_loss: float = float("nan")
    seconds: float = 0.0


_ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def build_mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    *,
    norm: str,
    activation: str = "relu",
) -> nn.Sequential:
    """Linear -> norm -> activation blocks, then a linear classifier.

    The linear layer before a norm has no bias: the norm's mean subtraction would cancel it.
    """
    layers: list[nn.Module] = []
    width = in_features
    for units in hidden:
        layers.append(nn.Linear(width, units, bias=norm == "none"))
        layers.append(get_norm_layer(norm, units, spatial_dims=0))
        layers.append(_ACTIVATIONS[activation]())
        width = units
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def run_demo(config: DemoConfig | None = None) -> list[DemoResult]:
    """Train one MLP per entry of ``config.norms`` on the digits; return their test accuracies.

    Deterministic for a given config: the same seed gives the same initial weights and batches to
    every network. Progress is logged at INFO level once per epoch.
    """
    cfg = config or DemoConfig()
    data = load_digits_split(seed=cfg.seed)
    standardize = InputStandardizer().fit(data.x_train)  # training split only
    x_train, x_test = standardize(data.x_train), standardize(data.x_test)
    results = []
    for norm in cfg.norms:
        torch.manual_seed(cfg.seed)
        model = build_mlp(x_train.shape[1], cfg.hidden, 10, norm=norm, activation=cfg.activation)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        order = torch.Generator().manual_seed(cfg.seed)
        accuracies = []
        loss = torch.tensor(float("nan"))
        start = time.perf_counter()
        for epoch in range(cfg.epochs):
            model.train()
            perm = torch.randperm(len(x_train), generator=order)
            # Full batches only: a tiny last batch would give noisy batch statistics.
            for i in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                loss = F.cross_entropy(model(x_train[idx]), data.y_train[idx])
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
            model.eval()
            accuracies.append(_accuracy(model, x_test, data.y_test))
            log.info(
                "norm=%s epoch %d/%d: train loss %.3f, test accuracy %.1f%%",
                norm,
                epoch + 1,
                cfg.epochs,
                loss.item(),
                100 * accuracies[-1],
            )
        results.append(
            DemoResult(norm, tuple(accuracies), loss.item(), time.perf_counter() - start)
        )
    return results
