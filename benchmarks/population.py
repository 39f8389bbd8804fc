"""Cost of exact population statistics vs one forward pass, update_bn and fvcore's PreciseBN.

Usage::

    python benchmarks/population.py            # the table in docs/population-statistics.md
    python benchmarks/population.py --quick    # a smoke run

Each row times one call on the same data (1 thread, median of repeats) and divides by the time
of one eval-mode forward pass over that data. fvcore is optional (``pip install fvcore``, benchmark
environment only); its row is skipped when it is not installed.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normlab.nn as nl
from _harness import emit, fix_allocator, machine
from normlab.surgery import recompute_population_stats


def vgg(width: int = 16) -> nn.Sequential:
    """VGG-style CNN for 3x32x32 inputs: four conv-BN-ReLU blocks, two poolings, a linear head."""
    c = width
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1, bias=False),
        nl.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nl.BatchNorm2d(c),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1, bias=False),
        nl.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False),
        nl.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(2 * c * 64, 10),
    )


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 256, bias=False),
        nl.BatchNorm1d(256),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(256, 256, bias=False),
        nl.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, 256, bias=False),
        nl.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_pass(model: nn.Module, loader: list[torch.Tensor]) -> None:
    model.eval()
    with torch.no_grad():
        for x in loader:
            model(x)


def rows(name: str, model: nn.Module, loader: list[torch.Tensor], repeats: int) -> list[str]:
    base = timed(lambda: forward_pass(model, loader), repeats)
    candidates: dict[str, Callable[[], object]] = {
        "one eval forward pass (reference)": lambda: forward_pass(model, loader),
        "normlab pooled": lambda: recompute_population_stats(model, loader, mode="pooled"),
        "normlab inference": lambda: recompute_population_stats(model, loader),
        "torch update_bn": lambda: torch.optim.swa_utils.update_bn(loader, model),
    }
    try:
        from fvcore.nn.precise_bn import update_bn_stats

        def fvcore_run() -> None:
            model.train()  # fvcore only updates layers in training mode
            update_bn_stats(model, loader, num_iters=len(loader))
            model.eval()

        candidates["fvcore update_bn_stats"] = fvcore_run
    except ImportError:
        pass
    passes = recompute_population_stats(model, loader).num_passes
    out = []
    for label, fn in candidates.items():
        t = timed(fn, repeats)
        extra = f" ({passes} passes)" if label == "normlab inference" else ""
        out.append(f"| {name} | {label}{extra} | {t * 1e3:.1f} | {t / base:.2f} |")
        print(out[-1], file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny data, one repeat (smoke run)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fix_allocator()
    torch.manual_seed(0)
    n, repeats = (256, 1) if args.quick else (4096, 5)
    images = [torch.randn(128, 3, 32, 32) for _ in range(n // 128)]
    features = [torch.randn(128, 64) for _ in range(n // 128)]
    lines = [
        f"Measured {datetime.date.today()} on {machine()}: {n} samples in batches of 128, "
        f"median of {repeats} runs; ratio = time / one eval-mode forward pass over the same data.",
        "",
        "| model | method | ms | × one forward |",
        "|---|---|---|---|",
    ]
    lines += rows("VGG-4 CNN, 3x32x32", vgg(), images, repeats)
    lines += rows("MLP 64-256x3", mlp(), features, repeats)
    return emit(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
