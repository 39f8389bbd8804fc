"""Weight standardization and weight normalization with data-dependent initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nl
from normlab.surgery import apply_weight_norm, init_weight_norm_, standardize_weights


@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (nn.Linear(6, 4), torch.randn(5, 6)),
        (nn.Conv1d(3, 4, 3), torch.randn(2, 3, 9)),
        (nn.Conv2d(3, 4, 3), torch.randn(2, 3, 6, 6)),
        (nn.Conv3d(2, 4, 2), torch.randn(2, 2, 4, 4, 4)),
    ],
)
def test_weight_standardization_every_layer_kind(layer: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.mul_(7).add_(0.3)
    model = standardize_weights(nn.Sequential(layer))
    w = model[0].weight
    flat = w.flatten(1).double()
    torch.testing.assert_close(flat.mean(1), torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        flat.std(1, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-4, rtol=0
    )
    raw = layer.weight.detach().flatten(1).double()
    expected = (
        (raw - raw.mean(1, keepdim=True))
        / torch.sqrt(raw.var(1, unbiased=False, keepdim=True) + 1e-5)
    ).view_as(w)
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(
        layer.weight, model[0].parametrizations.weight.original
    )  # caller untouched? copy
    out = model(x)
    assert out.shape == layer(x).shape
    out.sum().backward()
    assert model[0].parametrizations.weight.original.grad is not None


def test_ws_adds_no_parameters_and_pairs_with_group_norm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nl.get_norm_layer("ws_gn", 8))
    ws = standardize_weights(model)
    assert sum(p.numel() for p in ws.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 6, 6)
    w = ws[0].weight
    torch.testing.assert_close(ws(x), ws[1](F.conv2d(x, w)))


def test_weight_norm_data_dependent_init_normalizes_pre_activations() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
        nn.Dropout(0.5),
    )
    wn = apply_weight_norm(model)
    x = torch.randn(128, 3, 6, 6) * 4 + 2
    init_weight_norm_(wn, x)
    h = x
    wn.eval()
    for layer in wn:
        h = layer(h)
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            dims = [0, 2, 3] if h.dim() == 4 else [0]
            torch.testing.assert_close(h.mean(dims), torch.zeros(h.shape[1]), atol=1e-5, rtol=0)
            torch.testing.assert_close(
                h.std(dims, unbiased=False), torch.ones(h.shape[1]), atol=1e-4, rtol=0
            )
            g = layer.parametrizations.weight.original0.flatten()
            torch.testing.assert_close(
                layer.weight.flatten(1).norm(dim=1), g.abs(), rtol=1e-5, atol=1e-6
            )
    other = torch.randn(256, 3, 6, 6) * 4 + 2  # a fresh batch of the same distribution: close
    out = wn[0](other)
    assert out.mean((0, 2, 3)).abs().max() < 0.2
    assert (out.std((0, 2, 3)) - 1).abs().max() < 0.2
    assert wn.training is False  # restored to what it was (eval, set above)


def test_weight_norm_keeps_the_function_until_initialised() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(5, 4)
    torch.testing.assert_close(apply_weight_norm(model)(x), model(x))


def test_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"standardize_weights: the model must be a module with Linear "
        r"or Conv1d/2d/3d weights, got ReLU without one",
    ):
        standardize_weights(nn.ReLU())
    with pytest.raises(
        ValueError, match=r"apply_weight_norm: the model must be a module with Linear"
    ):
        apply_weight_norm(nn.Sequential(nn.Tanh()))
    with pytest.raises(
        ValueError,
        match=r"init_weight_norm_: the model must be a model with weight-normed "
        r"layers, got none\. Fix: call normlab\.surgery\.apply_weight_norm\(model\) first",
    ):
        init_weight_norm_(nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 3))
