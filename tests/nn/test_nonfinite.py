"""Non-finite training batches: the running statistics are never silently poisoned.

normlab's policy (documented in normlab.functional.NonFiniteStatisticsWarning): a training batch
whose batch statistics are NaN/Inf leaves every running statistic as it was and warns, naming the
layer; the forward still returns (NaN) outputs, so a training loop (and a GradScaler) can go on.
recompute_population_stats refuses non-finite data with a ValueError naming the layer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab.nn as nl
from normlab.functional import NonFiniteStatisticsWarning
from normlab.surgery import recompute_population_stats

LAYERS = {
    "BatchNorm2d": lambda: nl.BatchNorm2d(4),
    "BatchNorm1d": lambda: nl.BatchNorm1d(4),
    "InstanceNorm2d": lambda: nl.InstanceNorm2d(4, affine=True, track_running_stats=True),
    "BatchRenorm2d": lambda: nl.BatchRenorm2d(4),
    "GhostBatchNorm": lambda: nl.GhostBatchNorm(4, virtual_batch_size=4),
    "L1BatchNorm": lambda: nl.L1BatchNorm(4),
    "LinfBatchNorm": lambda: nl.LinfBatchNorm(4, k=2),
    "NoisyBatchNorm": lambda: nl.NoisyBatchNorm(4, seed=0),
    "MeanOnlyBatchNorm": lambda: nl.MeanOnlyBatchNorm(4),
    "SyncBatchNorm": lambda: nl.SyncBatchNorm(4),  # no process group: plain batch norm
}


def _input(name: str, big: bool = False) -> torch.Tensor:
    if name == "BatchNorm1d":
        return torch.randn(16, 4)
    shape = (64, 4, 48, 48) if big else (8, 4, 3, 3)  # big: the fast NCHW path (>= 2**19)
    return torch.randn(shape)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", list(LAYERS))
def test_a_non_finite_batch_leaves_running_statistics_and_warns(name: str, bad: float) -> None:
    layer = LAYERS[name]().train()
    layer(_input(name))  # one good step first
    before = {k: v.clone() for k, v in layer.state_dict().items() if "running" in k}
    assert before, name
    x = _input(name)
    x.view(-1)[5] = bad
    with pytest.warns(NonFiniteStatisticsWarning, match=rf"{name}: \d+ batch statistic"):
        layer(x)
    for key, value in before.items():
        assert torch.equal(layer.state_dict()[key], value), (name, key)
    layer(_input(name))  # a good batch updates again
    assert any(not torch.equal(layer.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d"])
def test_put_back_statistics_leave_the_backward_intact(name: str) -> None:
    """torch's kernel updates the buffers in place (and autograd keeps them); putting the old
    values back after a non-finite batch must not break that batch's backward ("modified by an
    inplace operation") nor the next good step."""
    layer = LAYERS[name]().train()
    before = {k: v.clone() for k, v in layer.state_dict().items() if "running" in k}
    x = _input(name).requires_grad_()
    with torch.no_grad():
        x.view(-1)[5] = float("nan")
    with pytest.warns(NonFiniteStatisticsWarning):
        y = layer(x)
    y.sum().backward()  # raises if a saved tensor's version moved
    assert x.grad is not None
    for key, value in before.items():
        assert torch.equal(layer.state_dict()[key], value), key
    layer(_input(name)).sum().backward()


@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d"])
def test_the_fast_nchw_path_follows_the_policy(name: str) -> None:
    layer = LAYERS[name]().train()
    before = {k: v.clone() for k, v in layer.state_dict().items() if "running" in k}
    x = _input(name, big=True)
    x[3, 1, 7, 7] = float("nan")
    with pytest.warns(NonFiniteStatisticsWarning):
        layer(x)
    for key, value in before.items():
        assert torch.equal(layer.state_dict()[key], value), key


def test_population_statistics_refuse_non_finite_data() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nl.BatchNorm1d(4))
    data = torch.randn(32, 3)
    data[7, 1] = float("nan")
    before = model[1].running_mean.clone()
    with pytest.raises(
        ValueError,
        match=r"recompute_population_stats: the statistics of layer '1' \(BatchNorm1d\) must be "
        r"finite, got \d+ NaN/Inf values",
    ):
        recompute_population_stats(model, data)
    assert torch.equal(model[1].running_mean, before)


def test_backward_still_works_after_a_skipped_update() -> None:
    # torch's kernel keeps the running statistics it was given for its backward: they must not
    # be modified in place afterwards (an earlier version restored them and broke backward)
    layer = nl.BatchNorm2d(4).train()
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    bad = x.detach().clone()
    bad[0, 0, 0, 0] = float("nan")
    bad.requires_grad_()
    with pytest.warns(NonFiniteStatisticsWarning):
        layer(bad).sum().backward()
    layer(x).sum().backward()
    assert x.grad is not None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_batch_norm_masks_non_finite_updates_without_a_graph_break() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nl.BatchNorm2d(8), nn.ReLU())
    eager = nn.Sequential(nn.Conv2d(3, 8, 3), nl.BatchNorm2d(8), nn.ReLU())
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(model[1].running_var, eager[1].running_var)
    before = model[1].running_var.clone()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    compiled(bad).sum().backward()  # no warning inside a compiled graph, but no poisoning
    assert torch.equal(model[1].running_var, before)


def test_batch_renorm_schedule_follows_loaded_step_counts() -> None:
    """The ramp follows the step count, also one loaded from a state dict."""
    layer = nl.BatchRenorm2d(4, warmup_steps=2, r_max_steps=4, d_max_steps=4, r_max=3.0)
    x = torch.randn(8, 4, 3, 3)
    for step in range(5):  # ramp from step 2 to step 4: r_max 1, 1, 1, 2, 3
        assert layer.current_limits()[0] == [1.0, 1.0, 1.0, 2.0, 3.0][step]
        layer.train()(x)
    state = layer.state_dict()
    state["num_batches_tracked"] = torch.tensor(0)
    layer.load_state_dict(state)
    assert layer.current_limits()[0] == 1.0
    state["num_batches_tracked"] = torch.tensor(10)
    layer.load_state_dict(state)
    assert layer.current_limits()[0] == 3.0
