"""One entry per layer configuration: the contract suite and the parity tests iterate over these.

A new layer joins by adding a :class:`LayerSpec` here (``tests/nn/test_registry.py`` fails for a
registered norm without one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import normlab.nn as nl


@dataclass(frozen=True)
class LayerSpec:
    """How to build a layer, which inputs it takes, and its torch.nn counterpart (if any).

    ``make(**factory_kwargs)`` builds the layer; ``torch_make(**factory_kwargs)`` builds the
    ``torch.nn`` layer with identical semantics and ``state_dict`` keys (``None`` if none exists).
    ``stateful`` means train and eval outputs differ after training steps (running statistics).
    ``registry`` names the registry entry (and ``spatial_dims``) that builds this layer.
    """

    id: str
    make: Callable[..., nn.Module]
    shapes: tuple[tuple[int, ...], ...]
    stateful: bool
    torch_make: Callable[..., nn.Module] | None = None
    registry: tuple[str, int] | None = None
    stochastic: bool = False  # training output is random: compared only with its noise held
    # False where the training gradient deliberately is not the derivative (batch renorm's
    # stop-gradient r, d): gradcheck runs in eval mode only, the layer's own tests cover training.
    exact_train_gradient: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _torch_channel_ln(c: int, **kw: Any) -> nn.Module:
    """The torch.nn way to get a channel layer norm: move channels last, LayerNorm(C), move back."""

    class TorchChannelLN(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.movedim(1, -1)).movedim(-1, 1)

    return TorchChannelLN(c, **kw)


SPECS: tuple[LayerSpec, ...] = (
    LayerSpec(
        "bn1d",
        lambda **kw: nl.BatchNorm1d(3, **kw),
        ((6, 3), (4, 3, 7)),
        True,
        lambda **kw: nn.BatchNorm1d(3, **kw),
        ("batch", 0),
    ),
    LayerSpec(
        "bn1d-cumulative-noaffine",
        lambda **kw: nl.BatchNorm1d(3, momentum=None, affine=False, **kw),
        ((5, 3), (3, 3, 5)),
        True,
        lambda **kw: nn.BatchNorm1d(3, momentum=None, affine=False, **kw),
    ),
    LayerSpec(
        "bn1d-untracked",
        lambda **kw: nl.BatchNorm1d(3, track_running_stats=False, **kw),
        ((6, 3),),
        False,
        lambda **kw: nn.BatchNorm1d(3, track_running_stats=False, **kw),
    ),
    LayerSpec(
        "bn2d",
        lambda **kw: nl.BatchNorm2d(3, **kw),
        ((4, 3, 5, 6),),
        True,
        lambda **kw: nn.BatchNorm2d(3, **kw),
        ("batch", 2),
    ),
    LayerSpec(
        "bn3d",
        lambda **kw: nl.BatchNorm3d(3, momentum=0.3, **kw),
        ((2, 3, 3, 4, 5),),
        True,
        lambda **kw: nn.BatchNorm3d(3, momentum=0.3, **kw),
        ("batch", 3),
    ),
    LayerSpec(
        "in1d",
        lambda **kw: nl.InstanceNorm1d(3, **kw),
        ((4, 3, 7), (3, 7)),
        False,
        lambda **kw: nn.InstanceNorm1d(3, **kw),
    ),
    LayerSpec(
        "in2d-affine",
        lambda **kw: nl.InstanceNorm2d(3, affine=True, **kw),
        ((4, 3, 5, 6), (3, 5, 6)),
        False,
        lambda **kw: nn.InstanceNorm2d(3, affine=True, **kw),
        ("instance", 2),
    ),
    LayerSpec(
        "in2d-tracked",
        lambda **kw: nl.InstanceNorm2d(3, affine=True, track_running_stats=True, **kw),
        ((4, 3, 5, 6),),
        True,
        lambda **kw: nn.InstanceNorm2d(3, affine=True, track_running_stats=True, **kw),
    ),
    LayerSpec(
        "in3d",
        lambda **kw: nl.InstanceNorm3d(3, **kw),
        ((2, 3, 3, 4, 5),),
        False,
        lambda **kw: nn.InstanceNorm3d(3, **kw),
    ),
    LayerSpec(
        "ln",
        lambda **kw: nl.LayerNorm(6, **kw),
        ((4, 6), (2, 3, 6)),
        False,
        lambda **kw: nn.LayerNorm(6, **kw),
        ("layer", 0),
    ),
    LayerSpec(
        "ln-multi-nobias",
        lambda **kw: nl.LayerNorm((3, 6), bias=False, **kw),
        ((4, 3, 6),),
        False,
        lambda **kw: nn.LayerNorm((3, 6), bias=False, **kw),
    ),
    LayerSpec(
        "cln",
        lambda **kw: nl.ChannelLayerNorm(3, **kw),
        ((4, 3), (4, 3, 5, 6)),
        False,
        lambda **kw: _torch_channel_ln(3, **kw),
        ("channel_layer", 2),
    ),
    LayerSpec(
        "gn",
        lambda **kw: nl.GroupNorm(6, 3, **kw),
        ((4, 6, 5), (4, 6, 5, 5)),
        False,
        lambda **kw: nn.GroupNorm(3, 6, **kw),
        ("group", 2),
    ),
    LayerSpec(
        "gn-layer",
        lambda **kw: nl.GroupNorm(6, 1, affine=False, **kw),
        ((4, 6, 5, 5),),
        False,
        lambda **kw: nn.GroupNorm(1, 6, affine=False, **kw),
        ("layer", 2),
    ),
)

SPECS = (
    *SPECS,
    LayerSpec(
        "renorm1d",
        lambda **kw: nl.BatchRenorm1d(3, warmup_steps=1, r_max_steps=3, d_max_steps=2, **kw),
        ((6, 3), (4, 3, 7)),
        True,
        None,
        ("renorm", 0),
        exact_train_gradient=False,
    ),
    LayerSpec(
        "renorm2d",
        lambda **kw: nl.BatchRenorm2d(
            3, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0, **kw
        ),
        ((4, 3, 5, 6),),
        True,
        None,
        ("renorm", 2),
        exact_train_gradient=False,
    ),
    LayerSpec(
        "renorm3d",
        lambda **kw: nl.BatchRenorm3d(3, **kw),
        ((2, 3, 3, 4, 5),),
        True,
        None,
        ("renorm", 3),
    ),
    LayerSpec(
        "ghost",
        lambda **kw: nl.GhostBatchNorm(3, virtual_batch_size=4, **kw),
        ((10, 3), (9, 3, 5, 5)),
        True,
        None,
        ("ghost", 2),
    ),
    LayerSpec(
        "ghost-whole-batch",
        lambda **kw: nl.GhostBatchNorm(3, virtual_batch_size=4, **kw),
        ((4, 3), (4, 3, 7)),
        True,
        lambda **kw: nn.BatchNorm1d(3, **kw),
    ),
    LayerSpec(
        "l1", lambda **kw: nl.L1BatchNorm(3, **kw), ((6, 3), (4, 3, 5, 6)), True, None, ("l1", 2)
    ),
    LayerSpec(
        "l1-santurkar",
        lambda **kw: nl.L1BatchNorm(3, center=False, gaussian_constant=False, **kw),
        ((6, 3),),
        True,
    ),
    LayerSpec(
        "linf",
        lambda **kw: nl.LinfBatchNorm(3, k=3, **kw),
        ((6, 3), (4, 3, 5, 6)),
        True,
        None,
        ("linf", 2),
    ),
    LayerSpec(
        "noisy",
        lambda **kw: nl.NoisyBatchNorm(3, seed=1, **kw),
        ((6, 3), (4, 3, 5, 6)),
        True,
        None,
        ("noisy", 2),
        stochastic=True,
    ),
    LayerSpec(
        "mean-only",
        lambda **kw: nl.MeanOnlyBatchNorm(3, **kw),
        ((6, 3), (4, 3, 5, 6)),
        True,
        None,
        ("weight", 2),
    ),
    LayerSpec(
        "ws-gn", lambda **kw: nl.GroupNorm(6, 3, **kw), ((4, 6, 5),), False, None, ("ws_gn", 2)
    ),
    LayerSpec("sync", lambda **kw: nl.SyncBatchNorm(3, **kw), ((6, 3), (4, 3, 5, 6)), True),
    LayerSpec("lp2", lambda **kw: nl.LpBatchNorm(3, p=2, **kw), ((6, 3), (4, 3, 5)), True),
    LayerSpec(
        "dropout", lambda **kw: nl.Dropout(0.3, seed=0), ((6, 3), (4, 3, 5)), True, stochastic=True
    ),
    LayerSpec(
        "dropout-classic",
        lambda **kw: nl.Dropout(0.3, inverted=False, seed=0),
        ((6, 3),),
        True,
        stochastic=True,
    ),
    LayerSpec(
        "feature-dropout1d",
        lambda **kw: nl.FeatureDropout1d(0.3, seed=0),
        ((6, 3, 5),),
        True,
        stochastic=True,
    ),
    LayerSpec(
        "feature-dropout2d",
        lambda **kw: nl.FeatureDropout2d(0.3, seed=0),
        ((6, 3, 4, 5),),
        True,
        stochastic=True,
    ),
    LayerSpec(
        "feature-dropout3d",
        lambda **kw: nl.FeatureDropout3d(0.3, seed=0),
        ((4, 3, 2, 3, 4),),
        True,
        stochastic=True,
    ),
    LayerSpec(
        "alpha-dropout", lambda **kw: nl.AlphaDropout(0.2, seed=0), ((6, 3),), True, stochastic=True
    ),
    LayerSpec(
        "feature-alpha-dropout",
        lambda **kw: nl.FeatureAlphaDropout(0.2, seed=0),
        ((6, 3, 5),),
        True,
        stochastic=True,
    ),
    LayerSpec("selu", lambda **kw: nl.SELU(), ((6, 3), (2, 3, 4)), False, lambda **kw: nn.SELU()),
    LayerSpec(
        "dropconnect-linear",
        lambda **kw: nl.DropConnectLinear(3, 3, p=0.3, samples=20, activation=nn.Tanh(), **kw),
        ((6, 3),),
        True,
        stochastic=True,
    ),
    LayerSpec(
        "dropconnect-linear-batch-mean",
        lambda **kw: nl.DropConnectLinear(3, 3, p=0.3, mode="batch", inference="mean", **kw),
        ((6, 3),),
        True,
        stochastic=True,
    ),
    LayerSpec(
        "dropconnect-conv1d",
        lambda **kw: nl.DropConnectConv1d(3, 3, 3, padding=1, p=0.3, samples=10, **kw),
        ((4, 3, 5),),
        True,
        stochastic=True,
    ),
    LayerSpec(
        "dropconnect-conv2d",
        lambda **kw: nl.DropConnectConv2d(
            3, 3, 3, padding=1, p=0.3, samples=10, activation=nn.ReLU(), **kw
        ),
        ((2, 3, 4, 4),),
        True,
        stochastic=True,
    ),
    LayerSpec(
        "dropconnect-conv3d",
        lambda **kw: nl.DropConnectConv3d(
            3, 3, 3, padding=1, p=0.3, inference="mc", samples=5, **kw
        ),
        ((2, 3, 3, 3, 3),),
        True,
        stochastic=True,
    ),
    LayerSpec("frozen", lambda **kw: nl.FrozenBatchNorm(3, **kw), ((6, 3), (4, 3, 5)), False),
)

SPEC_IDS = [s.id for s in SPECS]
