"""Torch ops per call on normlab's accelerator routes: a proxy for kernel launches on a GPU.

On a GPU every torch op is at least one kernel launch, and the host's few microseconds per launch,
not the bytes moved, set the time of the small per-channel steps (the H200 run in
docs/benchmarks.md: the variants' many small ops cost more than their passes over a 205 MB
activation). This script counts the ops each layer dispatches per training forward+backward (and
per eval forward) inside ``accelerator_routes()`` -- the CPU takes the routes normlab takes on
accelerators -- against its torch.nn counterpart, with a ``TorchDispatchMode`` that skips views
and allocations. Counts, not times: the same on any machine, no GPU needed. normlab's Triton
kernels (src/normlab/functional/_triton.py) count as one op each (``triton:`` and the kernel's
name; on the CPU they run in Triton's interpreter when triton is installed); ``--no-triton``
counts the torch ops that stand in for them where triton is missing.

    python benchmarks/launches.py                    # 8x16x4x4, NCHW and channels-last
    python benchmarks/launches.py --shape 8x16x4x4 --verbose --out launches.md
    python benchmarks/launches.py --device cuda --shape 128x128x56x56   # kernels, GPU and wall time

``--device cuda`` runs the layers on the GPU (normlab's own accelerator routes, no switch needed)
and adds, per call: the GPU tasks launched (kernels, copies, fills; torch.profiler), their summed
GPU time, and the wall time of a call with the queue drained (``torch.utils.benchmark``). Wall time
far above GPU time means launches, not bytes, set the layer's time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if "cuda" not in sys.argv[1:]:  # CPU counts: Triton kernels in its interpreter, which must be
    # chosen before triton's first import (torch._dynamo imports it when it is installed)
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import emit
from layers import LAYERS, VARIANTS, _fwd, _fwd_bwd, build, inputs, matching
from normlab.functional import _triton
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
        if name not in _FREE and not _IN_KERNEL[0]:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


_IN_KERNEL = [False]  # inside a Triton kernel: on the CPU its interpreter's own torch ops


@contextlib.contextmanager
def _kernels_uncounted() -> Iterator[None]:
    """Within this block the torch ops a Triton kernel's launch makes (on the CPU: its
    interpreter's copies) are not counted; the kernel itself is, by ``_triton.LAUNCHES``."""
    launch = _triton._launch

    def uncounted(*args: Any, **kwargs: Any) -> bool:
        _IN_KERNEL[0] = True
        try:
            return launch(*args, **kwargs)
        finally:
            _IN_KERNEL[0] = False

    _triton._launch = uncounted  # type: ignore[assignment]
    try:
        yield
    finally:
        _triton._launch = launch  # type: ignore[assignment]


def count_ops(run: Callable[[], object]) -> collections.Counter[str]:
    """The ops of one call of ``run`` (after one uncounted call: lazy set-up is not counted),
    normlab's Triton kernels among them (``triton:`` and the kernel's name)."""
    run()
    counter = OpCounter()
    before = collections.Counter(_triton.LAUNCHES)
    with counter, _kernels_uncounted():
        run()
    kernels = collections.Counter(_triton.LAUNCHES)
    kernels.subtract(before)
    counter.counts.update({f"triton:{k}": n for k, n in kernels.items() if n})
    return counter.counts


def gpu_work(
    run: Callable[[], object], reps: int = 5, by_op: bool = False
) -> tuple[float, float, float, str]:
    """Per call of ``run`` on a GPU: tasks launched, their summed GPU microseconds, wall
    microseconds (median, queue drained), and (``by_op``) the torch ops that spent the most GPU
    time, with calls and microseconds per call of ``run``."""
    from torch.autograd import DeviceType  # type: ignore[attr-defined]
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.benchmark import Timer

    run()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if by_op else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    tasks = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    gpu_us = sum(e.time_range.elapsed_us() for e in tasks) / reps
    wall_us = Timer("fn()", globals={"fn": run}).blocked_autorange(min_run_time=0.05).median * 1e6
    top = ""
    if by_op:
        ops = [
            e
            for e in prof.key_averages()
            if e.device_type == DeviceType.CPU and e.self_device_time_total > 0
        ]
        ops.sort(key=lambda e: -e.self_device_time_total)
        top = ", ".join(
            f"{e.key.removeprefix('aten::')} x{e.count / reps:g} {e.self_device_time_total / reps:.0f}"
            for e in ops[:10]
        )
    return len(tasks) / reps, gpu_us, wall_us, top


def rows(
    shape: tuple[int, ...], verbose: bool, device: str = "cpu", names: list[str] | None = None
) -> list[str]:
    lines = []
    specs = matching(LAYERS + VARIANTS, names)
    for fmt_name in ("NCHW", "channels_last"):
        x, gy = (t.to(device) for t in inputs(shape, fmt_name == "channels_last"))
        for spec in specs:
            ours, theirs = (m.to(device) for m in build(spec, shape))
            runs = [_fwd_bwd(m, x, gy) if spec.training else _fwd(m, x) for m in (ours, theirs)]
            counts = [count_ops(run) for run in runs]
            kind = "fwd+bwd" if spec.training else "fwd"
            n_ours, n_theirs = (sum(c.values()) for c in counts)
            detail = ""
            if device == "cuda":
                (k0, g0, w0, top), (k1, g1, w1, _) = (gpu_work(run, by_op=verbose) for run in runs)
                detail = f" | {k0:g} / {k1:g} | {g0:.0f} / {g1:.0f} | {w0:.0f} / {w1:.0f}"
                if verbose:
                    detail += f" | {top}"
            elif verbose:
                detail = " | " + ", ".join(f"{k} {v}" for k, v in sorted(counts[0].items()))
            lines.append(
                f"| {spec.name} | {fmt_name} | {kind} | {n_ours} | {n_theirs} | "
                f"{n_ours / max(n_theirs, 1):.1f}{detail} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="8x16x4x4", help="input, NxCxHxW")
    parser.add_argument("--verbose", action="store_true", help="list normlab's ops by name")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: run on the GPU and add GPU tasks, GPU time and wall time per call",
    )
    parser.add_argument(
        "--layers", nargs="+", metavar="TEXT", help="only layers whose name contains one of these"
    )
    parser.add_argument(
        "--no-triton",
        action="store_true",
        help="count the torch ops that stand in for normlab's Triton kernels where triton is "
        "missing (on the CPU the kernels run in Triton's interpreter when triton is installed)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: expected a machine with a CUDA device, got none; use --device cpu")
    shape = tuple(int(v) for v in args.shape.split("x"))
    torch.set_num_threads(1)
    if args.device == "cuda":
        where = (
            f"{torch.cuda.get_device_name()}; torch ops, then GPU tasks / GPU us / wall us per call"
        )
        body = rows(shape, args.verbose, "cuda", args.layers)
        extra = " GPU tasks (normlab / torch) | GPU us | wall us |"
        extra += " normlab's ops by GPU time (calls, us) |" if args.verbose else ""
    else:
        kernels = "with" if _triton.available() and not args.no_triton else "without"
        where = f"torch ops per call inside accelerator_routes(), {kernels} the Triton kernels"
        off = _triton.off() if args.no_triton else contextlib.nullcontext()
        with accelerator_routes(), _triton.interpreted(), off:
            body = rows(shape, args.verbose, names=args.layers)
        extra = " normlab's ops |" if args.verbose else ""
    return emit(
        [
            f"Counted {datetime.date.today()}, torch {torch.__version__}; input {args.shape}; "
            f"{where} (views and allocations not counted among ops).",
            "",
            f"| layer | format | call | normlab ops | torch.nn ops | ratio |{extra}",
            "|---|---|---|---|---|---|" + "---|" * extra.count("|"),
            *body,
        ],
        args.out,
    )


if __name__ == "__main__":
    raise SystemExit(main())
