"""Activation percentiles over training (Ioffe & Szegedy Fig. 1) against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from normlab.analysis.activations import ActivationTracker, percentiles


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_percentiles_match_numpy(n: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    qs = (0.0, 15.0, 50.0, 85.0, 100.0)
    assert percentiles(x, qs) == pytest.approx(np.percentile(x.double().numpy(), qs), rel=1e-6)


def test_tracker_records_training_forwards_and_removes_its_hooks() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3), nn.ReLU())
    inputs = [torch.randn(20, 4) for _ in range(5)]
    with ActivationTracker(net, every=2) as tracker:
        for x in inputs:
            net(x)
        net.eval()
        net(inputs[0])  # evaluation forwards are not training steps
        net.train()
    assert not net._forward_hooks
    assert not net._forward_pre_hooks
    assert not net[1]._forward_hooks
    assert tracker.steps == [0, 2, 4]
    assert tracker.names == ["1", "3"]
    assert tracker.as_tensor().shape == (3, 2, 5)
    with torch.no_grad():
        for row, x in zip(range(3), inputs[::2], strict=True):
            y = torch.sigmoid(net[0](x)).double().numpy()
            hist = tracker.history("1")
            assert hist["mean"][row].item() == pytest.approx(y.mean(), rel=1e-5)
            assert hist["variance"][row].item() == pytest.approx(y.var(), rel=1e-4)
            want = np.percentile(y, (15, 50, 85))
            got = [hist[k][row].item() for k in ("p15", "p50", "p85")]
            assert got == pytest.approx(want, rel=1e-5)


def test_tracker_follows_one_unit() -> None:
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU())
    x = torch.randn(4, 1, 6, 6)
    with ActivationTracker(net, unit=2) as tracker:
        net(x)
    with torch.no_grad():
        y = net(x)[:, 2]
    assert tracker.history("1")["p50"][0].item() == pytest.approx(
        float(np.median(y.numpy())), rel=1e-6
    )


def test_tracker_errors() -> None:
    with pytest.raises(
        ValueError, match=r"ActivationTracker: 'select' must pick at least one module, got none"
    ):
        ActivationTracker(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every"):
        ActivationTracker(nn.Sequential(nn.ReLU()), every=0)
    tracker = ActivationTracker(nn.Sequential(nn.ReLU()))
    with pytest.raises(KeyError, match=r"no tracked layer 'x'"):
        tracker.history("x")
    assert tracker.as_tensor().shape == (0, 1, 5)
