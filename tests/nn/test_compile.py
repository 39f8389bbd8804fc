"""``torch.compile(fullgraph=True)`` of every layer (tests/nn/specs.py) and of the reference models:
no graph break, and the compiled forward, input and parameter gradients and buffers equal eager
ones (float32 rounding). Seeded stochastic layers draw the same masks and noise compiled as eager
(normlab.functional._rng); the global RNG matches through inductor's ``fallback_random``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch import nn

import normlab.nn as nl
from normlab.experiments.config import RunConfig
from normlab.experiments.models import build_model
from tests.nn.specs import SPECS, LayerSpec

# Monte-Carlo DropConnect inference refuses to compile (test at the end of this file).
COMPILED = [s for s in SPECS if getattr(s.make(), "inference", None) != "mc"]

# inductor's first import in a process calls a deprecated torch.jit API
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


def refusal(message: str) -> str:
    """What a compiled layer's refusal shows: its own message; on torch < 2.11 (2.8 seen) dynamo
    replaces the layer's exception with "Observed exception" and the exception's type only."""
    return message if _TORCH >= (2, 11) else f"{message}|Observed exception"


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def _input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).float()


def _step(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(0)
    y = layer(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], gy, allow_unused=True)
    return (y.detach(), *(g for g in grads if g is not None), *layer.buffers())


def _assert_same(
    ours: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], rtol: float = 1e-4
) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=rtol, atol=5e-5)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("spec", COMPILED, ids=[s.id for s in COMPILED])
def test_compiled_layer_matches_eager(spec: LayerSpec) -> None:
    shape = spec.shapes[-1]
    eager = spec.make()
    for s in range(2):  # running statistics away from their initial values
        eager.train()(_input(shape, 10 + s))
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, dynamic=False)
    gy = _input(shape, 3)
    for training in (True, False, True):  # a second training call: counters and generators moved
        eager.train(training)
        compiled_layer.train(training)
        x = _input(shape, 20 + int(training))
        _assert_same(_step(compiled, x, gy), _step(eager, x, gy))


@pytest.mark.parametrize("per", ["element", "channel"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("default", [torch.float32, torch.float64], ids=["f32", "f64-default"])
def test_compiled_noisy_batch_norm_draws_on_the_accelerator_as_eager(
    per: str, fmt: torch.memory_format, default: torch.dtype
) -> None:
    """On accelerators noisy batch norm draws its noise there from a device generator seeded by
    the layer's own, eager and compiled alike (compiled, it drew on the CPU and copied: 846x
    BatchNorm2d's forward on an H200): same outputs, gradients and running statistics -- also
    with torch's default dtype float64 (the draws themselves depend on the dtype)."""
    from normlab.functional._core import accelerator_routes

    eager = nl.NoisyBatchNorm(3, seed=1, per=per, dtype=torch.float32)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, dynamic=False)
    gy = _input((4, 3, 5, 6), 3).contiguous(memory_format=fmt)
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        with accelerator_routes():
            for step in range(2):  # the generators move on together
                x = _input((4, 3, 5, 6), 20 + step).contiguous(memory_format=fmt)
                _assert_same(_step(compiled, x, gy), _step(eager, x, gy))
    finally:
        torch.set_default_dtype(before)


def test_one_compiled_function_draws_from_each_layers_own_generator() -> None:
    """The graph knows a generator by its id() (normlab.functional._rng): dynamo guards on the
    object, so a second layer, or a layer given a new generator, recompiles rather than drawing
    from the first generator."""

    def step(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x)  # type: ignore[no-any-return]

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    x = _input((4, 3, 5, 6), 1)
    for seed in (1, 2):
        ours, eager = nl.NoisyBatchNorm(3, seed=seed), nl.NoisyBatchNorm(3, seed=seed)
        torch.testing.assert_close(compiled(ours, x), eager(x))
    ours.generator = torch.Generator().manual_seed(5)
    eager.generator = torch.Generator().manual_seed(5)
    torch.testing.assert_close(compiled(ours, x), eager(x))


@pytest.mark.parametrize(
    ("arch", "norm", "dropout"),
    [
        ("vgg", "batch", "none"),
        ("vgg", "group", "dropout"),
        ("vgg", "renorm", "none"),
        ("vgg", "noisy", "none"),
        ("vgg", "ws_gn", "none"),
        ("mlp", "batch", "dropout"),
        ("mlp", "layer", "alpha"),
        ("mlp", "ghost", "none"),
    ],
)
def test_compiled_reference_model_trains_like_eager(arch: str, norm: str, dropout: str) -> None:
    cfg = RunConfig(
        arch=arch, norm=norm, depth=2, width=8, dropout=dropout, p=0.0 if dropout == "none" else 0.2
    )
    eager = build_model(cfg, (1, 8, 8), 10)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=False)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(64, 1, 8, 8, generator=g)  # ghost batch norm: two virtual batches of 32
        y = torch.randint(0, 10, (64,), generator=g)
        for model, opt in zip((eager, compiled), opts, strict=True):
            torch.manual_seed(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(compiled_model.state_dict().values(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4)  # three steps of rounding apart
    x = torch.randn(8, 1, 8, 8, generator=g)
    eager.eval()
    compiled_model.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-3, atol=5e-4)


def test_cumulative_average_compiles_where_torch_nn_does_not() -> None:
    """momentum=None reads the batch counter: torch.nn's batch norm stops fullgraph compilation
    there (a data-dependent guard); normlab's computes the factor as a tensor."""
    ours = nl.BatchNorm1d(3, momentum=None)
    compiled = torch.compile(ours, fullgraph=True, dynamic=False)
    xs = [_input((5, 3), s) for s in range(3)]
    for x in xs:
        compiled(x)
    stacked = torch.stack([x.double().mean(0) for x in xs])
    torch.testing.assert_close(ours.running_mean, stacked.mean(0).float())
    assert int(ours.num_batches_tracked) == 3
    theirs = torch.compile(nn.BatchNorm1d(3, momentum=None), fullgraph=True, dynamic=False)
    # torch 2.8 names the same stop differently (an unsupported Tensor.item())
    with pytest.raises(Exception, match=r"data-dependent|Tensor\.item\(\)"):
        theirs(xs[0])


@pytest.mark.parametrize("mode", ["sample", "batch"])
@pytest.mark.parametrize("inference", ["gaussian", "mean"])
def test_compiled_dropconnect_draws_what_eager_draws(mode: str, inference: str) -> None:
    """Per-sample masks (a custom op around the chunked forward/backward) and seeded sampled
    inference (a generator made while tracing, reseeded at every call) match eager exactly."""
    eager = nl.DropConnectConv2d(3, 4, 3, p=0.3, mode=mode, inference=inference, samples=50)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, dynamic=False)
    gy = _input((2, 4, 4, 4), 1)
    for training in (True, False, False, True):
        eager.train(training)
        compiled_layer.train(training)
        _assert_same(
            _step(compiled, _input((2, 3, 6, 6), 2), gy), _step(eager, _input((2, 3, 6, 6), 2), gy)
        )


def test_monte_carlo_dropconnect_inference_refuses_to_compile() -> None:
    layer = nl.DropConnectLinear(5, 4, inference="mc", samples=3).eval()
    with pytest.raises(Exception, match=refusal(r"inference='mc' under torch.compile")):
        torch.compile(layer, fullgraph=True)(torch.randn(2, 5))
