"""What every check needs: the data as batches, the loss, and the model's data flow.

The data flow comes from one traced forward pass: forward hooks record which module produced
each tensor and which module consumed it *directly* (the same tensor object), so "a linear layer
feeds a batch norm" is measured, not guessed from registration order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab._batches import InputFn, iter_inputs
from normlab._checks import check_positive_int, fail
from normlab.surgery._state import preserved

__all__ = ["Context", "build_context"]

LossFn = Callable[[Any, Any], Tensor]
INPUT = ""  # the name of the model input in the data flow


@dataclass
class Context:
    model: nn.Module
    inputs: list[tuple[Any, ...]]  # positional model inputs, one tuple per batch
    targets: list[Any] | None  # one per batch, or None
    loss_fn: LossFn | None
    batch_size: int | None  # the per-device training batch size, if known
    names: dict[int, str] = field(default_factory=dict)  # id(module) -> qualified name
    order: list[str] = field(default_factory=list)  # modules in first-call order
    feeds: dict[str, set[str]] = field(default_factory=dict)  # consumer -> direct producers

    @property
    def samples(self) -> int:
        return sum(batch_rows(args) for args in self.inputs)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def producers(self, name: str) -> set[str]:
        return self.feeds.get(name, set())

    def before(self, a: str, b: str) -> bool:
        """Whether module ``a`` first ran before module ``b``."""
        pos = {n: i for i, n in enumerate(self.order)}
        return a in pos and b in pos and pos[a] < pos[b]

    def run(self, args: tuple[Any, ...], model: nn.Module | None = None) -> Any:
        """``model(*args)`` (default: the audited model) without gradients; a failure names the
        batch."""
        with torch.no_grad():
            try:
                return (model or self.model)(*args)
            except Exception as error:
                fail(
                    ValueError,
                    "audit",
                    "the model",
                    "able to run on every batch of 'data'",
                    f"{type(error).__name__} on batch {_index(self.inputs, args)}: {error}",
                    "check that every batch holds the model's inputs (input_fn= for dicts)",
                )

    def tensor_output(self, out: Any) -> Tensor:
        """The output tensor of a model that may return a tuple or dict (its first tensor)."""
        found = _first_tensor(out)
        if found is None:
            fail(
                ValueError,
                "audit",
                "the model's output",
                "a tensor (or a tuple/dict holding one)",
                type(out).__name__,
                "wrap the model so that it returns its logits",
            )
        return found


def _tensors(value: Any) -> list[Tensor]:
    """Every tensor inside nested tuples/lists/dicts, in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _first_tensor(value: Any) -> Tensor | None:
    """The first tensor with a batch dimension inside nested tuples/lists/dicts."""
    return next((t for t in _tensors(value) if t.dim() > 0), None)


def batch_rows(args: tuple[Any, ...]) -> int:
    """Samples in one batch of model inputs (also inside dicts and tuples)."""
    first = _first_tensor(args)
    return int(first.shape[0]) if first is not None else 1


def _index(inputs: list[tuple[Any, ...]], args: tuple[Any, ...]) -> int:
    return next((i for i, a in enumerate(inputs) if a is args), -1)


def _split_pair(data: Any) -> tuple[Any, Any | None]:
    """``(inputs, targets)`` from an ``(X, y)`` *tuple* of equally long tensors, else
    ``(data, None)`` (a list is a list of batches)."""
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(d, (Tensor, np.ndarray)) for d in data)
        and len(data[0]) == len(data[1])
        and data[0].ndim > 1
    ):
        x, y = (torch.as_tensor(d) for d in data)
        return x, y
    return data, None


def read_batches(
    data: Any, input_fn: InputFn | None, target_fn: Callable[[Any], Any] | None, max_samples: int
) -> tuple[list[tuple[Any, ...]], list[Any] | None, int | None]:
    """At most ``max_samples`` inputs as batches, their targets, and the loader's batch size."""
    owner = "audit"
    x, y = _split_pair(data)
    if isinstance(x, (Tensor, np.ndarray)):
        x = torch.as_tensor(x)
        if x.dim() == 0 or x.shape[0] == 0:
            fail(
                ValueError,
                owner,
                "'data'",
                "a non-empty sample of the training inputs",
                f"a tensor of shape {tuple(x.shape)}",
                "pass e.g. 2000 training inputs, or (inputs, targets)",
            )
        x, y = x[:max_samples], (y[:max_samples] if y is not None else None)
        chunks = list(torch.split(x, 256))
        return [(c,) for c in chunks], (list(torch.split(y, 256)) if y is not None else None), None
    if not isinstance(data, Iterable):
        fail(
            TypeError,
            owner,
            "'data'",
            "a tensor, an (inputs, targets) pair, or an iterable of batches (a DataLoader)",
            type(data).__name__,
            "pass a sample of the training data",
        )
    inputs: list[tuple[Any, ...]] = []
    targets: list[Any] = []
    seen = 0
    raw: list[Any] = []

    def remember(batches: Iterable[Any]) -> Iterable[Any]:
        for batch in batches:
            raw.append(batch)
            yield batch

    for args in iter_inputs(remember(data), owner=owner, input_fn=input_fn):
        batch = raw[-1]
        inputs.append(args)
        if target_fn is not None:
            targets.append(target_fn(batch))
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2 and input_fn is None:
            targets.append(batch[1])
        seen += batch_rows(args)
        if seen >= max_samples:
            break
    first = batch_rows(inputs[0])
    return inputs, (targets if len(targets) == len(inputs) else None), first


def build_context(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn | None,
    input_fn: InputFn | None,
    target_fn: Callable[[Any], Any] | None,
    batch_size: int | None,
    max_samples: int,
) -> Context:
    check_positive_int(max_samples, name="max_samples", owner="audit")
    if batch_size is not None:
        check_positive_int(batch_size, name="batch_size", owner="audit")
    inputs, targets, loader_batch = read_batches(data, input_fn, target_fn, max_samples)
    ctx = Context(
        model=model,
        inputs=inputs,
        targets=targets,
        loss_fn=loss_fn,
        batch_size=batch_size if batch_size is not None else loader_batch,
        names={id(m): name for name, m in model.named_modules()},
    )
    _trace(ctx)
    return ctx


def _trace(ctx: Context) -> None:
    """One eval-mode forward on the first batch, recording who feeds whom."""
    produced: dict[int, tuple[str, int]] = {}  # id(tensor) -> (producer, version when made)
    keep: list[Tensor] = []  # outputs stay alive, so that no id is reused during the pass

    def pre(module: nn.Module, args: Any) -> None:
        name = ctx.names.get(id(module), "?")
        if name not in ctx.order:
            ctx.order.append(name)
        for t in _tensors(args):
            producer, version = produced.get(id(t), ("?", -1))
            if version == t._version:  # changed in place since (e.g. F.relu_): producer unknown
                ctx.feeds.setdefault(name, set()).add(producer)

    def post(module: nn.Module, args: Any, out: Any) -> None:
        name = ctx.names.get(id(module), "?")
        ins = {id(t) for t in _tensors(args)}
        for t in _tensors(out):
            # the innermost module that made a tensor owns it (children finish before their
            # parents); an in-place module's output is its input object, made by it now
            if id(t) not in produced or (id(t) in ins and not list(module.children())):
                produced[id(t)] = (name, t._version)
            keep.append(t)

    for t in _tensors(ctx.inputs[0]):
        produced[id(t)] = (INPUT, t._version)
    with preserved(ctx.model) as handles:
        ctx.model.eval()
        for m in ctx.model.modules():
            if m is ctx.model:
                continue
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        ctx.run(ctx.inputs[0])
