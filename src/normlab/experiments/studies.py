"""The named studies: each states a claim of the lecture, what would refute it, the runs that test
it, and a judge that reads the records and says whether they support it.

Runs are shared: a study is a list of labelled :class:`RunConfig` s, and two studies that need the
same configuration use the same record. Sizes follow the pilot measurements of
shared/reference/claims-at-small-scale.md (what shows which effect in how many seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from normlab._checks import check_positive_int, fail
from normlab.data import available_datasets
from normlab.experiments import judges
from normlab.experiments.config import RunConfig
from normlab.experiments.judges import Grouped, Verdict

__all__ = [
    "DEFAULT_SELECTION",
    "Options",
    "Study",
    "Verdict",
    "available_studies",
    "get_study",
]


@dataclass(frozen=True)
class Options:
    """How big to run a study: ``quick`` (fewer seeds and steps), ``data`` (overrides the study's
    dataset), ``seeds`` (overrides the count), ``steps`` (overrides every run's length; tests use
    it for tiny runs)."""

    quick: bool = False
    data: str | None = None
    seeds: int | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.data is not None and self.data not in available_datasets():
            fail(
                ValueError,
                "Options",
                "argument 'data'",
                f"one of {sorted(available_datasets())}",
                repr(self.data),
                "pass --data digits (fast) or mnist1d",
            )
        for name in ("seeds", "steps"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name=name, owner="Options")


@dataclass(frozen=True)
class Study:
    """A named, config-driven experiment (see the module docstring)."""

    name: str
    title: str
    claim: str
    refuted_if: str
    data: str
    seeds: int
    build: Callable[[str, bool], list[tuple[str, RunConfig]]]
    judge: Callable[[Grouped], Verdict]

    def runs(self, options: Options = Options()) -> list[tuple[str, RunConfig]]:
        """``(label, config)`` for every run, seeds expanded (``seed`` 0 .. n-1)."""
        data = options.data or self.data
        seeds = options.seeds or (max(1, self.seeds - 1) if options.quick else self.seeds)
        out = []
        for label, cfg in self.build(data, options.quick):
            if options.steps is not None:
                cfg = replace(
                    cfg,
                    steps=options.steps,
                    eval_every=min(cfg.eval_every, options.steps),
                    probe_every=min(cfg.probe_every, max(1, options.steps // 2))
                    if cfg.probe_every
                    else 0,
                )
            out += [(label, replace(cfg, seed=s)) for s in range(seeds)]
        return out


_STUDIES: dict[str, Study] = {}


def _register(study: Study) -> Study:
    _STUDIES[study.name] = study
    return study


def available_studies() -> dict[str, str]:
    """Study names and titles."""
    return {name: s.title for name, s in _STUDIES.items()}


def get_study(name: str) -> Study:
    """The study registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in _STUDIES:
        fail(
            ValueError,
            "get_study",
            "the study name",
            f"one of {sorted(_STUDIES)}",
            repr(name),
            "run `normlab study list` to see them",
        )
    return _STUDIES[name]


def _cnn(data: str, **changes: Any) -> RunConfig:
    """The pilots' CNN: CNN1D (32-32-pool-64-64-pool) on 1-D data, VGG-4 (16-16-pool-32-32-pool)
    on images; plain SGD, batch 128, Glorot init."""
    width = 32 if data == "mnist1d" else 16
    base = RunConfig(data=data, arch="vgg", width=width, steps=600, eval_every=50)
    return replace(base, **changes)


def _mlp(data: str, **changes: Any) -> RunConfig:
    return replace(RunConfig(data=data, arch="mlp", depth=3, width=128, eval_every=50), **changes)


# The CNN runs shared by the default selection: lr 0.1 runs carry the landscape probes.
def _cnn_run(data: str, quick: bool, norm: str, lr: float) -> RunConfig:
    steps = 400 if quick else 600
    return _cnn(data, norm=norm, lr=lr, steps=steps, probe_every=50 if lr == 0.1 else 0)


# -- 1. bn-training -----------------------------------------------------------------------------

BN_TRAINING = _register(
    Study(
        name="bn-training",
        title="Batch norm speeds up training and tolerates larger learning rates",
        claim=(
            "With batch norm a network reaches a given training loss in fewer SGD steps than the "
            "same network without it, and it still trains at a learning rate at which the plain "
            "network fails (Ioffe & Szegedy 2015; lecture: 'faster training, higher learning "
            "rates')."
        ),
        refuted_if=(
            "At the same learning rate the BN network needs as many or more steps to reach the "
            "loss threshold than the plain one in most seeds, or at lr 0.5 the plain network "
            "trains as well as the BN network."
        ),
        data="mnist1d",
        seeds=3,
        build=lambda data, quick: [
            (f"{'BN' if norm == 'batch' else 'plain'}, lr {lr:g}", _cnn_run(data, quick, norm, lr))
            for lr in (0.1, 0.5)
            for norm in ("none", "batch")
        ],
        judge=judges.bn_training,
    )
)

NOISY_BN = _register(
    Study(
        name="noisy-bn",
        title="Batch norm helps even with covariate shift injected after it",
        claim=(
            "Santurkar et al. (2018): adding noise with a non-zero mean and non-unit variance, "
            "drawn anew at every step, after each batch norm ('noisy BN') destabilises the "
            "activation distributions, yet the network still trains clearly better than without "
            "normalization (in the paper nearly as fast as with BN) -- controlling the "
            "distributions is not what makes BN work."
        ),
        refuted_if=(
            "Noisy BN trains no faster than the plain network at lr 0.1 and fails like it at "
            "lr 0.5."
        ),
        data="mnist1d",
        seeds=3,
        build=lambda data, quick: [
            (f"{name}, lr {lr:g}", _cnn_run(data, quick, norm, lr))
            for lr in (0.1, 0.5)
            for name, norm in (("plain", "none"), ("BN", "batch"), ("noisy BN", "noisy"))
        ],
        judge=judges.noisy_bn,
    )
)

LANDSCAPE = _register(
    Study(
        name="landscape",
        title="Batch norm smooths the loss landscape (Santurkar probes); L1 and L-inf BN compared",
        claim=(
            "Along the gradient, the loss of a BN network varies less (loss range), its gradient "
            "changes less (gradient predictiveness) and its effective beta-smoothness is lower "
            "than without BN (Santurkar et al. 2018, Fig. 4). The paper reports the same for L1 and "
            "L-inf batch norm (Sec. 3.3); their ratios are reported next to BN's, the verdict is "
            "on BN."
        ),
        refuted_if=(
            "After the first 100 steps the BN/plain ratios of loss range and gradient change "
            "(geometric mean over matched probes) are >= 1 in most seeds."
        ),
        data="mnist1d",
        seeds=3,
        build=lambda data, quick: [
            (name, _cnn_run(data, quick, norm, 0.1))
            for name, norm in (
                ("plain", "none"),
                ("BN", "batch"),
                ("L1 BN", "l1"),
                ("L-inf BN", "linf"),
            )
        ],
        judge=judges.landscape,
    )
)

ROBUSTNESS = _register(
    Study(
        name="robustness",
        title="Batch norm widens the learning-rate x initialization region that trains",
        claim=(
            "A BN network trains over a wider range of learning rates and initial weight scales "
            "than the same network without it (Ioffe & Szegedy: 'less careful about "
            "initialization', higher learning rates)."
        ),
        refuted_if="The fraction of grid cells that train is not larger with BN than without.",
        data="mnist1d",
        seeds=2,
        build=lambda data, quick: [
            (
                f"{norm} lr={lr:g} init x{scale:g}",
                _cnn(
                    data,
                    norm=norm,
                    lr=lr,
                    init_scale=scale,
                    steps=200 if quick else 400,
                    eval_every=400,
                ),
            )
            for norm in ("none", "batch", "layer", "group")
            for lr in (0.02, 0.1, 0.5, 2.0)
            for scale in (0.25, 1.0, 4.0)
        ],
        judge=judges.robustness,
    )
)

BATCH_SIZE = _register(
    Study(
        name="batch-size",
        title="Batch norm degrades at small batches; layer, group and instance norm do not",
        claim=(
            "Batch statistics of a few samples are noisy and differ from the population, so BN "
            "loses accuracy as the batch shrinks; normalizers that do not use the batch "
            "(layer, group, instance) keep it; batch renorm and ghost batch norm sit in between "
            "(Wu & He 2018; Ioffe 2017; Hoffer et al. 2017)."
        ),
        refuted_if=(
            "BN's accuracy relative to group/layer norm (at the same batch size, so the same "
            "number of steps) is no worse at the smallest batch than at the largest."
        ),
        data="mnist1d",
        seeds=2,
        build=lambda data, quick: [
            (
                f"{norm} batch {bs}",
                _cnn(
                    data,
                    norm=norm,
                    batch_size=bs,
                    lr=0.1 * min(1.0, bs / 32),
                    steps=max(150 if quick else 300, (3500 if quick else 7000) // bs),
                    eval_every=100_000,
                ),
            )
            for norm in ("batch", "layer", "group", "instance", "renorm", "ghost")
            for bs in ((2, 8, 32, 128) if quick else (2, 4, 8, 16, 32, 64, 128, 256))
        ],
        judge=judges.batch_size,
    )
)

#: Length of the short runs of the population-stats study.
SHORT_RUN = 40

POPULATION = _register(
    Study(
        name="population-stats",
        title="Test-time statistics: exact population statistics vs running averages",
        claim=(
            "At test time BN should use mu and sigma computed once over the whole training set "
            "after training (the lecture's rule). The running averages (EMA) used by default "
            "are close to that at the default momentum (torch 0.1 = Keras 0.9), but a slow EMA "
            "(torch momentum 0.001 = Keras 0.999) lags the trained weights and a fast one "
            "(torch 0.9 = Keras 0.1) follows single small batches; both cost test accuracy."
        ),
        refuted_if=(
            "Exact statistics are not better than the EMA at the extreme momenta (the difference "
            "lies within the seed spread)."
        ),
        data="digits",
        seeds=3,
        build=lambda data, quick: [
            (
                f"batch {bs}, {steps} steps",
                _mlp(
                    data,
                    batch_size=bs,
                    steps=steps,
                    ema_momenta=(0.001, 0.01, 0.1, 0.5, 0.9),
                    eval_every=100_000,
                ),
            )
            for bs in (8, 128)
            # a full run, and a short one (the EMA lags weights that still move fast)
            for steps in ((500 if quick else 1000) if bs == 8 else 300, SHORT_RUN)
        ],
        judge=judges.population,
    )
)

SELF_NORMALIZING = _register(
    Study(
        name="self-normalizing",
        title="SELU with LeCun-normal init keeps activations at mean 0, variance 1 through depth",
        claim=(
            "Klambauer et al. (2017): in a deep fully connected network without normalization "
            "layers, SELU with LeCun-normal weights maps mean 0 / variance 1 to mean 0 / "
            "variance 1, so the statistics stay put through many layers (also with alpha "
            "dropout), while ReLU and tanh networks drift."
        ),
        refuted_if=(
            "The SELU network's activation variance at its last layer is as far from 1 as the "
            "ReLU/tanh networks'."
        ),
        data="digits",
        seeds=3,
        build=lambda data, quick: [
            (
                label,
                _mlp(
                    data,
                    norm="none",
                    depth=16,
                    width=128,
                    activation=act,
                    init=init,
                    dropout=drop,
                    p=p,
                    steps=100 if quick else 300,
                    activations=True,
                    eval_every=100_000,
                ),
            )
            for label, act, init, drop, p in (
                ("SELU + LeCun", "selu", "lecun", "none", 0.0),
                ("SELU + LeCun + alpha dropout", "selu", "lecun", "alpha", 0.05),
                ("ReLU + Glorot", "relu", "glorot", "none", 0.0),
                ("ReLU + He", "relu", "he", "none", 0.0),
                ("tanh + Glorot", "tanh", "glorot", "none", 0.0),
            )
        ],
        judge=judges.self_normalizing,
    )
)

DROPOUT = _register(
    Study(
        name="dropout",
        title="Dropout and DropConnect reduce overfitting",
        claim=(
            "Randomly dropping units (dropout) or weights (DropConnect) during training reduces "
            "the gap between training and test accuracy of an over-parameterised network; "
            "DropConnect's Gaussian moment-matching inference is at least as good as using the "
            "mean weights; alpha dropout does the same for SELU networks."
        ),
        refuted_if="The train-test gap with dropout/DropConnect is not smaller than without.",
        data="digits",
        seeds=3,
        build=lambda data, quick: [
            (
                label,
                _mlp(
                    data,
                    norm="none",
                    depth=2,
                    width=512,
                    train_size=300,
                    steps=800 if quick else 2000,
                    dropout=drop,
                    p=p,
                    dropconnect_inference=inf,
                    activation=act,
                    init=init,
                    eval_every=100_000,
                    lr=0.1,
                ),
            )
            for label, drop, p, inf, act, init in (
                ("no dropout", "none", 0.0, "gaussian", "relu", "glorot"),
                ("dropout 0.5", "dropout", 0.5, "gaussian", "relu", "glorot"),
                ("DropConnect 0.5, mean inference", "dropconnect", 0.5, "mean", "relu", "glorot"),
                (
                    "DropConnect 0.5, Gaussian inference",
                    "dropconnect",
                    0.5,
                    "gaussian",
                    "relu",
                    "glorot",
                ),
                ("SELU, no dropout", "none", 0.0, "gaussian", "selu", "lecun"),
                ("SELU + alpha dropout 0.1", "alpha", 0.1, "gaussian", "selu", "lecun"),
            )
        ],
        judge=judges.dropout,
    )
)

INPUT_NORMALIZATION = _register(
    Study(
        name="input-normalization",
        title="Input normalization with training-set statistics",
        claim=(
            "Standardizing the inputs makes training faster than raw inputs; the statistics must "
            "come from the training split only. Fitting them on the test split is a leak: it "
            "does not make the model better, it makes the test score dishonest."
        ),
        refuted_if=(
            "With each at its best of three learning rates, standardized inputs reach the loss "
            "threshold no faster than raw inputs."
        ),
        data="digits",
        seeds=3,
        build=lambda data, quick: [
            (
                f"{label}, lr {lr:g}",
                _mlp(data, norm="none", standardize=how, steps=300 if quick else 600, lr=lr),
            )
            for label, how in (
                ("raw inputs", "none"),
                ("training-split statistics", "train"),
                ("test-split statistics (leak)", "leak"),
            )
            for lr in (0.01, 0.05, 0.2)
        ],
        judge=judges.input_normalization,
    )
)

#: What a bare ``normlab study`` runs: the core of Santurkar et al.'s argument, in minutes.
DEFAULT_SELECTION = ("bn-training", "noisy-bn", "landscape")
