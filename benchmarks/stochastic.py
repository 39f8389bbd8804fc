"""Dropout vs torch, and the cost of DropConnect vs a dense Linear (issue 6).

    python benchmarks/stochastic.py [--min-time 1.0] [--out table.md]

1 thread, float32, forward+backward unless marked, ratio = normlab / peer in the same run (peers
and normlab alternate, see _harness.compare). Memory: bytes autograd saves for the backward pass
(``saved_tensors_hooks``) plus the largest mask chunk DropConnect draws at once.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normlab.nn as nl
from _harness import compare, emit, fix_allocator, machine
from normlab.functional.dropconnect import CHUNK_ELEMENTS


def _fwd(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return layer(x)

    return run


def _fwd_bwd(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    xr = x.detach().clone().requires_grad_()
    params = [xr, *layer.parameters()]

    def run() -> object:
        y = layer(xr)
        return torch.autograd.grad(y, params, torch.ones_like(y))

    return run


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.detach().clone().requires_grad_())
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    args = parser.parse_args(argv)
    n, width, image = (8, 64, (4, 8, 8, 8)) if args.quick else (128, 1024, (64, 64, 32, 32))
    torch.set_num_threads(1)
    fix_allocator()
    torch.manual_seed(0)
    lines = [
        f"Measured {datetime.date.today()} on {machine()}; median ± IQR/median; ratio = normlab / "
        f"peer, same run (min_run_time={args.min_time}s).",
        "",
        "| row | normlab ms | peer ms | ratio | peer |",
        "|---|---|---|---|---|",
    ]

    def row(name: str, ours: Callable[[], object], theirs: Callable[[], object], peer: str) -> None:
        a, b = compare(ours, theirs, args.min_time)
        lines.append(
            f"| {name} | {a.median * 1e3:.3f} ±{100 * a.spread:.0f}% | {b.median * 1e3:.3f} "
            f"±{100 * b.spread:.0f}% | **{a.median / b.median:.2f}** | {peer} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)

    x = torch.randn(image)
    shape = "x".join(map(str, image))
    ours, theirs = nl.Dropout(0.5).train(), nn.Dropout(0.5).train()
    row(f"Dropout(0.5) fwd, {shape}", _fwd(ours, x), _fwd(theirs, x), "torch.nn.Dropout")
    row(
        f"Dropout(0.5) fwd+bwd, {shape}",
        _fwd_bwd(ours, x),
        _fwd_bwd(theirs, x),
        "torch.nn.Dropout",
    )
    seeded = nl.Dropout(0.5, seed=0).train()
    row(
        f"Dropout(0.5, seed=0) fwd, {shape}",
        _fwd(seeded, x),
        _fwd(theirs, x),
        "torch.nn.Dropout",
    )
    fx = torch.randn(image)
    row(
        "FeatureDropout2d(0.5) fwd+bwd",
        _fwd_bwd(nl.FeatureDropout2d(0.5).train(), fx),
        _fwd_bwd(nn.Dropout2d(0.5).train(), fx),
        "torch.nn.Dropout2d",
    )
    row(
        "AlphaDropout(0.1) fwd+bwd",
        _fwd_bwd(nl.AlphaDropout(0.1).train(), x),
        _fwd_bwd(nn.AlphaDropout(0.1).train(), x),
        "torch.nn.AlphaDropout",
    )

    v = torch.randn(n, width)
    dense = nn.Linear(width, width)
    batch_mode = nl.DropConnectLinear(width, width, p=0.5, mode="batch").train()
    sample_mode = nl.DropConnectLinear(width, width, p=0.5, mode="sample").train()
    row(
        f"DropConnectLinear per-batch mask fwd+bwd, {n}x{width}->{width}",
        _fwd_bwd(batch_mode, v),
        _fwd_bwd(dense, v),
        "nn.Linear",
    )
    row(
        f"DropConnectLinear per-sample masks fwd+bwd, {n}x{width}->{width}",
        _fwd_bwd(sample_mode, v),
        _fwd_bwd(dense, v),
        "nn.Linear",
    )
    gaussian = nl.DropConnectLinear(
        width, width, p=0.5, inference="gaussian", samples=100, activation=nn.ReLU()
    ).eval()
    row(
        "DropConnectLinear Gaussian inference (100 draws) fwd",
        _fwd(gaussian, v),
        _fwd(nn.Sequential(dense, nn.ReLU()), v),
        "nn.Linear + ReLU",
    )
    chunk = min(n, CHUNK_ELEMENTS // (width * width)) * width * width * 4
    lines += [
        "",
        f"Memory for backward, {n}x{width}->{width} float32 (bytes autograd saves; DropConnect also draws "
        f"at most {CHUNK_ELEMENTS:,} mask entries at once):",
        "",
        "| layer | saved for backward | largest mask chunk |",
        "|---|---|---|",
        f"| nn.Linear | {saved_bytes(dense, v) / 2**20:.1f} MiB | - |",
        f"| DropConnectLinear per-batch | {saved_bytes(batch_mode, v) / 2**20:.1f} MiB | "
        f"{width * width * 4 / 2**20:.1f} MiB |",
        f"| DropConnectLinear per-sample | {saved_bytes(sample_mode, v) / 2**20:.1f} MiB | "
        f"{chunk / 2**20:.1f} MiB |",
    ]
    return emit(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
