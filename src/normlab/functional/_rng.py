"""Random draws from a layer's own ``torch.Generator`` that ``torch.compile`` can trace.

Seeded layers (dropout with ``seed=``, noisy batch norm, DropConnect) draw from a generator of
their own, so runs are reproducible without touching torch's global RNG. Dynamo cannot put a
``torch.Generator`` into a graph ("Failed to convert args/kwargs to proxy"), so
``torch.compile(fullgraph=True)`` of such a layer would fail. Eagerly, :func:`rand` and
:func:`randn` call torch directly; while compiling they go through the custom ops
``normlab::rand`` / ``normlab::randn``, which look the generator up by a key fixed when the graph
is traced. The compiled layer therefore draws exactly what the eager layer draws, in the same
order, and advances the same generator. The ops are tagged ``nondeterministic_seeded`` so that
compiler passes neither merge two draws nor recompute one in the backward pass; draws that share a
generator within one call are chained with ``after=`` (the previous draw), because the compiler
may otherwise reorder independent ops (it does, in training graphs).

A generator used by a compiled graph stays referenced here for the life of the process (one
small object per seeded layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["rand", "randn"]

_GENERATORS: dict[int, torch.Generator] = {}
_SEEDED = (torch.Tag.nondeterministic_seeded,)


@torch._dynamo.assume_constant_result  # type: ignore[untyped-decorator]
def _key(generator: torch.Generator) -> int:
    """Runs while dynamo traces (its result becomes a constant of the graph)."""
    _GENERATORS[id(generator)] = generator
    return id(generator)


@torch.library.custom_op("normlab::rand", mutates_args=(), tags=_SEEDED)
def _rand_op(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, key: int, after: Tensor | None
) -> Tensor:
    return torch.rand(tuple(shape), dtype=dtype, device=device, generator=_GENERATORS[key])


@torch.library.custom_op("normlab::randn", mutates_args=(), tags=_SEEDED)
def _randn_op(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, key: int, after: Tensor | None
) -> Tensor:
    return torch.randn(tuple(shape), dtype=dtype, device=device, generator=_GENERATORS[key])


@_rand_op.register_fake
@_randn_op.register_fake
def _fake(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, key: int, after: Tensor | None
) -> Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def rand(
    shape: Sequence[int],
    generator: torch.Generator | None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    after: Tensor | None = None,
) -> Tensor:
    """``torch.rand(shape)`` from ``generator`` (``None``: torch's global RNG), drawn after the
    draw ``after`` when compiled (see the module docstring)."""
    if generator is not None and torch.compiler.is_compiling():
        where = torch.device(device if device is not None else generator.device)
        return _rand_op(list(shape), dtype, where, _key(generator), after)  # type: ignore[no-any-return]
    return torch.rand(tuple(shape), dtype=dtype, device=device, generator=generator)


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    after: Tensor | None = None,
) -> Tensor:
    """``torch.randn(shape)`` from ``generator`` (``None``: torch's global RNG), drawn after the
    draw ``after`` when compiled (see the module docstring)."""
    if generator is not None and torch.compiler.is_compiling():
        where = torch.device(device if device is not None else generator.device)
        return _randn_op(list(shape), dtype, where, _key(generator), after)  # type: ignore[no-any-return]
    return torch.randn(tuple(shape), dtype=dtype, device=device, generator=generator)
