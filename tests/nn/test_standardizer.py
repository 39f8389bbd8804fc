"""InputStandardizer against scikit-learn's StandardScaler and float64 closed forms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from normlab.nn import InputStandardizer


def _data(n: int = 500, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)) * [1.0, 5.0, 0.1, 1e3, 2.0, 1.0] + [0.0, -3.0, 7.0, 1e4, 0.5, 4.0]
    x[:, 5] = 4.0  # a constant feature
    return x


def test_agrees_with_standard_scaler_and_any_batching_gives_the_same_answer() -> None:
    x = _data()
    ref = StandardScaler().fit(x)
    whole = InputStandardizer().fit(torch.from_numpy(x))
    loader = [(torch.from_numpy(x[i : i + 37]), torch.zeros(1)) for i in range(0, len(x), 37)]
    streamed = InputStandardizer().fit(loader)
    partial = InputStandardizer().fit(x[:123])
    partial.partial_fit(x[123:])
    for s in (whole, streamed, partial):
        np.testing.assert_allclose(s.mean.flatten().numpy(), ref.mean_, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(s.var.flatten().numpy(), ref.var_, rtol=1e-10, atol=1e-12)
        out = s(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, ref.transform(x), rtol=1e-6, atol=1e-6)


def test_constant_features_are_only_centred() -> None:
    x = torch.from_numpy(_data()).float()
    s = InputStandardizer().fit(x)
    y = s(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 5], torch.zeros(len(x)))
    assert s(torch.full((1, 6), 4.5))[0, 5].item() == pytest.approx(0.5)


def test_per_channel_images_and_inverse() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    s = InputStandardizer(axis=1).fit(images)
    assert tuple(s.mean.shape) == (1, 3, 1, 1)
    ref = images.double()
    torch.testing.assert_close(s.mean.flatten(), ref.mean((0, 2, 3)))
    torch.testing.assert_close(s.std.flatten(), ref.std((0, 2, 3), unbiased=False))
    y = s(images)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.inverse(y), images.float(), atol=1e-4, rtol=0)
    pixel = InputStandardizer(axis=(1, 2, 3)).fit(images)
    assert tuple(pixel.mean.shape) == (1, 3, 8, 8)
    scalar = InputStandardizer(axis=None).fit(images)
    assert scalar.mean.shape == (1, 1, 1, 1)
    torch.testing.assert_close(scalar.mean.flatten()[0], ref.mean())


def test_fit_replaces_partial_fit_adds() -> None:
    a, b = torch.randn(50, 2) + 10, torch.randn(70, 2) - 10
    s = InputStandardizer().fit(a)
    s.fit(b)
    torch.testing.assert_close(s.mean.flatten(), b.double().mean(0))
    s.partial_fit(a)
    torch.testing.assert_close(s.mean.flatten(), torch.cat([b, a]).double().mean(0))
    assert int(s.count) == 120


def test_state_dict_round_trip_into_an_unfitted_module() -> None:
    s = InputStandardizer(axis=1).fit(torch.randn(40, 3, 4, 4) * 3 + 1)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    fresh = InputStandardizer(axis=1)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(fresh(x), s(x))
    assert "fitted on 640 values each" in repr(fresh)


def test_errors_and_failed_fit_keeps_old_statistics() -> None:
    s = InputStandardizer()
    with pytest.raises(
        ValueError,
        match=r"InputStandardizer: the standardizer must be fitted, got no "
        r"statistics\. Fix: call \.fit\(training_data\) first",
    ):
        s(torch.randn(2, 3))
    s.fit(torch.randn(10, 3))
    before = s.mean.clone()
    bad = [torch.randn(4, 3), torch.tensor([[float("nan"), 0.0, 0.0]])]
    with pytest.raises(
        ValueError, match=r"the training data must be finite, got NaN or inf values"
    ):
        s.fit(bad)
    assert torch.equal(s.mean, before)
    with pytest.raises(
        ValueError,
        match=r"the input shape must be compatible with the fitted statistics "
        r"of shape \(1, 3\), got \(2, 4\)",
    ):
        s(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"'data' must be at least one batch, got no batch"):
        InputStandardizer().fit([])
    with pytest.raises(
        TypeError,
        match=r"each batch of 'data' must be a tensor, a numpy array, or a "
        r"tuple/list whose first element is one, got dict\. Fix: pass input_fn=",
    ):
        InputStandardizer().fit([{"x": torch.randn(2, 3)}])
    assert InputStandardizer().fit([{"x": torch.randn(4, 3)}], input_fn=lambda b: b["x"]).fitted
    with pytest.raises(ValueError, match=r"argument 'axis' must be None, or non-zero int dims"):
        InputStandardizer(axis=0)
    with pytest.raises(
        ValueError,
        match=r"the per-sample shape of every batch must be statistics of "
        r"shape \(1, 3\), got a batch of shape \(2, 4\)",
    ):
        InputStandardizer().fit([torch.randn(2, 3), torch.randn(2, 4)])
    with pytest.raises(TypeError, match=r"'data' must be a tensor, a numpy array, or an iterable"):
        InputStandardizer().fit(3.0)


def test_usable_as_first_layer() -> None:
    x = torch.randn(30, 4) * 100 + 50
    model = torch.nn.Sequential(InputStandardizer().fit(x), torch.nn.Linear(4, 2))
    model.train()
    out_train = model(x)
    model.eval()
    torch.testing.assert_close(model(x), out_train)


def test_statistics_stay_float64_when_the_model_is_cast() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100_000, 2, generator=g) * 10 + 3
    s = InputStandardizer().fit(x)
    expected = s(x[:5])
    half = s.half()  # a count of 100000 would be inf in float16
    assert half.count.dtype == torch.float64
    assert half.mean.dtype == torch.float64
    torch.testing.assert_close(half(x[:5].half()).float(), expected, rtol=2e-3, atol=2e-3)


def test_tiny_but_real_variance_is_scaled_like_scikit_learn() -> None:
    x = np.random.default_rng(3).normal(size=(200, 2)) * [1e-9, 1.0]
    ref = StandardScaler().fit(x)
    s = InputStandardizer().fit(torch.from_numpy(x))
    np.testing.assert_allclose(s.scale.flatten().numpy(), ref.scale_, rtol=1e-12)
    floored = InputStandardizer(std_floor=1e-6).fit(torch.from_numpy(x))
    assert floored.scale.flatten()[0].item() == 1.0
    with pytest.raises(
        ValueError,
        match=r"argument 'std_floor' must be a finite float >= 0 \(features with a smaller std are only "
        r"centred\), got -1\.0",
    ):
        InputStandardizer(std_floor=-1.0)
