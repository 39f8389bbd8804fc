"""normlab layers are torch.nn layers to torch's own tools (they subclass them)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn

import normlab.nn as nl


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (nl.BatchNorm1d(3), nn.BatchNorm1d),
        (nl.BatchNorm2d(3), nn.BatchNorm2d),
        (nl.BatchNorm3d(3), nn.BatchNorm3d),
        (nl.InstanceNorm2d(3), nn.InstanceNorm2d),
        (nl.LayerNorm(3), nn.LayerNorm),
        (nl.GroupNorm(4, 2), nn.GroupNorm),
    ],
)
def test_isinstance_of_the_torch_class(ours: nn.Module, theirs: type) -> None:
    assert isinstance(ours, theirs)


def test_swa_update_bn_fills_normlab_batch_norm() -> None:
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nl.BatchNorm1d(3))
    data = [torch.randn(16, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    torch.optim.swa_utils.update_bn(data, model)
    assert int(model[1].num_batches_tracked) == 3
    with torch.no_grad():
        acts = torch.cat([model[0](x) for x in data])
    torch.testing.assert_close(model[1].running_mean, acts.mean(0), rtol=1e-5, atol=1e-6)


def test_fx_symbolic_trace_gives_the_same_outputs() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False),
        nl.BatchNorm2d(4),
        nl.GroupNorm(4, 2),
        nl.InstanceNorm2d(4, affine=True),
        nl.ChannelLayerNorm(4),
        nl.LayerNorm(4),
    ).eval()
    x = torch.randn(2, 2, 6, 6)
    expected = model(x)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), expected)


def test_convert_sync_batchnorm_sees_normlab_layers() -> None:
    model = nn.Sequential(nl.BatchNorm2d(3))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[0], nn.SyncBatchNorm)


def test_numpy_integers_are_accepted_as_sizes() -> None:
    assert nl.BatchNorm2d(np.int64(3)).num_features == 3
    assert nl.GroupNorm(np.int32(8), np.int64(4)).num_groups == 4


@pytest.mark.skipif(
    "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters,
    reason="torch's batch norm takes bias= from 2.13 on",
)
def test_bias_switch_like_torch() -> None:
    ours, theirs = nl.BatchNorm2d(3, bias=False), nn.BatchNorm2d(3, bias=False)
    assert ours.bias is None
    assert ours.weight is not None
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    gn = nl.GroupNorm(4, 2, bias=False)
    assert gn.bias is None
