"""One training run, described completely by a frozen dataclass (and so by its JSON)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from normlab._checks import check_choice, check_positive_int, fail
from normlab.data import available_datasets
from normlab.nn import available_norms

__all__ = ["ACTIVATIONS", "ARCHS", "DROPOUTS", "INITS", "RunConfig"]

ARCHS = ("mlp", "vgg", "dln")
ACTIVATIONS = ("relu", "tanh", "selu", "sigmoid")
DROPOUTS = ("none", "dropout", "alpha", "dropconnect")
INITS = ("glorot", "he", "lecun", "default")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run: data, model, optimizer, what to measure.

    Two runs with equal configs give identical records (up to wall times): weights come from
    ``seed``, and the batch of step ``t`` from ``(seed, t)`` alone -- so runs that differ only in
    the norm see the same batches.

    Model: ``arch`` ``"mlp"`` (``depth`` hidden layers of ``width`` units), ``"vgg"`` (VGG-style
    conv blocks w-w-pool-2w-2w-pool with ``w = width``: 16 gives VGG-4; 1-D or 2-D from the data) or
    ``"dln"`` (deep *linear* network: ``depth`` linear layers, no activation); every conv/linear
    layer is followed by ``norm`` (a registry name), then ``activation``, then ``dropout``
    (``"dropconnect"`` replaces the hidden linear layers instead; ``dropconnect_inference``
    ``"mean"`` or ``"gaussian"``). Init ``"glorot"`` (Santurkar et al.), ``"he"``, ``"lecun"``
    (SELU) or ``"default"`` (torch's), weights times ``init_scale``.

    Data: ``data`` standardized per ``standardize``; ``train_size`` > 0 trains on the first
    ``train_size`` examples of the (fixed, shuffled) training split only -- to provoke
    overfitting -- with the standardization of the whole split.

    Training: plain SGD (``momentum``) at ``lr``, ``batch_size``, ``steps``; norm layers use
    ``bn_momentum`` (torch's convention: the weight of the new batch). Measured: train loss every
    step; test/validation loss and accuracy every ``eval_every`` steps (eval mode); Santurkar
    probes every ``probe_every`` steps (0: never); at the end, test accuracy with the running
    (EMA) statistics and with exact population statistics, plus one EMA per value of
    ``ema_momenta`` tracked alongside; activation statistics at the start and end if
    ``activations``.
    """

    data: str = "digits"
    standardize: str = "train"
    train_size: int = 0
    arch: str = "mlp"
    norm: str = "batch"
    activation: str = "relu"
    depth: int = 3
    width: int = 128
    dropout: str = "none"
    p: float = 0.0
    dropconnect_inference: str = "gaussian"
    init: str = "glorot"
    init_scale: float = 1.0
    lr: float = 0.1
    momentum: float = 0.0
    batch_size: int = 128
    steps: int = 300
    seed: int = 0
    bn_momentum: float = 0.1
    eval_every: int = 50
    probe_every: int = 0
    ema_momenta: tuple[float, ...] = ()
    activations: bool = False

    def __post_init__(self) -> None:
        owner = "RunConfig"
        check_choice(self.data, tuple(available_datasets()), name="data", owner=owner)
        check_choice(self.standardize, ("train", "none", "leak"), name="standardize", owner=owner)
        check_choice(self.arch, ARCHS, name="arch", owner=owner)
        check_choice(self.norm, tuple(available_norms()), name="norm", owner=owner)
        check_choice(self.activation, ACTIVATIONS, name="activation", owner=owner)
        check_choice(self.dropout, DROPOUTS, name="dropout", owner=owner)
        check_choice(
            self.dropconnect_inference,
            ("mean", "gaussian"),
            name="dropconnect_inference",
            owner=owner,
        )
        check_choice(self.init, INITS, name="init", owner=owner)
        for name in ("depth", "width", "batch_size", "steps", "eval_every"):
            check_positive_int(getattr(self, name), name=name, owner=owner)
        if self.seed < 0 or self.probe_every < 0 or self.train_size < 0:
            fail(
                ValueError,
                owner,
                "'seed', 'probe_every' and 'train_size'",
                ">= 0",
                f"{self.seed}, {self.probe_every}, {self.train_size}",
                "pass non-negative integers",
            )
        for name in ("lr", "init_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                fail(
                    ValueError,
                    owner,
                    f"argument '{name}'",
                    "a positive finite number",
                    repr(value),
                    f"pass e.g. {name}=0.1",
                )
        if not 0.0 <= self.p < 1.0 or not 0.0 <= self.momentum < 1.0:
            fail(
                ValueError,
                owner,
                "'p' and 'momentum'",
                "in [0, 1)",
                f"p={self.p}, momentum={self.momentum}",
                "pass e.g. p=0.5, momentum=0.9",
            )
        if not all(0.0 < m <= 1.0 for m in (self.bn_momentum, *self.ema_momenta)):
            fail(
                ValueError,
                owner,
                "'bn_momentum' and 'ema_momenta'",
                "in (0, 1] (torch's convention: the weight of the new batch)",
                f"{self.bn_momentum}, {self.ema_momenta}",
                "Keras' momentum=0.99 is torch's 0.01",
            )
        if self.norm == "instance" and self.arch != "vgg":
            fail(
                ValueError,
                owner,
                "argument 'norm'",
                "a norm that works on feature vectors with arch='mlp'/'dln'",
                f"norm='instance' with arch={self.arch!r}",
                "instance norm needs positions to average over: use arch='vgg' or norm='layer'",
            )
        if self.dropout == "dropconnect" and self.arch == "vgg":
            fail(
                ValueError,
                owner,
                "argument 'dropout'",
                "'dropout' or 'alpha' with arch='vgg' (DropConnect replaces linear layers)",
                "dropout='dropconnect' with arch='vgg'",
                "use arch='mlp' for DropConnect, or dropout='dropout'",
            )
        if self.dropout != "none" and self.p == 0.0:
            fail(
                ValueError,
                owner,
                "argument 'p'",
                f"> 0 with dropout={self.dropout!r}",
                "0.0",
                "pass p=0.1 ... 0.5, or dropout='none'",
            )

    @property
    def run_id(self) -> str:
        """A readable, unique, filesystem-safe name: key fields plus a hash of all fields (runs
        are shared between studies that need the same configuration).

        >>> RunConfig().run_id  # doctest: +ELLIPSIS
        'digits-mlp-batch-lr0.1-s0-...'
        """
        digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.data}-{self.arch}-{self.norm}-lr{self.lr:g}-s{self.seed}-{digest}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ema_momenta"] = list(self.ema_momenta)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a foreign or newer record)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            fail(
                ValueError,
                "RunConfig.from_dict",
                "the config's keys",
                f"among {sorted(known)}",
                repr(unknown),
                "this record was written by another program or normlab version",
            )
        values = dict(data)
        if "ema_momenta" in values:
            values["ema_momenta"] = tuple(values["ema_momenta"])
        return cls(**values)
