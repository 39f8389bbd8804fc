"""Wall time of ``normlab.audit`` on the reference VGG-style CNN (issue 11: < 30 s for 2,000
samples on this machine).

    python benchmarks/audit.py [--samples 2000] [--repeats 3] [--threads 1] [--out table.md]

The CNN is the studies' MNIST-1D model (CNN1D, 32-32-64-64 channels, batch norm), trained for
300 SGD steps at batch 128 with exact population statistics afterwards -- a clean model -- and
audited with every check, cross-entropy and the training batch size. Reported: median and range
of the audit's wall time, and the time of each check (from one extra run).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import emit, machine
from normlab.audit import CHECKS, audit
from normlab.data import load_dataset
from normlab.experiments.config import RunConfig
from normlab.experiments.models import build_model
from normlab.surgery import recompute_population_stats


def trained_cnn(steps: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    data = load_dataset("mnist1d")
    model = build_model(RunConfig(data="mnist1d", arch="vgg", width=32), data.input_shape, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(data.y_train), (128,), generator=gen)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    recompute_population_stats(model, data.x_train)
    return model.eval(), data.x_train, data.y_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the CNN")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, x, y = trained_cnn(args.steps)
    data = (x[: args.samples], y[: args.samples])
    times, report = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        report = audit(model, data, loss_fn=F.cross_entropy, batch_size=128)
        times.append(time.perf_counter() - start)
    per_check = {}
    for check in CHECKS:
        start = time.perf_counter()
        audit(model, data, loss_fn=F.cross_entropy, batch_size=128, checks=[check])
        per_check[check] = time.perf_counter() - start
    assert report is not None
    lines = [
        f"Measured {datetime.date.today()} on {machine()}.",
        "",
        f"Audit of the reference CNN1D (MNIST-1D, {sum(p.numel() for p in model.parameters())} "
        f"parameters) on {report.samples} samples, all {len(CHECKS)} checks: median "
        f"{statistics.median(times):.2f} s (range {min(times):.2f}-{max(times):.2f} s over "
        f"{args.repeats} runs; target < 30 s); {len(report.findings)} finding(s).",
        "",
        "| check | seconds (alone, incl. the shared trace) |",
        "|---|---|",
        *(f"| {c} | {t:.2f} |" for c, t in per_check.items()),
    ]
    return emit(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
