"""The audit's checks: each measures the model on the data and returns its findings.

Every check gets the same :class:`~normlab.audit._context.Context` and must leave the model as it
found it (the caller also snapshots and restores it). Thresholds are module constants, named and
documented, so that a finding can say which line it crossed.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab.analysis import activation_statistics, is_stochastic
from normlab.audit._context import Context, batch_rows
from normlab.audit._report import Finding
from normlab.functional import Moments
from normlab.nn import AlphaDropout, InputStandardizer
from normlab.surgery import foldable, fusable_pairs, fuse_batchnorm, recompute_population_stats
from normlab.surgery._state import preserved, running_stat_layers

__all__ = ["RUNNERS"]

#: input-scale: a channel's |mean| beyond this many of max(its std, 1), a std outside this
#: range, or stds of different channels further apart than this ratio.
INPUT_OFFSET = 3.0
INPUT_STD_RANGE = (0.1, 10.0)
INPUT_STD_RATIO = 20.0
#: stale-statistics: a relative loss (or output) change, and an accuracy change (points).
STALE_LOSS = 0.02
STALE_OUTPUT = 0.05
STALE_ACCURACY = 0.5
#: stale-statistics: the output change must also exceed this many times the sampling noise
#: (the change between exact statistics from the two halves of the sample).
STALE_NOISE = 3.0
#: dropout-before-norm: |variance ratio - 1| at a norm's input between train and eval noise.
VARIANCE_SHIFT = 0.1
#: small-batch: std of a channel's batch mean over batches, in units of its population std.
BATCH_NOISE = 0.2
#: self-normalizing: SELU outputs farther than this from mean 0 / variance 1.
SELU_MEAN, SELU_VARIANCE = 0.3, (0.5, 2.0)
#: activations: fraction of dead (never positive) or saturated units in one layer.
DEAD, SATURATED = 0.5, 0.5
#: activations: variance of the last activation against the first, without norms in between.
DRIFT = 100.0
#: modes: a torch-convention momentum at least this large looks like Keras' decay.
KERAS_MOMENTUM = 0.9
#: fusion: report fusing when the measured eval speed-up reaches this.
FUSION_SPEEDUP = 1.1

_BIAS_CANCELLED = (_BatchNorm, _InstanceNorm)  # the norm's mean subtraction removes a bias


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)) or (
        hasattr(m, "running_mean") and hasattr(m, "momentum")
    )


def _per_channel(x: Tensor) -> Moments:
    """Exact per-channel (dim 1) moments of ``x`` over the batch and all positions."""
    return Moments.of(x, [0, *range(2, x.dim())])


def _pooled(parts: list[Moments]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (biased) std of all ``parts`` together."""
    merged = functools.reduce(Moments.merge, parts)
    return merged.mean, merged.variance().sqrt()


# -- 1. inputs not standardized -----------------------------------------------------------------


def _first_layer(ctx: Context) -> str | None:
    """The first module with weights that runs (Linear/Conv/Embedding...), unless a norm or an
    InputStandardizer runs before it (then the model standardizes its own input)."""
    for name in ctx.order:
        module = ctx.module(name) if name else None
        if module is None or list(module.children()):
            continue
        if isinstance(module, InputStandardizer) or _is_norm(module):
            return None
        if isinstance(getattr(module, "weight", None), Tensor):
            return name
    return None


def input_scale(ctx: Context) -> list[Finding]:
    first = _first_layer(ctx)
    if first is None:
        return []
    parts: list[Moments] = []

    def grab(module: nn.Module, args: Any) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2:
            parts.append(_per_channel(x))

    with preserved(ctx.model) as handles:
        ctx.model.eval()
        handles.append(ctx.module(first).register_forward_pre_hook(grab))
        for args in ctx.inputs:
            ctx.run(args)
    if not parts:
        return []  # integer inputs (an embedding) or a first layer without a tensor input
    mean, std = _pooled(parts)
    varying = std[std > 1e-12]
    offset = (mean.abs() / std.clamp_min(1.0)).max().item()
    low, high = (varying.min().item(), varying.max().item()) if varying.numel() else (0.0, 0.0)
    reasons = []
    if offset > INPUT_OFFSET:
        reasons.append(f"a channel mean is {offset:.1f} x max(std, 1) away from 0")
    if varying.numel() and (high > INPUT_STD_RANGE[1] or low < INPUT_STD_RANGE[0]):
        reasons.append(f"channel stds span {low:.3g} to {high:.3g}")
    if varying.numel() and high / low > INPUT_STD_RATIO:
        reasons.append(f"channel scales differ by {high / low:.0f}x")
    if not reasons:
        return []
    return [
        Finding(
            check="input-scale",
            severity="warning",
            title="inputs are not standardized",
            modules=(first,),
            evidence={
                "layer": first,
                "channels": int(mean.numel()),
                "mean_range": [mean.min().item(), mean.max().item()],
                "std_range": [low, high],
                "reasons": reasons,
            },
            cost=(
                "; ".join(reasons)
                + f": the first layer ({first}) sees badly scaled inputs, which slows "
                "SGD and narrows the learning rates that work"
            ),
            fix=(
                "standardize with statistics of the training split only: "
                "normlab.nn.InputStandardizer(axis=1).fit(train_inputs) as the first layer (or in "
                "the data pipeline), then retrain"
            ),
        )
    ]


# -- 2. a bias right before a norm that cancels it ----------------------------------------------


def redundant_biases(ctx: Context) -> list[tuple[str, str]]:
    """``(layer, norm)`` pairs: a Linear/Conv with a bias whose output goes straight into a
    batch or instance norm (whose mean subtraction removes the bias)."""
    pairs = []
    for name in ctx.order:
        norm = ctx.module(name)
        if not isinstance(norm, _BIAS_CANCELLED):
            continue
        for producer in ctx.producers(name):
            layer = ctx.module(producer) if producer else None
            if isinstance(layer, (nn.Linear, _ConvNd)) and layer.bias is not None:
                pairs.append((producer, name))
    return pairs


def _bias(layer: nn.Module) -> Tensor:
    bias = getattr(layer, "bias", None)
    assert isinstance(bias, Tensor)  # redundant_biases selected layers with a bias
    return bias


def remove_biases(model: nn.Module, pairs: list[tuple[str, str]], keep: bool = False) -> None:
    """Drop each layer's bias (``keep``: zero it instead); a norm with running statistics absorbs
    it into its running mean (eval outputs unchanged; in training the mean subtraction removed it
    anyway). In place."""
    with torch.no_grad():
        for layer_name, norm_name in pairs:
            layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
            bias = getattr(layer, "bias", None)
            if not isinstance(bias, Tensor):
                continue
            running = getattr(norm, "running_mean", None)
            if isinstance(running, Tensor):
                running.sub_(bias.detach().to(running.dtype))
            if keep:
                bias.zero_()
            else:
                layer.register_parameter("bias", None)


def _same_function(ctx: Context, a: nn.Module, b: nn.Module) -> bool:
    """Whether ``a`` and ``b`` (copies) give the same outputs on the first batch in eval and in
    train mode (same random masks)."""
    args = ctx.inputs[0]
    for training in (False, True):
        outs = []
        for model in (a, b):
            model.train(training)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                try:
                    outs.append(ctx.tensor_output(ctx.run(args, model)))
                except ValueError:
                    if training:  # e.g. a batch of one in train mode: eval decides
                        outs = []
                        break
                    raise
        if outs and not torch.allclose(
            outs[0], outs[1], rtol=1e-4, atol=1e-5 * (1 + float(outs[0].abs().max()))
        ):
            return False
    return True


def bias_before_norm(ctx: Context) -> list[Finding]:
    candidates = redundant_biases(ctx)
    if not candidates:
        return []
    # measured, not assumed: the bias is redundant if removing it changes no output (a second
    # consumer of the layer's output, e.g. a residual add, would see it)
    pairs = []
    for pair in candidates:
        base, trial = copy.deepcopy(ctx.model), copy.deepcopy(ctx.model)
        remove_biases(trial, [pair])
        if _same_function(ctx, base, trial):
            pairs.append(pair)
    if not pairs:
        return []
    biases = {p: _bias(ctx.module(p)) for p, _ in pairs}
    sizes = {p: int(b.numel()) for p, b in biases.items()}
    return [
        Finding(
            check="bias-before-norm",
            severity="info",
            title=f"{len(pairs)} bias(es) feed a norm that subtracts the mean",
            modules=tuple(m for pair in pairs for m in pair),
            evidence={
                "pairs": [list(p) for p in pairs],
                "parameters": sum(sizes.values()),
                "bias_norms": {p: float(b.detach().norm()) for p, b in biases.items()},
            },
            cost=(
                f"{sum(sizes.values())} parameters that training cannot use (the mean subtraction "
                "cancels them; in eval mode they only shift against the running mean)"
            ),
            fix="build the layer with bias=False; apply_fixes removes it and folds it into the "
            "running mean, so outputs stay the same",
            fixable=True,
        )
    ]


# -- 3. stale running statistics ------------------------------------------------------------------


def _evaluate(ctx: Context, model: nn.Module) -> tuple[Tensor, dict[str, float]]:
    """Eval-mode outputs (flat, float64) and, with targets and a loss, ``loss``/``accuracy``."""
    loss_sum, correct, count, outputs = 0.0, 0, 0, []
    with preserved(model), torch.no_grad():
        model.eval()
        for i, args in enumerate(ctx.inputs):
            raw = ctx.run(args, model)
            out = ctx.tensor_output(raw)
            outputs.append(out.detach().double().flatten())
            if ctx.targets is not None and ctx.loss_fn is not None:
                y = ctx.targets[i]
                rows = out.shape[0]
                loss_sum += float(ctx.loss_fn(raw, y)) * rows
                count += rows
                if out.dim() == 2 and isinstance(y, Tensor) and not y.is_floating_point():
                    correct += int((out.argmax(1) == y).sum())
    scores = {"loss": loss_sum / count, "accuracy": correct / count} if count else {}
    return torch.cat(outputs), scores


def stale_statistics(ctx: Context) -> list[Finding]:
    layers = running_stat_layers(ctx.model)
    if not layers:
        return []

    def exact(inputs: list[tuple[Any, ...]]) -> nn.Module:
        model = copy.deepcopy(ctx.model)
        recompute_population_stats(model, inputs, input_fn=lambda args: args)
        return model

    def relative(x: Tensor, y: Tensor) -> float:
        return float((x - y).norm() / x.norm().clamp_min(1e-12))

    (a, now), (b, then) = _evaluate(ctx, ctx.model), _evaluate(ctx, exact(ctx.inputs))
    change = relative(a, b)
    # sampling noise of "exact": statistics from either half of the sample differ this much
    half = len(ctx.inputs) // 2
    noise = (
        relative(
            _evaluate(ctx, exact(ctx.inputs[:half]))[0], _evaluate(ctx, exact(ctx.inputs[half:]))[0]
        )
        if half
        else 0.0
    )
    evidence: dict[str, Any] = {
        "layers": len(layers),
        "relative_output_change": change,
        "sampling_noise": noise,
    }
    if change <= STALE_NOISE * noise:
        return []  # the running statistics are as good as any estimate from this sample
    reasons = []
    if "loss" in now:
        evidence.update(
            loss_running=now["loss"],
            loss_exact=then["loss"],
            accuracy_running=now["accuracy"],
            accuracy_exact=then["accuracy"],
        )
        gain = now["loss"] - then["loss"]
        if gain > STALE_LOSS * max(now["loss"], 1e-12) and gain > 1e-3:
            reasons.append(f"loss {now['loss']:.4g} -> {then['loss']:.4g}")
        points = 100 * (then["accuracy"] - now["accuracy"])
        if points > STALE_ACCURACY and gain >= 0:  # an accuracy blip against a worse loss is noise
            reasons.append(f"accuracy +{points:.1f} points")
    elif change > STALE_OUTPUT:
        reasons.append(f"outputs change by {100 * change:.0f}%")
    if not reasons:
        return []
    points = 100 * (evidence.get("accuracy_exact", 0.0) - evidence.get("accuracy_running", 0.0))
    return [
        Finding(
            check="stale-statistics",
            severity="error" if points > 5 else "warning",
            title="the running statistics are not the data's statistics",
            modules=tuple(n for n, _ in layers),
            evidence=evidence,
            cost="with exact statistics of the given data: " + ", ".join(reasons),
            fix=(
                "after training, recompute_population_stats(model, train_loader) (the lecture's "
                "rule: mu and sigma over the whole training set, then fixed); apply_fixes does it "
                "on a copy with the given data"
            ),
            fixable=True,
        )
    ]


# -- 4. dropout (or other noise) feeding a norm -----------------------------------------------


def _norm_input_variance(ctx: Context, noisy: bool) -> dict[str, Tensor]:
    """Per-channel variance at every running-statistics layer's input, with only the stochastic
    layers in training mode (``noisy``) or everything in eval mode. RNG restored."""
    layers = running_stat_layers(ctx.model)
    parts: dict[str, list[Moments]] = {n: [] for n, _ in layers}
    with preserved(ctx.model) as handles, torch.random.fork_rng():
        torch.manual_seed(0)
        ctx.model.eval()
        if noisy:
            for m in ctx.model.modules():
                if is_stochastic(m):
                    m.train()
        for name, layer in layers:
            handles.append(
                layer.register_forward_pre_hook(
                    lambda m, args, name=name: parts[name].append(_per_channel(args[0]))
                )
            )
        for args in ctx.inputs:
            ctx.run(args)
    return {n: _pooled(p)[1] ** 2 for n, p in parts.items() if p}


def dropout_before_norm(ctx: Context) -> list[Finding]:
    noise = [n for n in ctx.order if is_stochastic(ctx.module(n)) if n]
    if not noise or not running_stat_layers(ctx.model):
        return []
    train, test = _norm_input_variance(ctx, True), _norm_input_variance(ctx, False)
    shifted = {}
    for name, var in train.items():
        if not any(ctx.before(d, name) for d in noise):
            continue
        kept = test[name] > 1e-12
        ratio = float((var[kept] / test[name][kept]).mean()) if kept.any() else 1.0
        if abs(ratio - 1) > VARIANCE_SHIFT:
            shifted[name] = ratio
    if not shifted:
        return []
    return [
        Finding(
            check="dropout-before-norm",
            severity="warning",
            title="dropout shifts the variance a batch norm sees between training and inference",
            modules=(*noise, *shifted),
            evidence={"variance_ratio_train_over_eval": shifted, "stochastic_layers": noise},
            cost=(
                "the norm's running variance is collected with the noise on, but applied without "
                "it: input variance differs by "
                + ", ".join(f"{100 * (r - 1):+.0f}% at {n}" for n, r in shifted.items())
                + " (the 'variance shift' of Li et al. 2019)"
            ),
            fix=(
                "place dropout after the last batch norm; at least collect the running statistics "
                "with the noise off (recompute_population_stats does; torch's update_bn does not)"
            ),
        )
    ]


# -- 5. batch norm with a small effective batch ---------------------------------------------------


def small_batch(ctx: Context) -> list[Finding]:
    layers = [
        (n, m)
        for n, m in running_stat_layers(ctx.model)
        if not isinstance(m, _InstanceNorm)  # per-sample statistics: no batch involved
    ]
    if not layers or ctx.batch_size is None:
        return []
    size = {n: int(getattr(m, "virtual_batch_size", ctx.batch_size)) for n, m in layers}
    if ctx.samples < 2 * max(size.values()):
        return []
    means: dict[str, list[Tensor]] = {n: [] for n, _ in layers}
    parts: dict[str, list[Moments]] = {n: [] for n, _ in layers}
    with preserved(ctx.model) as handles:  # eval mode: the buffers do not move
        ctx.model.eval()

        def hook(m: nn.Module, args: Any, name: str) -> None:
            x = args[0]
            b = size[name]
            for chunk in torch.split(x, b):
                if chunk.shape[0] == b:
                    means[name].append(_per_channel(chunk).mean)
            parts[name].append(_per_channel(x))

        for name, layer in layers:
            handles.append(
                layer.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
            )
        for args in ctx.inputs:
            ctx.run(args)
    noisy = {}
    for name, _ in layers:
        if len(means[name]) < 2:
            continue
        _mean, std = _pooled(parts[name])
        spread = torch.stack(means[name]).std(0) / std.clamp_min(1e-12)
        value = float(spread[std > 1e-12].mean()) if (std > 1e-12).any() else 0.0
        if value > BATCH_NOISE:
            noisy[name] = value
    if not noisy:
        return []
    return [
        Finding(
            check="small-batch",
            severity="warning",
            title=f"batch statistics of {ctx.batch_size} samples are noisy",
            modules=tuple(noisy),
            evidence={
                "batch_size": ctx.batch_size,
                "batch_mean_noise_in_population_stds": noisy,
            },
            cost=(
                "the mean a batch norm subtracts in training wanders by "
                + ", ".join(f"{v:.2f} std at {n}" for n, v in noisy.items())
                + " from batch to batch: noise in every activation, and a gap between training "
                "and the population statistics used at test time"
            ),
            fix=(
                "use a batch-independent norm (get_norm_layer('group' | 'layer', C)), batch "
                "renorm ('renorm'), a larger per-device batch, or SyncBatchNorm across devices"
            ),
        )
    ]


# -- 6./7. self-normalizing setups and activation health ------------------------------------------


def _selu_layers(ctx: Context) -> list[str]:
    return [n for n in ctx.order if isinstance(ctx.module(n), nn.SELU)]


def self_normalizing(ctx: Context) -> list[Finding]:
    selus = _selu_layers(ctx)
    if not selus:
        return []
    findings = []
    plain = [
        n
        for n in ctx.order
        if n and is_stochastic(ctx.module(n)) and not isinstance(ctx.module(n), _ALPHA)
    ]
    if plain:
        findings.append(
            Finding(
                check="self-normalizing",
                severity="warning",
                title="plain dropout in a SELU network",
                modules=tuple(plain),
                evidence={"dropout_layers": plain},
                cost="plain dropout moves activations off SELU's fixed point (mean 0, variance 1)",
                fix="use AlphaDropout, which keeps mean and variance; apply_fixes swaps them",
                fixable=True,
            )
        )
    stats = activation_statistics(ctx.model, *ctx.inputs[0], select=lambda n, m: n in selus)
    off = {
        s.name: (s.mean, s.variance)
        for s in stats
        if abs(s.mean) > SELU_MEAN or not SELU_VARIANCE[0] <= s.variance <= SELU_VARIANCE[1]
    }
    if off:
        ratios = {}
        for name, m in ctx.model.named_modules():
            if isinstance(m, (nn.Linear, _ConvNd)):
                fan_in = m.weight[0].numel()
                ratios[name] = float(m.weight.detach().std() * math.sqrt(fan_in))
        findings.append(
            Finding(
                check="self-normalizing",
                severity="warning",
                title="the SELU network is not self-normalizing",
                modules=tuple(off),
                evidence={"mean_variance": off, "weight_std_x_sqrt_fan_in": ratios},
                cost=(
                    "SELU activations drift off mean 0 / variance 1: "
                    + ", ".join(f"{n} mean {m:+.2f} var {v:.2f}" for n, (m, v) in off.items())
                ),
                fix=(
                    "initialise with LeCun-normal weights (std 1/sqrt(fan_in): "
                    "normlab.surgery.init_self_normalizing_ before training) and standardize the "
                    "inputs; the weight std x sqrt(fan_in) column should read ~1"
                ),
            )
        )
    return findings


_ALPHA = (AlphaDropout, nn.AlphaDropout, nn.FeatureAlphaDropout)
_RECTIFIERS = ("ReLU", "ReLU6")  # zero for every negative input: a unit can die


def activations(ctx: Context) -> list[Finding]:
    stats = activation_statistics(ctx.model, *ctx.inputs[0])
    findings = []
    dead = {s.name: s.dead for s in stats if s.kind in _RECTIFIERS and s.dead > DEAD}
    saturated = {s.name: s.saturated for s in stats if s.saturated > SATURATED}
    for kind, values in (("dead", dead), ("saturated", saturated)):
        if values:
            findings.append(
                Finding(
                    check="activations",
                    severity="warning",
                    title=f"layers with mostly {kind} units",
                    modules=tuple(values),
                    evidence={f"{kind}_fraction": values},
                    cost=", ".join(f"{100 * v:.0f}% {kind} at {n}" for n, v in values.items())
                    + (
                        ": they pass no gradient" if kind == "dead" else ": their gradient vanishes"
                    ),
                    fix="normalize before the activation (batch/layer norm), lower the learning "
                    "rate or re-initialise (He for ReLU, Glorot for tanh)",
                )
            )
    has_norm = any(_is_norm(m) for m in ctx.model.modules())
    positive = [s for s in stats if s.variance > 0]
    if len(positive) >= 3 and not has_norm:
        ratio = positive[-1].variance / positive[0].variance
        if ratio > DRIFT or ratio < 1 / DRIFT:
            findings.append(
                Finding(
                    check="activations",
                    severity="warning",
                    title="activation variance drifts with depth",
                    modules=(positive[0].name, positive[-1].name),
                    evidence={"variance": {s.name: s.variance for s in positive}},
                    cost=f"the last activation's variance is {ratio:.3g}x the first's: signals "
                    "and gradients explode or vanish through depth",
                    fix="add normalization layers, or use SELU with LeCun-normal init",
                )
            )
    return findings


# -- 7. mode and convention mistakes --------------------------------------------------------------


def modes(ctx: Context) -> list[Finding]:
    findings = []
    # layers whose behaviour depends on the mode (layer/group norm do not)
    stateful = [
        (n, m)
        for n, m in ctx.model.named_modules()
        if n
        and (
            isinstance(m, _BatchNorm)
            or n in dict(running_stat_layers(ctx.model))
            or is_stochastic(m)
        )
    ]
    if not ctx.model.training:
        left = [n for n, m in stateful if m.training]
        if left:
            findings.append(
                Finding(
                    check="modes",
                    severity="error",
                    title="layers left in training mode in an eval-mode model",
                    modules=tuple(left),
                    evidence={"training": left},
                    cost="at inference these layers use batch statistics or drop units: outputs "
                    "depend on the batch and change from call to call",
                    fix="call model.eval() on the whole model (it sets every submodule)",
                )
            )
    trains = any(p.requires_grad for p in ctx.model.parameters())  # not an inference model
    frozen = [
        n
        for n, m in running_stat_layers(ctx.model)
        if trains
        and (
            (any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters()))
            or (ctx.model.training and not m.training)  # frozen by bn.eval() in a training model
        )
    ]
    if frozen:
        findings.append(
            Finding(
                check="modes",
                severity="warning",
                title="frozen batch norms that .train() unfreezes",
                modules=tuple(frozen),
                evidence={"frozen_affine_but_tracking": frozen},
                cost="they are frozen (gamma/beta without gradients, or set to eval inside a "
                "training model), but model.train() switches them back to batch statistics and "
                "updates their running statistics",
                fix="normlab.surgery.freeze_batchnorm(model) (stays frozen under .train()); "
                "apply_fixes does it",
                fixable=True,
            )
        )
    keras = {
        n: m.momentum
        for n, m in ctx.model.named_modules()
        if isinstance(m, _BatchNorm) and m.momentum is not None and m.momentum >= KERAS_MOMENTUM
    }
    if keras:
        findings.append(
            Finding(
                check="modes",
                severity="warning",
                title="momentum values that look like Keras' convention",
                modules=tuple(keras),
                evidence={"momentum": keras},
                cost="torch's momentum is the weight of the NEW batch: "
                + ", ".join(f"{v:g} at {n}" for n, v in keras.items())
                + " makes the running statistics follow single batches (Keras 0.99 is torch 0.01)",
                fix="momentum = 1 - keras_momentum (normlab.surgery.keras_to_torch_momentum); "
                "apply_fixes converts these",
                fixable=True,
            )
        )
    return findings


# -- 8. inference speed: batch norms that fold into the layer before ------------------------------


def _fastest_seconds(
    a: nn.Module, b: nn.Module, args: tuple[Any, ...], repeats: int = 9
) -> tuple[float, float]:
    """The fastest of ``repeats`` interleaved eval forwards of ``a`` and of ``b`` (interleaving
    and the minimum keep a busy machine from favouring either)."""
    times: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        a(*args), b(*args)  # warm-up
        for _ in range(repeats):
            for model, out in ((a, times[0]), (b, times[1])):
                start = time.perf_counter()
                model(*args)
                out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def _fusion_candidates(ctx: Context) -> list[tuple[str, str]]:
    """``(layer, batch norm)``: inside ``nn.Sequential`` by order, elsewhere from the traced data
    flow (a Conv/Linear whose output goes straight into the norm)."""
    pairs = list(fusable_pairs(ctx.model))
    known = {bn for _, bn in pairs}
    for name in ctx.order:
        if name and name not in known:
            norm = ctx.module(name)
            pairs += [
                (producer, name)
                for producer in sorted(ctx.producers(name))
                if producer and foldable(ctx.module(producer), norm)
            ]
    return pairs


def fusion(ctx: Context) -> list[Finding]:
    pairs = _fusion_candidates(ctx)
    if not pairs:
        return []
    with preserved(ctx.model):
        ctx.model.eval()
        fused = fuse_batchnorm(ctx.model, pairs)
        args = ctx.inputs[0]
        # measured, not assumed: another reader of a layer's output would see the fold
        ours = ctx.tensor_output(ctx.run(args))
        theirs = ctx.tensor_output(ctx.run(args, fused))
        scale = 1 + float(ours.abs().max())
        if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4 * scale):
            return []
        before, after = _fastest_seconds(ctx.model, fused, args)
    speedup = before / max(after, 1e-12)
    if speedup < FUSION_SPEEDUP:
        return []
    return [
        Finding(
            check="fusion",
            severity="info",
            title=f"{len(pairs)} batch norm(s) can be folded into the layer before",
            modules=tuple(bn for _, bn in pairs),
            evidence={
                "pairs": [list(p) for p in pairs],
                "eval_ms_per_batch": before * 1e3,
                "fused_ms_per_batch": after * 1e3,
                "speedup": speedup,
            },
            cost=f"eval forward {before * 1e3:.2f} ms per batch of {batch_rows(args)}; fused "
            f"{after * 1e3:.2f} ms ({speedup:.2f}x faster)",
            fix="for inference, normlab.surgery.fuse_batchnorm(model.eval(), pairs) (a copy); "
            "apply_fixes(..., fuse=True) does it",
            fixable=True,
        )
    ]


RUNNERS: dict[str, Callable[[Context], list[Finding]]] = {
    "input-scale": input_scale,
    "bias-before-norm": bias_before_norm,
    "stale-statistics": stale_statistics,
    "dropout-before-norm": dropout_before_norm,
    "small-batch": small_batch,
    "self-normalizing": self_normalizing,
    "activations": activations,
    "modes": modes,
    "fusion": fusion,
}
