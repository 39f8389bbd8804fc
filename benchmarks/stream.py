"""Exact statistics over a stream larger than memory, with flat memory (issue 10).

    python benchmarks/stream.py [--gb 4] [--features 1024] [--batch 4096] [--out table.md]

A seeded generator yields ``--gb`` GB of float32 batches (features with different means and
scales), never held at once. Over it, in this one process:

1. ``InputStandardizer.fit`` (streaming, float64 Chan merges);
2. ``recompute_population_stats`` of a ``Linear -> BatchNorm1d`` model (the batch norm sees the
   linear layer's outputs), mode "pooled" (one pass);

and, as the oracle, a plain float64 two-pass over the regenerated stream (sums, then squared
deviations). Reported: the largest relative difference to the oracle, the wall time, and the
peak resident memory (ru_maxrss) against the memory after the first batch -- "flat" means the
peak stays within a few batches of it, however many GB stream past.
"""

from __future__ import annotations

import argparse
import datetime
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import emit, machine
from normlab.nn import BatchNorm1d, InputStandardizer
from normlab.surgery import recompute_population_stats


def stream(gb: float, features: int, batch: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """``gb`` GB of float32 ``(batch, features)`` tensors, generated batch by batch."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.linspace(-50, 50, features)
    scale = torch.logspace(-2, 2, features)
    batches = max(1, int(gb * 1e9 / (4 * batch * features)))
    for _ in range(batches):
        yield torch.randn(batch, features, generator=g) * scale + loc


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def oracle(
    batches: Iterator[torch.Tensor], again: Iterator[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 two-pass mean and biased variance per feature."""
    total, count = None, 0
    for x in batches:
        s = x.double().sum(0)
        total = s if total is None else total + s
        count += x.shape[0]
    assert total is not None
    mean = total / count
    sq = None
    for x in again:
        d = ((x.double() - mean) ** 2).sum(0)
        sq = d if sq is None else sq + d
    assert sq is not None
    return mean, sq / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=4.0)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    def data() -> Iterator[torch.Tensor]:
        return stream(args.gb, args.features, args.batch)

    first = next(data())
    del first
    base = rss_mb()
    start = time.perf_counter()
    scaler = InputStandardizer(axis=1).fit(data())
    t_scaler = time.perf_counter() - start
    mean, var = oracle(data(), data())
    err_mean = float(((scaler.mean.reshape(-1) - mean).abs() / var.sqrt()).max())
    err_var = float(((scaler.var.reshape(-1) - var).abs() / var).max())

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.features, 64), BatchNorm1d(64))
    start = time.perf_counter()
    recompute_population_stats(model, data(), mode="pooled")
    t_pop = time.perf_counter() - start
    with torch.no_grad():
        h_mean, h_var = oracle((model[0](x) for x in data()), (model[0](x) for x in data()))
    n = max(1, int(args.gb * 1e9 / (4 * args.batch * args.features))) * args.batch
    err_bn_mean = float(((model[1].running_mean.double() - h_mean).abs() / h_var.sqrt()).max())
    unbiased = h_var * n / max(n - 1, 1)
    err_bn_var = float(((model[1].running_var.double() - unbiased).abs() / unbiased).max())
    peak = rss_mb()
    batch_mb = 4 * args.batch * args.features / 2**20
    lines = [
        f"Measured {datetime.date.today()} on {machine()}.",
        "",
        f"Stream: {args.gb:g} GB of float32 ({args.batch} x {args.features} batches of "
        f"{batch_mb:.0f} MiB), generated on the fly, passed 6 times (2 fits, 4 oracle passes).",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| InputStandardizer.fit: max rel. error of mean (in stds) / variance | {err_mean:.1e} / {err_var:.1e} |",
        f"| recompute_population_stats (pooled): max rel. error of mean (in stds) / variance | {err_bn_mean:.1e} / {err_bn_var:.1e} |",
        f"| time: standardizer fit / population statistics | {t_scaler:.1f} s / {t_pop:.1f} s |",
        f"| peak RSS after the first batch / at the end | {base:.0f} MiB / {peak:.0f} MiB (+{peak - base:.0f} MiB; one batch is {batch_mb:.0f} MiB) |",
    ]
    return emit(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
