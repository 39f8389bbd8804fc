"""The fast extra's numba loops (functional/_kernels.py) against float64 oracles, and the layers'
routes through them. Skipped without numba (the torch routes are tested in test_fast.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import normlab.functional as NF
from normlab.functional import _fast, lp_norm
from normlab.functional import _kernels as kernels

pytest.importorskip("numba")
if not kernels.available():  # NORMLAB_NUMBA=0 in the environment
    pytest.skip("numba switched off", allow_module_level=True)

# layouts the loops read: channels-first rows (one block, several blocks with a remainder),
# channels-last 4-D / 5-D, and an (N, C) matrix over several row blocks with a remainder
LAYOUTS = {
    "nchw": ((8, 5, 33, 31), None),
    "long-rows": ((2, 3, 3 * kernels._BLOCK + 7), None),
    "nhwc": ((8, 5, 33, 31), torch.channels_last),
    "ndhwc": ((4, 6, 9, 10, 11), torch.channels_last_3d),
    "nc": ((3 * kernels._block_rows(40, 4) + 5, 40), None),
}
OFFSETS = (0.0, 1e4)  # centred, and far off-centre (exactly centred loops: no cancellation)


def _data(layout: str, offset: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(x, dy)`` of the layout, channels of different scale and ``offset`` std off
    zero."""
    shape, fmt = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[1], generator=g, dtype=torch.float64) * 3 + 0.1
    view = (1, -1, *([1] * (len(shape) - 2)))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale.view(view)
    x = x + offset * scale.view(view)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return x.float(), dy.float()


def _layout_format(x: torch.Tensor) -> torch.memory_format:
    for fmt in (torch.channels_last, torch.channels_last_3d):
        rank = 4 if fmt == torch.channels_last else 5
        if x.dim() == rank and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _view(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))


# float32 partial sums of at most 256 values per accumulator (blocks combined in float64): random
# rounding ~ sqrt(256) * eps = 1e-6 relative to the sum of |terms|; twice that as the bound
F32_REL = 2e-6


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("offset", OFFSETS)
def test_moments_against_float64(layout: str, offset: float) -> None:
    """Mean and biased variance of the float32 data against float64 of the same values; the
    corrected two-pass blocks keep the variance accurate however far off-centre."""
    x, _ = _data(layout, offset)
    assert kernels.usable(x)
    ref = x.double()
    mean, var = kernels.moments(x)
    ref_var = ref.var(_dims(x), unbiased=False)
    assert mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(
        mean, ref.mean(_dims(x)), rtol=1e-7, atol=1e-6 * ref_var.sqrt().max()
    )
    assert (var / ref_var - 1).abs().max().item() <= F32_REL
    _m64, v64 = kernels.moments(ref)  # float64 data: float64 all the way
    torch.testing.assert_close(v64, ref_var, rtol=1e-10, atol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("offset", OFFSETS)
def test_gradient_sums_and_input_gradient_against_float64(layout: str, offset: float) -> None:
    x, dy = _data(layout, offset)
    ref, gref = x.double(), dy.double()
    mean = ref.mean(_dims(x))
    mu = mean.float().double()  # the centre the kernel sees
    dz, d, signs = kernels.grad_sums(dy, x, mean, signs=True)
    z = ref - _view(x, mu)
    for got, want in ((dz, (gref * z).sum(_dims(x))), (d, gref.sum(_dims(x)))):
        assert (got - want).abs().max() <= F32_REL * (gref.abs() * z.abs()).sum(_dims(x)).max()
    torch.testing.assert_close(signs, z.sign().sum(_dims(x)), rtol=0, atol=0)
    assert kernels.grad_sums(dy, x, mean)[1].equal(d)
    g = torch.Generator().manual_seed(1)
    a, b, k = torch.randn(3, x.shape[1], generator=g, dtype=torch.float64)
    out = kernels.input_grad(dy, x, mean, a, b, k)
    assert out.stride() == x.stride()
    # centred: the error scales with |x - mean|, not |x| (a few float32 ulps of each term)
    want = _view(x, a) * gref + _view(x, b) * z + _view(x, k)
    scale = (_view(x, a.abs()) * gref.abs() + _view(x, b.abs()) * z.abs() + _view(x, k.abs())).max()
    assert (out.double() - want).abs().max() <= 4e-7 * scale
    signed = kernels.input_grad(dy, x, mean, a, b, k, signs=True)
    want = _view(x, a) * gref + _view(x, b) * z.sign() + _view(x, k)
    assert (signed.double() - want).abs().max() <= 4e-7 * (scale + 1)
    # into a slice of a bigger output along the batch (ghost batch norm's per-group route)
    whole = torch.full((2 * x.shape[0], *x.shape[1:]), float("nan"))
    whole = whole.contiguous(memory_format=_layout_format(x))
    half = whole[: x.shape[0]]
    if kernels.usable(x, dy, half):
        kernels.input_grad(dy, x, mean, a, b, k, out=half)
        torch.testing.assert_close(half, out, rtol=0, atol=0)
        assert whole[x.shape[0] :].isnan().all()  # nothing written past the slice
    dev, sign_sums = kernels.abs_deviation_sums(x, mean, signs=True)
    want = z.abs().sum(_dims(x))
    assert ((dev - want).abs() / want).max() <= F32_REL
    assert torch.equal(kernels.abs_deviation_sums(x, mean)[0], dev)  # the same without signs
    assert kernels.abs_deviation_sums(x, mean)[1] is None
    if layout in ("nhwc", "ndhwc", "nc"):
        # the signs counted in the same read; with mean=None the plain sums (relative to sum |x|)
        assert sign_sums is not None
        torch.testing.assert_close(sign_sums, z.sign().sum(_dims(x)), rtol=0, atol=0)
        sums = kernels.abs_deviation_sums(x, None)[0]
        want = x.double().sum(_dims(x))
        assert ((sums - want).abs() / x.double().abs().sum(_dims(x))).max() <= F32_REL
    else:
        assert sign_sums is None


def test_moments_of_samples_far_from_the_shift() -> None:
    """Channels-first moments sum ``x - shift`` and its square in one read, the shift being the
    mean of the channel's first block in sample 0; a row whose mean lies more than one std from
    it is summed again by the corrected two-pass. Samples 10^4 std (and 5 std, and a constant
    row 3 std) away from sample 0 keep float32-rounding accuracy: a one-pass sum there would
    lose 10^8 * 1e-7 -- every digit of the variance."""
    x64 = torch.randn(6, 4, 1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x64[1] += 1e4
    x64[2] -= 5.0
    x64[3] = 3.0  # a constant row off the shift
    x64[4] = x64[4] * 1e-3 + 0.5  # a narrow row half a std... of the channel, 500 of its own
    x = x64.float()
    ref = x.double()
    mean, var = kernels.moments(x)
    ref_var = ref.var(_dims(x), unbiased=False)
    torch.testing.assert_close(mean, ref.mean(_dims(x)), rtol=1e-7, atol=0)
    assert (var / ref_var - 1).abs().max().item() <= F32_REL


def test_which_rows_take_the_two_pass() -> None:
    """The one-pass sums serve rows whose mean lies within one std of the shift; the others are
    summed again by the two-pass (which writes its block mean into the row's ``guesses`` slot,
    NaN beforehand). Rows 0.5 std off: one pass; 1.5 and 20 std: the two-pass -- accuracy checks
    alone cannot tell (a 3-std threshold loses ~10x 1e-8, inside float32's tolerance)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, 3000, generator=g, dtype=torch.float64)
    x[1] += 0.5
    x[2] += 1.5
    x[3] += 20.0
    rows = kernels._rows(x.float())
    shifts, guesses = kernels._scratch(4, 2, rows.dtype)
    guesses[:] = float("nan")
    mean, m2 = (torch.empty(8, dtype=torch.float64).numpy() for _ in range(2))
    kernels._call("_rows_moments", rows, 2, kernels._BLOCK, shifts, guesses, mean, m2)
    two_pass = ~torch.from_numpy(guesses).isnan().view(4, 2)
    assert two_pass.all(1).tolist() == [False, False, True, True]


def test_overflowing_squares_take_the_two_pass() -> None:
    """Sample 0 (which sets the shift) 5e17 from the others: their float32 squares about the
    shift overflow to inf, which must not pass the one-std test (torch's kernel overflows there
    too, so an inf would cost the layer its output)."""
    x = torch.randn(8, 2, 64, 64, generator=torch.Generator().manual_seed(6))
    x[0] += 5e17
    ref = x.double().var(_dims(x), unbiased=False)
    var = kernels.moments(x)[1]
    assert var.isfinite().all()
    assert (var / ref - 1).abs().max().item() <= F32_REL
    out = torch.empty_like(x)
    finite, _, _, fused_var, *_ = kernels.batch_norm_forward(x, None, None, 1e-5, out)
    assert finite
    torch.testing.assert_close(fused_var, var, rtol=1e-12, atol=0)


def test_batch_norm_forward_against_float64() -> None:
    """The fused forward (moments, then ``(x - mean) * scale + bias``): statistics as
    :func:`moments`, the output within a few float32 ulps of its float64 value (centred: no
    rounding at ``|mean| * scale``, far off-centre either), a constant channel exactly ``bias``."""
    for layout, offset in (("nchw", 0.0), ("nchw", 1e4), ("long-rows", 3.0)):
        x, _ = _data(layout, offset)
        x[:, 1] = 7.0
        c = x.shape[1]
        g = torch.Generator().manual_seed(4)
        w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
        for weight, bias in ((w, b), (None, None)):
            out = torch.empty_like(x)
            finite, updated, mean, var, save_mean, save_invstd = kernels.batch_norm_forward(
                x, weight, bias, 1e-5, out
            )
            assert finite
            assert not updated
            m, v = kernels.moments(x)
            torch.testing.assert_close(mean, m, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(var, v, rtol=1e-12, atol=1e-12)
            assert save_mean.dtype == save_invstd.dtype == x.dtype
            assert save_mean.equal(mean.float())
            assert save_invstd.equal(torch.rsqrt(var + 1e-5).float())
            w64 = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
            b64 = torch.zeros(c, dtype=torch.float64) if bias is None else bias.double()
            want = F.batch_norm(x.double(), mean, var, w64, b64, False, 0.0, 1e-5)
            err = (out.double() - want).abs().max().item()
            assert err <= 4 * 2**-24 * (want.abs().max().item() + 1), (layout, err)
            assert out[:, 1].equal(torch.full_like(out[:, 1], float(b64[1])))
    with pytest.raises(
        ValueError, match=r"weight must be None or a \(3,\) tensor .* got shape \(1,\)"
    ):
        kernels.batch_norm_forward(x, torch.ones(1), None, 1e-5, torch.empty_like(x))
    x, _ = _data("nhwc", 0.0)
    with pytest.raises(ValueError, match=r"batch_norm_forward: x must be a channels-first"):
        kernels.batch_norm_forward(x, None, None, 1e-5, torch.empty_like(x))


def test_batch_norm_forward_moves_the_running_statistics() -> None:
    """With ``running`` the fused forward's loop moves the buffers by torch's rule from the batch
    statistics it returns (the variance times n / (n - 1); float64 math, then one rounding to
    the buffers' dtype), moves their version counters and says so; a NaN in the batch leaves
    them as they were; buffers it cannot write are refused with a message."""
    x, _ = _data("nchw", 3.0)
    c = x.shape[1]
    count = x.numel() // c
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float64):
        rm, rv = torch.randn(c, generator=g).to(dtype), torch.rand(c, generator=g).to(dtype) + 0.5
        old_mean, old_var, versions = rm.clone(), rv.clone(), (rm._version, rv._version)
        finite, updated, mean, var, *_ = kernels.batch_norm_forward(
            x, None, None, 1e-5, torch.empty_like(x), (rm, rv, 0.3, count / (count - 1))
        )
        assert finite
        assert updated
        assert (rm._version, rv._version) == (versions[0] + 1, versions[1] + 1)
        want_mean = 0.7 * old_mean.double() + 0.3 * mean
        want_var = 0.7 * old_var.double() + 0.3 * count / (count - 1) * var
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(rm.double(), want_mean, rtol=2 * ulp, atol=2 * ulp)
        torch.testing.assert_close(rv.double(), want_var, rtol=2 * ulp, atol=0)
        # bit for bit what the route without the loop stores (no fused multiply-add)
        NF.update_running_stats_(old_mean, old_var, mean, var, count, 0.3)
        assert torch.equal(rm, old_mean)
        assert torch.equal(rv, old_var)
    bad = x.clone()
    bad[0, 1, 0, 0] = float("nan")
    rm, rv = torch.zeros(c), torch.ones(c)
    finite, updated, *_ = kernels.batch_norm_forward(
        bad, None, None, 1e-5, torch.empty_like(x), (rm, rv, 0.1, 1.0)
    )
    assert not finite
    assert not updated
    assert rm.equal(torch.zeros(c))
    assert rv.equal(torch.ones(c))
    with pytest.raises(
        ValueError, match=r"running_var must be a \(5,\) tensor .* got shape \(2,\)"
    ):
        kernels.batch_norm_forward(x, None, None, 1e-5, torch.empty_like(x), (rm, rv[:2], 0.1, 1.0))
    with pytest.raises(ValueError, match=r"running must be 1-D CPU float32/float64 buffers"):
        kernels.batch_norm_forward(
            x, None, None, 1e-5, torch.empty_like(x), (rm, rv.requires_grad_(), 0.1, 1.0)
        )


def _tails_order(monkeypatch: pytest.MonkeyPatch, rowwise: bool) -> None:
    """Make ``group_tails`` read every group row after row (``rowwise``) or down the channels,
    whatever the tensor's size (``_TAIL_ROWWISE_BYTES``)."""
    monkeypatch.setattr(kernels, "_TAIL_ROWWISE_BYTES", 0 if rowwise else 1 << 62)


def _tails_oracle(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Per-channel float64 sums and the k largest group maxima and smallest group minima (groups
    of ``_TAIL_ROWS`` rows, the last may be partial), by torch's reductions."""
    groups = rows.split(kernels._TAIL_ROWS)
    hi = torch.stack([g.amax(0) for g in groups])
    lo = torch.stack([g.amin(0) for g in groups])
    kk = min(k, hi.shape[0])
    return rows.double().sum(0), hi.topk(kk, 0).values, lo.topk(kk, 0, largest=False).values


@pytest.mark.parametrize("shape", [(64, 8, 32, 32), (64 * 1024 + 5, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 10])  # (with k near the number of groups the lists cannot
# cover them: test_tail_deviations_against_a_full_sort reads those superblocks back)
@pytest.mark.parametrize("rowwise", [False, True], ids=["down-channels", "in-rows"])
def test_group_tails_against_torch(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    k: int,
    rowwise: bool,
) -> None:
    """L-infinity batch norm's one read: the sums to float rounding; where the superblocks'
    third values rule out every group left out of the lists (most channels of Gaussian data
    with 128 superblocks or more), the lists are exactly the k largest group maxima and smallest
    group minima, with their groups' ids (the last group partial for the (N, C) shape); groups
    read down the channels or row after row (``_TAIL_ROWWISE_BYTES``)."""
    _tails_order(monkeypatch, rowwise)
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3).to(dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x[0, 1].view(-1)[0] = 50.0  # a lone extreme in the first row of a group
    rows = torch.from_numpy(kernels._rows(x))
    sums, (hv, hg, lv, _, third_hi, third_lo) = kernels.group_tails(x, k)
    want_sums, want_hi, want_lo = _tails_oracle(rows, k)
    assert sums.dtype == torch.float64
    bound = (F32_REL if dtype == torch.float32 else 1e-14) * x.double().abs().sum(_dims(x))
    assert ((sums - want_sums).abs() <= bound).all()
    hi, lo = torch.from_numpy(hv), torch.from_numpy(lv)  # the chunks' lists merged
    covered = (torch.from_numpy(third_hi) <= hi[-1]).all(0) & (
        torch.from_numpy(third_lo) >= lo[-1]
    ).all(0)
    assert covered.float().mean() >= 0.5
    assert torch.equal(hi[:, covered], want_hi[:, covered])
    assert torch.equal(lo[:, covered], want_lo[:, covered])
    groups = rows.split(kernels._TAIL_ROWS)
    ids = torch.from_numpy(hg).long()
    for j in torch.nonzero(covered).flatten().tolist():
        maxima = torch.stack([groups[g][:, j].max() for g in ids[:, j].tolist()])
        assert torch.equal(maxima, hi[:, j])


@pytest.mark.parametrize("layout", ["nhwc", "ndhwc", "nc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("data", ["gaussian", "sorted", "ties", "far off-centre"])
@pytest.mark.parametrize("k", [1, 10, 300])
@pytest.mark.parametrize("threads", [1, 2])
def test_tail_deviations_against_a_full_sort(
    layout: str, dtype: torch.dtype, data: str, k: int, threads: int
) -> None:
    """The k largest |x - center| per channel (sorted), their storage offsets and signs: equal
    to a top-k over every value of the channel -- on Gaussian data (the lists suffice), on rows
    sorted along the batch (many superblocks hold more than two of the largest groups: read
    back whole), with ties, far off-centre, with k above the number of groups, on two
    threads (two chunks of lists)."""
    x = _data(layout, 1e3 if data == "far off-centre" else 0.0)[0].to(dtype)
    rows = torch.from_numpy(kernels._rows(x))  # a view of x's storage
    if data == "sorted":
        rows.copy_(rows.sort(0).values)
    elif data == "ties":
        rows.copy_((rows * 2).round())
    center = rows.double().mean(0).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        _, tails = kernels.group_tails(x, k)
        values, offsets, signs = kernels.tail_deviations(x, center, tails, k)
    finally:
        torch.set_num_threads(before)
    dev = rows - center
    want = dev.abs().topk(k, dim=0)
    assert torch.equal(values, want.values.t())
    c = x.shape[1]
    assert torch.equal(offsets % c, torch.arange(c).view(c, 1).expand(c, k))
    assert all(len(set(row.tolist())) == k for row in offsets)
    picked = dev.flatten()[offsets]  # rows are x's storage in order
    assert torch.equal(picked.abs(), values)
    assert torch.equal(picked.sign(), signs)


@pytest.mark.parametrize("layout", ["nhwc", "ndhwc", "nc", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("data", ["gaussian", "sorted", "ties", "far off-centre", "nan"])
@pytest.mark.parametrize("threads", [1, 2])
def test_tails_read_in_rows_as_down_the_channels(
    monkeypatch: pytest.MonkeyPatch, layout: str, dtype: torch.dtype, data: str, threads: int
) -> None:
    """Large tensors read each group row after row (``_TAIL_ROWWISE_BYTES``), small ones down
    the channels: the same lists, group ids, superblock bounds and search results, and sums
    within float rounding of float64 (tested against torch above for the channel order) -- with
    NaN in groups' first and later rows too ("wide": 72 channels, past the vectorised loop's
    64-channel body, and a partial last group)."""
    if layout == "wide":
        g = torch.Generator().manual_seed(8)
        x = (torch.randn(1029, 72, generator=g, dtype=torch.float64) * 1.5 + 0.2).float()
    else:
        x = _data(layout, 0.2)[0]
    x = (x + (1e3 if data == "far off-centre" else 0.0)).to(dtype)
    rows = torch.from_numpy(kernels._rows(x))
    if data == "sorted":
        rows.copy_(rows.sort(0).values)
    elif data == "ties":
        rows.copy_((rows * 2).round())
    elif data == "nan":
        pick = torch.rand(rows.shape, generator=torch.Generator().manual_seed(4)) < 0.01
        pick[:: kernels._TAIL_ROWS * 3] = True  # whole first rows of some groups
        rows[pick] = float("nan")
    center = rows.double().nanmean(0).to(dtype)
    before = torch.get_num_threads()
    results = []
    try:
        torch.set_num_threads(threads)
        for rowwise in (False, True):
            _tails_order(monkeypatch, rowwise)
            sums, tails = kernels.group_tails(x, 10)
            found = kernels.tail_deviations(x, center, tails, 10)
            results.append((sums, [torch.from_numpy(t) for t in tails], found))
    finally:
        torch.set_num_threads(before)
    (sums_c, tails_c, found_c), (sums_r, tails_r, found_r) = results
    for one, two in zip([*tails_c, *found_c], [*tails_r, *found_r], strict=True):
        torch.testing.assert_close(one, two, rtol=0, atol=0, equal_nan=True)
    want = rows.double().sum(0)
    bound = (F32_REL if dtype == torch.float32 else 1e-14) * rows.double().abs().sum(0)
    for sums in (sums_c, sums_r):
        assert ((sums - want).abs() <= bound)[~want.isnan()].all()
        assert torch.equal(sums.isnan(), want.isnan())


def test_group_tails_read_in_rows_from_the_size_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """``group_tails`` reads row after row from ``_TAIL_ROWWISE_BYTES`` bytes up, down the
    channels below."""
    x = _data("nhwc", 0.0)[0]
    nbytes = x.numel() * x.element_size()
    seen: list[bool] = []
    call = kernels._call

    def spy(name: str, *args: object) -> object:
        if name == "_cl_tails":
            seen.append(bool(args[2]))
        return call(name, *args)

    monkeypatch.setattr(kernels, "_call", spy)
    for threshold in (nbytes, nbytes + 1):
        monkeypatch.setattr(kernels, "_TAIL_ROWWISE_BYTES", threshold)
        kernels.group_tails(x, 3)
    assert seen == [True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rowwise", [False, True], ids=["down-channels", "in-rows"])
def test_tails_do_not_depend_on_the_thread_count(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, rowwise: bool
) -> None:
    """The read's chunks are fixed by the size alone: on tied data (which of equal values the
    search keeps decides L-infinity's input gradient) and in float64 (the sums' last bits) one
    thread and two give the same sums, values, offsets and signs (either order of the read)."""
    _tails_order(monkeypatch, rowwise)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 8, 16, 16, generator=g, dtype=dtype) * 2).round()
    x = x.contiguous(memory_format=torch.channels_last)
    center = torch.from_numpy(kernels._rows(x)).double().mean(0).to(dtype)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            sums, tails = kernels.group_tails(x, 10)
            results.append((sums, *kernels.tail_deviations(x, center, tails, 10)))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("share", [1e-4, 1e-2, 1.0])
@pytest.mark.parametrize("rowwise", [False, True], ids=["down-channels", "in-rows"])
def test_tail_deviations_with_nan_give_real_offsets(
    monkeypatch: pytest.MonkeyPatch, share: float, rowwise: bool
) -> None:
    """NaN never enters the lists: with NaN in the data (a few, or every value) the search still
    returns k distinct offsets of the channel (the statistics are NaN; the layer then keeps its
    running statistics and warns), whichever order the read takes."""
    _tails_order(monkeypatch, rowwise)
    x = _data("nhwc", 0.0)[0]
    x[torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < share] = float("nan")
    x[0, 0, 0, 0] = float("nan")
    rows = torch.from_numpy(kernels._rows(x))
    center = rows.double().mean(0).float()
    _, tails = kernels.group_tails(x, 7)
    _, offsets, _ = kernels.tail_deviations(x, center, tails, 7)
    c = x.shape[1]
    assert torch.equal(offsets % c, torch.arange(c).view(c, 1).expand(c, 7))
    assert all(len(set(row.tolist())) == 7 for row in offsets)
    assert 0 <= int(offsets.min()) <= int(offsets.max()) < x.numel()


def test_linf_mean_of_many_rows_in_one_superblock_chunk_stays_exact() -> None:
    """Group sums accumulate in float64 whatever the row count (65537 rows, values ~1000:
    float32 accumulation would miss the mean by ~1e-2), a prime row count leaving a partial last
    group."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(65537, 2, generator=g) + torch.tensor([0.0, 1000.0])
    want = x.double().sum(0)
    sums = kernels.group_tails(x, 10)[0]
    # 16-row float32 partial sums: ~1e-9 relative here (a float32 accumulator: ~1e-5)
    assert ((sums - want).abs() / want.abs()).max() <= 1e-8
    mean, tails = lp_norm._mean_and_tails(x, 10)
    assert tails is not None
    torch.testing.assert_close(mean.double(), want / x.shape[0], rtol=1e-7, atol=0)


def test_tail_deviations_of_a_constant_channel() -> None:
    """Ties: a constant channel gives k zero deviations at k distinct rows, sign 0."""
    x = _data("nhwc", 0.0)[0]
    x[:, 2] = 1.5
    rows = torch.from_numpy(kernels._rows(x))
    center = rows.double().mean(0).float()
    _, tails = kernels.group_tails(x, 5)
    values, offsets, signs = kernels.tail_deviations(x, center, tails, 5)
    assert torch.equal(values[2], torch.zeros(5))
    assert torch.equal(signs[2], torch.zeros(5))
    assert len(set(offsets[2].tolist())) == 5
    assert (offsets[2] % x.shape[1] == 2).all()


def test_group_tails_and_tail_deviations_refuse_what_they_cannot_read() -> None:
    nchw = _data("nchw", 0.0)[0]
    with pytest.raises(ValueError, match=r"group_tails: x and k must be a channels-last"):
        kernels.group_tails(nchw, 3)
    x = _data("nhwc", 0.0)[0]
    with pytest.raises(ValueError, match=r"k 0\. Fix: use the torch route"):
        kernels.group_tails(x, 0)
    _, tails = kernels.group_tails(x, 3)
    center = torch.zeros(x.shape[1])
    with pytest.raises(ValueError, match=r"tails and k must be what group_tails\(x, 4\) returned"):
        kernels.tail_deviations(x, center, tails, 4)
    with pytest.raises(
        ValueError,
        match=r"center must be a \(5,\) tensor \(one value per channel\), got shape \(1,\)",
    ):
        kernels.tail_deviations(x, center[:1], tails, 3)


def _instance_oracle(
    x: torch.Tensor, w: torch.Tensor | None, dy: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """float64 autograd through the plain instance-norm formula: ``(dx, dw, db)``."""
    x = x.double().requires_grad_()
    wd = None if w is None else w.double().requires_grad_()
    spatial = list(range(2, x.dim()))
    mean = x.mean(spatial, keepdim=True)
    var = (x - mean).square().mean(spatial, keepdim=True)
    y = (x - mean) / torch.sqrt(var + 1e-5)
    if wd is not None:
        y = y * _view(x, wd)
    inputs = [x] if wd is None else [x, wd]
    grads = torch.autograd.grad(y, inputs, dy.double())
    return grads[0], (grads[1] if wd is not None else None), dy.double().sum((0, *spatial))


@pytest.mark.parametrize("layout", ["nchw", "long-rows"])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_backward_against_float64(layout: str, offset: float, affine: bool) -> None:
    """Per (sample, channel) row: the two sums, then the input gradient while the row is in
    cache -- as accurate as torch's float32 group-norm backward (factor 4) against float64, far
    off-centre too; the parameter gradients in float64."""
    x, dy = _data(layout, offset)
    n, c = x.shape[0], x.shape[1]
    w = torch.rand(c) + 0.5 if affine else None
    positions = x.numel() // (n * c)
    _, mean, rstd = torch.native_group_norm(x, w, None, n, c, positions, c, 1e-5)
    ours = kernels.instance_norm_backward(dy, x, mean, rstd, w, True)
    theirs = torch.ops.aten.native_group_norm_backward(
        dy, x, mean, rstd, w, n, c, positions, c, [True, affine, affine]
    )
    oracle = _instance_oracle(x, w, dy)
    assert ours[0] is not None
    assert ours[0].stride() == x.stride()
    for o, t, r in zip(ours, theirs, oracle, strict=True):
        if r is None:  # no weight: no weight gradient to check
            continue
        err = (o.double() - r).norm() / r.norm()
        # torch's kernel cannot give the bias gradient without a weight: float64 sums, ~1e-7
        bound = 1e-6 if t is None else 4 * (t.double() - r).norm() / r.norm() + 1e-7
        assert err <= bound, err
    dx_free = kernels.instance_norm_backward(dy, x, mean, rstd, w, False)
    assert dx_free[0] is None
    torch.testing.assert_close(dx_free[1:], ours[1:], rtol=0, atol=0)


def test_instance_norm_backward_refuses_other_layouts() -> None:
    x, dy = _data("nhwc", 0.0)
    n, c = x.shape[0], x.shape[1]
    stats = torch.zeros(n, c)
    with pytest.raises(ValueError, match=r"instance_norm_backward: x, mean and rstd must be a"):
        kernels.instance_norm_backward(dy, x, stats, stats, None, True)
    x, dy = _data("nchw", 0.0)
    with pytest.raises(ValueError, match=r"statistics of 3 and 40 values"):
        kernels.instance_norm_backward(dy, x, stats[:1, :3], torch.zeros(8, 5), None, True)
    good = torch.zeros(8, 5)
    with pytest.raises(
        ValueError,
        match=r"weight must be None or a \(5,\) tensor \(one value per channel\), got shape \(3,\)",
    ):
        kernels.instance_norm_backward(dy, x, good, good, torch.ones(3), True)


def test_two_threads_match_one() -> None:
    """The parallel loops (prange over rows / row blocks) give the serial results: each row or
    block is summed the same way on either."""
    before = torch.get_num_threads()
    for layout, dtype in (
        ("nchw", torch.float32),
        ("nchw", torch.float64),
        ("nhwc", torch.float32),
    ):
        x, dy = (t.to(dtype) for t in _data(layout, 0.5))
        if layout == "nchw":  # samples 1 and 2 far from the shift: the two-pass rows too
            x[1] += 100.0
            x[2] -= 1e4
        mean = x.double().mean(_dims(x))
        outs = [torch.empty_like(x) for _ in range(2)]
        results = []
        try:
            for threads, out in zip((1, 2), outs, strict=True):
                torch.set_num_threads(threads)
                result = [*kernels.moments(x), *kernels.grad_sums(dy, x, mean, signs=True)]
                if layout == "nchw":
                    result += kernels.batch_norm_forward(x, None, None, 1e-5, out)[2:]
                if layout == "nchw":
                    n, c = x.shape[0], x.shape[1]
                    stats = torch.native_group_norm(x, None, None, n, c, x[0, 0].numel(), c, 1e-5)
                    result += kernels.instance_norm_backward(dy, x, *stats[1:], None, True)
                elif dtype == torch.float32:
                    sums, tails = kernels.group_tails(x, 9)
                    result += [sums, *kernels.tail_deviations(x, mean, tails, 9)]
                results.append(result)
        finally:
            torch.set_num_threads(before)
        one, two = results
        if layout == "nchw":
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        for a, b in zip(one, two, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_usable_only_for_layouts_the_loops_read(monkeypatch: pytest.MonkeyPatch) -> None:
    x, dy = _data("nchw", 0.0)
    assert kernels.usable(x, dy, None)
    assert not kernels.usable(x, dy.contiguous(memory_format=torch.channels_last))
    # the loops read raw memory: a caller that skips usable() gets an error, not a wrong read
    mean = torch.zeros(x.shape[1])
    with pytest.raises(ValueError, match=r"_kernels: the tensors must be .* Fix: check kernels"):
        kernels.grad_sums(dy.contiguous(memory_format=torch.channels_last), x, mean)
    with pytest.raises(ValueError, match="strides"):
        kernels.input_grad(dy, x, mean, mean, mean, mean, out=torch.empty_like(x)[:, :, ::2])
    with pytest.raises(ValueError, match="float16"):
        kernels.moments(x.half())
    assert not kernels.usable(x, dy.double())
    assert not kernels.usable(x.half())
    assert not kernels.usable(x[:, :, ::2])  # strided
    assert not kernels.usable(x[:1, :1, :4])  # too small to pay off
    monkeypatch.setenv("NORMLAB_NUMBA", "0")
    kernels._numba.cache_clear()
    try:
        assert not kernels.available()
        assert not kernels.usable(x)
    finally:
        monkeypatch.delenv("NORMLAB_NUMBA")
        kernels._numba.cache_clear()
    assert kernels.available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nhwc", "nc"])
def test_sign_counts_with_ties_and_nan(layout: str, dtype: torch.dtype) -> None:
    """The channels-last read's sign count: values equal to the centre count 0, as sign() says
    (integers: exact); a NaN counts 0 too, while its channel's deviation sum comes out NaN."""
    x, _ = _data(layout, 0.0)
    x = (x * 2).round_().to(dtype)  # integers: many values equal the integer centres
    mean = torch.arange(x.shape[1], dtype=torch.float64) % 3 - 1.0
    x[1, 2].view(-1)[0] = float("nan")
    dev, counts = kernels.abs_deviation_sums(x, mean, signs=True)
    z = x.double() - _view(x, mean)
    want = z.sign().nan_to_num(0.0).sum(_dims(x))
    assert (z == 0).sum() > x.numel() // 20  # ties are common
    assert counts is not None
    torch.testing.assert_close(counts, want, rtol=0, atol=0)
    assert dev[2].isnan()
    assert dev[[0, 1, 3]].isfinite().all()


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
def test_non_finite_data_reach_every_sum(layout: str) -> None:
    """No fast-math assumption drops a NaN/Inf: in the loops' own results the channel holding it
    comes out non-finite, the others stay finite (the layers' finiteness policy takes over)."""
    x, dy = _data(layout, 0.0)
    x[3, 2].view(-1)[0] = float("nan")
    x[1, 4].view(-1)[0] = float("inf")
    mean = torch.zeros(x.shape[1], dtype=torch.float64)
    var = kernels.moments(x)[1]
    dz, _, signs = kernels.grad_sums(dy, x, mean, signs=True)
    dev = kernels.abs_deviation_sums(x, mean)[0]
    for t in (var, dz, dev):
        assert t[2].isnan()
        assert not t[4].isfinite()
        assert t[[0, 1, 3]].isfinite().all()
    assert signs[[0, 1, 3, 4]].isfinite().all()  # sign(inf) = 1; sign(nan) is nan
    if layout == "nchw":  # and the layers' route, which then asks torch's kernel
        assert not _fast._batch_moments(x)[1][2].isfinite()


@pytest.mark.parametrize("layout", ["nhwc", "nc"])
def test_channels_last_moments_on_tied_data(layout: str) -> None:
    """Integer-valued data (few distinct squares, as after rounding or ReLU): float32 sums of
    256 rows rounded the same way again and again (2.2e-6 relative error of the variance); sums
    of 32 rows, pooled in float64, stay below 1e-6 (measured 2.9e-7; Gaussian data 2e-8)."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(5):
        scale = torch.rand(16, generator=g, dtype=torch.float64) * 3 + 0.1
        x = (torch.randn(4096, 16, generator=g, dtype=torch.float64) * scale * 2).round()
        if layout == "nhwc":
            x = x.view(16, 16, 16, 16).permute(0, 3, 1, 2)  # channels-last storage
        ref = x.var(_dims(x), unbiased=False)
        var = kernels.moments(x.float())[1]
        worst = max(worst, float(((var - ref).abs() / ref).max()))
    assert worst <= 1e-6


def test_float64_far_off_centre_stays_exact() -> None:
    """float64 data 1e8 std off-centre: the centred sums keep ~1e-8 relative accuracy (float64
    rounding of values near 1e8, in the oracle too) where sums of raw values would lose every
    digit (1e16 * 2e-16 ~ 1)."""
    x, dy = (t.double() for t in _data("nchw", 0.0))
    x = x + 1e8
    ref = x.double()
    mean = ref.mean(_dims(x))
    dz, _ = kernels.grad_sums(dy, x, mean)
    want = (dy * (x - _view(x, mean))).sum(_dims(x))
    torch.testing.assert_close(dz, want, rtol=1e-7, atol=1e-7 * want.abs().max().item())
    torch.testing.assert_close(
        kernels.moments(x)[1], ref.var(_dims(x), unbiased=False), rtol=1e-7, atol=0
    )


def test_batched_backward_falls_back() -> None:
    """``is_grads_batched`` runs the backward under vmap (batched tensors the loops cannot read):
    the layers take torch's routes there, with the same result as one backward per vector."""
    layer = NF.batch_norm
    x = torch.randn(8, 16, 64, 64, requires_grad=True)
    assert _fast.use_fast_batch_stats(x)  # BatchNormTrain, whose backward asks for the loops
    y = layer(x, None, None, training=True)
    vectors = torch.randn(2, *x.shape)
    batched = torch.autograd.grad(y, x, vectors, is_grads_batched=True, retain_graph=True)[0]
    for i in range(2):
        one = torch.autograd.grad(y, x, vectors[i], retain_graph=True)[0]
        torch.testing.assert_close(batched[i], one, rtol=1e-4, atol=1e-5)


def test_serial_code_is_never_the_parallel_codes_cache(tmp_path: pytest.TempPathFactory) -> None:
    """numba's cache key ignores ``parallel``: only the serial loops are cached, so a process
    that ran the parallel loops first (two threads) and then one thread runs serial machine code
    -- in a fresh process with a fresh cache, and again with the cache warm."""
    script = (
        "import torch, numba\n"
        "from normlab.functional import _kernels as k\n"
        "x = torch.randn(64, 64, 8, 8)\n"
        "torch.set_num_threads(2); k.moments(x)\n"
        "torch.set_num_threads(1); k.moments(x)\n"
        "serial = k._compiled('_rows_moments', False)\n"
        "parallel = k._compiled('_rows_moments', True)\n"
        "hits = lambda d: sum(d.stats.cache_hits.values())\n"
        "print(hits(serial), hits(parallel))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "2"}
    runs = [
        subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    # cold: nothing loaded (the serial loop does not load the parallel one's code); warm: the
    # serial loop loads its own, the parallel one is never cached
    assert runs == [["0", "0"], ["1", "0"]]


def _outputs_and_grads(
    fn: Callable[..., torch.Tensor],
    dtype: torch.dtype,
    x32: torch.Tensor,
    w32: torch.Tensor,
    dy32: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """``fn(x, w, b)`` and its gradients wrt ``x``, ``w`` and a zero ``b`` at ``dy``, in
    ``dtype``."""
    x = x32.to(dtype).requires_grad_()
    w = w32.to(dtype).requires_grad_()
    b = torch.zeros_like(w, requires_grad=True)
    y = fn(x, w, b)
    return (y, *torch.autograd.grad(y, (x, w, b), dy32.to(dtype)))


class _Spy:
    """Records which kernels ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.calls: list[str] = []
        for name in names:
            original = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, self._wrap(name, original))

    def _wrap(self, name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def run(*args: object, **kwargs: object) -> object:
            self.calls.append(name)
            return fn(*args, **kwargs)

        return run


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_batch_norm_through_the_loops(
    monkeypatch: pytest.MonkeyPatch, layout: str, offset: float
) -> None:
    """Training-mode batch norm, forward and backward, against torch's in float64 on the same
    float32 input: as accurate as torch's own float32 result (factor 4), far off-centre too
    (channels-first through the loops; channels-last on torch's kernels with given moments)."""
    monkeypatch.setattr(_fast, "_MIN_NUMEL", 1 << 15)
    monkeypatch.setattr(_fast, "_MIN_ROW", 16)
    spy = _Spy(monkeypatch, "moments", "batch_norm_forward", "grad_sums", "input_grad")
    x32, dy32 = _data(layout, offset)
    w32 = torch.rand(x32.shape[1]) + 0.5

    def run(fn: Callable[..., torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return _outputs_and_grads(fn, dtype, x32, w32, dy32)

    def batch_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if layout == "nchw":
            return NF.batch_norm(x, None, None, w, b, training=True)
        # channels-last batch norm is torch's kernel; batch renorm's route (statistics first)
        # normalizes with BatchNormTrain
        moments = _fast.batch_moments(x)
        return _fast.BatchNormTrain.apply(x, w, b, 1e-5, *moments)[0]  # type: ignore[no-untyped-call]

    ours = run(batch_norm, torch.float32)
    # channels-last: torch's kernels, as fast as the loops there (see _fast._loops)
    assert spy.calls == (
        [] if layout == "nhwc" else ["batch_norm_forward", "grad_sums", "input_grad"]
    )
    theirs = run(lambda x, w, b: F.batch_norm(x, None, None, w, b, True), torch.float32)
    oracle = run(lambda x, w, b: F.batch_norm(x, None, None, w, b, True), torch.float64)
    assert ours[0].stride() == x32.stride()
    assert ours[1].stride() == x32.stride()
    for o, t, r in zip(ours, theirs, oracle, strict=True):
        err = (o.double() - r).norm() / r.norm()
        assert err <= 4 * (t.double() - r).norm() / r.norm() + 1e-6, err


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
@pytest.mark.parametrize("large", [False, True], ids=["in-cache", "from-memory"])
def test_l1_batch_norm_through_the_loops(
    monkeypatch: pytest.MonkeyPatch, layout: str, large: bool
) -> None:
    """The fused L1 function with the loops (absolute deviations, three gradient sums in one read,
    the input gradient in one pass; "from-memory": channels-last channel sums from the loop, as
    for large tensors of many channels) against autograd through the composite formula in float64."""
    if large:
        monkeypatch.setattr(lp_norm, "_LOOP_SUMS_BYTES", 0)
        monkeypatch.setattr(lp_norm, "_LOOP_SUMS_CHANNELS", 1)
    spy = _Spy(monkeypatch, "abs_deviation_sums", "grad_sums", "input_grad")
    x32, dy32 = _data(layout, 0.3)
    w32 = torch.rand(x32.shape[1]) + 0.5
    c = lp_norm.L1_CONSTANT

    def composite(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mu = x.mean(_dims(x))
        dev = (x - _view(x, mu)).abs().mean(_dims(x))
        return (x - _view(x, mu)) / _view(x, c * dev + 1e-5) * _view(x, w) + _view(x, b)

    def fused(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return lp_norm.L1BatchNormTrain.apply(x, w, b, 1e-5, c)[0]  # type: ignore[no-untyped-call]

    def run(fn: Callable[..., torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return _outputs_and_grads(fn, dtype, x32, w32, dy32)

    ours = run(fused, torch.float32)
    # channels-last: the plain sums from the loop (from memory), the signs counted in the
    # forward, the other two gradient sums from torch's kernel (an (N, C) matrix: the loop's)
    sums = ["abs_deviation_sums"] if large and layout != "nchw" else []
    backward = [] if layout == "nhwc" else ["grad_sums"]
    assert spy.calls == [*sums, "abs_deviation_sums", *backward, "input_grad"]
    oracle = run(composite, torch.float64)
    for o, r in zip(ours, oracle, strict=True):
        assert ((o.double() - r).norm() / r.norm()).item() <= 1e-5


@pytest.mark.parametrize(
    ("channels", "large", "loop"), [(64, True, True), (32, True, False), (64, False, False)]
)
def test_l1_channel_sums_from_the_loop_only_for_many_channels(
    monkeypatch: pytest.MonkeyPatch, channels: int, large: bool, loop: bool
) -> None:
    """L1's channel mean comes from the loop for large channels-last tensors of at least
    ``_LOOP_SUMS_CHANNELS`` channels (torch's reduction is faster for fewer), from torch's sum
    otherwise; equal to the float64 mean either way."""
    if large:
        monkeypatch.setattr(lp_norm, "_LOOP_SUMS_BYTES", 0)
    spy = _Spy(monkeypatch, "abs_deviation_sums")
    x = torch.randn(8, channels, 8, 8).contiguous(memory_format=torch.channels_last) + 2.0
    count = x.numel() // channels
    mean = lp_norm._channel_mean(x, count)
    assert spy.calls == (["abs_deviation_sums"] if loop else [])
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", ["nhwc", "nc"])
def test_linf_batch_norm_through_the_loops(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """The fused L-infinity function on channels-last storage with the loops (sums and the
    groups' tails in one read, then a few groups read back per channel) against autograd through the composite
    formula (a sort of every channel) in float64."""
    spy = _Spy(monkeypatch, "group_tails", "tail_deviations")
    x32, dy32 = _data(layout, 0.3)
    w32 = torch.rand(x32.shape[1]) + 0.5
    n = x32.numel() // x32.shape[1]

    def composite(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mu = x.mean(_dims(x))
        scale = lp_norm.lp_dispersion(x, mu, "inf", k=10)
        return (x - _view(x, mu)) / _view(x, scale + 1e-5) * _view(x, w) + _view(x, b)

    def fused(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        constant = lp_norm.linf_constant(n)
        return lp_norm.LinfBatchNormTrain.apply(x, w, b, 1e-5, constant, 10)[0]  # type: ignore[no-untyped-call]

    def run(fn: Callable[..., torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return _outputs_and_grads(fn, dtype, x32, w32, dy32)

    ours = run(fused, torch.float32)
    assert spy.calls == ["group_tails", "tail_deviations"]
    assert ours[0].stride() == x32.stride()
    oracle = run(composite, torch.float64)
    for o, r in zip(ours, oracle, strict=True):
        assert ((o.double() - r).norm() / r.norm()).item() <= 1e-5


@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_through_the_loops(monkeypatch: pytest.MonkeyPatch, affine: bool) -> None:
    """InstanceNorm2d on a channels-first tensor: the group-norm kernel forward and the fused
    per-row backward (only when a gradient is needed), against float64 autograd through the
    plain formula; gradcheck and gradgradcheck (double backward: torch's kernel) in float64."""
    import normlab.nn as nl

    spy = _Spy(monkeypatch, "instance_norm_backward")
    x32, dy32 = _data("nchw", 0.5)
    layer = nl.InstanceNorm2d(x32.shape[1], affine=affine).train()
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    x = x32.clone().requires_grad_()
    y = layer(x)
    params = list(layer.parameters())
    grads = torch.autograd.grad(y, [x, *params], dy32)
    assert spy.calls == ["instance_norm_backward"]
    oracle = _instance_oracle(x32, layer.weight if affine else None, dy32)
    for o, r in zip(grads, [oracle[0], *oracle[1:]] if affine else oracle[:1], strict=True):
        assert ((o.double() - r).norm() / r.norm()).item() <= 1e-5
    with torch.no_grad():  # no gradient needed: torch's kernel alone
        torch.testing.assert_close(layer(x32), y.detach(), rtol=0, atol=0)
    monkeypatch.setattr(kernels, "_MIN_NUMEL", 0)
    g = torch.Generator().manual_seed(5)
    small = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)

    def fused(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _fast.InstanceNormTrain.apply(x, w, b, 1e-5)[0]  # type: ignore[no-untyped-call]

    assert torch.autograd.gradcheck(fused, (small, w, b))
    assert torch.autograd.gradgradcheck(fused, (small, w, b))
    # a gradient for the bias alone, also in double backward (a gradient penalty behind a frozen
    # input and weight), with and without a weight
    for weight in (w.detach(), None):
        frozen = small.detach()
        y = _fast.InstanceNormTrain.apply(frozen, weight, b, 1e-5)[0]  # type: ignore[no-untyped-call]
        (grad_b,) = torch.autograd.grad(y.square().sum(), b, create_graph=True)
        want = (2 * y).sum((0, 2, 3))
        torch.testing.assert_close(grad_b, want)
        assert grad_b.requires_grad


def test_gradcheck_through_the_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 gradcheck of batch norm and L1 batch norm with every loop in the path."""
    monkeypatch.setattr(kernels, "_MIN_NUMEL", 0)
    monkeypatch.setattr(_fast, "_MIN_NUMEL", 0)
    monkeypatch.setattr(_fast, "_MIN_ROW", 2)
    spy = _Spy(monkeypatch, "batch_norm_forward", "grad_sums", "input_grad")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, 2, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()

    def bn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return NF.batch_norm(x, None, None, w, b, training=True)

    def l1(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return lp_norm.L1BatchNormTrain.apply(x, w, b, 1e-5, 1.0)[0]  # type: ignore[no-untyped-call]

    for fn in (bn, l1):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradcheck(
            fn, (x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(), w, b)
        )
    assert {"batch_norm_forward", "grad_sums", "input_grad"} <= set(spy.calls)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_ghost_batch_norm_through_the_loops(
    monkeypatch: pytest.MonkeyPatch, fmt: torch.memory_format
) -> None:
    """Ghost batch norm's per-virtual-batch backward writes each input gradient into its slice
    with the loops (channels-last: the lean route's, one row of coefficients per sample), on both
    layouts: float64 gradcheck with thresholds lowered."""
    from normlab.functional.batch_variants import ghost_batch_norm_unchecked

    monkeypatch.setattr(kernels, "_MIN_NUMEL", 0)
    monkeypatch.setattr(_fast, "_MIN_NUMEL", 1)
    monkeypatch.setattr(_fast, "_MIN_ROW", 1)
    spy = _Spy(monkeypatch, "input_grad", "ghost_backward")
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 3, 2, 3, generator=g, dtype=torch.float64) + 2).contiguous(
        memory_format=fmt
    )
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()

    def ghost(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ghost_batch_norm_unchecked(x, None, None, w, b, True, 0.1, 1e-5, 2, "test")

    assert torch.autograd.gradcheck(ghost, (x.requires_grad_(), w, b))
    assert set(spy.calls) == {"input_grad" if fmt == torch.contiguous_format else "ghost_backward"}


def test_concurrent_callers_share_the_parallel_loops_safely() -> None:
    """Two Python threads calling the parallel loops at once (numba's thread pool is not
    reentrant on every threading layer: the calls are serialised by a lock) get the serial
    results."""
    from concurrent.futures import ThreadPoolExecutor

    x, dy = _data("nchw", 0.5)
    mean = x.double().mean(_dims(x))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = kernels.grad_sums(dy, x, mean)
        torch.set_num_threads(2)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: kernels.grad_sums(dy, x, mean), range(16)))
    finally:
        torch.set_num_threads(before)
    for got in results:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_numba_failure_names_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """If numba cannot build a loop on some platform, the error says how to run without it."""
    import numba

    def broken(*_: object) -> None:
        raise numba.core.errors.TypingError("no implementation for this platform")

    monkeypatch.setattr(kernels, "_compiled", lambda *_: broken)
    x, _ = _data("nchw", 0.0)
    with pytest.raises(
        RuntimeError, match=r"_rows_moments must be successful, got TypingError.*NORMLAB_NUMBA=0"
    ):
        kernels.moments(x)


def test_plain_sums_refuse_channels_first_rows() -> None:
    x, _ = _data("nchw", 0.0)
    with pytest.raises(
        ValueError,
        match=r"abs_deviation_sums: mean must be a per-channel tensor for channels-first input "
        r"\(None: plain sums, channels-last only\), got None\. Fix: sum channels-first rows",
    ):
        kernels.abs_deviation_sums(x, None)
