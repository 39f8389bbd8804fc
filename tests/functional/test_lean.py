"""The lean training routes (functional/_lean.py): ghost batch norm on channels-last CPU input
with the fast extra, against float64 oracles and against the general route it stands in for.
Skipped without numba."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import normlab.nn as nl
from normlab.functional import NonFiniteStatisticsWarning, batch_variants
from normlab.functional import _kernels as kernels
from normlab.functional import _lean as lean

pytest.importorskip("numba")
if not kernels.available():  # NORMLAB_NUMBA=0 in the environment
    pytest.skip("numba switched off", allow_module_level=True)

# (shape, virtual batch size): equal virtual batches, a ragged remainder (35 = 4 * 8 + 3), a
# lone leftover sample joining the last batch (10 = 3 * 3 + 1), and a 5-D channels-last input
CASES = [
    ((64, 16, 8, 8), 16),
    ((35, 8, 9, 7), 8),
    ((10, 4, 20, 30), 3),
    ((12, 6, 5, 6, 10), 4),
]


def _sizes(n: int, vbs: int) -> list[int]:
    full, rest = divmod(n, vbs)
    if rest == 1:
        full, rest = full - 1, vbs + 1
    return [vbs] * full + ([rest] if rest else [])


def _input(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    return x.to(dtype).contiguous(memory_format=fmt)


def _layer(c: int, vbs: int, dtype: torch.dtype, **kwargs: object) -> nl.GhostBatchNorm:
    layer = nl.GhostBatchNorm(c, vbs, dtype=dtype, **kwargs)  # type: ignore[arg-type]
    if layer.affine:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(c, generator=g))
    return layer


def _buffer(layer: torch.nn.Module, name: str) -> torch.Tensor:
    t = getattr(layer, name)
    assert isinstance(t, torch.Tensor)
    return t


class _Routes:
    """Counts the calls of a lean route (``route``, a function of ``_lean`` that
    ``batch_variants`` calls when ``check`` passes); ``general()`` switches it off."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        route: str = "ghost_batch_norm_channels_last",
        check: str = "lean_usable",
    ) -> None:
        self.monkeypatch, self.check = monkeypatch, check
        self.lean = 0
        original = getattr(lean, route)

        def counted(*args: object) -> torch.Tensor:
            self.lean += 1
            return original(*args)  # type: ignore[no-any-return]

        monkeypatch.setattr(batch_variants, route, counted)
        monkeypatch.setattr(batch_variants, check, getattr(lean, check))

    def general(self) -> None:
        self.monkeypatch.setattr(batch_variants, self.check, lambda *_: False)


def _step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xr = x.detach().clone().requires_grad_()
    y = layer(xr)
    grads = torch.autograd.grad(y, [xr, *layer.parameters()], dy)
    return (y.detach(), *grads)


def _oracle(
    x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, dy: torch.Tensor, vbs: int
) -> tuple[torch.Tensor, ...]:
    """float64 autograd through torch's batch norm per virtual batch."""
    xr = x.detach().double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in (w, b) if p is not None]
    wd, bd = [*params, None, None][:2] if w is not None else (None, None)
    y = torch.cat(
        [
            F.batch_norm(s, None, None, wd, bd, True, 0.0, 1e-5)
            for s in torch.split(xr, _sizes(len(x), vbs))
        ]
    )
    return (y.detach(), *torch.autograd.grad(y, [xr, *params], dy.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "vbs"), CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_ghost_matches_float64_and_the_general_route(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    vbs: int,
    affine: bool,
) -> None:
    """Output, gradients and running statistics of two training steps: against autograd through
    torch's batch norm per virtual batch in float64 (as close as the general route's float32
    result, factor 2), and against the general route (running statistics to a few ulps; their
    version counters move alike)."""
    routes = _Routes(monkeypatch)
    x, dy = _input(shape, dtype), _input(shape, dtype, seed=1)
    results = []
    for route in ("lean", "general"):
        if route == "general":
            routes.general()
        layer = _layer(shape[1], vbs, dtype, affine=affine)
        steps = [_step(layer, x, dy), _step(layer, x * 2 - 1, dy)]
        buffers = [_buffer(layer, name) for name in ("running_mean", "running_var")]
        results.append((steps, buffers, [t._version for t in buffers]))
    assert routes.lean == 2
    (ours, buffers, versions), (general, g_buffers, g_versions) = results
    ulps = 4 * torch.finfo(dtype).eps  # the pooling sums in another order
    for got, want in zip(buffers, g_buffers, strict=True):
        torch.testing.assert_close(got, want, rtol=ulps, atol=0)
    assert versions == g_versions
    assert min(versions) >= 2
    assert ours[0][0].stride() == x.stride()
    assert ours[0][1].stride() == x.stride()
    oracle = _oracle(x, *_params(shape[1], dtype, affine), dy, vbs)
    for o, g, r in zip(ours[0], general[0], oracle, strict=True):
        err = (o.double() - r).norm() / r.norm()
        bound = 2 * (g.double() - r).norm() / r.norm()
        assert err <= bound + (1e-6 if dtype == torch.float32 else 1e-13), err


def _params(
    c: int, dtype: torch.dtype, affine: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not affine:
        return None, None
    layer = _layer(c, 2, dtype)
    return layer.weight.detach(), layer.bias.detach()


def test_ghost_running_statistics_follow_torch_on_the_whole_batch() -> None:
    """The running statistics after a step are batch norm's with the whole batch (pooled from
    the virtual batches'), torch's rule; ``momentum=None`` (a cumulative average) too."""
    x = _input((35, 8, 9, 7), torch.float32)
    for momentum in (0.1, None):
        ours = _layer(8, 8, torch.float32, momentum=momentum).train()
        ref = torch.nn.BatchNorm2d(8, momentum=momentum, dtype=torch.float64).train()
        for step in range(2):
            ours(x + step)
            ref(x.double() + step)
            for name in ("running_mean", "running_var"):
                want = _buffer(ref, name).float()
                torch.testing.assert_close(_buffer(ours, name), want, rtol=1e-6, atol=1e-7)


def test_ghost_without_running_statistics_or_gradient() -> None:
    """``track_running_stats=False``, and a call without gradient (no autograd node), give the
    oracle's output."""
    x = _input((64, 16, 8, 8), torch.float64)
    layer = _layer(16, 16, torch.float64, track_running_stats=False)
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None
    w, b = layer.weight.detach(), layer.bias.detach()
    torch.testing.assert_close(
        y, _oracle(x, w, b, torch.ones_like(x), 16)[0], rtol=1e-12, atol=1e-12
    )


def test_ghost_double_backward_matches_the_general_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gradient penalty (``create_graph=True``) differentiates torch's formula again."""
    routes = _Routes(monkeypatch)
    x = _input((16, 4, 16, 16), torch.float64)
    results = []
    for route in ("lean", "general"):
        if route == "general":
            routes.general()
        layer = _layer(4, 4, torch.float64)
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(layer(xr).pow(3).sum(), xr, create_graph=True)
        penalty = gx.square().sum()
        results.append(torch.autograd.grad(penalty, [xr, layer.weight, layer.bias]))
    assert routes.lean == 1
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ghost_batched_gradients_fall_back() -> None:
    """``is_grads_batched`` runs the backward under vmap (tensors the loops cannot read): torch's
    formula, the same as one backward per vector."""
    x = _input((16, 4, 16, 16), torch.float32).requires_grad_()
    layer = _layer(4, 4, torch.float32)
    y = layer(x)
    n, c, h, w = x.shape
    vectors = torch.randn(2, n, h, w, c).permute(0, 1, 4, 2, 3)  # each one channels-last
    batched = torch.autograd.grad(y, x, vectors, is_grads_batched=True, retain_graph=True)[0]
    for i in range(2):
        one = torch.autograd.grad(y, x, vectors[i], retain_graph=True)[0]
        torch.testing.assert_close(batched[i], one, rtol=1e-4, atol=1e-5)


def test_ghost_non_finite_batch_keeps_the_running_statistics() -> None:
    layer = _layer(16, 16, torch.float32)
    x = _input((64, 16, 8, 8), torch.float32)
    layer(x)
    before = (_buffer(layer, "running_mean").clone(), _buffer(layer, "running_var").clone())
    bad = x.clone()
    bad[3, 2, 1, 1] = float("nan")
    with pytest.warns(NonFiniteStatisticsWarning, match=r"GhostBatchNorm: \d+ batch statistic"):
        layer(bad)
    assert torch.equal(_buffer(layer, "running_mean"), before[0])
    assert torch.equal(_buffer(layer, "running_var"), before[1])


def test_ghost_update_invalidates_graphs_that_saved_the_running_statistics() -> None:
    """The epilogue writes the running statistics through numpy and moves their version
    counters: an eval-mode graph that saved them refuses to backpropagate afterwards, as after
    torch's own in-place update."""
    layer = _layer(16, 16, torch.float32)
    x = _input((64, 16, 8, 8), torch.float32)
    layer.eval()
    y = layer(x.clone().requires_grad_())
    layer.train()
    layer(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_ghost_two_threads_match_one() -> None:
    """The input gradient's parallel loop (one row of coefficients per sample) gives the serial
    result."""
    x, dy = _input((35, 8, 9, 7), torch.float32), _input((35, 8, 9, 7), torch.float32, 1)
    sizes = _sizes(35, 8)
    g = torch.Generator().manual_seed(3)
    stats = torch.rand(len(sizes), 2, 8, generator=g)  # means and 1 / std
    sums = torch.randn(stats.shape, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(kernels.ghost_backward(dy, x, stats, sums, sizes, None, True))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lean_usable_only_where_the_route_serves() -> None:
    x = _input((64, 16, 8, 8), torch.float32)
    w, b, rm, rv = torch.ones(16), torch.zeros(16), torch.zeros(16), torch.ones(16)
    assert lean.lean_usable(x, w, b, rm, rv, 0.1)
    assert lean.lean_usable(x, None, None, None, None, 0.1)
    refused: list[Callable[[], bool]] = [
        lambda: lean.lean_usable(x.contiguous(), w, b, rm, rv, 0.1),  # channels-first
        lambda: lean.lean_usable(x.double(), w, b, rm, rv, 0.1),  # parameters of another dtype
        lambda: lean.lean_usable(x, w, b, rm, rv, torch.tensor(0.1)),  # a tensor momentum
        lambda: lean.lean_usable(x, w, b, rm.half(), rv, 0.1),  # half running statistics
        lambda: lean.lean_usable(x, w, b, rm, None, 0.1),  # half of them
        lambda: lean.lean_usable(x[:2, :, :2], w, b, rm, rv, 0.1),  # too small for the loops
    ]
    assert not any(check() for check in refused)


def test_epilogues_refuse_what_they_cannot_read() -> None:
    stats = torch.zeros(2, 2, 3)
    with pytest.raises(
        ValueError,
        match=r"ghost_coefficients: stats, sizes and the per-channel tensors must be stats "
        r"\(G, 2, C\), G positive sizes.*got stats \(2, 2, 3\), sizes \[4\]",
    ):
        kernels.ghost_coefficients(stats, [4], None, None, 1e-5)
    with pytest.raises(ValueError, match=r"got stats \(2, 2, 3\), sizes \[4, 4\], \(2,\)"):
        kernels.ghost_coefficients(stats, [4, 4], torch.ones(2), None, 1e-5)
    x = _input((8, 3, 32, 32), torch.float32)
    with pytest.raises(
        ValueError,
        match=r"ghost_backward: stats, sums, sizes and weight must be .*adding up to 8.*got "
        r"stats \(2, 2, 3\) torch.float32, sums \(2, 3\), sizes \[4, 3\]",
    ):
        kernels.ghost_backward(x, x, stats, torch.ones(2, 3), [4, 3], None, True)
    with pytest.raises(ValueError, match=r"input_grad: mean, a, b and k must be all \(C,\) or all"):
        kernels.input_grad(x, x, torch.zeros(8, 3), *torch.zeros(3, 3))
    with pytest.raises(
        ValueError,
        match=r"input_grad: mean must be a \(3,\) tensor \(one value per channel\) or a \(8, 3\) "
        r"tensor \(one row per sample\), got shape \(4, 3\)",
    ):
        kernels.input_grad(x, x, *torch.zeros(4, 4, 3))


@pytest.mark.parametrize("p", ["1", "inf"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("offset", [0.5, 60.0], ids=["centred", "off-centre"])
def test_lp_epilogues_match_the_torch_arithmetic(
    monkeypatch: pytest.MonkeyPatch, p: str, fmt: torch.memory_format, offset: float
) -> None:
    """L1 and L-infinity batch norm with their per-channel arithmetic and running-statistics
    update in the epilogues against the same functions with torch's ops (float32, two training
    steps): outputs and gradients to a few ulps of the larger values, running statistics to an
    ulp, version counters moved alike. (L1's backward takes its epilogue on both sides wherever
    the loops read the input: test_kernels.py checks it against float64.)"""
    from normlab.functional import lp_norm

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(16, 8, 16, 10, generator=g) * 2 + offset).contiguous(memory_format=fmt)
    dy = torch.randn(x.shape, generator=g).contiguous(memory_format=fmt)
    results = []
    for epilogues in (True, False):
        monkeypatch.setattr(lp_norm, "_epilogues", lambda *_, on=epilogues: on)
        layer = nl.L1BatchNorm(8) if p == "1" else nl.LinfBatchNorm(8, k=5)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(8, generator=torch.Generator().manual_seed(6)) + 0.5)
            layer.bias.normal_(generator=torch.Generator().manual_seed(7))
        steps = [_step(layer, x, dy), _step(layer, x * 2 - 1, dy)]
        buffers = [_buffer(layer, name) for name in ("running_mean", "running_scale")]
        results.append((steps, buffers, [t._version for t in buffers]))
    (ours, buffers, versions), (theirs, t_buffers, t_versions) = results
    assert versions == t_versions
    for got, want in zip(buffers, t_buffers, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-7, atol=0)
    for step, t_step in zip(ours, theirs, strict=True):
        for got, want in zip(step, t_step, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_float32_epilogues_compute_in_float64() -> None:
    """numba's ``float()`` of a float32 stays float32: the epilogues widen with ``np.float64``,
    so their float32 results are float64 math rounded once -- L1/L-inf's backward coefficients
    against that oracle, batch renorm's ``d`` against the general route's float64 ``d``, bit for
    bit over 4096 channels (with float32 squares and differences ~20-26 % of channels were off
    by an ulp)."""
    g = torch.Generator().manual_seed(4)
    c = 4096
    denom = (torch.rand(c, generator=g, dtype=torch.float64) * 3 + 0.2).float()
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).float()
    sums = torch.randn(3, c, generator=g, dtype=torch.float64) * 30
    got = kernels.lp_grad_coefficients(denom, weight, sums, 0.01, 1000)
    d64, w64 = denom.double(), weight.double()
    alpha = w64 / d64
    beta = -w64 * sums[0] / (d64 * d64) * 0.01
    shift = -(alpha * sums[1] + beta * sums[2]) / 1000
    want = torch.stack((alpha, beta, shift, sums[0] / d64, sums[1])).float()
    assert torch.equal(got, want)
    stats = torch.stack(
        (
            torch.randn(c, generator=g, dtype=torch.float64),
            torch.rand(c, generator=g, dtype=torch.float64) * 4,
        )
    ).float()
    running_mean = (torch.randn(c, generator=g, dtype=torch.float64) * 0.3).float()
    running_std = (torch.rand(c, generator=g, dtype=torch.float64) * 4 + 2).float()
    out, _ = kernels.renorm_coefficients(
        stats, weight, None, 1e-5, 100.0, 100.0, running_mean.clone(), running_std.clone(), 0.1
    )
    _r, d = batch_variants._correction(
        stats[0], stats[1], running_mean, running_std, 1e-5, 100.0, 100.0
    )
    assert torch.equal(out[6], d.float())


def test_lp_epilogues_refuse_what_they_cannot_read() -> None:
    c3, c2 = torch.zeros(3), torch.zeros(2)
    with pytest.raises(
        ValueError,
        match=r"lp_coefficients: mean, dispersion and the per-channel tensors must be all "
        r"\(3,\), got \(3,\), \(2,\), None, None\. Fix: pass one value per channel",
    ):
        kernels.lp_coefficients(c3, c2, 4, 1.0, 1e-5, 8.0, None, None)
    with pytest.raises(
        ValueError,
        match=r"lp_grad_coefficients: denom, sums and weight must be denom \(3,\), sums "
        r"\(3, 3\), weight \(3,\), got \(3,\), \(2, 3\), None",
    ):
        kernels.lp_grad_coefficients(c3, None, torch.zeros(2, 3), 1.0, 4)


def _renorm_steps(
    monkeypatch: pytest.MonkeyPatch,
    x: torch.Tensor,
    dy: torch.Tensor,
    lean_route: bool,
    create_graph: bool = False,
) -> tuple[list[torch.Tensor], int]:
    """Two training steps of batch renorm with ``r`` and ``d`` clipped (their limits active):
    outputs, gradients (or, with ``create_graph``, a gradient penalty's gradients), running
    statistics, and how often the lean route ran."""
    routes = _Routes(monkeypatch, "batch_renorm_channels_last", "renorm_usable")
    if not lean_route:
        routes.general()
    make = nl.BatchRenorm2d if x.dim() == 4 else nl.BatchRenorm3d
    layer = make(x.shape[1], dtype=x.dtype, r_max=1.5, d_max=0.5, warmup_steps=0)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(x.shape[1], generator=g) + 0.5)
        layer.bias.copy_(torch.randn(x.shape[1], generator=g))
        _buffer(layer, "running_std").fill_(2.0)  # the batch's std is ~3: r clipped to 1.5
        _buffer(layer, "running_mean").fill_(0.3)
    out: list[torch.Tensor] = []
    for step in range(2):
        xr = (x * (step + 1)).detach().requires_grad_()
        y = layer(xr)
        wrt = [xr, *layer.parameters()]
        if create_graph:
            (gx,) = torch.autograd.grad(y.pow(3).sum(), xr, create_graph=True)
            out += torch.autograd.grad(gx.square().sum(), wrt)
        else:
            out += [y.detach(), *torch.autograd.grad(y, wrt, dy)]
    out += [_buffer(layer, "running_mean").clone(), _buffer(layer, "running_std").clone()]
    return out, routes.lean


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 16, 8, 8), (12, 6, 5, 6, 10)])
def test_renorm_matches_the_general_route(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """Batch renorm's lean route rounds as the general route: outputs, gradients and running
    statistics of two steps equal to an ulp of the largest value, layout kept."""
    x, dy = _input(shape, dtype), _input(shape, dtype, seed=1)
    ours, calls = _renorm_steps(monkeypatch, x, dy, True)
    theirs, none = _renorm_steps(monkeypatch, x, dy, False)
    assert (calls, none) == (2, 0)
    assert ours[0].stride() == x.stride()
    assert ours[1].stride() == x.stride()
    ulp = torch.finfo(dtype).eps
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=2 * ulp, atol=2 * ulp * float(want.abs().max()))


def test_renorm_double_backward_matches_the_general_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = _input((16, 4, 16, 16), torch.float64)
    ours, calls = _renorm_steps(monkeypatch, x, x, True, create_graph=True)
    theirs, _ = _renorm_steps(monkeypatch, x, x, False, create_graph=True)
    assert calls == 2
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_renorm_non_finite_batch_keeps_the_running_statistics() -> None:
    layer = nl.BatchRenorm2d(16)
    x = _input((64, 16, 8, 8), torch.float32)
    with torch.no_grad():
        layer(x)  # no gradient: the route without the autograd function
    before = [_buffer(layer, n).clone() for n in ("running_mean", "running_std")]
    assert not torch.equal(before[0], torch.zeros(16))
    bad = x.clone()
    bad[3, 2, 1, 1] = float("inf")
    with pytest.warns(NonFiniteStatisticsWarning, match=r"BatchRenorm2d: \d+ batch statistic"):
        layer(bad)
    for name, value in zip(("running_mean", "running_std"), before, strict=True):
        assert torch.equal(_buffer(layer, name), value)


def test_renorm_epilogue_refuses_what_it_cannot_read() -> None:
    c3 = torch.ones(3)
    with pytest.raises(
        ValueError,
        match=r"renorm_coefficients: stats and the per-channel tensors must be stats \(2, 3\) "
        r"and \(3,\) tensors, got \(3, 3\), None, None, \(3,\), \(3,\)",
    ):
        kernels.renorm_coefficients(torch.ones(3, 3), None, None, 1e-5, 3.0, 5.0, c3, c3, 0.1)


def test_epilogues_divide_by_zero_as_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A zero divisor gives inf/NaN as torch's ops do (numba's default error model raised
    ZeroDivisionError): batch renorm with a zero running std (r and d clip to their limits), L1
    and L-infinity batch norm with an eps that rounds to 0 in float32 and a constant channel."""
    from normlab.functional import lp_norm

    x = _input((64, 16, 8, 8), torch.float32)
    dy = _input((64, 16, 8, 8), torch.float32, seed=1)
    for route in ("lean", "general"):
        if route == "general":
            monkeypatch.setattr(batch_variants, "renorm_usable", lambda *_: False)
        layer = nl.BatchRenorm2d(16, r_max=2.0, d_max=1.0, warmup_steps=0)
        _buffer(layer, "running_std").zero_()
        result = _step(layer, x, dy)
        if route == "lean":
            lean_result = result
    for got, want in zip(lean_result, result, strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)
    constant = x.clone()
    constant[:, 3] = 1.5
    for make in (lambda: nl.L1BatchNorm(16, eps=1e-50), lambda: nl.LinfBatchNorm(16, eps=1e-50)):
        results = []
        for epilogues in (True, False):
            monkeypatch.setattr(lp_norm, "_epilogues", lambda *_, on=epilogues: on)
            results.append(_step(make(), constant, dy))
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_ghost_backward_on_channels_first_rows() -> None:
    """kernels.ghost_backward reads channels-first input too (rows of positions): gradients equal
    torch's batch-norm backward per virtual batch."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 8, 8, 8, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    sizes = [16, 16, 16, 16]
    pieces = [torch.batch_norm_update_stats(s, None, None, 0.0) for s in torch.split(x, sizes)]
    mean = torch.stack([m for m, _ in pieces])
    invstd = torch.stack([torch.rsqrt(v + 1e-5) for _, v in pieces])
    want = [
        torch.ops.aten.native_batch_norm_backward(
            gs, xs, w, None, None, m, i, True, 1e-5, [True, True, True]
        )
        for gs, xs, m, i in zip(
            torch.split(dy, sizes), torch.split(x, sizes), mean, invstd, strict=True
        )
    ]
    sums = torch.stack([torch.stack((gw, gb)) for _, gw, gb in want])
    stats = torch.stack((mean, invstd), 1)
    grad_x, grad_w, grad_b = kernels.ghost_backward(dy, x, stats, sums, sizes, w, True)
    assert grad_x is not None
    torch.testing.assert_close(grad_x, torch.cat([gx for gx, _, _ in want]))
    torch.testing.assert_close(grad_w, sum(gw for _, gw, _ in want) * 1.0)
    torch.testing.assert_close(grad_b, sum(gb for _, _, gb in want) * 1.0)


def test_renorm_batched_gradients() -> None:
    """``is_grads_batched`` (the backward under vmap): the same as one backward per vector."""
    x = _input((16, 4, 16, 16), torch.float32).requires_grad_()
    layer = nl.BatchRenorm2d(4)
    y = layer(x)
    n, c, h, w = x.shape
    vectors = torch.randn(2, n, h, w, c).permute(0, 1, 4, 2, 3)
    batched = torch.autograd.grad(y, x, vectors, is_grads_batched=True, retain_graph=True)[0]
    for i in range(2):
        one = torch.autograd.grad(y, x, vectors[i], retain_graph=True)[0]
        torch.testing.assert_close(batched[i], one, rtol=1e-4, atol=1e-5)
