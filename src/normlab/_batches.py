"""Turn what users pass as "data" into a stream of model inputs, with errors that say what to do.

Accepted: a tensor or numpy array (split into chunks along dim 0), or any iterable (a list, a
generator, a ``DataLoader``) of tensors, numpy arrays, or ``(x, y, ...)`` tuples/lists whose first
element is the input. Anything else needs ``input_fn``, which maps one batch to the model's
positional input (a tensor or a tuple of arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normlab._checks import fail

__all__ = ["CHUNK_ROWS", "InputFn", "iter_inputs"]

InputFn = Callable[[Any], Any]
CHUNK_ROWS = 1 << 14  # rows per chunk when a whole tensor is passed


def _as_args(value: Any) -> tuple[Any, ...]:
    if isinstance(value, tuple):
        return value
    if isinstance(value, np.ndarray):
        return (torch.from_numpy(value),)
    return (value,)


def _default_input(batch: Any, owner: str) -> tuple[Any, ...]:
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, np.ndarray):
        return (torch.from_numpy(batch),)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (Tensor, np.ndarray)):
        return _as_args(batch[0])
    fail(
        TypeError,
        owner,
        "each batch of 'data'",
        "a tensor, a numpy array, or a tuple/list whose first element is one",
        f"{type(batch).__name__}"
        + (
            f" of {[type(b).__name__ for b in batch][:4]}"
            if isinstance(batch, (list, tuple))
            else ""
        ),
        "pass input_fn=, a function that returns the model input of one batch "
        "(e.g. input_fn=lambda batch: batch['image'])",
    )


def iter_inputs(
    data: Any, *, owner: str, input_fn: InputFn | None = None, num_batches: int | None = None
) -> Iterator[tuple[Any, ...]]:
    """Yield the positional model input of each batch of ``data`` (at most ``num_batches``).

    Raises:
        TypeError: ``data`` is not iterable, or a batch is not understood and no ``input_fn``.
        ValueError: ``data`` yields no batch at all.
    """
    batches: Iterable[Any]
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, Tensor):
        batches = torch.split(data, CHUNK_ROWS) if data.dim() > 0 and data.shape[0] > 0 else ()
    elif isinstance(data, Iterable):
        batches = data
    else:
        fail(
            TypeError,
            owner,
            "'data'",
            "a tensor, a numpy array, or an iterable of batches (e.g. a DataLoader)",
            type(data).__name__,
            "wrap single inputs in a list, or pass a DataLoader",
        )
    seen = 0
    for batch in batches:
        if num_batches is not None and seen >= num_batches:
            break
        yield _as_args(input_fn(batch)) if input_fn is not None else _default_input(batch, owner)
        seen += 1
    if seen == 0:
        fail(
            ValueError,
            owner,
            "'data'",
            "at least one batch",
            "no batch (empty data)" if num_batches != 0 else "num_batches=0",
            "pass the training data (a non-empty tensor or loader)",
        )
