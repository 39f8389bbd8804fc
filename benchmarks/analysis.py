"""Curvature and landscape measurements against PyHessian and loss-landscapes (issue 7).

    python benchmarks/analysis.py [--seeds 10] [--quick] [--out table.md]

Needs the peers in the benchmark environment only (PyHessian is GPL-3.0, never a dependency):
``pip install pyhessian loss-landscapes``. 1 thread, digits (1x8x8, /16), models trained 2 epochs
of SGD at lr 0.1, batch 32 (the anchor recipe of shared/reference/anchor-measurements.md).

1. Accuracy at equal cost: a BN MLP (64-32-10) on 512 digits in eval mode (PyHessian forces it).
   Truth: the dense float64 Hessian. For each seed PyHessian runs with its defaults
   (``maxIter=100, tol=1e-3``), timed with its constructor (which runs the forward and the
   create_graph backward); normlab gets as many Hessian-vector products as fit in PyHessian's
   median wall time (calibrated in the same run), and is timed the same way. Reported: median relative error, median
   time, and how often normlab's own error estimate covers its true error (eigenvalue: Ritz
   bound; trace: 2 standard errors).
2. Cost of one Santurkar probe (8 step sizes) in forward+backward passes and in time.
3. A 21x21 filter-normalized plane of a BN CNN on 1000 digits against loss-landscapes'
   ``random_plane`` on the same model, data, BN mode and grid size, and what each leaves behind.
4. The top Hessian eigenvalue of that CNN by BN mode: eval with the training EMA, eval with exact
   population statistics, and train mode (batch statistics).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import normlab.nn as nl
from _harness import compare, emit, fix_allocator, machine
from normlab.analysis import (
    dense_hessian,
    hessian_eigenvalues,
    hessian_trace,
    landscape_probe,
    loss_surface,
)
from normlab.surgery import recompute_population_stats


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    return x, torch.tensor(d.target)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nl.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
    )


def cnn() -> nn.Module:
    """13,306 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nl.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nl.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 16),
        nl.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def trained(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall time in seconds."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def accuracy_rows(seeds: int, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    from pyhessian import hessian as PyHessian

    model = trained(mlp, x, y)
    xb, yb = x[:512], y[:512]
    h = dense_hessian(model, F.cross_entropy, (xb, yb), bn_mode="eval")
    eig_true = float(torch.linalg.eigvalsh(h)[-1])
    trace_true = float(torch.trace(h))
    ph: dict[str, list[float]] = {
        "eig_err": [],
        "eig_t": [],
        "eig_n": [],
        "tr_err": [],
        "tr_t": [],
        "tr_n": [],
    }

    def build() -> Any:  # PyHessian's constructor runs the forward and create_graph backward
        return PyHessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(xb, yb), cuda=False)

    for seed in range(seeds):
        torch.manual_seed(seed)
        start = time.perf_counter()
        eigs, _ = build().eigenvalues(top_n=1)
        ph["eig_t"].append(time.perf_counter() - start)
        ph["eig_err"].append(abs(eigs[0] - eig_true) / eig_true)
        torch.manual_seed(seed)
        start = time.perf_counter()
        samples = build().trace()
        ph["tr_t"].append(time.perf_counter() - start)
        ph["tr_err"].append(abs(statistics.mean(samples) - trace_true) / trace_true)
        ph["tr_n"].append(len(samples))
    # PyHessian's eigenvalue iterations: count Hessian-vector products through its hv function
    ph_eig_hvps = _pyhessian_eig_hvps(model, xb, yb, seeds)
    eig_budget = _fitting(
        lambda n: hessian_eigenvalues(model, F.cross_entropy, (xb, yb), bn_mode="eval", steps=n),
        int(statistics.median(ph_eig_hvps)),
        statistics.median(ph["eig_t"]),
    )
    tr_budget = _fitting(
        lambda n: hessian_trace(model, F.cross_entropy, (xb, yb), bn_mode="eval", matvecs=n),
        int(statistics.median(ph["tr_n"])),
        statistics.median(ph["tr_t"]),
    )
    ours: dict[str, list[float]] = {
        "eig_err": [],
        "eig_t": [],
        "eig_cov": [],
        "tr_err": [],
        "tr_t": [],
        "tr_cov": [],
    }
    for seed in range(seeds):
        ev, t = timed(
            hessian_eigenvalues,
            model,
            F.cross_entropy,
            (xb, yb),
            bn_mode="eval",
            steps=eig_budget,
            seed=seed,
        )
        err = abs(ev.values[0] - eig_true)
        ours["eig_err"].append(err / eig_true)
        ours["eig_t"].append(t)
        ours["eig_cov"].append(float(err <= ev.error_bound[0]))
        tr, t = timed(
            hessian_trace,
            model,
            F.cross_entropy,
            (xb, yb),
            bn_mode="eval",
            matvecs=tr_budget,
            seed=seed,
        )
        err = abs(tr.value - trace_true)
        ours["tr_err"].append(err / trace_true)
        ours["tr_t"].append(t)
        ours["tr_cov"].append(float(err <= 2 * tr.std_error))
    med = statistics.median
    rows = [
        f"### 1. Accuracy at PyHessian's cost: BN MLP 64-32-10, 512 digits, eval mode, {seeds} seeds",
        f"Truth (dense float64 Hessian, {h.shape[0]} parameters): top eigenvalue {eig_true:.4f}, "
        f"trace {trace_true:.3f}.",
        "",
        "| quantity | tool | Hessian-vector products | median time | median rel. error [min - max] | error estimate covers the error |",
        "|---|---|---|---|---|---|",
        f"| top eigenvalue | PyHessian (power, tol 1e-3) | median {statistics.median(ph_eig_hvps):.0f} [{min(ph_eig_hvps)} - {max(ph_eig_hvps)}] | "
        f"{med(ph['eig_t']) * 1e3:.1f} ms | {med(ph['eig_err']):.2e} [{min(ph['eig_err']):.1e} - {max(ph['eig_err']):.1e}] | (none reported) |",
        f"| top eigenvalue | normlab (Lanczos) | {eig_budget} (what fits in PyHessian's median time) | {med(ours['eig_t']) * 1e3:.1f} ms | "
        f"{med(ours['eig_err']):.2e} [{min(ours['eig_err']):.1e} - {max(ours['eig_err']):.1e}] | {sum(ours['eig_cov']):.0f}/{seeds} |",
        f"| trace | PyHessian (Hutchinson, tol 1e-3) | median {med(ph['tr_n']):.0f} [{min(ph['tr_n']):.0f} - {max(ph['tr_n']):.0f}] | "
        f"{med(ph['tr_t']) * 1e3:.1f} ms | {med(ph['tr_err']):.2e} [{min(ph['tr_err']):.1e} - {max(ph['tr_err']):.1e}] | (none reported) |",
        f"| trace | normlab (Lanczos-deflated Hutchinson) | {tr_budget} (what fits in PyHessian's median time) | {med(ours['tr_t']) * 1e3:.1f} ms | "
        f"{med(ours['tr_err']):.2e} [{min(ours['tr_err']):.1e} - {max(ours['tr_err']):.1e}] | {sum(ours['tr_cov']):.0f}/{seeds} (2 SE) |",
        "",
        f"Error ratio normlab / PyHessian (medians): eigenvalue {med(ours['eig_err']) / med(ph['eig_err']):.2g}, "
        f"trace {med(ours['tr_err']) / med(ph['tr_err']):.2g}. Time ratio: eigenvalue "
        f"{med(ours['eig_t']) / med(ph['eig_t']):.2f}, trace {med(ours['tr_t']) / med(ph['tr_t']):.2f}.",
        "",
    ]
    return rows


def _fitting(run: Callable[[int], object], count: int, seconds: float) -> int:
    """How many Hessian-vector products ``run`` can spend within ``seconds``: its time is fitted
    as fixed cost + per-product cost from runs at ``count`` and ``2 * count`` products (median
    of 5 each), so the fixed cost (building the graph) is not charged to every product."""
    one = statistics.median(timed(run, count)[1] for _ in range(5))
    two = statistics.median(timed(run, 2 * count)[1] for _ in range(5))
    per_product = max(two - one, 1e-9) / count
    fixed = max(one - per_product * count, 0.0)
    return max(3, int((seconds - fixed) / per_product))


def _pyhessian_eig_hvps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: int
) -> list[int]:
    """Count PyHessian's power iterations (one HVP each) by wrapping its hessian_vector_product."""
    import pyhessian  # noqa: F401 -- loads the submodule, whose name the package's class shadows

    module = sys.modules["pyhessian.hessian"]

    counts = []
    original = module.hessian_vector_product
    for seed in range(seeds):
        n = 0

        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal n
            n += 1
            return original(*args, **kwargs)

        module.hessian_vector_product = counting
        try:
            torch.manual_seed(seed)
            module.hessian(
                copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=False
            ).eigenvalues(top_n=1)
        finally:
            module.hessian_vector_product = original
        counts.append(n)
    return counts


def probe_rows(x: torch.Tensor, y: torch.Tensor, min_time: float) -> list[str]:
    model = trained(cnn, x, y)
    batch = (x[:128], y[:128])
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    probe = landscape_probe(model, F.cross_entropy, batch, lr=0.1)
    passes = len(calls)
    handle.remove()
    ref = copy.deepcopy(model).train()
    params = list(ref.parameters())

    def one_pass() -> object:
        return torch.autograd.grad(F.cross_entropy(ref(batch[0]), batch[1]), params)

    t_probe, t_pass = compare(
        lambda: landscape_probe(model, F.cross_entropy, batch, lr=0.1), one_pass, min_time
    )
    return [
        "### 2. One Santurkar probe (8 step sizes, 1/2-4 x lr 0.1), BN CNN, batch of 128, train mode",
        "",
        "| forward passes counted | time | one forward+backward (torch, same batch) | ratio |",
        "|---|---|---|---|",
        f"| {passes} (reported {probe.passes}) | {t_probe.median * 1e3:.1f} ms +- {t_probe.spread:.0%} | "
        f"{t_pass.median * 1e3:.2f} ms +- {t_pass.spread:.0%} | {t_probe.median / t_pass.median:.1f} passes |",
        "",
    ]


def surface_rows(x: torch.Tensor, y: torch.Tensor, repeats: int) -> list[str]:
    import loss_landscapes
    import loss_landscapes.metrics

    model = trained(cnn, x, y)
    xb, yb = x[:1000], y[:1000]
    rows = [
        "### 3. 21x21 filter-normalized plane, BN CNN (13,306 parameters), 1000 digits",
        "",
        "| BN mode | loss-landscapes `random_plane` | normlab `loss_surface` | speed-up | model afterwards (loss-landscapes / normlab) |",
        "|---|---|---|---|---|",
    ]
    for mode in ("eval", "train"):
        theirs, ours = [], []
        left = ""
        for _ in range(repeats):
            peer = copy.deepcopy(model).train(mode == "train")
            theta = torch.cat([p.detach().reshape(-1) for p in peer.parameters()])
            metric = loss_landscapes.metrics.Loss(F.cross_entropy, xb, yb)
            _, t = timed(
                loss_landscapes.random_plane,
                peer,
                metric,
                distance=1,
                steps=21,
                normalization="filter",
            )
            theirs.append(t)
            moved = torch.cat([p.detach().reshape(-1) for p in peer.parameters()])
            frozen = sum(not p.requires_grad for p in peer.parameters())
            left = f"displaced by {float((moved - theta).norm() / theta.norm()):.2f} x norm, {frozen} params frozen"
            mine = copy.deepcopy(model).train(mode == "train")
            before = copy.deepcopy(mine.state_dict())
            _, t = timed(loss_surface, mine, F.cross_entropy, (xb, yb), steps=21, bn_mode=mode)
            ours.append(t)
            same = all(torch.equal(v, before[k]) for k, v in mine.state_dict().items())
            left_ours = (
                "unchanged"
                if same and all(p.requires_grad for p in mine.parameters())
                else "CHANGED"
            )
        t_theirs, t_ours = statistics.median(theirs), statistics.median(ours)
        rows.append(
            f"| {mode} | {t_theirs:.2f} s [{min(theirs):.2f} - {max(theirs):.2f}] | {t_ours:.2f} s [{min(ours):.2f} - {max(ours):.2f}] | "
            f"{t_theirs / t_ours:.2f}x | {left} / {left_ours} |"
        )
    with torch.no_grad():
        one = copy.deepcopy(model).eval()
        _, t_fwd = timed(lambda: [F.cross_entropy(one(xb), yb) for _ in range(20)])
    rows += [
        "",
        f"One eval forward of the 1000 digits (default layout) takes {t_fwd / 20 * 1e3:.1f} ms: a 441-point "
        "grid at one forward per point is the peer's cost; normlab runs convolutions channels-last "
        "(memory_format='auto') and never writes to the model.",
        "",
    ]
    return rows


def mode_rows(x: torch.Tensor, y: torch.Tensor, steps: int = 23, matvecs: int = 60) -> list[str]:
    model = trained(cnn, x, y)
    xb, yb = x[:512], y[:512]
    ema = hessian_eigenvalues(model, F.cross_entropy, (xb, yb), bn_mode="eval", steps=steps)
    exact_model = copy.deepcopy(model)
    recompute_population_stats(exact_model, [x[i : i + 128] for i in range(0, len(x), 128)])
    exact = hessian_eigenvalues(exact_model, F.cross_entropy, (xb, yb), bn_mode="eval", steps=steps)
    train = hessian_eigenvalues(model, F.cross_entropy, (xb, yb), bn_mode="train", steps=steps)
    tr = [
        hessian_trace(m, F.cross_entropy, (xb, yb), bn_mode=mode, matvecs=matvecs).value
        for m, mode in ((model, "eval"), (exact_model, "eval"), (model, "train"))
    ]
    return [
        f"### 4. The BN mode is not a detail: BN CNN, 512 digits (Lanczos, {steps} steps; deflated Hutchinson, {matvecs} products)",
        "",
        "| mode | top eigenvalue (+- Ritz bound) | trace |",
        "|---|---|---|",
        f"| eval, running statistics from training (EMA) | {ema.values[0]:.1f} +- {ema.error_bound[0]:.1g} | {tr[0]:.0f} |",
        f"| eval, exact population statistics | {exact.values[0]:.1f} +- {exact.error_bound[0]:.1g} | {tr[1]:.0f} |",
        f"| train (batch statistics: the loss SGD optimizes) | {train.values[0]:.1f} +- {train.error_bound[0]:.1g} | {tr[2]:.0f} |",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the 21x21 plane")
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 seeds, 1 repeat, parts 2 and 4"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fix_allocator()
    x, y = digits()
    lines = [
        f"## Analysis vs PyHessian and loss-landscapes ({datetime.date.today()}, {machine()})",
        "",
    ]
    if args.quick:
        lines += probe_rows(x[:200], y[:200], 0.02) + mode_rows(x[:200], y[:200], 8, 9)
        return emit(lines, args.out)
    lines += accuracy_rows(args.seeds, x, y)
    lines += probe_rows(x, y, args.min_time)
    lines += surface_rows(x, y, args.repeats)
    lines += mode_rows(x, y)
    return emit(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
