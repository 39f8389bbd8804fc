"""The layers on a GPU: every layer in tests/nn/specs.py on CUDA against the same layer on the CPU
in float64, channels_last kept, float16 autocast against torch.nn, NaN batches, and torch.compile.

Where no CUDA device is present (CI) the same checks run on the CPU inside
``normlab.functional._core.accelerator_routes()``: the CPU then takes the routes normlab takes on
accelerators (no host syncs, no fast-extra loops), so their arithmetic is checked everywhere;
what only a GPU shows (its kernels, autocast's float16 casts) needs a machine with one
(``NORMLAB_TEST_DEVICE=cuda`` there, the default when CUDA is available).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import os
import traceback
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.overrides import TorchFunctionMode

import normlab.nn as nl
from normlab.functional import _triton
from normlab.functional._core import accelerator_routes
from tests.nn.specs import SPECS, LayerSpec
from tests.nn.test_compile import _assert_same as assert_same
from tests.nn.test_compile import _step as step_results
from tests.nn.test_compile import refusal
from tests.nn.test_low_precision import assert_autocast_matches_torch

DEVICE = os.environ.get("NORMLAB_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    # inductor's first import in a process calls a deprecated torch.jit API
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


# normlab's Triton kernels for the per-channel steps (functional/_triton.py), and the torch ops
# that stand in for them where triton is missing; on the CPU the kernels run in Triton's
# interpreter (the root conftest.py)
KERNELS = ["torch-ops"] + (
    ["triton"] if _triton.available() and (DEVICE != "cpu" or _triton._interpreter()) else []
)


@pytest.fixture(autouse=True, params=KERNELS)
def _routes(request: pytest.FixtureRequest) -> Iterator[None]:
    """On the CPU: the accelerators' routes (on a GPU they are taken anyway); with and without
    the Triton kernels."""
    with contextlib.ExitStack() as stack:
        if DEVICE == "cpu":
            stack.enter_context(accelerator_routes())
            stack.enter_context(_triton.interpreted())
        if request.param == "torch-ops":
            stack.enter_context(_triton.off())
        yield


EXACT = [s for s in SPECS if not s.stochastic]
STOCHASTIC = [s for s in SPECS if s.stochastic]
FOUR_D = [s for s in EXACT if any(len(shape) == 4 for shape in s.shapes)]


def _input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5


def _step(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    """Output, input and parameter gradients, and buffers after one call, on the CPU in float64."""
    out = step_results(layer, x, gy)
    return [t.detach().cpu().double() if t.is_floating_point() else t.cpu() for t in out]


def _close(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    # float32 against float64: relative error ~1e-6 per op; gradients through the statistics
    # lose a few more digits on inputs of a few values per channel
    assert_same(ours, ref, rtol=2e-4)


@pytest.mark.parametrize("spec", EXACT, ids=[s.id for s in EXACT])
def test_layer_on_device_matches_float64_on_cpu(spec: LayerSpec) -> None:
    """Two training steps (outputs, gradients, running statistics) and an eval step."""
    for shape in spec.shapes:
        ref = spec.make().double()
        ours = copy.deepcopy(ref).float().to(DEVICE)
        gy = _input(shape, 1)
        for i, training in enumerate((True, True, False)):
            ref.train(training)
            ours.train(training)
            x = _input(shape, 10 + i)
            with accelerator_routes(False):  # the reference takes the CPU's routes
                expected = _step(ref, x, gy)
            got = _step(ours, x.float().to(DEVICE), gy.float().to(DEVICE))
            _close(got, expected)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("p", ["1", "inf"])
def test_lp_batch_norm_passes_run_as_kernels_on_device(p: str, cl: bool) -> None:
    """With triton, every pass of L1's and L-inf's training step that has a kernel runs as that
    kernel on the device: no silent hand-over to the torch ops (a refused layout, a device or
    dtype check)."""
    if _triton._OFF[0]:
        pytest.skip("the torch ops' route: no kernels")
    layer = (nl.L1BatchNorm if p == "1" else nl.LinfBatchNorm)(8).to(DEVICE)
    x, gy = (_input((4, 8, 6, 6), seed).float().to(DEVICE) for seed in (1, 2))
    if cl:
        x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
    before = collections.Counter(_triton.LAUNCHES)
    step_results(layer, x, gy)
    kernels = {"lp_forward", "lp_pass", "lp_backward"}
    if p == "1":
        kernels.add("l1_sums")
    else:
        kernels.update({"linf_row_worst" if cl else "linf_block_worst", "linf_select"})
    assert set(_triton.LAUNCHES - before) == kernels


@pytest.mark.parametrize("spec", FOUR_D, ids=[s.id for s in FOUR_D])
def test_channels_last_on_device_keeps_format_and_values(spec: LayerSpec) -> None:
    shape = next(s for s in spec.shapes if len(s) == 4)
    layer = spec.make().to(DEVICE).train()
    twin = copy.deepcopy(layer)
    x = _input(shape, 2).float().to(DEVICE)
    gy = _input(shape, 3).float().to(DEVICE)
    cl = torch.channels_last
    with torch.no_grad():
        assert copy.deepcopy(layer)(x.contiguous(memory_format=cl)).is_contiguous(memory_format=cl)
    _close(
        _step(twin, x.contiguous(memory_format=cl), gy.contiguous(memory_format=cl)),
        _step(layer, x, gy),
    )


COUNTERPARTS = [s for s in EXACT if s.torch_make is not None]


@pytest.mark.parametrize("spec", COUNTERPARTS, ids=[s.id for s in COUNTERPARTS])
@pytest.mark.parametrize("low", [False, True], ids=["float32-input", "low-input"])
def test_autocast_matches_torch_nn(spec: LayerSpec, low: bool) -> None:
    """Under autocast (float16 on CUDA, bfloat16 on the CPU) every layer returns the dtype
    torch.nn's returns (CUDA autocast runs group and layer norm in float32, batch and instance
    norm in the input's dtype), with close values; the buffers stay float32 and move as torch's."""
    dtype = torch.float16 if DEVICE == "cuda" else torch.bfloat16
    shape = spec.shapes[-1]
    x = _input(shape, 4).float().to(DEVICE)
    if low:
        x = x.to(dtype)
    assert_autocast_matches_torch(spec.make().to(DEVICE), spec.torch_make().to(DEVICE), x, dtype)


STATEFUL = [s for s in EXACT if s.stateful]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("spec", STATEFUL, ids=[s.id for s in STATEFUL])
def test_non_finite_batch_leaves_running_statistics_on_device(spec: LayerSpec, bad: float) -> None:
    """A NaN in a training batch changes no running statistic (on accelerators without a host
    sync: the choice is a torch.where on the device); a finite batch then updates them."""
    shape = spec.shapes[-1]
    layer = spec.make().to(DEVICE).train()
    layer(_input(shape, 7).float().to(DEVICE))
    floats = lambda: [b for n, b in layer.named_buffers() if "running" in n]  # noqa: E731
    before = [b.clone() for b in floats()]
    assert before
    x = _input(shape, 8).float()
    x.view(-1)[3] = bad  # no warning: knowing would take a host sync (warnings are errors)
    layer(x.to(DEVICE))
    for a, b in zip(floats(), before, strict=True):
        assert torch.equal(a, b)
    layer(_input(shape, 9).float().to(DEVICE))
    assert any(not torch.equal(a, b) for a, b in zip(floats(), before, strict=True))


@pytest.mark.parametrize("spec", STOCHASTIC, ids=[s.id for s in STOCHASTIC])
def test_stochastic_layer_trains_on_device_with_the_global_generator(spec: LayerSpec) -> None:
    """Unseeded, a stochastic layer trains on the device and repeats under the same global seed;
    its eval output is deterministic. (Seeded layers draw on the CPU: see the next test.)"""
    layer = spec.make()
    if getattr(layer, "generator", None) is not None:
        layer.generator = None
    layer = layer.to(DEVICE).train()
    shape = spec.shapes[-1]
    x = _input(shape, 5).float().to(DEVICE)
    with torch.no_grad():
        gy = _input(tuple(copy.deepcopy(layer)(x).shape), 6).float().to(DEVICE)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(_step(copy.deepcopy(layer), x, gy))
    # to float rounding, not bitwise: on the H200 two calls of DropConnectConv3d's grouped
    # convolution differed in the last bits of the output; another mask would differ by O(1)
    for a, b in zip(*runs, strict=True):
        assert not a.is_floating_point() or a.isfinite().all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    layer.eval()
    with torch.no_grad():
        torch.manual_seed(8)
        first = layer(x)
        torch.manual_seed(8)
        torch.testing.assert_close(layer(x), first, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [lambda: nl.Dropout(0.3, seed=5), lambda: nl.FeatureDropout2d(0.3, seed=5)],
    ids=["dropout", "feature-dropout2d"],
)
def test_seeded_layer_on_device_repeats_its_masks(make) -> None:  # type: ignore[no-untyped-def]
    """Two layers of one seed draw the same masks, call after call; the masks change from call to
    call; evaluation is the identity."""
    a, b = make().train(), make().train()
    x = torch.ones(8, 16, 4, 4, device=DEVICE)
    first = a(x)
    assert torch.equal(first, b(x))
    second = a(x)
    assert torch.equal(second, b(x))
    assert not torch.equal(first, second)
    assert 0.5 < float((first != 0).float().mean()) < 0.9  # keep rate 0.7
    torch.testing.assert_close(a.eval()(x), x, rtol=0, atol=0)


def test_seeded_layer_refuses_to_compile_for_an_accelerator() -> None:
    torch._dynamo.reset()
    layer = torch.compile(nl.Dropout(0.3, seed=5).train(), fullgraph=True, dynamic=False)
    with pytest.raises(Exception, match=refusal("use seed=None")):
        layer(torch.ones(4, 3, device=DEVICE))
    torch._dynamo.reset()


COMPILED = ["bn2d", "gn", "l1", "linf", "renorm2d", "ghost", "noisy"]


@pytest.mark.parametrize("spec_id", COMPILED)
def test_compiled_on_device_matches_eager(spec_id: str) -> None:
    spec = next(s for s in SPECS if s.id == spec_id)
    shape = spec.shapes[-1]
    torch._dynamo.reset()
    eager = spec.make().to(DEVICE)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, dynamic=False)
    gy = _input(shape, 3).float().to(DEVICE)
    for i, training in enumerate((True, False, True)):
        eager.train(training)
        compiled_layer.train(training)
        x = _input(shape, 20 + i).float().to(DEVICE)
        assert_same(_step(compiled, x, gy), _step(eager, x, gy))
    torch._dynamo.reset()


class _HostReads(TorchFunctionMode):
    """Records each read of a tensor's values into Python (``item``, ``tolist``, ``bool()``,
    ``int()``, ``float()``) and each tensor made from Python data (``torch.tensor``) that
    normlab's code makes -- host syncs on an accelerator. Draws from a layer's own CPU generator
    (noisy batch norm's levels, and the seeds ``_rng.host_seed`` draws) are reads of CPU
    tensors everywhere, so the functions that make them are allowed."""

    READS = frozenset(
        {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "tensor"}
    )
    ALLOWED = frozenset({"draw_noise", "host_seed"})

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in self.READS:
            frames = [f for f in traceback.extract_stack()[:-1] if "/normlab/" in f.filename]
            if frames and not any(f.name in self.ALLOWED for f in frames):
                last = frames[-1]
                self.found.append(
                    f"{func.__name__} at {last.filename.split('normlab/')[-1]}:{last.lineno}"
                )
        return func(*args, **(kwargs or {}))


SYNC_FREE = [
    *[s for s in SPECS if s.id != "sync"],  # SyncBatchNorm's collectives need counts on the host
    LayerSpec(
        "bn1d-cumulative-eval", lambda **kw: nl.BatchNorm1d(3, momentum=None), ((6, 3),), True
    ),
]


@pytest.mark.parametrize("spec", SYNC_FREE, ids=[s.id for s in SYNC_FREE])
def test_training_and_eval_steps_make_no_host_sync(spec: LayerSpec) -> None:
    """On CUDA torch's sync debug mode turns any sync into an error; elsewhere (the CPU on the
    accelerator routes) every read of a tensor's value into Python by normlab's code is one."""
    shape = spec.shapes[-1]
    layer = spec.make()
    layer = layer.to(DEVICE)
    x = _input(shape, 5).float().to(DEVICE)
    with torch.no_grad():
        gy = _input(tuple(copy.deepcopy(layer)(x).shape), 6).float().to(DEVICE)
    for training in (True, True, False):
        layer.train(training)
        step_results(layer, x, gy)  # a first call of each kind: lazy set-up may read values
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            try:
                with warnings.catch_warnings():  # torch's notice that the mode is a prototype
                    warnings.filterwarnings("ignore", "Synchronization debug mode is a prototype")
                    torch.cuda.set_sync_debug_mode("error")
                step_results(layer, x, gy)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            spy = _HostReads()
            with spy:
                step_results(layer, x, gy)
            assert not spy.found, spy.found
