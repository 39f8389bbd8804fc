"""Layer speed vs torch.nn: forward and forward+backward, median and spread, ratio and GB/s.

Usage::

    python benchmarks/layers.py                       # the README table (both issue shapes)
    python benchmarks/layers.py --channels-last       # add channels_last rows
    python benchmarks/layers.py --crossover           # where the fast BN path starts to pay off
    python benchmarks/layers.py --shapes 8x16x8x8 --min-time 0.01   # a quick smoke run

GB/s counts the minimum activation traffic: forward 2 S (read x, write y), forward+backward 5 S
(forward, then read x and dy, write dx), with S the tensor's size in bytes; "copy" is
``y.copy_(x)`` of the same tensor (2 S) -- the practical bandwidth ceiling for one thread.
Ratios are normlab time / torch.nn time measured in the same run (< 1 means normlab is faster).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normlab.nn as nl
from _harness import Timing, compare, emit, fix_allocator, machine, time_fn


class TorchChannelLayerNorm(nn.LayerNorm):
    """What torch.nn users write for a channels-first layer norm (timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TorchNoisyBatchNorm(nn.BatchNorm2d):
    """Santurkar et al.'s noisy batch norm as a torch.nn user writes it: BatchNorm2d, then
    per-element noise ``s * y + m`` with ``m ~ U(mu_t +- 0.1)``, ``s ~ N(sigma_t, 0.1)`` drawn by
    torch's in-place generators from a generator of its own (the cheapest way in plain torch), on
    the activations' device (the levels on the CPU)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.generator = torch.Generator().manual_seed(0)
        self.device_generators: dict[torch.device, torch.Generator] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        mu, sigma = torch.rand(2, generator=self.generator).tolist()
        mu, sigma = mu - 0.5, 1.0 + 0.25 * sigma
        g = self.generator
        if y.device.type != "cpu":
            g = self.device_generators.setdefault(
                y.device, torch.Generator(y.device).manual_seed(0)
            )
        m = torch.empty_like(y).uniform_(mu - 0.1, mu + 0.1, generator=g)
        s = torch.empty_like(y).normal_(sigma, 0.1, generator=g)
        return torch.addcmul(m, s, y)


@dataclass(frozen=True)
class Layer:
    name: str
    ours: Callable[[int, tuple[int, ...]], nn.Module]
    theirs: Callable[[int, tuple[int, ...]], nn.Module]
    training: bool = True


LAYERS = [
    Layer("BatchNorm2d train", lambda c, s: nl.BatchNorm2d(c), lambda c, s: nn.BatchNorm2d(c)),
    Layer(
        "BatchNorm2d eval", lambda c, s: nl.BatchNorm2d(c), lambda c, s: nn.BatchNorm2d(c), False
    ),
    Layer(
        "InstanceNorm2d(affine)",
        lambda c, s: nl.InstanceNorm2d(c, affine=True),
        lambda c, s: nn.InstanceNorm2d(c, affine=True),
    ),
    Layer(
        "GroupNorm(32)",
        lambda c, s: nl.GroupNorm(c, nl.default_num_groups(c)),
        lambda c, s: nn.GroupNorm(nl.default_num_groups(c), c),
    ),
    Layer("LayerNorm([C,H,W])", lambda c, s: nl.LayerNorm(s[1:]), lambda c, s: nn.LayerNorm(s[1:])),
    Layer(
        "ChannelLayerNorm",
        lambda c, s: nl.ChannelLayerNorm(c),
        lambda c, s: TorchChannelLayerNorm(c),
    ),
]

# Variants, each against the torch.nn layer a user would otherwise train with: BatchNorm2d
# (noisy batch norm: BatchNorm2d plus the same noise in plain torch -- the noise is its purpose).
VARIANTS = [
    Layer(
        "BatchRenorm2d (r,d active) vs BN2d",
        lambda c, s: _renorm(c),
        lambda c, s: nn.BatchNorm2d(c),
    ),
    Layer(
        "GhostBatchNorm(vbs=N/4) vs BN2d",
        lambda c, s: nl.GhostBatchNorm(c, virtual_batch_size=max(2, s[0] // 4)),
        lambda c, s: nn.BatchNorm2d(c),
    ),
    Layer("L1BatchNorm vs BN2d", lambda c, s: nl.L1BatchNorm(c), lambda c, s: nn.BatchNorm2d(c)),
    Layer(
        "LinfBatchNorm(k=10) vs BN2d",
        lambda c, s: nl.LinfBatchNorm(c),
        lambda c, s: nn.BatchNorm2d(c),
    ),
    Layer(
        "NoisyBatchNorm vs BN2d+noise",
        lambda c, s: nl.NoisyBatchNorm(c),
        lambda c, s: TorchNoisyBatchNorm(c),
    ),
    Layer("Conv2d3x3+WS vs Conv2d3x3", lambda c, s: _ws_conv(c), lambda c, s: _conv(c)),
]


def matching(specs: Sequence[Layer], names: Sequence[str] | None) -> list[Layer]:
    """The ``specs`` whose row name contains one of ``names`` (case-insensitive), in their order;
    all of them when ``names`` is None."""
    if names is None:
        return list(specs)
    return [s for s in specs if any(n.lower() in s.name.lower() for n in names)]


def inputs(
    shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded ``(x, dy)`` every layer table times: standard normal, of ``dtype``, in the
    channels-last memory format if asked."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
    return x, gy


def build(spec: Layer, shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """``(ours, theirs)`` of ``spec`` for inputs of ``shape``, in the spec's mode; eval rows get
    realistic running statistics on both sides (means within 0.1 of 0, variances 0.9-1.1)."""
    c = shape[1]
    ours = spec.ours(c, shape).train(spec.training)
    theirs = spec.theirs(c, shape).train(spec.training)
    if not spec.training:
        with torch.no_grad():
            for m in (ours, theirs):
                m.running_mean.uniform_(-0.1, 0.1)  # type: ignore[operator]
                m.running_var.uniform_(0.9, 1.1)  # type: ignore[operator]
    return ours, theirs


def _renorm(c: int) -> nn.Module:
    """Batch renorm past its warm-up, so that r and d are computed and applied."""
    layer = nl.BatchRenorm2d(c, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    with torch.no_grad():
        layer.running_std.fill_(1.3)
    return layer


def _conv(c: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(c, c, 3, padding=1, bias=False)


def _ws_conv(c: int) -> nn.Module:
    from normlab.surgery import standardize_weights

    return standardize_weights(_conv(c))


def _fwd(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return layer(x)

    return run


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], object]:
    xr = x.detach().clone().requires_grad_()
    inputs = [xr, *layer.parameters()]

    def run() -> object:
        return torch.autograd.grad(layer(xr), inputs, gy)

    return run


def _row(name: str, ours: Timing, theirs: Timing, traffic: float) -> str:
    gbs = lambda t: traffic / t.median / 1e9  # noqa: E731
    return (
        f"| {name} | {ours.median * 1e3:.3f} ±{100 * ours.spread:.0f}% | "
        f"{theirs.median * 1e3:.3f} ±{100 * theirs.spread:.0f}% | **{ours.median / theirs.median:.2f}** | "
        f"{gbs(ours):.1f} | {gbs(theirs):.1f} |"
    )


def bench_shape(
    shape: tuple[int, ...], min_time: float, channels_last: bool, variants: bool = True
) -> list[str]:
    x, gy = inputs(shape, channels_last)
    size = x.numel() * x.element_size()
    out = torch.empty_like(x)
    copy = time_fn(lambda: out.copy_(x), min_time)
    fmt = "channels_last" if channels_last else "NCHW"
    lines = [
        f"\n**{'x'.join(map(str, shape))} float32 {fmt}** ({size / 1e6:.1f} MB; copy "
        f"{copy.median * 1e3:.3f} ms = {2 * size / copy.median / 1e9:.1f} GB/s)\n",
        "| layer | normlab ms | torch.nn ms | ratio | normlab GB/s | torch GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for spec in LAYERS + (VARIANTS if variants else []):
        ours, theirs = build(spec, shape)
        t_ours, t_theirs = compare(_fwd(ours, x), _fwd(theirs, x), min_time)
        lines.append(_row(f"{spec.name} fwd", t_ours, t_theirs, 2 * size))
        if spec.training:
            t_ours, t_theirs = compare(_fwd_bwd(ours, x, gy), _fwd_bwd(theirs, x, gy), min_time)
            lines.append(_row(f"{spec.name} fwd+bwd", t_ours, t_theirs, 5 * size))
        print(lines[-1], file=sys.stderr, flush=True)
    # issue #9's bandwidth target, read against a copy timed alternately with the forward (the
    # copy above is timed once, before the table: the host's drift in between moves the GB/s)
    bn = nl.BatchNorm2d(shape[1]).train()
    t_bn, t_copy = compare(_fwd(bn, x), lambda: out.copy_(x), min_time)
    lines.append(
        f"\nBatchNorm2d train forward, timed alternately with `y.copy_(x)`: "
        f"{t_bn.median * 1e3:.3f} ms against {t_copy.median * 1e3:.3f} ms, "
        f"{100 * t_copy.median / t_bn.median:.0f} % of the copy's bandwidth (issue #9's target 50 %)"
    )
    return lines


def _ratio(ours: Timing, theirs: Timing) -> float:
    return ours.median / theirs.median


def crossover(min_time: float) -> list[str]:
    """BatchNorm training forward+backward, normlab / torch, on shapes around the fast-path limits."""
    lines = ["| shape | row | fast path | fwd ratio | fwd+bwd ratio |", "|---|---|---|---|---|"]
    from normlab.functional._fast import use_fast_batch_stats

    sizes = [
        (8, 16, 8),
        (32, 16, 8),
        (32, 64, 4),
        (128, 64, 4),
        (256, 64, 2),
        (32, 32, 8),
        (64, 64, 8),
        (128, 64, 8),
        (16, 32, 16),
        (32, 64, 16),
        (64, 128, 16),
        (256, 64, 4),
        (256, 128, 4),
        (128, 256, 7),
        (64, 16, 32),
        (8, 64, 32),
        (32, 64, 32),
    ]
    for shape in [(n, c, hw, hw) for n, c, hw in sizes]:
        x, gy = torch.randn(shape), torch.randn(shape)
        ours, theirs = nl.BatchNorm2d(shape[1]), nn.BatchNorm2d(shape[1])
        f = _ratio(*compare(_fwd(ours, x), _fwd(theirs, x), min_time))
        fb = _ratio(*compare(_fwd_bwd(ours, x, gy), _fwd_bwd(theirs, x, gy), min_time))
        row = shape[2] * shape[3]
        lines.append(
            f"| {shape} | {row} | {use_fast_batch_stats(x, None, None)} | {f:.2f} | {fb:.2f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["64x64x32x32", "256x256x14x14"])
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--channels-last", action="store_true", help="add channels_last rows")
    parser.add_argument("--crossover", action="store_true", help="fast-path crossover table only")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fixed = fix_allocator()
    header = [
        f"Measured {datetime.date.today()} on {machine()}; allocator fix "
        f"{'on' if fixed else 'OFF'}; median ± IQR/median of torch.utils.benchmark blocked_autorange "
        f"(min_run_time={args.min_time}s). Ratio = normlab / torch.nn, same run.",
    ]
    lines = list(header)
    if args.crossover:
        lines += crossover(args.min_time)
    else:
        for spec in args.shapes:
            shape = tuple(int(v) for v in spec.split("x"))
            lines += bench_shape(shape, args.min_time, channels_last=False)
            if args.channels_last:
                lines += bench_shape(shape, args.min_time, channels_last=True, variants=False)
    return emit(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
