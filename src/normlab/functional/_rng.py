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

import ctypes
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "device_generator",
    "host_seed",
    "lookup",
    "rand",
    "randint",
    "randn",
    "register",
    "seeded",
    "uniform_normal",
]

_OBJECTS: dict[int, Any] = {}
_SEEDED = (torch.Tag.nondeterministic_seeded,)


@torch._dynamo.assume_constant_result  # type: ignore[untyped-decorator]
def register(obj: Any) -> int:
    """A key for ``obj`` (a generator, a convolution callable) that custom ops take instead of
    the object. Runs while dynamo traces: the key becomes a constant of the graph."""
    _OBJECTS[id(obj)] = obj
    return id(obj)


def lookup(key: int) -> Any:
    """The object :func:`register` gave ``key`` for."""
    return _OBJECTS[key]


class Keyed:
    """A generator made while dynamo traces, known to the graph by its key (see :func:`seeded`)."""

    def __init__(self, key: int, device: str) -> None:
        self.key = key
        self.device = torch.device(device)


def seeded(seed: int, device: torch.device | str) -> torch.Generator | Keyed:
    """A fresh generator on ``device`` seeded with ``seed`` -- for sampling that repeats exactly
    at every call. Compiled, the generator is made while tracing, and the graph's first draw from
    it (:func:`rand`, :func:`randn`, :func:`randint` with ``after=None``) reseeds it."""
    if torch.compiler.is_compiling():
        where = str(torch.device(device))
        return Keyed(_made_while_tracing(seed, where), where)
    return torch.Generator(device).manual_seed(seed)


def host_seed(generator: torch.Generator | None) -> int:
    """A seed in ``[0, 2**62)`` drawn on the CPU from ``generator`` (``None``: torch's global CPU
    generator); from an accelerator's generator through a CPU generator of the same initial seed
    (sampled inference's, reseeded at every call): reading a number from the device would be a
    host sync. Eager only."""
    if generator is not None and generator.device.type != "cpu":
        generator = torch.Generator().manual_seed(generator.initial_seed())
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def device_generator(generator: torch.Generator, device: torch.device | str) -> torch.Generator:
    """A fresh generator on ``device`` seeded by a draw from ``generator`` (a layer's own CPU
    generator): what a seeded layer draws from on an accelerator, at each call -- reproducible
    from its seed, with nothing device-bound kept on the layer. Eager only."""
    return torch.Generator(device).manual_seed(host_seed(generator))


_RESEED: dict[int, int] = {}


@torch._dynamo.assume_constant_result  # type: ignore[untyped-decorator]
def _made_while_tracing(seed: int, device: str) -> int:
    key = int(register(torch.Generator(device).manual_seed(seed)))
    _RESEED[key] = seed
    return key


def _traced(
    generator: torch.Generator | Keyed | None, device: torch.device | str | None
) -> tuple[torch.device, int] | None:
    """While compiling, where to draw and the key of ``generator``; else (or without a generator,
    which the compiler traces itself) ``None``: draw eagerly."""
    if generator is None or not torch.compiler.is_compiling():
        return None
    where = torch.device(device if device is not None else generator.device)
    if isinstance(generator, Keyed):
        return where, generator.key
    # not register(generator): torch 2.11's dynamo cannot pass a generator to a function of
    # constant result. id() of an object from outside the graph is a constant (guarded on that
    # object), and _keep, run once while tracing, files the object under it
    return where, _keep(id(generator))


@torch._dynamo.assume_constant_result  # type: ignore[untyped-decorator]
def _keep(key: int) -> int:
    """Files the live object whose ``id`` is ``key`` under it in ``_OBJECTS`` (kept alive there, so
    the id stays its own); runs while dynamo traces, where the object is an argument of the traced
    call."""
    if key not in _OBJECTS:
        _OBJECTS[key] = ctypes.cast(key, ctypes.py_object).value
    return key


def _generator(key: int, after: Tensor | None) -> torch.Generator:
    generator: torch.Generator = _OBJECTS[key]
    if after is None and key in _RESEED:  # a per-call generator: start its stream again
        generator.manual_seed(_RESEED[key])
    return generator


@torch.library.custom_op("normlab::rand", mutates_args=(), tags=_SEEDED)
def _rand_op(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, key: int, after: Tensor | None
) -> Tensor:
    return torch.rand(tuple(shape), dtype=dtype, device=device, generator=_generator(key, after))


@torch.library.custom_op("normlab::randn", mutates_args=(), tags=_SEEDED)
def _randn_op(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, key: int, after: Tensor | None
) -> Tensor:
    return torch.randn(tuple(shape), dtype=dtype, device=device, generator=_generator(key, after))


@_rand_op.register_fake
@_randn_op.register_fake
def _fake(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, key: int, after: Tensor | None
) -> Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def _draw(
    eager: Callable[..., Tensor],
    op: Callable[..., Tensor],
    shape: Sequence[int],
    generator: torch.Generator | Keyed | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
    after: Tensor | None,
) -> Tensor:
    if (traced := _traced(generator, device)) is not None:
        return op(list(shape), dtype, *traced, after)
    return eager(tuple(shape), dtype=dtype, device=device, generator=generator)


def rand(
    shape: Sequence[int],
    generator: torch.Generator | Keyed | None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    after: Tensor | None = None,
) -> Tensor:
    """``torch.rand(shape)`` from ``generator`` (``None``: torch's global RNG), drawn after the
    draw ``after`` when compiled (see the module docstring)."""
    return _draw(torch.rand, _rand_op, shape, generator, device, dtype, after)


def randn(
    shape: Sequence[int],
    generator: torch.Generator | Keyed | None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    after: Tensor | None = None,
) -> Tensor:
    """``torch.randn(shape)`` from ``generator`` (``None``: torch's global RNG), drawn after the
    draw ``after`` when compiled (see the module docstring)."""
    return _draw(torch.randn, _randn_op, shape, generator, device, dtype, after)


@torch.library.custom_op("normlab::randint", mutates_args=(), tags=_SEEDED)
def _randint_op(high: int, device: torch.device, key: int, after: Tensor | None) -> Tensor:
    return torch.randint(0, high, (1,), device=device, generator=_generator(key, after))


@_randint_op.register_fake
def _(high: int, device: torch.device, key: int, after: Tensor | None) -> Tensor:
    return torch.empty((1,), dtype=torch.int64, device=device)


def randint(
    high: int,
    generator: torch.Generator | Keyed | None,
    *,
    device: torch.device | str | None = None,
    after: Tensor | None = None,
) -> Tensor:
    """``torch.randint(0, high, (1,))`` from ``generator`` (``None``: torch's global RNG)."""
    if (traced := _traced(generator, device)) is not None:
        return _randint_op(high, *traced, after)  # type: ignore[no-any-return]
    return torch.randint(0, high, (1,), device=device, generator=generator)  # type: ignore[arg-type]


@torch.library.custom_op("normlab::uniform_normal", mutates_args=(), tags=_SEEDED)
def _uniform_normal_op(
    shape: Sequence[int], device: torch.device, key: int, after: Tensor | None
) -> tuple[Tensor, Tensor]:
    return _uniform_normal(shape, device_generator(_generator(key, after), device), device)


@_uniform_normal_op.register_fake
def _(
    shape: Sequence[int], device: torch.device, key: int, after: Tensor | None
) -> tuple[Tensor, Tensor]:
    u = torch.empty(tuple(shape), device=device, dtype=torch.float32)
    return u, torch.empty_like(u)


def _uniform_normal(
    shape: Sequence[int], fill: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """float32 ``rand`` then ``randn`` of ``shape`` from ``fill`` (float32 whatever torch's default
    dtype: the draws, not only their precision, depend on it)."""
    u = torch.rand(tuple(shape), device=device, generator=fill, dtype=torch.float32)
    return u, torch.randn(tuple(shape), device=device, generator=fill, dtype=torch.float32)


def uniform_normal(
    shape: Sequence[int],
    generator: torch.Generator,
    device: torch.device,
    *,
    after: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """float32 ``(torch.rand(shape), torch.randn(shape))`` drawn on ``device`` from one generator of that
    device seeded by a draw from ``generator`` (a layer's CPU generator; :func:`device_generator`),
    eagerly and compiled alike: activation-sized noise for an accelerator, drawn there."""
    if (traced := _traced(generator, device)) is not None:
        return _uniform_normal_op(list(shape), *traced, after)  # type: ignore[no-any-return]
    return _uniform_normal(shape, device_generator(generator, device), device)
