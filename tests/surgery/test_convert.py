"""The walker and its converters: conversion, fusion, freezing, Keras conventions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import normlab.nn as nl
from normlab.surgery import (
    convert_norm,
    copy_norm_state,
    freeze_batchnorm,
    fusable_pairs,
    fuse_batchnorm,
    keras_to_torch_momentum,
    load_keras_batchnorm,
    replace_modules,
    torch_to_keras_momentum,
)


def _trained(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.train()
        for s in range(steps):
            model(x + 0.1 * s)
    return model.eval()


def _cnn(norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        norm(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, bias=False), norm(8), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6),
        nn.BatchNorm1d(6),
        nn.GroupNorm(2, 6),
        nn.LayerNorm(6),
        nn.Linear(6, 2),
    )


X = torch.randn(16, 3, 6, 6) * 2 + 1


def _same_state(a: nn.Module, b: nn.Module) -> None:
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb), ka


def test_replace_modules_copies_unless_inplace() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Sequential(nn.ReLU(), nn.Tanh()))
    out = replace_modules(model, lambda n, m: isinstance(m, nn.ReLU), lambda n, m: nn.GELU())
    assert [type(m).__name__ for m in out.modules()].count("GELU") == 2
    assert isinstance(model[0], nn.ReLU)
    names: list[str] = []
    replace_modules(model, lambda n, m: names.append(n) or False, lambda n, m: m)
    assert sorted(names) == ["", "0", "1", "1.0", "1.1"]
    same = replace_modules(
        model, lambda n, m: isinstance(m, nn.Tanh), lambda n, m: nn.Sigmoid(), inplace=True
    )
    assert same is model
    assert isinstance(model[1][1], nn.Sigmoid)


def test_convert_to_normlab_and_back_is_exact() -> None:
    model = _trained(_cnn(), X)
    before = copy.deepcopy(model)
    ours = convert_norm(model, "normlab")
    assert isinstance(ours[1], nl.BatchNorm2d)
    assert isinstance(ours[7], nl.GroupNorm)
    assert ours[7].num_groups == 2
    assert isinstance(ours[8], nl.LayerNorm)
    _same_state(model, before)  # the caller's model is untouched
    _same_state(ours, model)
    for mode in (False, True):
        model.train(mode)
        ours.train(mode)
        torch.testing.assert_close(ours(X), model(X))
    back = convert_norm(ours, "torch")
    assert type(back[1]) is nn.BatchNorm2d
    assert type(back[7]) is nn.GroupNorm
    torch.testing.assert_close(back.eval()(X), model.eval()(X))


def test_convert_batch_norm_to_group_norm_copies_affine() -> None:
    model = _trained(_cnn(), X)
    gn = convert_norm(model, "group", num_groups=2)
    assert isinstance(gn[1], nl.GroupNorm)
    assert gn[1].num_groups == 2
    assert isinstance(gn[6], nl.GroupNorm)  # BatchNorm1d(6) too
    torch.testing.assert_close(gn[1].weight, model[1].weight)
    assert gn(X).shape == (16, 2)


def test_convert_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"convert_norm: argument 'to' must be 'normlab', 'torch' or a "
        r"registered norm \[.*'group'.*\], got 'grup'",
    ):
        convert_norm(_cnn(), "grup")
    with pytest.raises(
        TypeError,
        match=r"keyword arguments with to='normlab'/'torch' must be none, got "
        r"\['eps'\]",
    ):
        convert_norm(_cnn(), "normlab", eps=1e-3)


def test_fuse_batchnorm_equals_the_eval_model_and_leaves_it_unchanged() -> None:
    model = _trained(_cnn(nl.BatchNorm2d), X)
    before = copy.deepcopy(model)
    assert sorted(fusable_pairs(model)) == [("0", "1"), ("3.0", "3.1"), ("5", "6")]
    fused = fuse_batchnorm(model)
    _same_state(model, before)
    assert isinstance(fused[1], nn.Identity)
    assert isinstance(fused[3][1], nn.Identity)
    assert fused[3][0].bias is not None  # a bias appears where the conv had none
    torch.testing.assert_close(fused(X), model(X), rtol=1e-5, atol=1e-5)
    fast = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert fast == 0


def test_fuse_refuses_training_mode() -> None:
    model = _cnn().train()
    with pytest.raises(
        ValueError,
        match=r"fuse_batchnorm: every batch norm must be in eval mode, got "
        r"training mode in \['1', '3.1', '6'\]\. Fix: call model.eval\(\)",
    ):
        fuse_batchnorm(model)
    assert model.training


def test_freeze_batchnorm_survives_train() -> None:
    model = _trained(_cnn(nl.BatchNorm2d), X)
    frozen = freeze_batchnorm(model)
    assert isinstance(frozen[1], nl.FrozenBatchNorm)
    expected = model.eval()(X)
    frozen.train()  # the pytorch#66073 trap: a parent's .train()
    state = copy.deepcopy(frozen.state_dict())
    torch.testing.assert_close(frozen(X), expected)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, state[k])
    assert not any(p.requires_grad for p in frozen[1].buffers())
    trainable = freeze_batchnorm(model, trainable_affine=True)
    assert trainable[1].weight.requires_grad


def test_copy_norm_state_ignores_what_does_not_fit() -> None:
    bn = _trained(nn.Sequential(nn.BatchNorm1d(4)), torch.randn(8, 4))[0]
    gn = copy_norm_state(bn, nn.GroupNorm(2, 4))
    torch.testing.assert_close(gn.weight, bn.weight)
    small = copy_norm_state(bn, nn.BatchNorm1d(3))
    assert torch.equal(small.running_mean, torch.zeros(3))


def test_keras_momentum_conversions() -> None:
    assert keras_to_torch_momentum(0.99) == pytest.approx(0.01)
    assert torch_to_keras_momentum(0.1) == pytest.approx(0.9)
    with pytest.raises(
        ValueError,
        match=r"keras_to_torch_momentum: argument 'momentum' must be a float in \[0, 1\], got 99",
    ):
        keras_to_torch_momentum(99)


@pytest.mark.parametrize("layer_cls", [nl.BatchNorm2d, nn.BatchNorm2d])
def test_load_keras_batchnorm_gives_keras_inference_outputs(layer_cls: type[nn.Module]) -> None:
    rng = np.random.default_rng(0)
    gamma, beta = rng.uniform(0.5, 1.5, 5), rng.normal(size=5)
    mean, var = rng.normal(size=5), rng.uniform(0.1, 2.0, 5)
    x = rng.normal(size=(4, 5, 3, 3)).astype(np.float32)
    keras = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-3)
    keras = keras * gamma[None, :, None, None] + beta[None, :, None, None]
    layer = load_keras_batchnorm(layer_cls(5), [gamma, beta, mean, var], momentum=0.99)
    assert layer.eps == 1e-3
    assert layer.momentum == pytest.approx(0.01)
    out = layer.eval()(torch.from_numpy(x))
    np.testing.assert_allclose(out.detach().numpy(), keras, rtol=1e-5, atol=1e-5)
    no_scale = load_keras_batchnorm(layer_cls(5), {"moving_mean": mean, "moving_variance": var})
    assert torch.equal(no_scale.weight.detach(), torch.ones(5))


def test_load_keras_errors() -> None:
    with pytest.raises(
        TypeError,
        match=r"load_keras_batchnorm: 'layer' must be a batch norm with running statistics, got LayerNorm",
    ):
        load_keras_batchnorm(nn.LayerNorm(3), [np.ones(3)] * 4)
    with pytest.raises(ValueError, match=r"the shape of 'gamma' must be \(3,\), got \(4,\)"):
        load_keras_batchnorm(nl.BatchNorm1d(3), [np.ones(4), np.ones(3), np.ones(3), np.ones(3)])
    with pytest.raises(ValueError, match=r"a list of 3 arrays must be unambiguous"):
        load_keras_batchnorm(nl.BatchNorm1d(3), [np.ones(3)] * 3)
    with pytest.raises(ValueError, match=r"'gamma' must be absent for a layer without it"):
        load_keras_batchnorm(nl.BatchNorm1d(3, affine=False), [np.ones(3)] * 4)


def test_sequential_subclasses_with_their_own_forward_are_not_fused() -> None:
    class Residual(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self[1](self[0](x)) + x

    model = nn.Sequential(Residual(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()
    assert fusable_pairs(model) == []


def test_load_keras_changes_nothing_when_it_raises() -> None:
    layer = nl.BatchNorm1d(3, affine=False)
    with pytest.raises(
        ValueError,
        match=r"load_keras_batchnorm: argument 'momentum' must be Keras' "
        r"momentum \(a decay\) in \[0, 1\], or None, got 1\.5",
    ):
        load_keras_batchnorm(layer, [np.ones(3) * 5, np.ones(3)], momentum=1.5)
    with pytest.raises(ValueError, match=r"'gamma' must be absent for a layer without it"):
        load_keras_batchnorm(
            layer,
            {"moving_mean": np.ones(3) * 5, "moving_variance": np.ones(3), "gamma": np.ones(3)},
        )
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert layer.eps == 1e-5
