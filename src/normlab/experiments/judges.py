"""Verdicts: each study's judge reads its records (grouped by label, seeds in order) and says
whether they support the claim -- with the numbers, and with ``"inconclusive"`` or
``"not supported"`` where the measurement does not show it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from normlab.experiments.records import RunRecord
from normlab.experiments.summary import final, geometric_mean, spread, steps_to_threshold, trained

__all__ = ["LOSS_THRESHOLD", "Grouped", "Verdict"]

Status = Literal["supported", "not supported", "inconclusive"]
Grouped = dict[str, list[RunRecord]]  # label -> records over seeds, in seed order
#: Training-loss level (10-step mean) whose first crossing measures convergence speed.
LOSS_THRESHOLD = 0.2
#: Runs of at most this many steps count as "short training" (population-stats).
SHORT_STEPS = 100
#: Probes at steps up to here are "early" (BN can be rougher there: pilot lesson).
EARLY_STEPS = 100


@dataclass(frozen=True)
class Verdict:
    """A study's conclusion: ``status``, a paragraph with the numbers behind it, and a table
    (first row: the header)."""

    status: Status
    summary: str
    table: tuple[tuple[str, ...], ...]


def _steps(record: RunRecord) -> float:
    """Steps to the loss threshold; ``inf`` if never reached."""
    s = steps_to_threshold(record, LOSS_THRESHOLD)
    return math.inf if s is None else float(s)


def _steps_text(records: Sequence[RunRecord]) -> str:
    values = [_steps(r) for r in records]
    reached = [v for v in values if math.isfinite(v)]
    total = records[0]["config"].steps if records else 0
    if not reached:
        return f"> {total} (never)"
    text = str(spread(reached))
    return text if len(reached) == len(values) else f"{text}; {len(values) - len(reached)} never"


def _faster(a: Sequence[RunRecord], b: Sequence[RunRecord]) -> tuple[int, int]:
    """Seeds where ``a`` reaches the threshold strictly before ``b`` (never = infinitely late),
    out of the seeds where at least one of them reaches it."""
    wins = total = 0
    for ra, rb in zip(a, b, strict=False):
        sa, sb = _steps(ra), _steps(rb)
        if math.isfinite(sa) or math.isfinite(sb):
            total += 1
            wins += sa < sb
    return wins, total


def _trained_count(records: Sequence[RunRecord]) -> str:
    return f"{sum(trained(r) for r in records)}/{len(records)}"


def _acc(records: Sequence[RunRecord], key: str = "test_acc_exact") -> str:
    return spread(final(r, key) for r in records).percent()


def _training_table(groups: Grouped) -> tuple[tuple[str, ...], ...]:
    header = (
        "run",
        f"steps to train loss < {LOSS_THRESHOLD}",
        "trained (not diverged, above chance)",
        "test accuracy (exact statistics)",
    )
    rows = [(label, _steps_text(rs), _trained_count(rs), _acc(rs)) for label, rs in groups.items()]
    return (header, *rows)


def _majority(wins: int, total: int) -> bool:
    return total > 0 and 2 * wins > total


def _find(groups: Grouped, *parts: str) -> list[RunRecord]:
    for label, records in groups.items():
        if all(p in label for p in parts):
            return records
    return []


def _mean_acc(records: Sequence[RunRecord], key: str = "test_acc_exact") -> float:
    return spread(final(r, key) for r in records).mean


def _steps_ratio(a: Sequence[RunRecord], b: Sequence[RunRecord]) -> float:
    """Mean over seeds (both reaching the threshold) of steps(a) / steps(b); NaN if none."""
    pairs = [(_steps(x), _steps(y)) for x, y in zip(a, b, strict=False)]
    return spread(x / y for x, y in pairs if math.isfinite(x) and math.isfinite(y) and y).mean


def bn_training(groups: Grouped) -> Verdict:
    plain1, bn1 = _find(groups, "plain", "lr 0.1"), _find(groups, "BN", "lr 0.1")
    plain5, bn5 = _find(groups, "plain", "lr 0.5"), _find(groups, "BN", "lr 0.5")
    faster = _faster(bn1, plain1)
    faster5 = _faster(bn5, plain5)
    bn5_ok = sum(trained(r) for r in bn5)
    plain5_ok = sum(trained(r) for r in plain5)
    large_lr = bn5_ok * 2 > len(bn5) and (plain5_ok < bn5_ok or _majority(*faster5))
    # the two refutations of the study: not faster in most seeds; plain as good at lr 0.5
    slower = faster[1] > 0 and 2 * faster[0] < faster[1]
    plain_copes = bool(plain5) and plain5_ok >= bn5_ok and not _majority(*faster5)
    if slower or plain_copes:
        status: Status = "not supported"
    elif _majority(*faster) and large_lr:
        status = "supported"
    else:
        status = "inconclusive"
    gap = 100 * (_mean_acc(bn1) - _mean_acc(plain1))
    summary = (
        f"At lr 0.1 BN reached a training loss of {LOSS_THRESHOLD} first in {faster[0]} of "
        f"{faster[1]} seeds (steps: BN {_steps_text(bn1)}, plain {_steps_text(plain1)}). At lr "
        f"0.5 {bn5_ok}/{len(bn5)} BN runs and {plain5_ok}/{len(plain5)} plain runs trained "
        f"(BN first in {faster5[0]} of {faster5[1]} seeds). Final test accuracy at lr 0.1: BN "
        f"{_acc(bn1)}, plain {_acc(plain1)} ({gap:+.1f} points); the claim is about the steps."
    )
    return Verdict(status, summary, _training_table(groups))


def noisy_bn(groups: Grouped) -> Verdict:
    plain1, noisy1, bn1 = (_find(groups, n, "lr 0.1") for n in ("plain", "noisy", "BN,"))
    plain5, noisy5 = _find(groups, "plain", "lr 0.5"), _find(groups, "noisy", "lr 0.5")
    faster = _faster(noisy1, plain1)
    noisy5_ok, plain5_ok = sum(trained(r) for r in noisy5), sum(trained(r) for r in plain5)
    helps_fast = _majority(*faster)
    helps_large_lr = noisy5_ok * 2 > len(noisy5) and noisy5_ok > plain5_ok
    if helps_fast or helps_large_lr:
        status: Status = "supported"
    elif not faster[1] and not noisy5:
        status = "inconclusive"  # nothing reached the threshold and no large-lr runs
    else:
        status = "not supported"
    vs_bn = _steps_ratio(noisy1, bn1)
    bn_first = _faster(bn1, noisy1)
    if not math.isfinite(vs_bn):
        position = "Noisy BN and BN could not be compared (one of them never reached it)."
    elif vs_bn <= 1.25:
        position = (
            f"Noisy BN needed {vs_bn:.2f}x BN's steps: nearly as fast as BN, as in the paper."
        )
    else:
        position = (
            f"Noisy BN needed {vs_bn:.2f}x BN's steps (BN first in {bn_first[0]} of "
            f"{bn_first[1]} seeds): slower than BN here, where the paper found it nearly as "
            "fast."
        )
    where = [
        part for part, holds in (("at lr 0.1", helps_fast), ("at lr 0.5", helps_large_lr)) if holds
    ]
    summary = (
        f"Noisy BN reached loss {LOSS_THRESHOLD} before the plain network in {faster[0]} of "
        f"{faster[1]} seeds at lr 0.1 (steps: noisy {_steps_text(noisy1)}, BN "
        f"{_steps_text(bn1)}, plain {_steps_text(plain1)}); at lr 0.5 {noisy5_ok}/{len(noisy5)} "
        f"noisy-BN runs trained against {plain5_ok}/{len(plain5)} plain runs. "
        + (
            f"The benefit over plain survives the injected shift ({' and '.join(where)}). "
            if where
            else "At this scale the injected noise cancels BN's benefit over plain. "
        )
        + position
    )
    return Verdict(status, summary, _training_table(groups))


def _probe_metrics(probe: dict) -> dict[str, float]:  # type: ignore[type-arg]
    losses, changes = probe["losses"], probe["grad_changes"]
    return {
        "loss variation": max(losses) - min(losses),
        "gradient change": max(changes) - min(changes),
        "beta": probe["beta"],
        "|g|": probe["grad_norm"],
    }


METRICS = ("loss variation", "gradient change", "beta", "|g|")


def _ratios(
    ours: Sequence[RunRecord], base: Sequence[RunRecord], early: bool
) -> dict[str, tuple[list[float], int, int]]:
    """Per metric: per-seed geometric means of ours/base at matched probes (same seed and step,
    both runs trained), and how many matched probes had ours smaller."""
    out: dict[str, tuple[list[float], int, int]] = {m: ([], 0, 0) for m in METRICS}
    for a, b in zip(ours, base, strict=False):
        if not (trained(a) and trained(b)):
            continue
        pb = {p["step"]: p for p in b["probes"]}
        pairs = [
            (_probe_metrics(p), _probe_metrics(pb[p["step"]]))
            for p in a["probes"]
            if p["step"] in pb and (p["step"] <= EARLY_STEPS) == early
        ]
        if not pairs:
            continue
        for m in METRICS:
            seeds, smaller, total = out[m]
            values = [x[m] / y[m] for x, y in pairs if y[m] > 0 and x[m] >= 0]
            seeds.append(geometric_mean(values))
            out[m] = (seeds, smaller + sum(x[m] < y[m] for x, y in pairs), total + len(pairs))
    return out


def landscape(groups: Grouped) -> Verdict:
    plain = groups.get("plain", [])
    header = ("run / plain", "phase", *(f"{m} ratio" for m in METRICS), "runs compared")
    rows: list[tuple[str, ...]] = []
    verdict_ratios: dict[str, list[float]] = {}
    others: dict[str, tuple[list[float], list[float]]] = {}
    for label, records in groups.items():
        if label == "plain":
            continue
        for early in (True, False):
            r = _ratios(records, plain, early)
            phase = f"steps <= {EARLY_STEPS}" if early else f"steps > {EARLY_STEPS}"
            cells = []
            for m in METRICS:
                seeds, smaller, total = r[m]
                cells.append(f"{spread(seeds)}; smaller in {smaller}/{total}" if seeds else "n/a")
            compared = len(r["beta"][0])
            rows.append((label, phase, *cells, str(compared)))
            if label == "BN" and not early:
                verdict_ratios = {m: r[m][0] for m in METRICS}
            if label != "BN" and not early:
                others[label] = (r["loss variation"][0], r["gradient change"][0])
    dead = [
        f"{label} seed {i}"
        for label, rs in groups.items()
        for i, rec in enumerate(rs)
        if not trained(rec)
    ]
    loss_ok = verdict_ratios.get("loss variation", [])
    grad_ok = verdict_ratios.get("gradient change", [])
    if not loss_ok or not grad_ok:
        status: Status = "inconclusive"
    elif sum(v < 1 for v in loss_ok) * 2 > len(loss_ok) and sum(v < 1 for v in grad_ok) * 2 > len(
        grad_ok
    ):
        status = "supported"
    elif sum(v >= 1 for v in loss_ok) * 2 > len(loss_ok) and sum(v >= 1 for v in grad_ok) * 2 > len(
        grad_ok
    ):
        status = "not supported"
    else:
        status = "inconclusive"
    early_g = spread(_ratios(groups.get("BN", []), plain, True)["|g|"][0])
    if not early_g.n:
        early_text = "There were no matched early probes."
    elif early_g.mean > 1:
        early_text = (
            f"Early probes are reported separately: there BN's gradient is {early_g} times "
            "plain's at the same learning rate, which inflates its probes (|g| column)."
        )
    else:
        early_text = f"Early probes (reported separately): BN's gradient-norm ratio is {early_g}."

    def other(label: str, lv: list[float], gc: list[float]) -> str:
        head = (
            f" {label}: late loss-variation ratio {spread(lv)}, gradient-change ratio {spread(gc)}"
        )
        if not lv or not gc:
            return f" {label}: no matched late probes (a run did not train)."
        if max(lv) < 1 and max(gc) < 1:
            return head + " -- smoother than plain too."
        return head + " -- not smoother than plain in every seed here."

    summary = (
        "Ratios are BN-variant / plain at matched probes (same seed, same step), geometric mean "
        "per seed, shown as mean (min-max) over seeds; < 1 means smoother. After step "
        f"{EARLY_STEPS} BN's loss variation ratio is {spread(loss_ok)} and its gradient-change "
        f"ratio {spread(grad_ok)}. {early_text}"
        + "".join(other(label, lv, gc) for label, (lv, gc) in others.items())
        + (f" Runs that did not train were left out: {', '.join(dead)}." if dead else "")
    )
    return Verdict(status, summary, (header, *rows))


def _by_config(
    groups: Grouped, key: Callable[[RunRecord], tuple[object, ...]]
) -> dict[tuple[object, ...], list[RunRecord]]:
    out: dict[tuple[object, ...], list[RunRecord]] = {}
    for records in groups.values():
        for r in records:
            out.setdefault(key(r), []).append(r)
    return out


def robustness(groups: Grouped) -> Verdict:
    everything = [r for rs in groups.values() for r in rs]
    best = max((final(r, "test_acc_exact") or 0.0 for r in everything), default=0.0)
    bar = 0.8 * best
    cells = _by_config(groups, lambda r: (r["config"].norm, r["config"].lr, r["config"].init_scale))
    fraction: dict[str, list[bool]] = {}
    for (norm, _, _), records in cells.items():
        ok = [
            r["status"] == "complete" and (final(r, "test_acc_exact") or 0.0) >= bar
            for r in records
        ]
        fraction.setdefault(str(norm), []).append(2 * sum(ok) > len(ok))
    rows = [(norm, f"{sum(v)}/{len(v)}", f"{sum(v) / len(v):.2f}") for norm, v in fraction.items()]
    bn, plain = fraction.get("batch", []), fraction.get("none", [])
    if not bn or not plain:
        status: Status = "inconclusive"
    else:
        status = "supported" if sum(bn) > sum(plain) else "not supported"
    summary = (
        f"A cell (learning rate x init scale) trains if most of its seeds finish without "
        f"diverging at >= 80% of the best test accuracy in the grid ({100 * best:.1f}%, so "
        f">= {100 * bar:.1f}%). Cells that train: BN {sum(bn)}/{len(bn)}, plain "
        f"{sum(plain)}/{len(plain)}"
        + "".join(
            f", {norm} norm {sum(v)}/{len(v)}"
            for norm, v in fraction.items()
            if norm not in ("batch", "none")
        )
        + "."
    )
    return Verdict(status, summary, (("norm", "cells that train", "fraction"), *rows))


def batch_size(groups: Grouped) -> Verdict:
    cells = _by_config(groups, lambda r: (r["config"].norm, r["config"].batch_size))
    norms = sorted({str(k[0]) for k in cells})
    sizes = sorted({int(str(k[1])) for k in cells})
    acc = {
        (norm, b): spread(final(r, "test_acc_exact") for r in cells.get((norm, b), [])).mean
        for norm in norms
        for b in sizes
    }
    header = ("norm", *(f"batch {b}" for b in sizes))
    rows = [
        (
            norm,
            *(
                spread(final(r, "test_acc_exact") for r in cells.get((norm, b), [])).percent()
                for b in sizes
            ),
        )
        for norm in norms
    ]

    steps = {int(str(k[1])): max(r["config"].steps for r in rs) for k, rs in cells.items()}
    steps_text = ", ".join(f"{steps[b]} at batch {b}" for b in sizes)

    def behind(b: int) -> float:
        """BN minus the better of group and layer norm at batch ``b`` (same steps for all)."""
        others = [acc[(n, b)] for n in ("group", "layer") if (n, b) in acc]
        return acc.get(("batch", b), math.nan) - max(others, default=math.nan)

    small, large = (behind(sizes[0]), behind(sizes[-1])) if sizes else (math.nan, math.nan)
    if not (math.isfinite(small) and math.isfinite(large)):
        status: Status = "inconclusive"
    elif small < large - 0.02:
        status = "supported"
    elif small >= large:
        status = "not supported"
    else:
        status = "inconclusive"
    lead = (
        f"BN is still ahead at batch {sizes[0]}: the crossover reported at batches of 2-4 is not "
        "reached at this scale, only the shrinking lead."
        if math.isfinite(small) and small > 0
        else ""
    )
    if sizes and ("batch", sizes[0]) in acc:
        b0 = sizes[0]
        versus = [
            f"{name} {100 * (acc[(norm, b0)] - acc[('batch', b0)]):+.1f}"
            for norm, name in (
                ("renorm", "batch renorm"),
                ("ghost", "ghost BN"),
                ("instance", "instance norm"),
            )
            if (norm, b0) in acc
        ]
        if versus:
            lead += f" At batch {b0}, against BN (points): {', '.join(versus)}."
    summary = (
        "Test accuracy with exact population statistics; at each batch size every norm trains "
        f"the same number of steps ({steps_text}) at learning rate "
        f"0.1 x min(1, batch/32). BN minus the better of group/layer norm: {100 * large:+.1f} "
        f"points at batch {sizes[-1] if sizes else '?'}, {100 * small:+.1f} at batch "
        f"{sizes[0] if sizes else '?'}. {lead}"
    ).strip()
    return Verdict(status, summary, (header, *rows))


def population(groups: Grouped) -> Verdict:
    header = (
        "run",
        "momentum (torch; Keras = 1 - it)",
        "EMA test accuracy",
        "exact test accuracy",
        "exact - EMA",
    )
    rows = []
    extreme_gains: list[float] = []
    default_gap: list[float] = []
    short_gap: list[float] = []
    all_diffs: list[float] = []
    for label, records in groups.items():
        momenta = sorted({m for r in records for m in (final(r, "ema_momenta") or {})}, key=float)
        exact = [final(r, "test_acc_exact") for r in records]
        for m in momenta:
            ema = [(final(r, "ema_momenta") or {}).get(m) for r in records]
            diffs = [
                e - a for e, a in zip(exact, ema, strict=True) if e is not None and a is not None
            ]
            rows.append(
                (
                    label,
                    m,
                    spread(ema).percent(),
                    spread(exact).percent(),
                    f"{100 * spread(diffs).mean:+.1f} pt",
                )
            )
            short = min(r["config"].steps for r in records) <= SHORT_STEPS
            if label.startswith("batch 8,") and not short and float(m) in (0.001, 0.9):
                extreme_gains += diffs
            if float(m) == 0.1:
                (short_gap if short else default_gap).extend(diffs)
            all_diffs += diffs
    if not extreme_gains:
        status: Status = "inconclusive"
    elif min(extreme_gains) > 0:
        status = "supported"
    elif spread(extreme_gains).mean <= 0:
        status = "not supported"
    else:
        status = "inconclusive"
    default, short = spread(default_gap), spread(short_gap)
    worst = min(all_diffs, default=math.nan)
    parts = [
        f"At batch 8 (full runs) the extreme momenta (torch 0.001 and 0.9) cost "
        f"{100 * spread(extreme_gains).mean:.1f} points on average against exact statistics "
        f"(per run: {spread([100 * g for g in extreme_gains])} pt)."
        if extreme_gains
        else "There were no full runs at batch 8 to judge the extreme momenta."
    ]
    if default.n:
        parts.append(
            f"At the default momentum 0.1 the gap is {100 * default.mean:+.1f} points in full "
            "runs"
            + (" -- a null effect, as the pilots found." if abs(default.mean) < 0.01 else ".")
        )
    if short.n:
        lag = short.mean > (default.mean if default.n else 0.0) + 0.005
        parts.append(
            f"After only {SHORT_STEPS} steps or fewer it is {100 * short.mean:+.1f} points"
            + (
                ": the running averages lag weights that still move fast."
                if lag
                else ", no larger than in full runs here."
            )
        )
    if all_diffs:
        parts.append(
            "Exact statistics were never worse than a running average by more than 0.5 points."
            if worst >= -0.005
            else f"Exact statistics were worse than a running average by up to {-100 * worst:.1f} "
            "points."
        )
    summary = " ".join(parts)
    return Verdict(status, summary, (header, *rows))


def self_normalizing(groups: Grouped) -> Verdict:
    header = (
        "network",
        "variance: layer 1",
        "layer 8",
        "last layer",
        "|mean| last layer",
        "test accuracy",
    )
    rows, last_logvar = [], {}
    for label, records in groups.items():
        profiles = [((r.get("activations") or {}).get("start") or []) for r in records]
        profiles = [p for p in profiles if p]
        if not profiles:
            continue

        def at(i: int, key: str, profiles: list[list[dict]] = profiles) -> list[float]:  # type: ignore[type-arg]
            return [p[min(i, len(p) - 1)][key] for p in profiles]

        last = at(10**6, "variance")
        last_logvar[label] = spread(abs(math.log(v)) if v > 0 else math.inf for v in last).mean
        rows.append(
            (
                label,
                str(spread(at(0, "variance"))),
                str(spread(at(7, "variance"))),
                str(spread(last)),
                str(spread(abs(m) for m in at(10**6, "mean"))),
                _acc(records, "test_acc_ema"),
            )
        )
    selu = last_logvar.get("SELU + LeCun")
    others = [v for k, v in last_logvar.items() if not k.startswith("SELU")]
    if selu is None or not others:
        status: Status = "inconclusive"
    elif selu < min(others) and selu < math.log(2):
        status = "supported"
    else:
        status = "not supported"
    summary = (
        "Activation statistics at initialisation (train mode, 256 training inputs) after each "
        "activation of a 16-layer network without normalization layers. |log variance| at the "
        f"last layer: SELU + LeCun {selu if selu is not None else math.nan:.2f}, others "
        + ", ".join(
            f"{k} {v:.2f}" for k, v in last_logvar.items() if not k.startswith("SELU + LeCun")
        )
        + "."
    )
    return Verdict(status, summary, (header, *rows))


def dropout(groups: Grouped) -> Verdict:
    header = ("run", "train accuracy", "test accuracy", "gap (train - test)")
    rows, gaps = [], {}
    for label, records in groups.items():
        train = [final(r, "train_acc") for r in records]
        test = [final(r, "test_acc_ema") for r in records]
        gap = [a - b for a, b in zip(train, test, strict=True) if a is not None and b is not None]
        gaps[label] = spread(gap).mean
        rows.append(
            (
                label,
                spread(train).percent(),
                spread(test).percent(),
                f"{100 * spread(gap).mean:.1f} pt",
            )
        )
    base = gaps.get("no dropout")
    regularized = [v for k, v in gaps.items() if k.startswith(("dropout", "DropConnect"))]
    if base is None or not regularized:
        status: Status = "inconclusive"
    elif all(v < base for v in regularized):
        status = "supported"
    elif all(v >= base for v in regularized):
        status = "not supported"
    else:
        status = "inconclusive"
    summary = (
        f"Train-test accuracy gap without dropout: {100 * (base or math.nan):.1f} points; with "
        + ", ".join(f"{k}: {100 * v:.1f}" for k, v in gaps.items() if k != "no dropout")
        + ". DropConnect masks are drawn per mini-batch here (per-sample masks cost ~100x). "
        + _paired(groups, "DropConnect 0.5, Gaussian inference", "DropConnect 0.5, mean inference")
        + " "
        + _paired(groups, "SELU + alpha dropout 0.1", "SELU, no dropout")
    )
    return Verdict(status, summary, (header, *rows))


def _paired(groups: Grouped, a: str, b: str) -> str:
    """Test accuracy of ``a`` minus ``b`` per seed, and whether ``a`` was at least as good in
    every seed."""
    diffs = [
        (final(x, "test_acc_ema") or 0.0) - (final(y, "test_acc_ema") or 0.0)
        for x, y in zip(groups.get(a, []), groups.get(b, []), strict=False)
    ]
    if not diffs:
        return ""
    d = spread(100 * v for v in diffs)
    verdict = "at least as good in every seed" if min(diffs) >= 0 else "worse in some seed"
    return f"Test accuracy, {a} minus {b}: {d} points ({verdict})."


def _best_lr(groups: Grouped, prefix: str) -> list[RunRecord]:
    """Per seed, the run (among the learning rates of ``prefix``) that reaches the threshold
    first."""
    runs = [rs for label, rs in groups.items() if label.startswith(prefix)]
    return [min(seed_runs, key=_steps) for seed_runs in zip(*runs, strict=True)] if runs else []


def input_normalization(groups: Grouped) -> Verdict:
    raw, train = (_best_lr(groups, p) for p in ("raw", "training-split"))
    faster = _faster(train, raw)
    leak_by_lr = {
        rs[0]["config"].lr: rs for label, rs in groups.items() if label.startswith("test-split")
    }
    diff = [  # the leak at the learning rate of the best standardized run of the same seed
        (final(leak_by_lr[t["config"].lr][i], "test_acc_ema") or 0.0)
        - (final(t, "test_acc_ema") or 0.0)
        for i, t in enumerate(train)
        if t["config"].lr in leak_by_lr and i < len(leak_by_lr[t["config"].lr])
    ]
    leak = spread(100 * d for d in diff)
    if not faster[1]:
        status: Status = "inconclusive"
    else:
        status = "supported" if _majority(*faster) else "not supported"
    summary = (
        "Each input variant at its best of three learning rates (per seed). Standardized inputs "
        f"reached loss {LOSS_THRESHOLD} before raw inputs in {faster[0]} of {faster[1]} seeds "
        f"(steps: standardized {_steps_text(train)}, raw {_steps_text(raw)}). Test-split "
        f"statistics (same learning rate) change test accuracy by {leak} points"
        + (
            ": nothing measurable with these i.i.d. splits -- and any gain would be a dishonest "
            "score, not a better model."
            if leak.n and abs(leak.mean) < 0.5
            else " -- a change bought by looking at the test split: not a better model, a "
            "dishonest score."
        )
    )
    return Verdict(status, summary, _training_table(groups))
