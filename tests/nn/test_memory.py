"""Tensors saved for backward: no more than torch.nn's counterpart keeps (issue #9). Counted as
the bytes of the distinct storages that autograd's saved-tensor hooks see during the forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab.nn as nl
from tests.nn.specs import SPECS, LayerSpec


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.detach().requires_grad_())
    return sum(storages.values())


PAIRS = [s for s in SPECS if s.torch_make is not None]


@pytest.mark.parametrize("spec", PAIRS, ids=[s.id for s in PAIRS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_saves_no_more_than_torch(spec: LayerSpec, training: bool) -> None:
    assert spec.torch_make is not None
    for shape in spec.shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        ours, ref = spec.make().train(training), spec.torch_make().train(training)
        assert saved_bytes(ours, x) <= saved_bytes(ref, x), shape


@pytest.mark.parametrize(
    ("ours", "ref"),
    [
        (lambda: nl.BatchNorm2d(16), lambda: nn.BatchNorm2d(16)),
        (lambda: nl.InstanceNorm2d(16, affine=True), lambda: nn.InstanceNorm2d(16, affine=True)),
        (lambda: nl.GhostBatchNorm(16, virtual_batch_size=8), lambda: nn.BatchNorm2d(16)),
        (lambda: nl.BatchRenorm2d(16), lambda: nn.BatchNorm2d(16)),
    ],
    ids=["batch", "instance", "ghost-vs-batch", "renorm-vs-batch"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fast_paths_save_no_more_than_torch(ours, ref, channels_last) -> None:  # type: ignore[no-untyped-def]
    """Shapes large enough for normlab's own NCHW batch-statistics path (and its channels-last
    routes): the input, and per-channel statistics -- never an extra activation-sized tensor.
    (Ghost batch norm keeps statistics per virtual batch: a few hundred bytes more than BN.)"""
    x = torch.randn(32, 16, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mine, theirs = saved_bytes(ours().train(), x), saved_bytes(ref().train(), x)
    assert mine <= theirs + 1024
    assert mine < 1.01 * x.numel() * x.element_size()
