"""``normlab`` command line: parse, build a config, call the library, print. Nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import normlab

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab", description="Normalization and stochastic regularization for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"normlab {normlab.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="train an MLP on the digits with and without batch norm; print accuracies"
    )
    demo.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    demo.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    demo.add_argument("--batch-size", type=int, default=60, help="mini-batch size (default 60)")
    demo.add_argument("--activation", default="sigmoid", choices=["sigmoid", "relu", "tanh"])
    demo.add_argument("--seed", type=int, default=0, help="seed for weights and batches")
    _study_parser(sub)
    _audit_parser(sub)
    report = sub.add_parser(
        "report", help="re-render report.md and report.html from a study directory (no training)"
    )
    report.add_argument("dir", type=Path, help="the --out directory of `normlab study`")
    return parser


DEFAULT_OUT = Path("normlab-study")


def _audit_parser(sub: Any) -> None:
    audit = sub.add_parser(
        "audit",
        help="find normalization and regularization mistakes in a model",
        description=(
            "Measure MODEL (built by 'module:factory' or 'file.py:factory') on a sample of its "
            "training data and report each problem with evidence, cost and fix. Exit status: "
            "0 without findings, 1 with findings, 2 on bad input."
        ),
    )
    audit.add_argument("model", metavar="MODEL", help="module:factory or file.py:factory")
    audit.add_argument("--checkpoint", type=Path, help="a state dict to load (weights_only)")
    audit.add_argument(
        "--data",
        default="digits",
        help="an embedded dataset (its training split) or a .pt file of tensors (default digits)",
    )
    audit.add_argument("--samples", type=int, default=2000, help="inputs to use (default 2000)")
    audit.add_argument(
        "--batch-size", type=int, default=None, help="the per-device training batch size"
    )
    audit.add_argument(
        "--loss",
        default="auto",
        choices=["auto", "cross-entropy", "mse", "none"],
        help="loss for the statistics check (auto: cross-entropy for integer targets)",
    )
    audit.add_argument("--checks", nargs="+", metavar="CHECK", help="a subset of the checks")
    audit.add_argument("--json", type=Path, help="write the report as JSON here")
    audit.add_argument("--html", type=Path, help="write the report as an HTML page here")
    audit.add_argument(
        "--fix", type=Path, help="save the state dict of the repaired copy (apply_fixes) here"
    )


def _audit(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F
    from rich.console import Console

    from normlab.audit import apply_fixes, audit
    from normlab.audit.loading import load_model, load_tensors
    from normlab.data import available_datasets, load_dataset
    from normlab.report.audit import audit_html_page, audit_table

    if args.samples < 1:
        raise ValueError(
            f"normlab audit: option --samples must be a positive number of inputs, got "
            f"{args.samples}. Fix: pass e.g. --samples 2000"
        )
    model = load_model(args.model, args.checkpoint)
    y: torch.Tensor | None
    if args.data in available_datasets():
        dataset = load_dataset(args.data)
        x, y = dataset.x_train, dataset.y_train
    else:
        x, y = load_tensors(args.data)
    losses: dict[str, Callable[..., torch.Tensor] | None] = {
        "cross-entropy": F.cross_entropy,
        "mse": F.mse_loss,
        "none": None,
    }
    loss_name = args.loss
    if loss_name == "auto":
        integer = y is not None and not torch.is_floating_point(y)
        loss_name = "cross-entropy" if integer else ("mse" if y is not None else "none")
    loss_fn = losses[loss_name]
    data = (x, y) if y is not None else x
    report = audit(
        model,
        data,
        loss_fn=loss_fn,
        batch_size=args.batch_size,
        checks=args.checks,
        max_samples=args.samples,
    )
    Console(stderr=False, width=140).print(audit_table(report))
    for check, why in report.skipped.items():
        print(f"skipped {check}: {why}")
    if args.json:
        args.json.write_text(report.to_json())
        print(f"JSON: {args.json}")
    if args.html:
        args.html.write_text(audit_html_page(report, f"normlab audit of {args.model}"))
        print(f"HTML: {args.html}")
    if args.fix:
        fixed = apply_fixes(model, report, x[: args.samples], keep_architecture=True)
        torch.save(fixed.state_dict(), args.fix)
        print(f"repaired copy (state dict, loads into {args.model}()): {args.fix}")
        if any(f.check == "modes" for f in report.findings):
            print(
                "note: momentum and mode fixes are not in a state dict; change them in the factory"
            )
    return 0 if report.ok else 1


def _study_parser(sub: Any) -> None:
    study = sub.add_parser(
        "study",
        help="reproduce the lecture's claims on offline data and write a report",
        description=(
            "Without a subcommand: run the default selection (bn-training, noisy-bn, landscape) "
            "and write report.html / report.md. Rerunning the same command skips finished runs "
            "and resumes interrupted ones."
        ),
    )
    _run_options(study)
    study_sub = study.add_subparsers(dest="study_command", metavar="SUBCOMMAND")
    study_sub.add_parser("list", help="list the studies and their claims")
    run = study_sub.add_parser("run", help="run named studies and write the report")
    run.add_argument("names", nargs="+", metavar="NAME", help="study names (see `study list`)")
    _run_options(run, keep_parent=True)


def _run_options(parser: argparse.ArgumentParser, keep_parent: bool = False) -> None:
    """The options of ``study`` and ``study run``. With ``keep_parent`` (on ``run``) they have no
    defaults of their own, so ``study --quick run NAME`` keeps the ``--quick`` given before."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if keep_parent else value

    parser.add_argument(
        "--quick", action="store_true", default=default(False), help="fewer seeds and steps"
    )
    parser.add_argument("--data", default=default(None), help="dataset instead of each study's own")
    parser.add_argument("--seeds", type=int, default=default(None), help="seeds per configuration")
    parser.add_argument(
        "--steps", type=int, default=default(None), help="override every run's length"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default(DEFAULT_OUT),
        help=f"output directory (default {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default(os.cpu_count() or 1),
        help="parallel runs (default: cores)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=default(30.0),
        metavar="SECONDS",
        help="checkpoint running runs this often (default 30)",
    )
    parser.add_argument(
        "--executor",
        default=default("process"),
        choices=["process", "ray"],
        help="local pool or Ray",
    )


def _demo(args: argparse.Namespace) -> int:
    from normlab.experiments.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        activation=args.activation,
        seed=args.seed,
    )
    print(
        f"MLP {cfg.hidden} ({cfg.activation}) on scikit-learn digits, SGD lr={cfg.lr}, "
        f"batch {cfg.batch_size}, {cfg.epochs} epochs, seed {cfg.seed}"
    )
    results = run_demo(cfg)
    header = "epoch  " + "  ".join(f"{r.norm:>10s}" for r in results)
    print("test accuracy after each epoch (eval mode)")
    print(header)
    for epoch in range(cfg.epochs):
        row = "  ".join(f"{100 * r.test_accuracy[epoch]:9.1f}%" for r in results)
        print(f"{epoch + 1:5d}  {row}")
    for r in results:
        print(
            f"final test accuracy, norm={r.norm}: {100 * r.test_accuracy[-1]:.1f}% "
            f"({r.seconds:.1f} s)"
        )
    return 0


def _study_list() -> int:
    from normlab.experiments.studies import DEFAULT_SELECTION, available_studies, get_study

    for name in available_studies():
        study = get_study(name)
        mark = " (default)" if name in DEFAULT_SELECTION else ""
        print(f"{name}{mark}: {study.title}")
        print(f"    data {study.data}, {study.seeds} seeds; claim: {study.claim}")
    return 0


def _study_run(names: Sequence[str], args: argparse.Namespace) -> int:
    from normlab.experiments.runner import Interrupted, execute, update_manifest
    from normlab.experiments.studies import Options, get_study
    from normlab.report import render_report

    options = Options(quick=args.quick, data=args.data, seeds=args.seeds, steps=args.steps)
    studies = [get_study(name) for name in names]
    configs = [cfg for study in studies for _, cfg in study.runs(options)]
    out = args.out
    from normlab.experiments.runner import check_output_dir

    check_output_dir(out)
    update_manifest(out, names, options)
    total = len({c.run_id for c in configs})
    print(f"{', '.join(names)}: {total} runs on {args.workers} worker(s) into {out}/")
    start = time.perf_counter()

    def on_done(cfg: Any, result: Any, done: int, count: int) -> None:
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (count - done)
        if isinstance(result, BaseException):
            what = f"FAILED: {result}"
        else:
            acc = (result.get("final") or {}).get("test_acc_exact")
            what = (
                f"{result['status']}, test {100 * acc:.1f}%"
                if acc is not None
                else result["status"]
            )
            what += f", {result['seconds']:.1f} s"
        print(
            f"[{done:3d}/{count}] {cfg.run_id}: {what} (elapsed {elapsed:.0f} s, ~{eta:.0f} s left)",
            flush=True,
        )

    try:
        execute(
            configs,
            out,
            workers=args.workers,
            executor=args.executor,
            on_done=on_done,
            checkpoint_seconds=args.checkpoint_every,
        )
    except Interrupted as stop:
        print(f"\n{stop}", file=sys.stderr)
        return 130
    md, html = render_report(out)
    print(f"done in {time.perf_counter() - start:.0f} s; report: {html} and {md}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normlab`` console script and ``python -m normlab``."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "study":
            from normlab.experiments.studies import DEFAULT_SELECTION

            if args.study_command == "list":
                return _study_list()
            if args.study_command == "run":
                return _study_run(args.names, args)
            return _study_run(DEFAULT_SELECTION, args)
        if args.command == "audit":
            return _audit(args)
        if args.command == "report":
            from normlab.report import render_report

            md, html = render_report(args.dir)
            print(f"report: {html} and {md}")
            return 0
    except (ValueError, TypeError, OSError, ImportError) as error:  # OSError: unwritable --out
        print(f"normlab: error: {error}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2
