"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), shipped inside its wheel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from normlab._checks import fail

__all__ = ["Split", "load_digits_split"]


@dataclass(frozen=True)
class Split:
    """A fixed train/test split: inputs ``(n, 64)`` float32 in [0, 16], labels ``(n,)`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """Load the digits and split them with a seeded, class-stratified permutation.

    The same ``(test_fraction, seed)`` always gives the same split, on every machine.

    Raises:
        ValueError: ``test_fraction`` outside (0, 1).

    Example:
        >>> s = load_digits_split()
        >>> tuple(s.x_train.shape), tuple(s.x_test.shape)
        ((1347, 64), (450, 64))
    """
    if not 0.0 < test_fraction < 1.0:
        fail(
            ValueError,
            "load_digits_split",
            "argument 'test_fraction'",
            "in (0, 1)",
            repr(test_fraction),
            "pass e.g. test_fraction=0.25",
        )
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        test_idx.extend(members[: round(len(members) * test_fraction)].tolist())
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    mask = torch.as_tensor(is_test)
    return Split(xt[~mask], yt[~mask], xt[mask], yt[mask])
