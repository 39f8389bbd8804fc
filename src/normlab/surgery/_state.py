"""Snapshot and restore the caller-visible state of a model (house rule 7)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["preserved", "running_stat_layers"]


def running_stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer that tracks running statistics (batch-norm-like).

    A layer qualifies if ``track_running_stats`` is true and it has tensor buffers
    ``running_mean`` and ``running_var`` (torch's and normlab's batch norms, instance norms with
    ``track_running_stats=True``, later variants) -- frozen batch norms do not.
    """
    return [
        (name, m)
        for name, m in model.named_modules()
        if getattr(m, "track_running_stats", False) is True
        and isinstance(getattr(m, "running_mean", None), torch.Tensor)
        and isinstance(getattr(m, "running_var", None), torch.Tensor)
    ]


@contextmanager
def preserved(
    model: nn.Module, *, buffers_of: list[nn.Module] | None = None, restore_buffers: bool = False
) -> Iterator[list[RemovableHandle]]:
    """Restore every module's ``training`` flag and ``momentum``, every parameter's
    ``requires_grad``, and remove the hooks registered into the yielded list -- on exit, also
    when an exception is raised. Buffers of ``buffers_of`` are restored on an exception, or
    always with ``restore_buffers=True``."""
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in model.modules() if hasattr(m, "momentum")]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    saved = [(b, b.detach().clone()) for m in (buffers_of or []) for b in m.buffers(recurse=False)]
    handles: list[RemovableHandle] = []
    failed = True
    try:
        yield handles
        failed = False
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes:
            m.training = mode
        for m, momentum in momenta:
            m.momentum = momentum
        for p, flag in grads:
            p.requires_grad_(flag)
        if failed or restore_buffers:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)
