"""Records -> matplotlib figures, one per study (the report draws; nothing here trains)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from normlab.experiments.judges import EARLY_STEPS, LOSS_THRESHOLD, Grouped
from normlab.experiments.records import RunRecord
from normlab.experiments.summary import final, running_mean, trained

__all__ = ["FIGURES", "figure_for"]


Series = Callable[[RunRecord], tuple[list[int], list[float]]]


def _curves(ax: Axes, groups: Grouped, series: Series) -> None:
    """Mean over seeds (line) and min-max band of a per-run series."""
    for label, records in groups.items():
        runs = [series(r) for r in records]
        runs = [(s, v) for s, v in runs if s]
        if not runs:
            continue
        length = min(len(s) for s, _ in runs)
        steps = np.asarray(runs[0][0][:length])
        values = np.asarray([v[:length] for _, v in runs], dtype=float)
        with np.errstate(all="ignore"):
            mean = np.nanmean(values, axis=0) if np.isfinite(values).any() else values[0]
        (line,) = ax.plot(steps, mean, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(
                steps,
                np.nanmin(values, 0),
                np.nanmax(values, 0),
                color=line.get_color(),
                alpha=0.15,
            )


def _loss(record: RunRecord) -> tuple[list[int], list[float]]:
    values = running_mean(record["train_loss"], 10)
    return list(range(1, len(values) + 1)), values


def loss_curves(groups: Grouped, title: str) -> Figure:
    """Training loss (10-step mean) vs step, one panel per learning rate found in the labels."""
    panels: dict[str, Grouped] = {}
    for label, records in groups.items():
        key = label.split(", ")[-1] if "lr " in label else ""
        panels.setdefault(key, {})[label] = records
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, sub) in zip(axes[0], panels.items(), strict=True):
        _curves(ax, sub, _loss)
        ax.axhline(LOSS_THRESHOLD, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("SGD step")
        ax.set_ylabel("training loss (10-step mean)")
        ax.set_title(key or title)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


_PROBES = (
    ("loss variation", lambda p: max(p["losses"]) - min(p["losses"])),
    ("gradient change (max - min)", lambda p: max(p["grad_changes"]) - min(p["grad_changes"])),
    ("effective beta-smoothness", lambda p: p["beta"]),
    ("gradient norm |g|", lambda p: p["grad_norm"]),
)


def probes(groups: Grouped, title: str) -> Figure:
    """The Santurkar probes vs step (mean over the runs that trained), log scale."""
    fig, grid_axes = plt.subplots(2, 2, figsize=(12, 8))
    axes = grid_axes.ravel()
    for ax, (name, metric) in zip(axes, _PROBES, strict=True):
        alive = {k: [r for r in v if trained(r) and r["probes"]] for k, v in groups.items()}

        def series(
            r: RunRecord, metric: Callable[[Any], float] = metric
        ) -> tuple[list[int], list[float]]:
            return [p["step"] for p in r["probes"]], [metric(p) for p in r["probes"]]

        _curves(ax, {k: v for k, v in alive.items() if v}, series)
        ax.axvline(EARLY_STEPS, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("SGD step")
        ax.set_title(name)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " (runs that trained; dotted: end of the early phase)")
    fig.tight_layout()
    return fig


def grid(groups: Grouped, title: str) -> Figure:
    """Final test accuracy over learning rate x init scale, one heat map per norm."""
    records = [r for rs in groups.values() for r in rs]
    norms = sorted({r["config"].norm for r in records})
    lrs = sorted({r["config"].lr for r in records})
    scales = sorted({r["config"].init_scale for r in records})
    fig, axes = plt.subplots(1, len(norms), figsize=(4.5 * len(norms), 3.8), squeeze=False)
    for ax, norm in zip(axes[0], norms, strict=True):
        table = np.full((len(scales), len(lrs)), np.nan)
        for i, s in enumerate(scales):
            for j, lr in enumerate(lrs):
                accs = [
                    final(r, "test_acc_exact") or 0.0
                    for r in records
                    if r["config"].norm == norm
                    and r["config"].lr == lr
                    and r["config"].init_scale == s
                ]
                if accs:
                    table[i, j] = 100 * float(np.mean(accs))
        image = ax.imshow(table, vmin=0, vmax=100, cmap="viridis", origin="lower", aspect="auto")
        for i in range(len(scales)):
            for j in range(len(lrs)):
                if math.isfinite(table[i, j]):
                    ax.text(
                        j, i, f"{table[i, j]:.0f}", ha="center", va="center", color="w", fontsize=9
                    )
        ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs])
        ax.set_yticks(range(len(scales)), [f"x{v:g}" for v in scales])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("initial weight scale")
        ax.set_title(f"norm = {norm}")
    fig.colorbar(image, ax=axes[0].tolist(), label="test accuracy (%)")
    fig.suptitle(title)
    return fig


def _finish(fig: Figure, ax: Axes, title: str) -> Figure:
    """Legend, title and layout of a one-panel figure."""
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def batch_sizes(groups: Grouped, title: str) -> Figure:
    """Test accuracy (exact statistics) vs batch size, one line per norm."""
    records = [r for rs in groups.values() for r in rs]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for norm in sorted({r["config"].norm for r in records}):
        sizes = sorted({r["config"].batch_size for r in records if r["config"].norm == norm})
        means = [
            100
            * float(
                np.mean(
                    [
                        final(r, "test_acc_exact") or 0.0
                        for r in records
                        if r["config"].norm == norm and r["config"].batch_size == b
                    ]
                )
            )
            for b in sizes
        ]
        ax.plot(sizes, means, marker="o", label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (%), exact statistics")
    return _finish(fig, ax, title)


def momenta(groups: Grouped, title: str) -> Figure:
    """Test accuracy with EMA statistics vs the EMA momentum, per batch size; dashed: exact."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, records in groups.items():
        keys = sorted({m for r in records for m in (final(r, "ema_momenta") or {})}, key=float)
        values = [
            100 * float(np.mean([(final(r, "ema_momenta") or {}).get(k, np.nan) for r in records]))
            for k in keys
        ]
        (line,) = ax.plot([float(k) for k in keys], values, marker="o", label=f"{label}: EMA")
        exact = 100 * float(np.mean([final(r, "test_acc_exact") or np.nan for r in records]))
        ax.axhline(exact, color=line.get_color(), ls="--", label=f"{label}: exact statistics")
    ax.set_xscale("log")
    ax.set_xlabel("EMA momentum (torch convention: weight of the new batch; Keras = 1 - it)")
    ax.set_ylabel("test accuracy (%)")
    return _finish(fig, ax, title)


def depth_profiles(groups: Grouped, title: str) -> Figure:
    """Activation variance and mean after each activation at initialisation, vs depth."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for label, records in groups.items():
        profiles = [(r.get("activations") or {}).get("start") or [] for r in records]
        profiles = [p for p in profiles if p]
        if not profiles:
            continue
        depth = min(len(p) for p in profiles)
        var = np.mean([[p[i]["variance"] for i in range(depth)] for p in profiles], axis=0)
        mean = np.mean([[p[i]["mean"] for i in range(depth)] for p in profiles], axis=0)
        layers = np.arange(1, depth + 1)
        left.plot(layers, var, marker=".", label=label)
        right.plot(layers, mean, marker=".", label=label)
    left.set_yscale("log")
    left.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.axhline(0.0, color="grey", lw=0.8, ls="--")
    for ax, name in ((left, "variance"), (right, "mean")):
        ax.set_xlabel("layer (after its activation)")
        ax.set_ylabel(f"activation {name} at initialisation")
    left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def accuracy_bars(groups: Grouped, title: str) -> Figure:
    """Train and test accuracy per run (mean over seeds): the gap is overfitting."""
    labels = list(groups)
    train = [
        100 * float(np.mean([final(r, "train_acc") or 0.0 for r in groups[k]])) for k in labels
    ]
    test = [
        100 * float(np.mean([final(r, "test_acc_ema") or 0.0 for r in groups[k]])) for k in labels
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels)), 4.2))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, train, 0.4, label="train")
    ax.bar(x + 0.2, test, 0.4, label="test")
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(min([*train, *test, 100.0]) - 5, 100.5)
    ax.set_ylabel("accuracy (%)")
    return _finish(fig, ax, title)


FIGURES: dict[str, Callable[[Grouped, str], Figure]] = {
    "bn-training": loss_curves,
    "noisy-bn": loss_curves,
    "landscape": probes,
    "robustness": grid,
    "batch-size": batch_sizes,
    "population-stats": momenta,
    "self-normalizing": depth_profiles,
    "dropout": accuracy_bars,
    "input-normalization": loss_curves,
}


def figure_for(study: str, groups: Grouped, title: str) -> Figure:
    """The figure of ``study`` (a loss-curve plot for studies without a special one)."""
    return FIGURES.get(study, loss_curves)(groups, title)
