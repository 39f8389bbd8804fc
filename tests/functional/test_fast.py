"""normlab's fast training-mode batch-statistics path (functional/_fast.py) against oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
from normlab.functional import _fast
from normlab.functional import _kernels as kernels
from normlab.functional._fast import BatchNormTrain, use_fast_batch_stats

BIG = (8, 5, 33, 31)
DEFAULT_LIMITS = (_fast._MIN_NUMEL, _fast._MIN_ROW)


def _x(shape, dtype=torch.float64, seed=0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the float64 ``ref``."""
    return (torch.linalg.vector_norm(a.double() - ref) / torch.linalg.vector_norm(ref)).item()


@pytest.fixture(autouse=True)
def fast_for_big(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the moderate BIG shape take the fast path (the default limits are tuned for speed)."""
    monkeypatch.setattr(_fast, "_MIN_NUMEL", 1 << 15)
    monkeypatch.setattr(_fast, "_MIN_ROW", 16)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test runs on torch's routes (as without the fast extra) and, where numba is there,
    through the fast extra's loops; tests marked ``torch_routes`` pin a torch route and run once."""
    pinned = metafunc.definition.get_closest_marker("torch_routes") is not None
    loops = kernels.available() and not pinned
    metafunc.parametrize("loops", ["torch", "loops"] if loops else ["torch"], indirect=True)


@pytest.fixture(autouse=True)
def loops(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``torch``: the loops switched off; ``loops``: as installed (numba's loops serve the inputs
    they can; their own oracles are in test_kernels.py)."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "usable", lambda *_: False)
    return str(request.param)


@pytest.fixture
def fast_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route even tiny inputs through the fast path, so gradcheck can afford to test it."""
    monkeypatch.setattr(_fast, "_MIN_NUMEL", 0)
    monkeypatch.setattr(_fast, "_MIN_ROW", 2)


def test_eligibility() -> None:
    """Defaults: large channels-first CPU float tensors with rows of >= 32 values (crossover
    measured by benchmarks/layers.py --crossover)."""
    _fast._MIN_NUMEL, _fast._MIN_ROW = DEFAULT_LIMITS  # undone by the autouse fixture
    x = torch.empty(16, 5, 80, 82)
    assert use_fast_batch_stats(x, None, None)
    assert use_fast_batch_stats(x.double(), torch.ones(5, dtype=torch.float64), None)
    assert not use_fast_batch_stats(x.contiguous(memory_format=torch.channels_last), None, None)
    assert not use_fast_batch_stats(x.half(), None, None)
    assert not use_fast_batch_stats(x.bfloat16(), None, None)
    assert not use_fast_batch_stats(torch.empty(40000, 5), None, None)  # dense: torch is fast
    assert not use_fast_batch_stats(torch.empty(8, 5, 33, 31), None, None)  # small
    assert not use_fast_batch_stats(torch.empty(40000, 5, 4, 4), None, None)  # short rows
    assert not use_fast_batch_stats(x, torch.ones(5, dtype=torch.float64), None)  # mixed dtypes
    assert not use_fast_batch_stats(x[:, :, :, ::2], None, None)  # strided


def test_forward_and_gradients_equal_the_composite_reference() -> None:
    x = _x(BIG).requires_grad_()
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y, mean, var = BatchNormTrain.apply(x, w, b, 1e-5)
    ref, ref_mean, ref_var = NF.normalize(x, [0, 2, 3], w, b, eps=1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean, ref_mean.flatten())
    torch.testing.assert_close(var, ref_var.flatten())
    gy = _x(BIG, seed=1)
    for a, r in zip(
        torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(ref, (x, w, b), gy), strict=False
    ):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("fast_everywhere")
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(affine: bool) -> None:
    x = _x((3, 2, 4, 3)).requires_grad_()
    params = (
        (
            torch.rand(2, dtype=torch.float64, requires_grad=True) + 0.5,
            torch.randn(2, dtype=torch.float64, requires_grad=True),
        )
        if affine
        else ()
    )
    assert use_fast_batch_stats(x, *(params or (None, None)))

    def fn(x: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        return NF.batch_norm(x, None, None, *p, training=True)

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_double_backward_matches_torch_on_a_fast_shape() -> None:
    """Hessian-vector products through training-mode BN (what curvature analysis needs)."""
    x0, v = _x(BIG), _x(BIG, seed=2)
    w0 = torch.rand(5, dtype=torch.float64) + 0.5
    results = []
    for fn in (
        lambda x, w: NF.batch_norm(x, None, None, w, None, training=True),
        lambda x, w: F.batch_norm(x, None, None, w, None, True),
    ):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = (fn(x, w) ** 3).sum()
        gx, gw = torch.autograd.grad(loss, (x, w), create_graph=True)
        results.append(torch.autograd.grad((gx * v).sum() + gw.sum(), (x, w)))
    for a, b in zip(*results, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_constant_channel_gives_bias_without_nan() -> None:
    x = _x(BIG, torch.float32)
    x[:, 2] = 7.0
    x.requires_grad_()
    b = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0])
    y = NF.batch_norm(x, None, None, None, b, training=True)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 2], torch.full_like(y[:, 2], 0.5))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all()


def test_running_stats_use_the_unbiased_variance() -> None:
    x = _x(BIG)
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    NF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rm, x.mean((0, 2, 3)))
    torch.testing.assert_close(rv, x.var((0, 2, 3), unbiased=True))


def test_saves_no_more_for_backward_than_torch() -> None:
    def saved_bytes(fn) -> int:  # type: ignore[no-untyped-def]
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = _x(BIG, torch.float32).requires_grad_()
        w = torch.ones(5, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, w)
        return total

    ours = saved_bytes(lambda x, w: NF.batch_norm(x, None, None, w, None, training=True))
    torch_ = saved_bytes(lambda x, w: F.batch_norm(x, None, None, w, None, True))
    assert ours <= torch_


def test_torch_func_transforms_fall_back_to_the_native_op() -> None:
    x = _x(BIG)
    w = torch.rand(5, dtype=torch.float64) + 0.5

    def loss(w: torch.Tensor) -> torch.Tensor:
        return (NF.batch_norm(x, None, None, w, None, training=True) ** 3).sum()

    w_req = w.clone().requires_grad_()
    expected = torch.autograd.grad(loss(w_req), w_req)[0]
    torch.testing.assert_close(torch.func.grad(loss)(w), expected)


@pytest.mark.parametrize(("offset", "fast"), [(0.0, True), (10.0, True), (1e3, False)])
@pytest.mark.torch_routes
def test_backward_is_accurate_on_both_routes(
    monkeypatch: pytest.MonkeyPatch, offset: float, fast: bool
) -> None:
    """The fast backward serves centred data (|mean|/std <= 8); far off-centre data goes to
    torch's exactly centred kernel. Against a float64 oracle on the same (float32) input, each
    float32 gradient is at least as accurate as torch's own, up to a factor 4."""
    calls = []
    original = _fast._fast_backward
    monkeypatch.setattr(_fast, "_fast_backward", lambda *a: calls.append(1) or original(*a))
    x32 = (_x(BIG) + offset).float()  # std 2
    w32, gy32 = torch.rand(5) + 0.5, _x(BIG, torch.float32, seed=3)

    def grads(fn, dtype):  # type: ignore[no-untyped-def]
        x, w = x32.to(dtype).requires_grad_(), w32.to(dtype).requires_grad_()
        b = torch.zeros(5, dtype=dtype, requires_grad=True)
        return torch.autograd.grad(fn(x, w, b), (x, w, b), gy32.to(dtype))

    ours = lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True)  # noqa: E731
    theirs = lambda x, w, b: F.batch_norm(x, None, None, w, b, True)  # noqa: E731
    oracle = grads(theirs, torch.float64)
    calls.clear()
    ours32 = grads(ours, torch.float32)
    assert bool(calls) == fast
    for g, t, r in zip(ours32, grads(theirs, torch.float32), oracle, strict=True):
        assert _rel(g, r) <= 4 * _rel(t, r) + 1e-6, (_rel(g, r), _rel(t, r))


@pytest.mark.parametrize(
    ("offset", "route"),
    [(0.0, "sums"), (1.5, "sums"), (2.5, "rows"), (7.0, "rows"), (1e4, "torch")],
)
@pytest.mark.torch_routes
def test_batch_statistics_are_as_accurate_as_torchs_on_every_route(
    monkeypatch: pytest.MonkeyPatch, offset: float, route: str
) -> None:
    """Row sums and norms serve channels with |mean| / std <= 2, where their float32 error
    (~(1 + mean^2 / var) * eps) stays within a few float32 ulps; up to 8 the group-norm kernel's
    per-row moments, beyond that torch's double-accumulating kernel. Variance and output against
    a float64 oracle on the same float32 input: within a factor 3 of torch's own error, plus
    4e-7 (~7 float32 ulps: what the sums route costs at offset 2)."""
    calls: list[str] = []
    for name in ("row_moments", "_native_moments"):
        original = getattr(_fast, name)
        monkeypatch.setattr(_fast, name, lambda x, f=original, n=name: calls.append(n) or f(x))
    g = torch.Generator().manual_seed(5)
    scale = torch.rand(1, 5, 1, 1, generator=g, dtype=torch.float64) * 3 + 0.1
    x64 = torch.randn(BIG, generator=g, dtype=torch.float64) * scale
    x32 = (x64 + offset * x64.std((0, 2, 3), keepdim=True)).float()
    ref = x32.double()
    ref_var = ref.var((0, 2, 3), unbiased=False)
    mean, var = _fast.batch_moments(x32)
    expected = {"sums": [], "rows": ["row_moments"], "torch": ["_native_moments"]}[route]
    assert calls == expected
    _, _, torch_invstd = torch.ops.aten.native_batch_norm(x32, None, None, None, None, True, 0, 0)
    torch_err = (torch_invstd.double().pow(-2) / ref_var - 1).abs().max().item()
    assert (var / ref_var - 1).abs().max().item() <= 3 * torch_err + 4e-7
    torch.testing.assert_close(
        mean, ref.mean((0, 2, 3)), rtol=1e-7, atol=1e-6 * ref_var.sqrt().max()
    )
    y = NF.batch_norm(x32, None, None, training=True)
    oracle = F.batch_norm(ref, None, None, training=True, eps=1e-5)
    assert _rel(y, oracle) <= 3 * _rel(F.batch_norm(x32, None, None, training=True), oracle) + 4e-7


@pytest.mark.parametrize(("shape", "route"), [((1, 2, 1024, 1024), "sums"), ((8, 4, 4099), "rows")])
@pytest.mark.torch_routes
def test_batch_statistics_of_long_rows(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], route: str
) -> None:
    """torch's float32 norm loses accuracy linearly with the length it reduces (~2e-5 at 1M
    values): rows are normed in pieces of at most 4096 values; a long row with no divisor in
    [1024, 4096] (4099 is prime) takes the group-norm kernel. Variance as accurate as torch's."""
    calls: list[int] = []
    original = _fast.row_moments
    monkeypatch.setattr(_fast, "row_moments", lambda x: calls.append(1) or original(x))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=g)
    dims = [0, *range(2, x.dim())]
    ref_var = x.double().var(dims, unbiased=False)
    mean, var = _fast.batch_moments(x)
    assert bool(calls) == (route == "rows")
    _, _, torch_invstd = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0, 0)
    torch_err = (torch_invstd.double().pow(-2) / ref_var - 1).abs().max().item()
    assert (var / ref_var - 1).abs().max().item() <= 3 * torch_err + 4e-7
    torch.testing.assert_close(mean, x.double().mean(dims), rtol=0, atol=1e-6)


def test_batch_statistics_fall_back_when_squares_overflow_float32() -> None:
    """Values near 1e18 overflow a float32 row sum of squares (an infinite "variance" that would
    pass any offset test): torch's kernel, which centres first, gives the finite moments."""
    x = (1e18 + _x(BIG) * 1e15).float()
    assert not torch.linalg.vector_norm(x.view(-1, BIG[-1] * BIG[-2]), dim=1).isfinite().all()
    mean, var = _fast.batch_moments(x)
    ref = x.double()
    torch.testing.assert_close(mean, ref.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var, ref.var((0, 2, 3), unbiased=False), rtol=1e-6, atol=0)


# torch's forward AD scripts its own decompositions on first use (torch's warning, not ours).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad_falls_back_to_the_native_op() -> None:
    import torch.autograd.forward_ad as fwAD

    x, t = _x(BIG), _x(BIG, seed=4)
    assert use_fast_batch_stats(x)
    with fwAD.dual_level():
        assert not use_fast_batch_stats(x)
        tangent = fwAD.unpack_dual(NF.batch_norm(fwAD.make_dual(x, t), training=True)).tangent
        expected = fwAD.unpack_dual(F.batch_norm(fwAD.make_dual(x, t), None, None, training=True))
    torch.testing.assert_close(tangent, expected.tangent)


def test_mixed_dtypes_go_to_torch_which_refuses_them() -> None:
    """A float32 layer given float64 input must not silently run (torch's kernel raises)."""
    x = _x(BIG)  # float64
    rm, rv = torch.zeros(5), torch.ones(5)  # float32 buffers
    assert not use_fast_batch_stats(x, None, None, rm, rv)
    with pytest.raises(RuntimeError, match="dtype"):
        NF.batch_norm(x, rm, rv, training=True)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("offset", [0.0, 20.0], ids=["centred", "off-centre"])
def test_channels_last_instance_norm_against_the_float64_reference(
    monkeypatch: pytest.MonkeyPatch, affine: bool, offset: float
) -> None:
    """The per-sample channels-last path: output and all gradients against the plain
    instance-norm formula in float64; gradcheck and gradgradcheck; channels-last kept."""
    import importlib

    bn = importlib.import_module(
        "normlab.functional.batch_norm"
    )  # the package's name is a function
    monkeypatch.setattr(bn, "_MIN_SAMPLE_CL", 1)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 2 + offset).contiguous(
        memory_format=torch.channels_last
    )
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5) if affine else None
    b = torch.randn(4, generator=g, dtype=torch.float64) if affine else None
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64) + 1.0

    def ours(x, w, b):  # type: ignore[no-untyped-def]
        return bn.instance_norm_unchecked(x, None, None, w, b, True, 0.1, 1e-5, "test")

    def reference(x, w, b):  # type: ignore[no-untyped-def]
        mean = x.mean((2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean((2, 3), keepdim=True)
        y = (x - mean) / torch.sqrt(var + 1e-5)
        return y if w is None else y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = ours(x, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, reference(x, w, b))
    for got, want in zip(
        torch.autograd.grad(y, inputs, gy),
        torch.autograd.grad(reference(x, w, b), inputs, gy),
        strict=True,
    ):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(ours, (x, w, b))
    assert torch.autograd.gradgradcheck(ours, (x, w, b))


def _group_norm_reference(x: torch.Tensor, groups: int, w, b) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Group norm by its definition, channels-first, in x's dtype (float64 here)."""
    n, c = x.shape[0], x.shape[1]
    v = x.reshape(n, groups, -1)
    mean = v.mean(2, keepdim=True)
    var = ((v - mean) ** 2).mean(2, keepdim=True)
    y = ((v - mean) / torch.sqrt(var + 1e-5)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = y if w is None else y * w.view(shape)
    return y if b is None else y + b.view(shape)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("offset", [0.0, 20.0], ids=["centred", "off-centre"])
@pytest.mark.parametrize(
    ("shape", "groups"),
    [((3, 6, 5, 4), 6), ((3, 6, 5, 4), 2), ((2, 4, 3, 2, 3), 4), ((2, 4, 3, 2, 3), 1)],
    ids=["instance-2d", "groups-2d", "instance-3d", "one-group-3d"],
)
def test_channels_last_group_norm_on_accelerators_against_the_float64_reference(
    monkeypatch: pytest.MonkeyPatch,
    affine: bool,
    offset: float,
    shape: tuple[int, ...],
    groups: int,
) -> None:
    """Group and instance norm of channels-last input on the accelerator routes
    (ChannelsLastGroupNorm, no layout copies): output, all gradients and running statistics
    against the definition in float64; float32 within its rounding; channels-last out and in the
    input gradient; gradcheck and gradgradcheck."""
    import importlib

    from normlab.functional._core import accelerator_routes

    bn = importlib.import_module("normlab.functional.batch_norm")  # the package's name is taken
    monkeypatch.setattr(_fast, "_MIN_BYTES_CL_GROUPS", 1)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).contiguous(
        memory_format=fmt
    )
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    gy = (torch.randn(shape, generator=g, dtype=torch.float64) + 1.0).contiguous(memory_format=fmt)
    calls: list[int] = []
    apply = _fast.ChannelsLastGroupNorm.apply

    def ours(x, w, b):  # type: ignore[no-untyped-def]
        if groups == c:  # instance norm, through its own function (running statistics)
            return bn.instance_norm_unchecked(x, None, None, w, b, True, 0.1, 1e-5, "test")
        return NF.group_norm(x, groups, w, b, eps=1e-5)

    def spy(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return apply(*args)

    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]
    want = _group_norm_reference(x, groups, w, b)
    want_grads = torch.autograd.grad(want, inputs, gy)
    with accelerator_routes(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(_fast.ChannelsLastGroupNorm, "apply", spy)
        y = ours(x, w, b)
        grads = torch.autograd.grad(y, inputs, gy)
        assert calls, "channels-last group norm took another route on accelerators"
        assert y.is_contiguous(memory_format=fmt)
        assert grads[0].is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, want)
        for got, ref in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got, ref)
        assert torch.autograd.gradcheck(ours, (x, w, b))
        assert torch.autograd.gradgradcheck(ours, (x, w, b))
        # float32: within float32 rounding of the float64 result (off-centre input loses
        # log10(1 + offset^2 / var) digits in the backward's sum of g * x, as torch's kernel)
        low = [t.detach().float().requires_grad_() for t in (x, w, b) if t is not None]
        args32 = (low[0], *(low[1:] if affine else (None, None)))
        y32 = ours(*args32)
        grads32 = torch.autograd.grad(y32, low, gy.float())
        tol = 1e-5 * (1 + offset**2 / 4)
        torch.testing.assert_close(y32.double(), want, rtol=1e-5, atol=1e-5)
        for got, ref in zip(grads32, want_grads, strict=True):
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    if groups == c:  # running statistics: the batch's instance means and unbiased variances
        with accelerator_routes():
            rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
            bn.instance_norm_unchecked(x.detach(), rm, rv, w, b, True, 1.0, 1e-5, "test")
        dims = tuple(range(2, x.dim()))
        torch.testing.assert_close(rm, x.detach().mean(dims).mean(0))
        torch.testing.assert_close(rv, x.detach().var(dims).mean(0))


@pytest.mark.parametrize("params", ["weight", "bias"])
@pytest.mark.parametrize("grad_layout", ["channels_last", "channels_first", "expanded"])
def test_channels_last_group_norm_with_one_parameter_and_any_gradient_layout(
    monkeypatch: pytest.MonkeyPatch, params: str, grad_layout: str
) -> None:
    """ChannelsLastGroupNorm with a weight but no bias and the reverse, and an output gradient
    that is channels-first or a zero-stride expansion (the gradient of ``y.sum()``): output and
    gradients against the definition in float64, and its second derivatives."""
    from normlab.functional._core import accelerator_routes

    monkeypatch.setattr(_fast, "_MIN_BYTES_CL_GROUPS", 1)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64) + 1).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.5 if params == "weight" else None
    b = torch.randn(6, generator=g, dtype=torch.float64) if params == "bias" else None
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    if grad_layout == "channels_last":
        gy = gy.contiguous(memory_format=torch.channels_last)
    elif grad_layout == "expanded":
        gy = torch.tensor(0.7, dtype=torch.float64).expand(x.shape)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]
    want = _group_norm_reference(x, 3, w, b)
    with accelerator_routes():
        assert _fast.channels_last_groups_usable(x, w, b)
        y = NF.group_norm(x, 3, w, b, eps=1e-5)
        torch.testing.assert_close(y, want)
        for got, ref in zip(
            torch.autograd.grad(y, inputs, gy),
            torch.autograd.grad(want, inputs, gy),
            strict=True,
        ):
            torch.testing.assert_close(got, ref)

        def ours(x, param):  # type: ignore[no-untyped-def]
            pair = (param, None) if params == "weight" else (None, param)
            return _fast.ChannelsLastGroupNorm.apply(x, *pair, 3, 1e-5)[0]

        assert torch.autograd.gradgradcheck(ours, tuple(inputs))


@pytest.mark.parametrize("route", ["instance-first", "groups-last"])
def test_group_norm_routes_double_backward_matches_torch(
    monkeypatch: pytest.MonkeyPatch, loops: str, route: str
) -> None:
    """Gradients taken with create_graph=True, and Hessian-vector products through them, equal
    torch's for InstanceNormTrain (channels-first) and ChannelsLastGroupNorm (accelerator routes):
    their double-backward recomputation (gradgradcheck alone would accept a consistently wrong
    one)."""
    import contextlib

    from normlab.functional._core import accelerator_routes

    monkeypatch.setattr(_fast, "_MIN_BYTES_CL_GROUPS", 1)
    monkeypatch.setattr(kernels, "_MIN_NUMEL", 1)  # the loops' route for this small input
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 6, 5, 4, generator=g, dtype=torch.float64) + 0.5
    v = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    w0 = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    if route == "instance-first":
        ours = lambda x, w: NF.instance_norm(x, weight=w, training=True)  # noqa: E731
        theirs = lambda x, w: F.instance_norm(x, weight=w)  # noqa: E731
        routes: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        spied = _fast.InstanceNormTrain
    else:
        x0 = x0.contiguous(memory_format=torch.channels_last)
        ours = lambda x, w: NF.group_norm(x, 3, w)  # noqa: E731
        theirs = lambda x, w: F.group_norm(x.contiguous(), 3, w)  # noqa: E731
        routes = accelerator_routes()
        spied = _fast.ChannelsLastGroupNorm
    calls: list[int] = []
    apply = spied.apply
    monkeypatch.setattr(spied, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    results = []
    with routes:
        for fn in (ours, theirs):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            loss = (fn(x, w) ** 3).sum()
            gx, gw = torch.autograd.grad(loss, (x, w), create_graph=True)
            hvp = torch.autograd.grad((gx * v).sum() + gw.sum(), (x, w))
            results.append((gx, gw, *hvp))
    # InstanceNormTrain serves channels-first input where the loops do
    used = route == "groups-last" or loops == "loops"
    assert bool(calls) == used, f"{spied.__name__} was {'not ' if used else ''}used"
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_channels_last_group_norm_route_only_where_it_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Accelerators only (the CPU keeps its own routes), channels-last full-precision input with
    parameters of its dtype, large enough, eager and outside forward-mode AD."""
    from normlab.functional._core import accelerator_routes

    usable = _fast.channels_last_groups_usable
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    w = torch.ones(4)
    monkeypatch.setattr(_fast, "_MIN_BYTES_CL_GROUPS", x.numel() * 4 + 4)
    with accelerator_routes():
        assert not usable(x, w, None)  # below the size where the route pays off
    monkeypatch.setattr(_fast, "_MIN_BYTES_CL_GROUPS", x.numel() * 4)
    assert not usable(x, w, None)  # the CPU
    with accelerator_routes():
        assert usable(x, w, None)
        assert not usable(x.contiguous(), w, None)  # channels-first: torch's kernel
        assert not usable(x.half(), w, None)  # low precision: computed in float32 elsewhere
        assert not usable(x, w.double(), None)
        with torch.autograd.forward_ad.dual_level():
            assert not usable(x, w, None)
        with monkeypatch.context() as tracing:  # torch.jit.trace itself warns (deprecated)
            tracing.setattr(torch.jit, "is_tracing", lambda: True)
            assert not usable(x, w, None)


@pytest.mark.torch_routes
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("into", [False, True], ids=["new", "out"])
def test_channels_last_output_from_given_statistics(affine: bool, into: bool) -> None:
    """Batch renorm's output pass on channels-last input (a multiply-add along the channels, not
    the eval kernel): as accurate as the kernel against float64, off-centre too, layout kept,
    into ``out`` or a new tensor; channels-first input keeps the kernel (identical result)."""
    x64 = _x((6, 5, 9, 7), seed=3) + 20.0
    g = torch.Generator().manual_seed(4)
    w64 = torch.rand(5, generator=g, dtype=torch.float64) + 0.5 if affine else None
    b64 = torch.randn(5, generator=g, dtype=torch.float64) if affine else None
    mean, var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    oracle = F.batch_norm(x64, mean, var, w64, b64, False, 0.0, 1e-5)
    x = x64.float().contiguous(memory_format=torch.channels_last)
    w, b = (None if t is None else t.float() for t in (w64, b64))
    out = torch.empty_like(x) if into else None
    y = _fast.normalize_given(x, w, b, mean, var, 1e-5, out)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert out is None or y is out
    kernel = F.batch_norm(x, mean.float(), var.float(), w, b, False, 0.0, 1e-5)
    assert _rel(y, oracle) <= 2 * _rel(kernel, oracle) + 1e-7
    first = x.contiguous()
    torch.testing.assert_close(
        _fast.normalize_given(first, w, b, mean, var, 1e-5), kernel.contiguous(), rtol=0, atol=0
    )
