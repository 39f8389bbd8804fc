"""``normlab.audit``: find the normalization and regularization mistakes in a model.

:func:`audit` measures a model (normlab's or plain torch) on a sample of its training data and
returns an :class:`AuditReport` of findings, each with severity, evidence, cost and fix. The
model is never changed: modes, momenta, hooks, ``requires_grad``, parameters, buffers and the
global RNG are the same bit for bit afterwards. :func:`apply_fixes` returns a repaired *copy* for
the findings whose fix is mechanical.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab._batches import InputFn
from normlab._checks import fail
from normlab.audit._context import LossFn, build_context
from normlab.audit._report import CHECKS, AuditReport, Finding, Severity, sort_findings
from normlab.audit.checks import RUNNERS
from normlab.nn import AlphaDropout
from normlab.surgery import (
    freeze_batchnorm,
    fuse_batchnorm,
    keras_to_torch_momentum,
    recompute_population_stats,
    replace_modules,
)
from normlab.surgery._state import preserved

__all__ = ["CHECKS", "AuditReport", "Finding", "Severity", "apply_fixes", "audit"]

log = logging.getLogger(__name__)

_NEEDS = {"stale-statistics": "loss_fn and targets (compares outputs only without them)"}


def audit(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn | None = None,
    batch_size: int | None = None,
    checks: Sequence[str] | None = None,
    input_fn: InputFn | None = None,
    target_fn: Callable[[Any], Any] | None = None,
    max_samples: int = 2000,
) -> AuditReport:
    """Audit ``model`` on ``data`` (a sample of its *training* data).

    Args:
        model: any ``nn.Module``; left exactly as it was.
        data: the inputs (a tensor), an ``(inputs, targets)`` pair of tensors, or an iterable of
            batches (a ``DataLoader``: tensors or ``(x, y, ...)`` tuples). At most
            ``max_samples`` inputs are used.
        loss_fn: ``loss_fn(outputs, targets)``, e.g. ``F.cross_entropy``; with targets it turns
            the statistics check into a loss/accuracy comparison.
        batch_size: the per-device training batch size (what the batch norms see); default:
            the size of the first batch of a loader. Without it the small-batch check is skipped.
        checks: a subset of :data:`CHECKS` (default: all).
        input_fn, target_fn: map one batch to the model's input / the targets (for dict
            batches and the like).

    Returns:
        An :class:`AuditReport` (``str()`` is a readable table, ``.to_json()`` the record).

    Raises:
        TypeError: ``model`` is not a module, or ``data`` is not understood.
        ValueError: empty data, an unknown check, a bad ``batch_size``/``max_samples``, or a
            model that fails on the data.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        >>> report = audit(net, torch.randn(64, 4), checks=["bias-before-norm"])
        >>> [f.check for f in report.findings]
        ['bias-before-norm']
    """
    if not isinstance(model, nn.Module):
        fail(
            TypeError,
            "audit",
            "argument 'model'",
            "a torch.nn.Module",
            type(model).__name__,
            "pass the model object (not its state_dict)",
        )
    chosen = tuple(CHECKS if checks is None else checks)
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown or not chosen:
        fail(
            ValueError,
            "audit",
            "argument 'checks'",
            f"names from {list(CHECKS)}",
            repr(list(checks or [])),
            "leave checks=None to run them all",
        )
    start = time.perf_counter()
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    with preserved(model), torch.random.fork_rng():
        try:
            ctx = build_context(
                model,
                data,
                loss_fn=loss_fn,
                input_fn=input_fn,
                target_fn=target_fn,
                batch_size=batch_size,
                max_samples=max_samples,
            )
            findings: list[Finding] = []
            skipped: dict[str, str] = {}
            for name in chosen:
                if name == "small-batch" and ctx.batch_size is None:
                    skipped[name] = "no training batch size (pass batch_size= or a loader)"
                    continue
                if name in _NEEDS and (ctx.loss_fn is None or ctx.targets is None):
                    skipped[name] = "partial: " + _NEEDS[name]
                log.info("audit: %s", name)
                findings += RUNNERS[name](ctx)
        finally:
            with torch.no_grad():
                current = model.state_dict(keep_vars=True)
                for key, value in state.items():
                    if key in current:
                        current[key].copy_(value)
    return AuditReport(
        findings=sort_findings(findings),
        checks=chosen,
        skipped=skipped,
        samples=ctx.samples,
        seconds=time.perf_counter() - start,
    )


def apply_fixes(
    model: nn.Module,
    report: AuditReport,
    data: Any = None,
    *,
    fuse: bool = False,
    input_fn: InputFn | None = None,
) -> nn.Module:
    """A copy of ``model`` with every mechanical fix of ``report`` applied (the original is not
    touched): redundant biases removed (folded into the running mean: outputs unchanged),
    Keras-looking momenta converted, frozen batch norms made :class:`FrozenBatchNorm`, plain
    dropout in SELU networks replaced by alpha dropout, population statistics recomputed on
    ``data`` (stale statistics), and with ``fuse=True`` batch norms
    folded for inference (the copy is then in eval mode).

    Raises:
        ValueError: a statistics fix is needed but ``data`` is None.
    """
    checks = {f.check for f in report.findings if f.fixable}
    fixed = copy.deepcopy(model)
    if "bias-before-norm" in checks:
        _remove_biases(fixed, report)
    for f in report.by_check("modes"):
        if "momentum" in f.evidence:
            for name, value in f.evidence["momentum"].items():
                norm = cast(_BatchNorm, fixed.get_submodule(name))
                norm.momentum = keras_to_torch_momentum(value)
    if any("frozen_affine_but_tracking" in f.evidence for f in report.by_check("modes")):
        fixed = freeze_batchnorm(fixed)
    if any("dropout_layers" in f.evidence for f in report.by_check("self-normalizing")):
        fixed = replace_modules(
            fixed,
            lambda name, m: name in _dropout_names(report),
            lambda name, m: AlphaDropout(float(getattr(m, "p", 0.0))),
        )
    if "stale-statistics" in checks:
        if data is None:
            fail(
                ValueError,
                "apply_fixes",
                "argument 'data'",
                "the training data (the running statistics must be recomputed)",
                "None",
                "pass the training loader: apply_fixes(model, report, train_loader)",
            )
        recompute_population_stats(fixed, data, input_fn=input_fn)
    if fuse and "fusion" in checks:
        fixed = fuse_batchnorm(fixed.eval())
    return fixed


def _dropout_names(report: AuditReport) -> set[str]:
    return {
        name
        for f in report.by_check("self-normalizing")
        for name in f.evidence.get("dropout_layers", [])
    }


def _remove_biases(model: nn.Module, report: AuditReport) -> None:
    """Drop each redundant bias; a norm with running statistics absorbs it into its running mean
    (eval outputs unchanged; in training the mean subtraction removed it anyway)."""
    pairs = [tuple(p) for f in report.by_check("bias-before-norm") for p in f.evidence["pairs"]]
    with torch.no_grad():
        for layer_name, norm_name in pairs:
            layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
            bias = layer.bias
            if not isinstance(bias, Tensor):
                continue
            running = getattr(norm, "running_mean", None)
            if isinstance(running, Tensor):
                running.sub_(bias.detach().to(running.dtype))
            layer.bias = None  # type: ignore[assignment]


class _CallableModule(types.ModuleType):
    """``normlab.audit(model, data, ...)`` is :func:`audit`; the module's names stay reachable."""

    def __call__(self, model: nn.Module, data: Any, **options: Any) -> AuditReport:
        return audit(model, data, **options)


sys.modules[__name__].__class__ = _CallableModule
