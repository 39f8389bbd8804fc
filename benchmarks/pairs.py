"""Chosen layers against their torch.nn counterparts in alternating pairs of calls.

On a shared host the machine's speed drifts within seconds (other guests' memory traffic, CPU
steal): blocked timings taken one after the other (``run_all.py``, ``layers.py``) then disagree
by 10-40 % between runs. Here each pair is a few calls of one layer immediately followed by the
same number of the other's (torch.nn first in even pairs, normlab first in odd ones: A B, B A,
...), and the ratio is taken per pair, so both sides of one ratio see the same host; the table
gives the median of those ratios and their quartiles. This is the measure behind the A/B numbers
in commit messages and issue notes.

Usage::

    python benchmarks/pairs.py L1 Linf                    # both issue shapes, channels_last
    python benchmarks/pairs.py "BatchNorm2d train" --format nchw --pairs 50
    python benchmarks/pairs.py Ghost --shapes 8x16x8x8 --pairs 3 --inner 1   # a smoke run

A name selects every layer of ``layers.py`` (``LAYERS`` and ``VARIANTS``) whose row name contains
it (case-insensitive). Ratio = normlab / torch.nn; < 1 is faster.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import emit, fix_allocator, machine
from layers import LAYERS, VARIANTS, Layer, _fwd, _fwd_bwd, build, inputs, matching


def paired(
    theirs: Callable[[], object], ours: Callable[[], object], pairs: int, inner: int
) -> tuple[float, float, float, float, float]:
    """``(median, first quartile, third quartile)`` of the per-pair ratios ``ours / theirs``, then
    the median seconds per call of each (``theirs``, ``ours``); ``inner`` calls per side per
    pair, ``theirs`` first in even pairs and ``ours`` first in odd ones, after one warm-up call
    of each."""
    theirs()
    ours()
    ratios, t_theirs, t_ours = [], [], []
    for i in range(pairs):
        first, second = (theirs, ours) if i % 2 == 0 else (ours, theirs)
        start = time.perf_counter()
        for _ in range(inner):
            first()
        middle = time.perf_counter()
        for _ in range(inner):
            second()
        end = time.perf_counter()
        a, b = (middle - start, end - middle) if i % 2 == 0 else (end - middle, middle - start)
        t_theirs.append(a / inner)
        t_ours.append(b / inner)
        ratios.append(b / a)
    q1, median, q3 = statistics.quantiles(ratios, n=4) if pairs > 1 else ratios * 3
    return median, q1, q3, statistics.median(t_theirs), statistics.median(t_ours)


def select(names: Sequence[str]) -> list[Layer]:
    """The layers whose row names contain one of ``names`` (case-insensitive), in table order."""
    chosen = matching((*LAYERS, *VARIANTS), names)
    if not chosen:
        known = ", ".join(repr(spec.name) for spec in (*LAYERS, *VARIANTS))
        raise SystemExit(
            f"benchmarks/pairs.py: no layer matches {list(names)}; expected part of one of the "
            f"row names {known}; got none matching -- pass e.g. L1 or 'BatchNorm2d train'"
        )
    return chosen


def _cell(result: tuple[float, float, float, float, float]) -> str:
    median, q1, q3, t_theirs, t_ours = result
    return f"**{median:.2f}** [{q1:.2f}, {q3:.2f}] | {t_ours * 1e3:.3f} / {t_theirs * 1e3:.3f}"


def rows(
    layers: Sequence[Layer], shapes: Sequence[tuple[int, ...]], fmt: str, pairs: int, inner: int
) -> list[str]:
    """The table's lines: one row per shape and layer, forward and (training layers)
    forward+backward, on seeded random input of the memory format ``fmt``."""
    lines = [
        "| layer | shape | format | fwd ratio [quartiles] | fwd ms normlab / torch.nn "
        "| fwd+bwd ratio [quartiles] | fwd+bwd ms normlab / torch.nn |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        x, gy = inputs(shape, fmt == "channels_last")
        for spec in layers:
            ours, theirs = build(spec, shape)
            forward = _cell(paired(_fwd(theirs, x), _fwd(ours, x), pairs, inner))
            both = "- | -"
            if spec.training:
                both = _cell(paired(_fwd_bwd(theirs, x, gy), _fwd_bwd(ours, x, gy), pairs, inner))
            size = "x".join(map(str, shape))
            lines.append(f"| {spec.name} | {size} | {fmt} | {forward} | {both} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="+", help="parts of row names of layers.py's layers")
    parser.add_argument("--shapes", nargs="+", default=["64x64x32x32", "256x256x14x14"])
    parser.add_argument("--format", choices=["channels_last", "nchw"], default="channels_last")
    parser.add_argument("--pairs", type=int, default=30, help="pairs per comparison")
    parser.add_argument("--inner", type=int, default=3, help="calls per side in each pair")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if min(args.pairs, args.inner, args.threads) < 1:
        parser.error(
            "--pairs, --inner and --threads must be at least 1; got "
            f"{args.pairs}, {args.inner} and {args.threads}: pass positive counts"
        )
    layers = select(args.names)
    shapes = [_shape(parser, spec, args.format) for spec in args.shapes]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads)
        fixed = fix_allocator()
        header = [
            f"Measured {datetime.date.today()} on {machine()}; allocator fix "
            f"{'on' if fixed else 'OFF'}; {args.pairs} pairs of {args.inner} call(s) per side, "
            "alternately torch.nn and normlab first. Ratio = normlab / torch.nn per pair: "
            "median [quartiles].",
            "",
        ]
        table = rows(layers, shapes, args.format, args.pairs, args.inner)
    finally:
        torch.set_num_threads(threads)
    return emit(header + table, args.out)


def _shape(parser: argparse.ArgumentParser, spec: str, fmt: str) -> tuple[int, ...]:
    """``"64x64x32x32"`` as a tuple of positive ints (4 of them for channels_last), else
    ``parser.error``."""
    parts = spec.split("x")
    if all(p.isdigit() and int(p) > 0 for p in parts) and (
        len(parts) == 4 if fmt == "channels_last" else len(parts) >= 2
    ):
        return tuple(int(p) for p in parts)
    wanted = "N x C x H x W" if fmt == "channels_last" else "N x C x ..."
    parser.error(
        f"--shapes: each shape must be {wanted}, positive ints joined by 'x' for --format "
        f"{fmt}; got {spec!r}: pass e.g. 64x64x32x32"
    )


if __name__ == "__main__":
    raise SystemExit(main())
