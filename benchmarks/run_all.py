"""One table for issue #9: every layer against torch.nn, and whole training steps.

Usage::

    python benchmarks/run_all.py                  # the README table (a few minutes)
    python benchmarks/run_all.py --quick          # smoke run: small shapes, short timings
    python benchmarks/run_all.py --out table.md   # also write the markdown
    python benchmarks/run_all.py --device cuda    # the same table on a GPU, against cuDNN

Layer rows: layer x shape x dtype x memory format; time ratio normlab / torch.nn (forward, and
forward+backward) measured alternately in the same run, 1 thread, median of
``torch.utils.benchmark`` blocked autorange; GB/s of normlab's forward+backward counting the
minimum traffic (5 S: forward 2 S, backward reads x and dy and writes dx; S = tensor bytes); peak
memory of one forward+backward (tensors alive at once: input, output, saved tensors, gradients;
``torch.distributed._tools.mem_tracker.MemTracker``) for normlab / torch.nn. bfloat16 rows feed
bfloat16 activations to float32 parameters, as autocast does. Variant rows (batch renorm, ghost,
L1/Linf) compare with ``torch.nn.BatchNorm2d``, what a user would otherwise train; noisy batch norm
with ``BatchNorm2d`` plus the same noise drawn in plain torch (``layers.TorchNoisyBatchNorm``: the
random numbers are the layer's purpose and most of its cost).

Model rows: one SGD training step (forward, cross-entropy, backward, optimizer step) of the
reference VGG-style CNN (VGG-4 width 16, 1x28x28 input) and MLP (3 x 128, 784 inputs), batch 128,
with normlab's norm layers vs the same model with torch.nn's (same weights), 1 and 2 threads.

``--compile``: the layer rows with both sides ``torch.compile``'d (``dynamic=False``; normlab's
with ``fullgraph=True``), as a user compiles a model -- on a GPU the variants' many small ops fuse
into a few kernels there. The noisy batch-norm peer stays eager (its random levels are Python
floats: compiled, it would recompile at every call).

``--device cuda``: the same rows on the GPU; float16 rows instead of bfloat16 (autocast's CUDA
type); peak memory from the CUDA allocator's statistics; model rows at batch 128 and 1024 in place
of the thread counts; and a last section listing each normlab layer's host synchronisations in one
training forward+backward (``torch.cuda.set_sync_debug_mode``), which stall the GPU's queue.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Timing, compare, emit, fix_allocator, machine
from layers import (
    LAYERS,
    VARIANTS,
    Layer,
    TorchNoisyBatchNorm,
    _fwd,
    _fwd_bwd,
    build,
    inputs,
    matching,
)
from normlab.experiments.config import RunConfig
from normlab.experiments.models import build_model


def peak_mib(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> float:
    """Peak MiB of tensors alive during one forward+backward (inputs and parameters included)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    x = x.detach().clone().requires_grad_()
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        layer(x).backward(gy)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        layer.zero_grad(set_to_none=True)
        held = sum(t.numel() * t.element_size() for t in (x, gy, *layer.parameters()))
        return (extra + held) / 2**20
    tracker = MemTracker()
    tracker.track_external(layer, x, gy)
    with tracker:
        layer(x).backward(gy)
    layer.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")
    return sum(stats.get("Total", 0) for stats in peak.values()) / 2**20


def layer_rows(
    specs: list[Layer],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    channels_last: bool,
    min_time: float,
    device: str = "cpu",
    compiled: bool = False,
) -> list[str]:
    x, gy = (t.to(device) for t in inputs(shape, channels_last, dtype))
    # CUDA's low-precision rows run under autocast, as users do (torch.nn's group norm, say, takes
    # float16 input with float32 parameters there only through autocast's float32 cast)
    cast = device == "cuda" and dtype != torch.float32
    size = x.numel() * x.element_size()
    label = f"{'x'.join(map(str, shape))} | {str(dtype).removeprefix('torch.')} | " + (
        "channels_last" if channels_last else "NCHW"
    )
    rows = []
    for spec in specs:
        ours, theirs = eager = tuple(m.to(device) for m in build(spec, shape))
        if compiled:  # both sides, as a user compiles a whole model; normlab's in one graph
            torch._dynamo.reset()  # each row from scratch (no recompilation limits reached)
            ours = _compiled(ours, True)
            # the noisy peer's levels are Python floats: compiled, it would recompile every call
            if not isinstance(theirs, TorchNoisyBatchNorm):
                theirs = _compiled(theirs, False)
        fwd = compare(_cast(_fwd(ours, x), cast), _cast(_fwd(theirs, x), cast), min_time)
        if spec.training:
            both: tuple[Timing, Timing] | None = compare(
                _cast(_fwd_bwd(ours, x, gy), cast), _cast(_fwd_bwd(theirs, x, gy), cast), min_time
            )
            assert both is not None
            gbs = f"{5 * size / both[0].median / 1e9:.1f}"
            ratio_both = _ratio(*both)
            with torch.autocast("cuda", dtype=torch.float16, enabled=cast):
                # the eager layers' (MemTracker is a dispatch mode, which compiled code refuses)
                memory = f"{peak_mib(eager[0], x, gy):.1f} / {peak_mib(eager[1], x, gy):.1f}"
        else:
            gbs = f"{2 * size / fwd[0].median / 1e9:.1f} (fwd)"
            ratio_both, memory = "-", "-"
        rows.append(f"| {spec.name} | {label} | {_ratio(*fwd)} | {ratio_both} | {gbs} | {memory} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _compiled(module: nn.Module, fullgraph: bool) -> nn.Module:
    """``torch.compile(module, dynamic=False)``: ``fullgraph`` for normlab's layers (a graph break
    is an error there), not needed for the torch.nn side."""
    return torch.compile(module, fullgraph=fullgraph, dynamic=False)  # type: ignore[return-value]


def _cast(fn: Callable[[], object], cast: bool) -> Callable[[], object]:
    """``fn`` under CUDA float16 autocast if ``cast``."""
    if not cast:
        return fn

    def run() -> object:
        with torch.autocast("cuda", dtype=torch.float16):
            return fn()

    return run


def _ratio(ours: Timing, theirs: Timing) -> str:
    """``ours / theirs`` in bold with its spread: the two relative IQRs combined in quadrature."""
    spread = math.hypot(ours.spread, theirs.spread)
    return f"**{ours.median / theirs.median:.2f}** ±{100 * spread:.0f}%"


def _torch_norms(model: nn.Module) -> nn.Module:
    """The same model with every normlab norm layer replaced by the torch.nn class it subclasses
    (same state dict)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if not type(module).__module__.startswith("normlab."):
            continue
        base = next(
            (c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.modules")),
            None,
        )
        if base is None or base is nn.Module:
            continue
        replacement = copy.deepcopy(module)
        replacement.__class__ = base
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, attr, replacement)
    return twin


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def host_syncs(specs: list[Layer], shape: tuple[int, ...]) -> list[str]:
    """Each layer's host synchronisations in one CUDA training forward+backward, counted from
    ``torch.cuda.set_sync_debug_mode("warn")``'s warnings (torch.nn's layers make none)."""
    x, gy = (t.cuda() for t in inputs(shape, False))
    rows = []
    for spec in specs:
        if not spec.training:
            continue
        ours = build(spec, shape)[0].cuda()
        run = _fwd_bwd(ours, x, gy)
        run()  # first call: lazy initialisation
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        where = sorted({str(w.message).splitlines()[0][:80] for w in caught})
        rows.append(f"| {spec.name} | {len(caught)} | {'; '.join(where) or '-'} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def model_rows(
    min_time: float, threads: tuple[int, ...], batch: int, device: str = "cpu"
) -> list[str]:
    cases = [
        ("VGG-4 CNN, BN", RunConfig(arch="vgg", norm="batch", width=16), (1, 28, 28)),
        ("VGG-4 CNN, GN", RunConfig(arch="vgg", norm="group", width=16), (1, 28, 28)),
        ("MLP 3x128, BN", RunConfig(arch="mlp", norm="batch", depth=3, width=128), (1, 28, 28)),
    ]
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, cfg, shape in cases:
        ours = build_model(cfg, shape, 10).train()
        theirs = _torch_norms(ours).train()
        assert any(type(m).__module__.startswith("normlab.") for m in ours.modules())
        assert not any(type(m).__module__.startswith("normlab.") for m in theirs.modules())
        ours, theirs = ours.to(device), theirs.to(device)
        x = torch.randn(batch, *shape, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        for n in threads:
            torch.set_num_threads(n)
            t_ours, t_theirs = compare(_train_step(ours, x, y), _train_step(theirs, x, y), min_time)
            rows.append(
                f"| {name} | {n} | {t_ours.median * 1e3:.2f} ±{100 * t_ours.spread:.0f}% | "
                f"{t_theirs.median * 1e3:.2f} ±{100 * t_theirs.spread:.0f}% | "
                f"**{t_ours.median / t_theirs.median:.2f}** |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    torch.set_num_threads(1)
    return rows


def _shape(spec: str) -> tuple[int, ...]:
    return tuple(int(v) for v in spec.split("x"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["64x64x32x32", "256x256x14x14"])
    parser.add_argument("--min-time", type=float, default=0.4, help="seconds per comparison")
    parser.add_argument("--quick", action="store_true", help="smoke run: one small shape")
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the tensors live"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="layer rows of torch.compile'd layers on both sides (fullgraph, static shapes): on a "
        "GPU the variants' small ops fuse into a few kernels",
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        metavar="TEXT",
        help="only the layer rows whose name contains one of these (case-insensitive), e.g. "
        "Renorm Ghost; model rows are kept",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float32", "low"],
        default=["float32", "low"],
        help="float32 and/or the low-precision rows (bfloat16 on CPU, float16 on CUDA)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: expected a machine with a CUDA device, got none; use --device cpu")
    if args.quick:
        args.shapes, args.min_time = ["8x16x8x8"], 0.02
    torch.set_num_threads(1)
    fixed = fix_allocator()
    where = machine()
    if args.device == "cuda":
        where = (
            f"{torch.cuda.get_device_name()} (cuDNN {torch.backends.cudnn.version()}, CUDA "
            f"{torch.version.cuda}), host {where}"
        )
    lines = [
        f"Measured {datetime.date.today()} on {where}; allocator fix "
        f"{'on' if fixed else 'OFF'}; `python benchmarks/run_all.py --min-time {args.min_time} "
        f"--device {args.device} --shapes {' '.join(args.shapes)}"
        f"{' --compile' if args.compile else ''}"
        f"{' --layers ' + ' '.join(args.layers) if args.layers else ''}"
        f"{' --dtypes ' + ' '.join(args.dtypes) if len(args.dtypes) < 2 else ''}` "
        "(--min-time: seconds per comparison). Ratio = normlab time / torch.nn time, same run; < 1 is faster; "
        "± its spread (the two timings' relative IQRs in quadrature).",
        "",
        "| layer | shape | dtype | format | fwd ratio | fwd+bwd ratio | normlab GB/s (fwd+bwd) | "
        "peak MiB fwd+bwd (normlab / torch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    low = torch.float16 if args.device == "cuda" else torch.bfloat16
    dtypes = [torch.float32 if d == "float32" else low for d in args.dtypes]
    layers, all_variants = (matching(specs, args.layers) for specs in (LAYERS, VARIANTS))
    if not layers + all_variants:
        parser.error(
            f"--layers: expected text found in a layer's name, got {args.layers}; names: "
            + ", ".join(s.name for s in LAYERS + VARIANTS)
        )
    # first (seconds), so that a run stopped at its time limit still reports them
    syncs = (
        host_syncs(layers + all_variants, _shape(args.shapes[0])) if args.device == "cuda" else []
    )
    for spec in args.shapes:
        shape = _shape(spec)
        for dtype in dtypes:
            for channels_last in (False, True):
                variants = all_variants if dtype == torch.float32 else []
                lines += layer_rows(
                    layers + variants,
                    shape,
                    dtype,
                    channels_last,
                    args.min_time,
                    args.device,
                    args.compile,
                )
    batch = 16 if args.quick else 128
    lines += [
        "",
        f"| model (one SGD step, batch {batch}) | threads | normlab ms | torch.nn ms | ratio |",
        "|---|---|---|---|---|",
    ]
    if args.device == "cuda":
        lines += model_rows(args.min_time * 2, (1,), batch, "cuda")
        lines += [
            "",
            f"| model (one SGD step, batch {8 * batch}) | threads | normlab ms | torch.nn ms | "
            "ratio |",
            "|---|---|---|---|---|",
        ]
        lines += model_rows(args.min_time * 2, (1,), 8 * batch, "cuda")
        lines += [
            "",
            f"Host synchronisations in one training forward+backward, {args.shapes[0]} float32:",
            "",
            "| layer | syncs | where (first line of each warning) |",
            "|---|---|---|",
        ]
        lines += syncs
    else:
        lines += model_rows(args.min_time * 2, (1, 2), batch)
    return emit(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
