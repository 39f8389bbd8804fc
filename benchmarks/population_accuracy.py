"""Test accuracy with EMA running statistics vs exact population statistics (issue 4's table).

Trains an MLP with batch norm on scikit-learn's digits (inputs standardized on the training split)
for several BN momenta and batch sizes, then evaluates the same weights three ways: with the
running (EMA) statistics left by training, with exact "pooled" statistics and with exact
"inference"-consistent statistics (normlab.surgery.recompute_population_stats). The momentum only
changes the EMA, not training, so the three columns of a row share their weights.

    python benchmarks/population_accuracy.py [--seeds 3] [--out table.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normlab.nn as nl
from _harness import emit, machine
from normlab.data import load_digits_split
from normlab.surgery import recompute_population_stats


def model(momentum: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 64
    for _ in range(3):
        layers += [
            nn.Linear(width, 256, bias=False),
            nl.BatchNorm1d(256, momentum=momentum),
            nn.ReLU(),
            nn.Dropout(0.1),
        ]
        width = 256
    return nn.Sequential(*layers, nn.Linear(width, 10))


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net.eval()(x).argmax(1) == y).float().mean())


def run(momentum: float, batch: int, steps: int, seed: int) -> tuple[float, float, float]:
    data = load_digits_split(seed=0)
    scale = nl.InputStandardizer().fit(data.x_train)
    x, xt = scale(data.x_train), scale(data.x_test)
    torch.manual_seed(seed)
    net = model(momentum)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            net.train()
            loss = F.cross_entropy(net(x[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    ema = accuracy(net, xt, data.y_test)
    loader = [x[i : i + 256] for i in range(0, len(x), 256)]
    pooled, inference = copy.deepcopy(net), copy.deepcopy(net)
    recompute_population_stats(pooled, loader, mode="pooled")
    recompute_population_stats(inference, loader, mode="inference")
    return ema, accuracy(pooled, xt, data.y_test), accuracy(inference, xt, data.y_test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        f"Measured {datetime.date.today()} on {machine()}: digits (1347 train / 450 test), MLP "
        f"64-256x3-10 with BN and dropout 0.1, SGD lr 0.05 momentum 0.9, {args.steps} steps, "
        f"{args.seeds} seeds; test accuracy in %, mean [min – max] over seeds.",
        "",
        "| batch | BN momentum | EMA (running stats) | exact pooled | exact inference |",
        "|---|---|---|---|---|",
    ]
    for batch in (8, 128):
        for momentum in (0.001, 0.01, 0.1, 0.9):
            results = [run(momentum, batch, args.steps, s) for s in range(args.seeds)]
            cells = []
            for column in zip(*results, strict=True):
                pct = [100 * v for v in column]
                cells.append(f"{statistics.mean(pct):.1f} [{min(pct):.1f} – {max(pct):.1f}]")
            lines.append(f"| {batch} | {momentum} | " + " | ".join(cells) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    return emit(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
