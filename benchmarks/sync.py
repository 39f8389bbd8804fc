"""SyncBatchNorm across 2 gloo processes vs batch norm without synchronization (issue 5).

Both processes run at once (one thread each, the machine's two cores), each on its own
(32, 64, 32, 32) float32 batch, forward + backward. The baselines run in the same two processes
at the same time, so both sides share memory bandwidth alike; ratios are SyncBatchNorm time /
baseline time.

    python benchmarks/sync.py [--repeats 20] [--out table.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normlab.nn as nl
from _harness import emit, fix_allocator, machine

SHAPE = (32, 64, 32, 32)


def _time(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor, repeats: int) -> float:
    params = [x, *layer.parameters()]
    times = []
    for i in range(repeats + 2):
        dist.barrier()
        start = time.perf_counter()
        torch.autograd.grad(layer(x), params, gy)
        elapsed = time.perf_counter() - start
        if i >= 2:  # warm-up
            times.append(elapsed)
    return statistics.median(times)


def _worker(rank: int, init: str, out: str, repeats: int) -> None:
    torch.set_num_threads(1)
    fix_allocator()
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(SHAPE, generator=g).requires_grad_()
        gy = torch.randn(SHAPE, generator=g)
        results = {
            "torch.nn.BatchNorm2d (no sync)": _time(nn.BatchNorm2d(64).train(), x, gy, repeats),
            "normlab BatchNorm2d (no sync)": _time(nl.BatchNorm2d(64).train(), x, gy, repeats),
            "normlab SyncBatchNorm (2 gloo processes)": _time(
                nl.SyncBatchNorm(64).train(), x, gy, repeats
            ),
        }
        torch.save(results, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in the workers (and in the header)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(f"{tmp}/init", f"{tmp}/res", args.repeats), nprocs=2, join=True)
        results = [torch.load(f"{tmp}/res.{r}", weights_only=True) for r in (0, 1)]
    base = max(r["torch.nn.BatchNorm2d (no sync)"] for r in results)
    lines = [
        f"Measured {datetime.date.today()} on {machine()}, 2 processes x 1 thread, "
        f"{'x'.join(map(str, SHAPE))} float32 per process, forward+backward, median of "
        f"{args.repeats}; the slower process's time; ratio vs torch.nn.BatchNorm2d without sync.",
        "",
        "| layer | ms | ratio |",
        "|---|---|---|",
    ]
    for name in results[0]:
        t = max(r[name] for r in results)
        lines.append(f"| {name} | {t * 1e3:.2f} | **{t / base:.2f}** |")
    return emit(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
