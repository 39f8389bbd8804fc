"""The embedded digits split."""

from __future__ import annotations

import pytest
import torch

from normlab.data import load_digits_split


def test_split_is_fixed_stratified_and_disjoint() -> None:
    a, b = load_digits_split(seed=3), load_digits_split(seed=3)
    assert torch.equal(a.x_test, b.x_test)
    assert torch.equal(a.y_train, b.y_train)
    assert len(a.x_train) + len(a.x_test) == 1797
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 44
    assert counts.max() <= 46
    train_rows = {tuple(r) for r in a.x_train.tolist()}
    overlap = sum(tuple(r) in train_rows for r in a.x_test.tolist())
    assert overlap < 5  # the digits contain a few duplicate images, nothing more
    assert not torch.equal(load_digits_split(seed=4).y_test, a.y_test)


def test_bad_fraction() -> None:
    with pytest.raises(
        ValueError,
        match=r"load_digits_split: argument 'test_fraction' must be in \(0, 1\), got 1\.5",
    ):
        load_digits_split(test_fraction=1.5)
