"""Per-call overhead of each layer in the cold state: normlab's module against torch.nn's.

In a training loop a norm layer runs right after passes over large activations, which evict the
interpreter's and the dispatcher's data from the caches: every Python-level step and small torch
op then costs several times its warm cost. This script times each layer on a small input (so the
passes over memory are short and the per-call steps dominate) right after copying a large buffer
twice, one call at a time, and prints the median per call (microseconds) for normlab and
torch.nn, forward (no gradient) and forward+backward. It isolates the overhead far more steadily
than whole-layer ratios on a noisy host.

    python benchmarks/overhead.py                     # 8x64x8x8, NCHW and channels-last
    python benchmarks/overhead.py --shape 8x64x8x8 --calls 300 --flush-mb 16
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import emit, fix_allocator, machine
from layers import LAYERS, VARIANTS, Layer, _fwd, _fwd_bwd, build, inputs


def cold_time(fn: Callable[[], object], calls: int, flush: Callable[[], object]) -> float:
    """Median seconds of ``fn()`` timed right after ``flush()`` (a few warm-up calls first)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        flush()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rows(
    layers: list[Layer], shape: tuple[int, ...], calls: int, flush: Callable[[], object]
) -> list[str]:
    lines = []
    for fmt_name in ("NCHW", "channels_last"):
        x, gy = inputs(shape, fmt_name == "channels_last")
        for spec in layers:
            ours, theirs = build(spec, shape)
            cells = []
            for make in (_fwd, _fwd_bwd) if spec.training else (_fwd,):
                args = (x,) if make is _fwd else (x, gy)
                with torch.no_grad() if make is _fwd else torch.enable_grad():
                    a = cold_time(make(ours, *args), calls, flush)  # type: ignore[arg-type]
                    b = cold_time(make(theirs, *args), calls, flush)  # type: ignore[arg-type]
                cells += [f"{a * 1e6:.0f} / {b * 1e6:.0f}", f"**{a / b:.2f}**"]
            cells += ["-", "-"] * (2 - len(cells) // 2)
            lines.append(f"| {spec.name} | {fmt_name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="8x64x8x8", help="small input, NxCxHxW")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per measurement")
    parser.add_argument(
        "--flush-mb", type=float, default=16.0, help="buffer copied twice before each call"
    )
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fixed = fix_allocator()
    shape = tuple(int(v) for v in args.shape.split("x"))
    big = torch.randn(max(1, int(args.flush_mb * (1 << 20)) // 4))
    scratch = torch.empty_like(big)

    def flush() -> None:
        scratch.copy_(big)
        scratch.copy_(big)

    layers = [s for s in LAYERS + VARIANTS if not s.name.startswith("Conv2d")]
    lines = [
        f"Measured {datetime.date.today()} on {machine()}; allocator fix "
        f"{'on' if fixed else 'OFF'}; input {args.shape}, median of {args.calls} single calls, "
        f"each right after copying {args.flush_mb:g} MB twice. Microseconds per call "
        "(normlab / torch.nn) and their ratio.",
        "",
        "| layer | format | fwd us | fwd ratio | fwd+bwd us | fwd+bwd ratio |",
        "|---|---|---|---|---|---|",
        *rows(layers, shape, args.calls, flush),
    ]
    return emit(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
