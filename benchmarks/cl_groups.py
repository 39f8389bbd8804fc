"""Channels-last group and instance norm on accelerators: where the copy-free route pays off.

normlab normalizes channels-last input on accelerators in its own layout
(:class:`normlab.functional._fast.ChannelsLastGroupNorm`: ~24 small ops around 10 passes over the
activation) instead of copying it to channels-first for torch's group-norm kernels and the results
back (4 copies, few ops). On a GPU the first wins once the copies' bytes outweigh the extra
launches; normlab takes it from ``_MIN_BYTES_CL_GROUPS`` on. This script times training
forward+backward of both routes (each forced at every size) and of torch.nn (which returns
channels-first output) at several sizes, in alternating rounds, to find that crossover.

    python benchmarks/cl_groups.py --device cuda
    python benchmarks/cl_groups.py --shapes 8x16x8x8 --min-time 0.05   # smoke run on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import emit, machine, time_fn
from layers import LAYERS, _fwd_bwd, build, inputs
from normlab.functional import _fast
from normlab.functional._core import accelerator_routes


@contextlib.contextmanager
def route(copy_free: bool) -> Iterator[None]:
    """normlab's channels-last group and instance norm by one route at every size: the copy-free
    route (``copy_free``) or the copy route (the only one before)."""
    saved = _fast._MIN_BYTES_CL_GROUPS
    _fast._MIN_BYTES_CL_GROUPS = 0 if copy_free else 1 << 62
    try:
        yield
    finally:
        _fast._MIN_BYTES_CL_GROUPS = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", nargs="+", default=["64x64x32x32", "64x128x56x56", "128x128x56x56"]
    )
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per timing")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    specs = [s for s in LAYERS if s.name.startswith(("InstanceNorm", "GroupNorm"))]
    lines = [
        f"Measured {datetime.date.today()} on "
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else machine()}, torch "
        f"{torch.__version__}; training forward+backward, channels-last float32, median us "
        "(ratio to torch.nn); on the CPU inside accelerator_routes().",
        "",
        "| layer | shape | copy-free route | copy route | torch.nn |",
        "|---|---|---|---|---|",
    ]
    routes = accelerator_routes() if args.device == "cpu" else contextlib.nullcontext()
    with routes:
        for spec in specs:
            for text in args.shapes:
                shape = tuple(int(v) for v in text.split("x"))
                x, gy = (t.to(args.device) for t in inputs(shape, True))
                ours, theirs = (m.to(args.device) for m in build(spec, shape))
                run_ours, run_theirs = _fwd_bwd(ours, x, gy), _fwd_bwd(theirs, x, gy)
                times: dict[str, list[float]] = {"new": [], "copy": [], "torch": []}
                for _ in range(3):  # alternating rounds
                    for key, copy_free in (("new", True), ("copy", False)):
                        with route(copy_free):
                            times[key].append(time_fn(run_ours, args.min_time / 3).median)
                    times["torch"].append(time_fn(run_theirs, args.min_time / 3).median)
                med = {k: sorted(v)[1] * 1e6 for k, v in times.items()}
                lines.append(
                    f"| {spec.name} | {text} | {med['new']:.0f} ({med['new'] / med['torch']:.2f}) "
                    f"| {med['copy']:.0f} ({med['copy'] / med['torch']:.2f}) | {med['torch']:.0f} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
    return emit(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
