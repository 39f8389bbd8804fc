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
from normlab.audit._context import LossFn, build_context, read_batches
from normlab.audit._report import CHECKS, AuditReport, Finding, Severity, sort_findings
from normlab.audit.checks import RUNNERS, remove_biases
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
                try:
                    findings += RUNNERS[name](ctx)
                except Exception as error:  # one check's failure must not lose the others
                    log.warning("audit check %s failed: %s", name, error)
                    skipped[name] = f"failed: {type(error).__name__}: {error}"
        finally:
            _restore_changed(model, state)
    return AuditReport(
        findings=sort_findings(findings),
        checks=chosen,
        skipped=skipped,
        samples=ctx.samples,
        seconds=time.perf_counter() - start,
    )


def _restore_changed(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Put back any tensor a check changed (none should): only those, so that the version
    counters autograd checks stay as they were for everything else."""
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            saved = state.get(key)
            if saved is not None and not torch.equal(value.detach(), saved):
                log.warning("audit: restoring %s, which a check changed", key)
                value.copy_(saved)


def apply_fixes(
    model: nn.Module,
    report: AuditReport,
    data: Any = None,
    *,
    fuse: bool = False,
    keep_architecture: bool = False,
    input_fn: InputFn | None = None,
    max_samples: int | None = None,
) -> nn.Module:
    """A copy of ``model`` with every mechanical fix of ``report`` applied (the original is not
    touched): redundant biases removed and folded into the running mean (outputs unchanged),
    Keras-looking momenta converted, the frozen batch norms named in the report made
    :class:`~normlab.nn.FrozenBatchNorm`, plain dropout in SELU networks replaced by alpha
    dropout, population statistics recomputed on ``data`` (stale statistics; ``data`` as for
    :func:`audit`), and with ``fuse=True`` batch norms folded into the layer before them for
    inference (the copy is then in eval mode).

    ``keep_architecture=True`` keeps the copy's ``state_dict`` loadable into the original
    architecture: redundant biases are zeroed (and folded) instead of removed, frozen batch norms
    are not replaced, nothing is fused.

    Raises:
        ValueError: a statistics fix is needed but ``data`` is None.
    """
    checks = {f.check for f in report.findings if f.fixable}
    fixed = copy.deepcopy(model)
    pairs = [tuple(p) for f in report.by_check("bias-before-norm") for p in f.evidence["pairs"]]
    if pairs:
        remove_biases(fixed, pairs, keep=keep_architecture)
    for f in report.by_check("modes"):
        for name, value in f.evidence.get("momentum", {}).items():
            norm = cast(_BatchNorm, fixed.get_submodule(name))
            norm.momentum = keras_to_torch_momentum(value)
    frozen = {
        n
        for f in report.by_check("modes")
        for n in f.evidence.get("frozen_affine_but_tracking", [])
    }
    if frozen and not keep_architecture:
        fixed = freeze_batchnorm(fixed, only=frozen)
    if _dropout_names(report):
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
        inputs, _, _ = read_batches(data, input_fn, None, max_samples or 1 << 62)
        recompute_population_stats(fixed, inputs, input_fn=lambda args: args)
    if fuse and not keep_architecture:
        found = [tuple(p) for f in report.by_check("fusion") for p in f.evidence["pairs"]]
        fixed = fuse_batchnorm(fixed.eval(), found or None)
    return fixed


def _dropout_names(report: AuditReport) -> set[str]:
    return {
        name
        for f in report.by_check("self-normalizing")
        for name in f.evidence.get("dropout_layers", [])
    }


class _CallableModule(types.ModuleType):
    """``normlab.audit(model, data, ...)`` is :func:`audit`; the module's names stay reachable."""

    def __call__(self, model: nn.Module, data: Any, **options: Any) -> AuditReport:
        return audit(model, data, **options)


sys.modules[__name__].__class__ = _CallableModule
