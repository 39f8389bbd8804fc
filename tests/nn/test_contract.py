"""The contract every normlab layer meets (one suite over tests/nn/specs.py::SPECS).

shape and dtype; device/dtype constructor kwargs; state_dict round trip (also through torch.save
with weights_only=True); repr; train/eval outputs differ exactly when the layer declares running
statistics; float64 gradcheck in both modes; no mutation of the input.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import normlab.nn as nl
from tests.nn.specs import SPEC_IDS, SPECS, LayerSpec

CASES = [(spec, shape) for spec in SPECS for shape in spec.shapes]
CASE_IDS = [f"{spec.id}-{'x'.join(map(str, shape))}" for spec, shape in CASES]


def _input(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _train_steps(
    layer: nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, steps: int = 3
) -> None:
    layer.train()
    for s in range(steps):
        layer(_input(shape, dtype, seed=100 + s))


def _randomize_affine(layer: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)


@pytest.mark.parametrize(("spec", "shape"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype(spec: LayerSpec, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    layer = spec.make(dtype=dtype)
    x = _input(shape, dtype)
    for mode in (True, False):
        layer.train(mode)
        y = layer(x)
        assert y.shape == x.shape
        assert y.dtype == dtype
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_factory_kwargs(spec: LayerSpec) -> None:
    layer = spec.make(dtype=torch.float64)
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        expected = torch.long if name.endswith("num_batches_tracked") else torch.float64
        assert t.dtype == expected, name
    meta = spec.make(device="meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_state_dict_round_trip(spec: LayerSpec) -> None:
    shape = spec.shapes[0]
    trained = spec.make()
    _randomize_affine(trained)
    _train_steps(trained, shape)
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    buf.seek(0)
    fresh = spec.make()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = _input(shape, seed=7)
    for mode in (False,) if spec.stochastic else (False, True):
        trained.train(mode)
        fresh.train(mode)
        torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_repr(spec: LayerSpec) -> None:
    """torch's repr where normlab mirrors a torch layer; GroupNorm shows num_features first."""
    layer = spec.make()
    text = repr(layer)
    assert text.startswith(type(layer).__name__ + "(")
    if hasattr(layer, "eps"):
        assert f"eps={layer.eps}" in text
    if isinstance(layer, nl.GroupNorm):
        assert text.startswith(f"GroupNorm({layer.num_features}, num_groups={layer.num_groups},")
    elif spec.torch_make is not None and type(spec.torch_make()).__name__ == type(layer).__name__:
        assert text == repr(spec.torch_make())


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_train_eval_differ_exactly_when_declared(spec: LayerSpec) -> None:
    shape = spec.shapes[0]
    layer = spec.make()
    _train_steps(layer, shape)
    x = _input(shape, seed=3)
    train_out = layer.train()(x)
    eval_out = layer.eval()(x)
    differ = not torch.equal(train_out, eval_out)
    assert differ == spec.stateful


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(spec: LayerSpec, training: bool) -> None:
    if training and not spec.exact_train_gradient:
        pytest.skip("training gradient is not the derivative by design (tested by the layer)")
    shape = spec.shapes[0]
    layer = spec.make(dtype=torch.float64)
    _randomize_affine(layer)
    _train_steps(layer, shape, torch.float64)
    layer.train(training)
    x = _input(shape, torch.float64, seed=5).requires_grad_()
    if spec.stochastic and hasattr(layer, "hold_noise"):  # hold one draw of the noise
        layer.hold_noise = True
        layer(x.detach())
    params = tuple(layer.parameters())
    ref = copy.deepcopy(layer)  # gradcheck calls forward many times; keep buffers of `ref` apart

    def fn(x: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        if spec.stochastic:  # gradcheck calls forward many times: the same masks every time
            torch.manual_seed(0)
            if getattr(ref, "generator", None) is not None:
                ref.generator.manual_seed(0)
        return torch.func.functional_call(
            ref, dict(zip(dict(layer.named_parameters()), p, strict=False)), (x,)
        )

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_does_not_mutate_input(spec: LayerSpec) -> None:
    x = _input(spec.shapes[0])
    before = x.clone()
    spec.make()(x)
    assert torch.equal(x, before)


SPATIAL = [(spec, shape) for spec, shape in CASES if len(shape) in (4, 5)]


@pytest.mark.parametrize(
    ("spec", "shape"),
    SPATIAL,
    ids=[f"{spec.id}-{'x'.join(map(str, shape))}" for spec, shape in SPATIAL],
)
def test_channels_last_in_channels_last_out(spec: LayerSpec, shape: tuple[int, ...]) -> None:
    """Output and input gradient keep a channels-last input's memory format, in both modes
    (torch's instance norm and layer norm return channels-first)."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    layer = spec.make()
    x = _input(shape).contiguous(memory_format=fmt).requires_grad_()
    for training in (True, False):
        y = layer.train(training)(x)
        assert y.is_contiguous(memory_format=fmt), f"output, training={training}"
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert gx.is_contiguous(memory_format=fmt), f"input gradient, training={training}"
