"""``normlab`` command line: parse, build a config, call the library, print. Nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

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
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normlab`` console script and ``python -m normlab``."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "demo":
        return _demo(args)
    parser.print_help()
    return 2
