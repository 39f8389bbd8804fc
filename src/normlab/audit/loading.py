"""What ``normlab audit`` needs from files: a model from ``module:factory`` (plus a checkpoint)
and tensors from a ``.pt`` file -- loaded with ``weights_only=True``, never unpickled freely."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normlab._checks import fail

__all__ = ["load_model", "load_tensors"]


def load_model(spec: str, checkpoint: str | Path | None = None) -> nn.Module:
    """``"package.module:factory"`` or ``"path/to/file.py:factory"``: import, call ``factory()``,
    and load ``checkpoint`` (a state dict, or a dict holding one under ``"model"`` or
    ``"state_dict"``) into the result.

    Raises:
        ValueError: a malformed spec, a missing module/factory, a factory that does not return an
            ``nn.Module``, or a checkpoint that does not fit.
    """
    owner = "normlab audit"
    module_name, sep, factory_name = spec.rpartition(":")
    if not sep or not module_name or not factory_name:
        fail(
            ValueError,
            owner,
            "the model",
            "'module:factory' or 'file.py:factory'",
            repr(spec),
            "e.g. normlab audit mypackage.models:build_net",
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or loader_spec.loader is None or not path.exists():
                raise ImportError(f"no file {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules.setdefault(path.stem, module)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as error:
        fail(
            ValueError,
            owner,
            f"the module {module_name!r}",
            "importable",
            f"{type(error).__name__}: {error}",
            "run from the directory that holds it, or pass a path: file.py:factory",
        )
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        fail(
            ValueError,
            owner,
            f"{module_name}:{factory_name}",
            "a callable that builds the model",
            "missing" if factory is None else type(factory).__name__,
            f"define def {factory_name}() -> nn.Module in {module_name}",
        )
    try:
        model = factory()
    except Exception as error:
        fail(
            ValueError,
            owner,
            f"{spec}()",
            "a factory that builds the model without arguments",
            f"{type(error).__name__}: {error}",
            "fix the factory, or point to one that needs no arguments",
        )
    if not isinstance(model, nn.Module):
        fail(
            ValueError,
            owner,
            f"{spec}()",
            "an nn.Module",
            type(model).__name__,
            "return the model from the factory",
        )
    if checkpoint is not None:
        state = _load(
            checkpoint,
            "the checkpoint",
            "a state dict saved with torch.save(model.state_dict(), path)",
        )
        if isinstance(state, dict):
            state = state.get("model", state.get("state_dict", state))
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as error:
            fail(
                ValueError,
                owner,
                f"the checkpoint {str(checkpoint)!r}",
                f"a state dict of {spec}()",
                str(error).splitlines()[0],
                "pass the checkpoint saved from this model (torch.save(model.state_dict(), ...))",
            )
    return model


def load_tensors(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """``(inputs, targets or None)`` from a ``.pt`` file holding a tensor, an ``(x, y)`` pair, or
    a dict with ``"x"``/``"inputs"`` and optionally ``"y"``/``"targets"``."""
    value: Any = _load(
        path, "the data file", "tensors saved with torch.save({'x': inputs, 'y': targets}, path)"
    )
    if isinstance(value, dict):
        x = value.get("x", value.get("inputs"))
        y = value.get("y", value.get("targets"))
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        x, y = value
    else:
        x, y = value, None
    if not isinstance(x, Tensor) or (y is not None and not isinstance(y, Tensor)):
        fail(
            ValueError,
            "normlab audit",
            f"the data file {str(path)!r}",
            "a tensor, an (x, y) pair of tensors, or a dict with 'x' (and 'y')",
            type(value).__name__,
            "torch.save({'x': inputs, 'y': targets}, path)",
        )
    return x, y


def _load(path: str | Path, what: str, expected: str) -> Any:
    """``torch.load(path, weights_only=True)`` with an error that says what to save instead."""
    if not Path(path).is_file():
        fail(
            ValueError,
            "normlab audit",
            f"{what} {str(path)!r}",
            "an existing file",
            "no such file",
            "check the path (data may also name an embedded dataset: digits, mnist1d, ...)",
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled modules, corrupt files: never unpickle freely
        fail(
            ValueError,
            "normlab audit",
            f"{what} {str(path)!r}",
            expected,
            f"{type(error).__name__}: {str(error).splitlines()[0][:200]}",
            "save plain tensors or a state dict (weights_only=True loads nothing else)",
        )
