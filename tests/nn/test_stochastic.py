"""Dropout, alpha dropout, SELU and LeCun init: seeded statistical properties with tolerances
derived from the sample size, exact constants, torch parity."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nl
from normlab.analysis import activation_statistics
from normlab.functional.stochastic import SELU_ALPHA, SELU_LAMBDA, alpha_dropout_affine
from normlab.nn.init import lecun_normal_
from normlab.surgery import init_self_normalizing_

N = 1_000_000


@pytest.mark.parametrize("seed", [None, 3])
@pytest.mark.parametrize("inverted", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_keeps_the_expectation_and_drops_at_the_rate(
    p: float, inverted: bool, seed: int | None
) -> None:
    torch.manual_seed(0)
    x = torch.ones(N, dtype=torch.float64)
    layer = nl.Dropout(p, inverted=inverted, seed=seed).train()
    y = layer(x)
    q = 1 - p
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * q / N)
    expected = layer.eval()(x)  # identity (inverted) or x * q (the paper's weight scaling)
    torch.testing.assert_close(expected, x if inverted else x * q)
    # E[y] = eval output; Var[y] = (scale^2) q p with scale = 1/q (inverted) or 1
    sd = (1 / q if inverted else 1.0) * math.sqrt(p * q / N)
    assert abs(y.mean().item() - expected.mean().item()) < 5 * sd


def test_dropout_values_match_torch() -> None:
    """Like torch.nn.Dropout: every training output is 0 or x / (1 - p); eval is the identity."""
    x = torch.randn(10000)
    for layer in (nl.Dropout(0.3).train(), nn.Dropout(0.3).train()):
        y = layer(x)
        assert torch.all((y == 0) | torch.isclose(y, x / 0.7))
    torch.testing.assert_close(nl.Dropout(0.3).eval()(x), nn.Dropout(0.3).eval()(x))


def test_dropout_edge_probabilities() -> None:
    x = torch.randn(100)
    torch.testing.assert_close(nl.Dropout(0.0).train()(x), x)
    assert torch.equal(nl.Dropout(1.0).train()(x), torch.zeros(100))
    assert torch.equal(nl.Dropout(1.0, seed=1).train()(x), torch.zeros(100))
    assert torch.equal(nl.Dropout(1.0, inverted=False).eval()(x), torch.zeros(100))
    torch.testing.assert_close(nl.Dropout(1.0).eval()(x), x)


def test_seeded_dropout_is_reproducible() -> None:
    x = torch.randn(1000)
    assert torch.equal(nl.Dropout(0.5, seed=7).train()(x), nl.Dropout(0.5, seed=7).train()(x))


def test_feature_dropout_drops_whole_channels() -> None:
    layer = nl.FeatureDropout2d(0.4, seed=1).train()
    y = layer(torch.ones(500, 40, 3, 3))
    per_channel = y.flatten(2)
    assert torch.all((per_channel == 0).all(2) | (per_channel == 1 / 0.6).all(2))  # all or nothing
    dropped = (per_channel[:, :, 0] == 0).double().mean().item()
    assert abs(dropped - 0.4) < 5 * math.sqrt(0.4 * 0.6 / 20000)


@pytest.mark.parametrize(
    ("rate", "a", "b"),
    [
        (0.05, 0.954844476005, 0.083935572194),
        (0.10, 0.921284516150, 0.161970970058),
        (0.20, 0.878903583444, 0.309039962144),
        (0.50, 0.886404894666, 0.779193930518),
    ],
)
def test_alpha_dropout_constants(rate: float, a: float, b: float) -> None:
    """The table of shared/reference/techniques.md §8 (mpmath)."""
    got_a, got_b = alpha_dropout_affine(rate)
    assert got_a == pytest.approx(a, abs=1e-11)
    assert got_b == pytest.approx(b, abs=1e-11)


@pytest.mark.parametrize(("mean", "var"), [(0.0, 1.0), (0.5, 2.0)])
def test_alpha_dropout_keeps_the_fixed_point(mean: float, var: float) -> None:
    """Input with mean mu and variance nu keeps them; standard errors from n = 2e6 samples."""
    g = torch.Generator().manual_seed(0)
    n = 2_000_000
    x = torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(var) + mean
    y = nl.AlphaDropout(0.1, fixed_mean=mean, fixed_var=var, seed=1).train()(x)
    assert abs(y.mean().item() - mean) < 5 * math.sqrt(var / n)
    fourth = ((y - y.mean()) ** 4).mean().item()
    assert abs(y.var().item() - var) < 5 * math.sqrt((fourth - var**2) / n)


def test_alpha_dropout_matches_torch() -> None:
    """torch's AlphaDropout output takes exactly the values a*x + b (kept) or a*alpha' + b."""
    torch.manual_seed(0)
    x = torch.randn(10000, dtype=torch.float64)
    y = nn.AlphaDropout(0.2).train()(x)
    a, b = alpha_dropout_affine(0.2)
    kept = torch.isclose(y, a * x + b)
    dropped = torch.isclose(y, torch.full_like(y, a * -SELU_LAMBDA * SELU_ALPHA + b))
    assert torch.all(kept | dropped)
    x2 = torch.randn(5, 3)
    torch.testing.assert_close(nl.AlphaDropout(0.2).eval()(x2), nn.AlphaDropout(0.2).eval()(x2))
    assert torch.equal(nl.AlphaDropout(1.0).train()(x2), torch.zeros(5, 3))


def test_feature_alpha_dropout_drops_channels_to_the_same_value() -> None:
    y = nl.FeatureAlphaDropout(0.5, seed=2).train()(torch.zeros(200, 8, 4))
    assert torch.all(y.flatten(2).std(2) == 0)  # zero input: each channel is one value


def test_selu_constants_to_40_digits_and_fixed_point() -> None:
    mpmath.mp.dps = 40
    e, erfc, sqrt, pi = mpmath.e, mpmath.erfc, mpmath.sqrt, mpmath.pi
    alpha = -sqrt(2 / pi) / (mpmath.exp(mpmath.mpf(1) / 2) * erfc(1 / sqrt(2)) - 1)
    lam = (1 - sqrt(e) * erfc(1 / sqrt(2))) * sqrt(
        2
        * pi
        / (
            2
            + pi
            - 2 * sqrt(e) * (2 + pi) * erfc(1 / sqrt(2))
            + e * pi * erfc(1 / sqrt(2)) ** 2
            + 2 * e**2 * erfc(sqrt(2))
        )
    )
    assert abs(SELU_ALPHA - float(alpha)) < 1e-16
    assert abs(SELU_LAMBDA - float(lam)) < 1e-16

    def selu(z):  # type: ignore[no-untyped-def]
        return lam * z if z > 0 else lam * alpha * (mpmath.exp(z) - 1)

    density = lambda z: mpmath.exp(-z * z / 2) / sqrt(2 * pi)  # noqa: E731
    mean = mpmath.quad(lambda z: selu(z) * density(z), [-mpmath.inf, 0, mpmath.inf])
    second = mpmath.quad(lambda z: selu(z) ** 2 * density(z), [-mpmath.inf, 0, mpmath.inf])
    assert abs(mean) < 1e-30
    assert abs(second - mean**2 - 1) < 1e-30
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(nl.SELU()(x), nn.SELU()(x))


def test_lecun_normal_std() -> None:
    g = torch.Generator().manual_seed(0)
    for shape, fan in (((500, 400), 400), ((64, 16, 3, 3), 144)):
        w = lecun_normal_(torch.empty(shape), generator=g)
        sd = 1 / math.sqrt(fan)
        assert abs(w.std().item() - sd) < 5 * sd / math.sqrt(2 * w.numel())
        assert abs(w.mean().item()) < 5 * sd / math.sqrt(w.numel())


def _deep(activation: type[nn.Module], depth: int = 64, width: int = 256) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), activation()]
    return nn.Sequential(*layers)


def test_selu_self_normalizes_to_depth_64_and_relu_does_not() -> None:
    x = torch.randn(1024, 256, generator=torch.Generator().manual_seed(1))  # standardized input
    snn = init_self_normalizing_(_deep(nl.SELU), seed=0)  # (another stream than the input's)
    stats = activation_statistics(snn, x)
    assert len(stats) == 64
    for s in stats:
        assert abs(s.mean) < 0.1, s
        assert 0.8 <= s.variance <= 1.25, s
    torch.manual_seed(0)
    relu = _deep(nn.ReLU)  # torch's default init
    relu_stats = activation_statistics(relu, x)
    assert not all(0.8 <= s.variance <= 1.25 for s in relu_stats)
    assert relu_stats[-1].variance < 1e-3


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (
            lambda: nl.Dropout(1.5),
            ValueError,
            r"Dropout: argument 'p' must be a float in \[0, 1\] \(the drop probability\), got 1\.5\. Fix: "
            r"pass the probability of dropping a unit, e\.g\. p=0\.5; a percentage\? divide by 100",
        ),
        (
            lambda: nl.Dropout(-0.1),
            ValueError,
            r"Dropout: argument 'p' must be a float in \[0, 1\]",
        ),
        (
            lambda: nl.Dropout("0.5"),
            TypeError,
            r"Dropout: argument 'p' must be a float in \[0, 1\] \(the drop "
            r"probability\), got str '0\.5'",
        ),
        (
            lambda: nl.AlphaDropout(0.1, fixed_var=0.0),
            ValueError,
            r"argument 'fixed_var' must be > 0",
        ),
        (
            lambda: nl.FeatureDropout2d(0.1)(torch.randn(4, 3, 5)),
            ValueError,
            r"FeatureDropout2d: the input must be a 4-D tensor \(N, C, \*spatial\), got shape \(4, 3, 5\)\. "
            r"Fix: use FeatureDropout1d for 3-D input",
        ),
        (
            lambda: nl.get_dropout_layer("spatial", 0.1),
            ValueError,
            r"get_dropout_layer: argument 'name' must be one of \['alpha', 'dropout', 'feature', "
            r"'feature_alpha', 'none'\], got 'spatial'",
        ),
        (
            lambda: nl.get_dropout_layer("feature", 0.1),
            ValueError,
            r"'spatial_dims' for 'feature' dropout must be 1, 2 or 3, got 0",
        ),
    ],
)
def test_errors(make, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match):
        make()


def test_dropout_registry() -> None:
    assert isinstance(nl.get_dropout_layer("none", 0.5), nn.Identity)
    assert isinstance(nl.get_dropout_layer("alpha", 0.05), nl.AlphaDropout)
    assert set(nl.available_dropouts()) == {"none", "dropout", "feature", "alpha", "feature_alpha"}
    layer = nl.get_dropout_layer("dropout", 0.2, inverted=False)
    assert layer.inverted is False
    assert F.dropout  # the native kernel serves the unseeded path
