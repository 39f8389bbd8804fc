"""The built-in demo."""

from __future__ import annotations

import pytest

from normlab.experiments import DemoConfig, run_demo
from normlab.experiments.demo import build_mlp


def test_batch_norm_trains_faster_in_the_demo_setting() -> None:
    results = run_demo(DemoConfig(epochs=3))
    by_norm = {r.norm: r for r in results}
    assert set(by_norm) == {"none", "batch"}
    assert all(len(r.test_accuracy) == 3 for r in results)
    # Ioffe & Szegedy's claim in its own setting (sigmoid MLP, plain SGD): BN is far ahead early.
    assert by_norm["batch"].test_accuracy[-1] > by_norm["none"].test_accuracy[-1] + 0.3


def test_demo_is_deterministic() -> None:
    cfg = DemoConfig(epochs=1, norms=("batch",))
    assert run_demo(cfg)[0].test_accuracy == run_demo(cfg)[0].test_accuracy


def test_bias_is_dropped_before_a_norm() -> None:
    with_bn = build_mlp(4, (8,), 2, norm="batch")
    plain = build_mlp(4, (8,), 2, norm="none")
    assert with_bn[0].bias is None
    assert plain[0].bias is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, r"DemoConfig: argument 'epochs' must be a positive int"),
        ({"lr": 0.0}, r"DemoConfig: argument 'lr' must be > 0, got 0\.0"),
        (
            {"activation": "gelu"},
            r"DemoConfig: argument 'activation' must be one of \['relu', 'sigmoid', 'tanh'\]",
        ),
    ],
)
def test_config_errors(kwargs, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=match):
        DemoConfig(**kwargs)
