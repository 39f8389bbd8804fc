"""Torch ops per call on normlab's accelerator routes: a proxy for kernel launches on a GPU.

On a GPU every torch op is at least one kernel launch, and the host's few microseconds per launch,
not the bytes moved, set the time of the small per-channel steps (the H200 run in
docs/benchmarks.md: the variants' many small ops cost more than their passes over a 205 MB
activation). This script counts the ops each layer dispatches per training forward+backward (and
per eval forward) inside ``accelerator_routes()`` -- the CPU takes the routes normlab takes on
accelerators -- against its torch.nn counterpart, with a ``TorchDispatchMode`` that skips views
and allocations. Counts, not times: the same on any machine, no GPU needed.

    python benchmarks/launches.py                    # 8x16x4x4, NCHW and channels-last
    python benchmarks/launches.py --shape 8x16x4x4 --verbose --out launches.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import emit
from layers import LAYERS, VARIANTS, _fwd, _fwd_bwd, build, inputs
from normlab.functional._core import accelerator_routes

# ops that launch no kernel of their own (views, metadata, allocations)
_FREE = frozenset(
    [
        "view",
        "_unsafe_view",
        "reshape",
        "expand",
        "permute",
        "transpose",
        "t",
        "as_strided",
        "detach",
        "alias",
        "unsqueeze",
        "squeeze",
        "slice",
        "select",
        "unbind",
        "split",
        "chunk",
        "movedim",
        "lift_fresh",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
    ]
)


class OpCounter(TorchDispatchMode):
    """Counts the torch ops dispatched inside it by name, views and allocations excepted."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in _FREE:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(run: Callable[[], object]) -> collections.Counter[str]:
    """The ops of one call of ``run`` (after one uncounted call: lazy set-up is not counted)."""
    run()
    counter = OpCounter()
    with counter:
        run()
    return counter.counts


def rows(shape: tuple[int, ...], verbose: bool) -> list[str]:
    lines = []
    for fmt_name in ("NCHW", "channels_last"):
        x, gy = inputs(shape, fmt_name == "channels_last")
        for spec in LAYERS + VARIANTS:
            ours, theirs = build(spec, shape)
            counts = [
                count_ops(_fwd_bwd(m, x, gy) if spec.training else _fwd(m, x))
                for m in (ours, theirs)
            ]
            kind = "fwd+bwd" if spec.training else "fwd"
            n_ours, n_theirs = (sum(c.values()) for c in counts)
            detail = ""
            if verbose:
                detail = " | " + ", ".join(f"{k} {v}" for k, v in sorted(counts[0].items()))
            lines.append(
                f"| {spec.name} | {fmt_name} | {kind} | {n_ours} | {n_theirs} | "
                f"{n_ours / max(n_theirs, 1):.1f}{detail} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="8x16x4x4", help="input, NxCxHxW")
    parser.add_argument("--verbose", action="store_true", help="list normlab's ops by name")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    with accelerator_routes():
        body = rows(shape, args.verbose)
    extra = " normlab's ops |" if args.verbose else ""
    return emit(
        [
            f"Counted {datetime.date.today()}, torch {torch.__version__}; input {args.shape}; "
            "torch ops per call inside accelerator_routes() (views and allocations not "
            "counted).",
            "",
            f"| layer | format | call | normlab ops | torch.nn ops | ratio |{extra}",
            "|---|---|---|---|---|---|" + ("---|" if args.verbose else ""),
            *body,
        ],
        args.out,
    )


if __name__ == "__main__":
    raise SystemExit(main())
