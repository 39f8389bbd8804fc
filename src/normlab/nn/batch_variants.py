"""Batch-norm variants: batch renorm, ghost batch norm, noisy batch norm, mean-only batch norm."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from normlab._checks import (
    check_bool,
    check_min_float,
    check_momentum,
    check_positive_int,
    fail,
)
from normlab.functional import _rng, _triton
from normlab.functional._core import (
    channel_view_shape,
    channels_last_format,
    on_accelerator,
    store_if_finite_,
)
from normlab.functional.batch_norm import batch_norm_unchecked
from normlab.functional.batch_variants import batch_renorm_unchecked, ghost_batch_norm_unchecked
from normlab.nn._base import InputChecks, RunningStatsNorm, check_norm_args, is_traced

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm",
    "MeanOnlyBatchNorm",
    "NoisyBatchNorm",
]


# (1, 0): batch renorm's neutral limits (plain batch norm), one float64 tensor per device
_NEUTRAL_LIMITS: dict[torch.device, Tensor] = {}


def _neutral_limits(device: torch.device) -> Tensor:
    """The float64 tensor ``(1, 0)`` on ``device``: made once per device outside
    ``torch.compile`` (a copy from the host at every step would be a host sync on a GPU), a
    constant of the graph under it."""
    if torch.compiler.is_compiling():
        return torch.tensor([1.0, 0.0], dtype=torch.float64, device=device)
    neutral = _NEUTRAL_LIMITS.get(device)
    if neutral is None:
        neutral = _NEUTRAL_LIMITS[device] = torch.tensor(
            [1.0, 0.0], dtype=torch.float64, device=device
        )
    return neutral


def _check_nonnegative_int(value: object, *, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        fail(
            ValueError,
            owner,
            f"argument '{name}'",
            "an int >= 0",
            repr(value),
            f"pass a number of training steps, e.g. {name}=5000",
        )
    return value


class _BatchRenorm(InputChecks, nn.Module):
    """Batch renormalization (Ioffe, NeurIPS 2017): batch norm whose training output is corrected
    towards the running statistics, so training and inference agree even for small or non-i.i.d.
    batches.

    .. math:: \\hat x = \\frac{x - \\mu_B}{\\sigma_B} r + d, \\quad
              r = \\mathrm{clip}_{[1/r_{max}, r_{max}]}\\Big(\\frac{\\sigma_B}{\\sigma}\\Big), \\quad
              d = \\mathrm{clip}_{[-d_{max}, d_{max}]}\\Big(\\frac{\\mu_B - \\mu}{\\sigma}\\Big)

    ``y = weight * x_hat + bias``; ``sigma_B = sqrt(var_B + eps)`` (biased batch variance);
    ``r`` and ``d`` are constants for the gradient (``mu_B``, ``sigma_B`` get gradients); they
    use the running ``mu``, ``sigma`` before this step's update, which is
    ``mu += momentum * (mu_B - mu)``, ``sigma += momentum * (sigma_B - sigma)`` -- a moving
    average of the **standard deviation** as in the paper (buffer ``running_std``). Evaluation:
    ``weight * (x - mu) / sigma + bias``.

    **Schedule** (the paper's): ``r_max = 1``, ``d_max = 0`` (plain batch norm) for the first
    ``warmup_steps`` training steps, then linear ramps reaching ``r_max`` at step ``r_max_steps``
    and ``d_max`` at step ``d_max_steps``. Steps are counted by ``num_batches_tracked``; the
    schedule is the buffer ``renorm_schedule`` (``[r_max, d_max, warmup, r_max_steps,
    d_max_steps]``), so both travel with the ``state_dict``. ``warmup_steps=r_max_steps=
    d_max_steps=0`` gives fixed limits from the start.

    Args:
        num_features: ``C``.
        eps: added to the batch variance inside ``sigma_B``. Default: 1e-5.
        momentum: ``alpha``, weight of the new batch in the moving averages. Default: 0.01 (the
            paper's "relatively fast" updates).
        affine: learn ``weight`` and ``bias``. Default: ``True``.
        r_max, d_max: final clipping limits (>= 1 and >= 0). Defaults: 3 and 5 (the paper's).
        warmup_steps, r_max_steps, d_max_steps: the schedule. Defaults: 5000, 40000, 25000.
        device, dtype: where and in which dtype to create parameters and buffers.

    Raises:
        ValueError: ``r_max < 1``, ``d_max < 0``, a ramp that ends before the warm-up, and the
            batch-norm errors (dims, channels, one value per channel in training).

    Note:
        ``running_var`` (read-only) is ``running_std**2 - eps``, the variance the eval output
        uses, so torch tools and :func:`normlab.surgery.recompute_population_stats` (which
        writes through :meth:`set_running_stats_`) work with it.
    """

    running_mean: Tensor
    running_std: Tensor
    num_batches_tracked: Tensor
    renorm_schedule: Tensor
    track_running_stats = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features, self.eps, _, self.affine, _ = check_norm_args(
            owner, num_features, eps, momentum, affine, allow_none_momentum=False
        )
        self.momentum: float = float(momentum)
        check_min_float(
            r_max,
            name="r_max",
            owner=owner,
            minimum=1.0,
            meaning="r is clipped to [1/r_max, r_max]",
            fix="pass e.g. r_max=3.0; r_max=1 is plain batch norm",
        )
        check_min_float(
            d_max,
            name="d_max",
            owner=owner,
            minimum=0.0,
            meaning="d is clipped to [-d_max, d_max]",
            fix="pass e.g. d_max=5.0; d_max=0 is plain batch norm",
        )
        warmup = _check_nonnegative_int(warmup_steps, name="warmup_steps", owner=owner)
        for name, end in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
            _check_nonnegative_int(end, name=name, owner=owner)
            if end < warmup:
                fail(
                    ValueError,
                    owner,
                    f"argument '{name}'",
                    f">= warmup_steps={warmup} (the ramp starts after the warm-up)",
                    repr(end),
                    f"pass {name} >= {warmup}",
                )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_std", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        schedule = [
            float(r_max),
            float(d_max),
            float(warmup),
            float(r_max_steps),
            float(d_max_steps),
        ]
        self.register_buffer(
            "renorm_schedule", torch.tensor(schedule, dtype=torch.float64, device=device)
        )

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_std.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    @property
    def running_var(self) -> Tensor:
        """``running_std**2 - eps``: the variance the eval output normalizes with (read-only)."""
        return (self.running_std.square() - self.eps).clamp_min(0.0)

    def set_running_stats_(self, mean: Tensor, var: Tensor) -> None:
        """Store population statistics: ``running_mean = mean``, ``running_std = sqrt(var + eps)``."""
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_std.copy_(torch.sqrt(var.double() + self.eps))

    def current_limits(self) -> tuple[float, float] | tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` for the next training step, from the schedule (0-dim float64
        tensors under ``torch.compile``, where reading the buffers as numbers would be
        data-dependent guards that stop ``fullgraph=True`` compilation, and on accelerators,
        where it would be a host sync at every step)."""
        if torch.compiler.is_compiling() or on_accelerator(self.num_batches_tracked):
            r_max, d_max = self._traced_limits().unbind()
            return r_max, d_max
        r_max, d_max, warmup, r_end, d_end = self.renorm_schedule.tolist()
        t = float(self.num_batches_tracked)

        def ramp(final: float, neutral: float, end: float) -> float:
            if t < warmup:
                return neutral
            if end <= warmup:
                return float(final)
            return float(neutral + (final - neutral) * min(1.0, (t - warmup) / (end - warmup)))

        return ramp(r_max, 1.0, r_end), ramp(d_max, 0.0, d_end)

    def _traced_limits(self) -> Tensor:
        """:meth:`current_limits` as a ``(2,)`` float64 tensor, in six tensor ops (each a kernel
        launch on a GPU): the ramps' progress ``(t - warmup) / (end - warmup)`` clamped to
        ``[0, 1]`` -- a zero-length ramp divides by zero: ``0/0`` at its first step (the final
        limit) and ``+inf`` after it (1), ``-inf`` before it (0) -- then ``lerp`` from the neutral
        limits ``(1, 0)`` to the final ones."""
        schedule = self.renorm_schedule.double()
        fused = _triton.renorm_limits(schedule, self.num_batches_tracked)
        if fused is not None:  # one kernel
            return fused
        final, warmup, end = schedule[:2], schedule[2], schedule[3:]
        progress = ((self.num_batches_tracked - warmup) / (end - warmup)).nan_to_num_(1.0, 1.0, 0.0)
        return torch.lerp(_neutral_limits(schedule.device), final, progress.clamp_(0.0, 1.0))

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        r_max, d_max = self.current_limits()
        y = batch_renorm_unchecked(
            input,
            self.running_mean,
            self.running_std,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
            r_max,
            d_max,
            type(self).__name__,
        )
        if self.training:
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        r_max, d_max, warmup, r_end, d_end = self.renorm_schedule.tolist()
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"r_max={r_max}, d_max={d_max}, warmup_steps={int(warmup)}, "
            f"r_max_steps={int(r_end)}, d_max_steps={int(d_end)}"
        )


class BatchRenorm1d(_BatchRenorm):
    __doc__ = (
        (_BatchRenorm.__doc__ or "")
        + """
    Shape:
        ``(N, C)`` or ``(N, C, L)``.

    Example:
        >>> BatchRenorm1d(4)(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """
    )
    _ndims = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    __doc__ = (
        (_BatchRenorm.__doc__ or "")
        + """
    Shape:
        ``(N, C, H, W)``.

    Example:
        >>> BatchRenorm2d(4)(torch.randn(2, 4, 3, 3)).shape
        torch.Size([2, 4, 3, 3])
    """
    )
    _ndims = (4,)
    _layout = "(N, C, H, W)"


class BatchRenorm3d(_BatchRenorm):
    __doc__ = (
        (_BatchRenorm.__doc__ or "")
        + """
    Shape:
        ``(N, C, D, H, W)``.

    Example:
        >>> BatchRenorm3d(4)(torch.randn(2, 4, 2, 3, 3)).shape
        torch.Size([2, 4, 2, 3, 3])
    """
    )
    _ndims = (5,)
    _layout = "(N, C, D, H, W)"


class GhostBatchNorm(RunningStatsNorm, _TorchBatchNorm):
    """Ghost batch norm (Hoffer, Hubara & Soudry, NeurIPS 2017): batch statistics over *virtual*
    batches of ``virtual_batch_size`` samples inside each mini-batch.

    Training normalizes each virtual batch with its own mean and biased variance (a ragged
    remainder of >= 2 samples is a smaller virtual batch; a single leftover sample joins the
    previous one). Running statistics are updated once per step with the **whole** batch's
    statistics, exactly as ``BatchNorm`` with that batch would, so evaluation is plain batch norm
    with running statistics (unlike tf.keras' ``virtual_batch_size``, which also applied ghost
    batches at inference: tensorflow#23050). Subclasses torch's batch norm: ``isinstance``,
    ``update_bn``, fusion and population statistics treat it as a batch norm.

    Args:
        num_features: ``C``.
        virtual_batch_size: samples per virtual batch (>= 2).
        eps, momentum, affine, track_running_stats, device, dtype: as in ``BatchNorm``.

    Shape:
        ``(N, C, *)``, any number of trailing dims.

    Raises:
        ValueError: ``virtual_batch_size < 2``; a training batch smaller than
            ``virtual_batch_size``; the batch-norm errors.

    Example:
        >>> GhostBatchNorm(4, virtual_batch_size=8)(torch.randn(32, 4)).shape
        torch.Size([32, 4])
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        owner = type(self).__name__
        check_positive_int(virtual_batch_size, name="virtual_batch_size", owner=owner)
        if virtual_batch_size < 2:
            fail(
                ValueError,
                owner,
                "argument 'virtual_batch_size'",
                "at least 2 (statistics of one sample have zero variance)",
                repr(virtual_batch_size),
                "pass e.g. virtual_batch_size=32, or use InstanceNorm/LayerNorm for per-sample "
                "statistics",
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = int(virtual_batch_size)

    def _check_input_dim(self, input: Tensor) -> None:  # torch's forward (tracing) calls it
        pass

    def forward(self, input: Tensor) -> Tensor:
        if is_traced(input):
            return super().forward(input)
        self._check_input(input)
        return self._normalize_with(self._ghost, input)

    def _ghost(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        training: bool,
        momentum: float | Tensor,
        eps: float,
        owner: str,
    ) -> Tensor:
        return ghost_batch_norm_unchecked(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            self.virtual_batch_size,
            owner,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"  # type: ignore[no-untyped-call]


class NoisyBatchNorm(RunningStatsNorm, _TorchBatchNorm):
    """Batch norm followed by injected, time-varying covariate shift (Santurkar et al. 2018, §2.1).

    After the batch norm (and its affine map), in training, every activation ``a`` of every
    sample becomes ``s * a + m``. At each training step the layer draws ``mu_t ~ U(-0.5, 0.5)``
    and ``sigma_t ~ U(1, 1.25)``, then per sample and unit ``m ~ U(mu_t - 0.1, mu_t + 0.1)`` and
    ``s ~ N(sigma_t, 0.1)``: non-zero-mean, non-unit-variance noise whose distribution changes at
    every step -- the instrument of "batch norm helps even with covariate shift injected after
    it". ``per="element"`` (default) draws ``m``, ``s`` for every ``(c, *position)``,
    ``per="channel"`` once per channel. Evaluation applies no noise (``eval_noise=True`` keeps
    it). The noise comes from the layer's own generator (``seed``), so runs are reproducible (on
    an accelerator the activation-sized draws are made there, from a device generator that the
    layer's own seeds at each step: reproducible too, a different stream from the CPU's); set
    ``hold_noise = True`` to draw at the next call and reuse that noise in the calls after it
    (e.g. across the step sizes of a landscape probe) -- only then does the layer keep it.

    Args:
        num_features: ``C``.
        seed: seed of the layer's noise generator. Default: 0.
        per: ``"element"`` or ``"channel"``.
        mean_range, std_range: the ranges of ``mu_t`` and ``sigma_t``. Defaults: (-0.5, 0.5),
            (1.0, 1.25).
        mean_spread, std_spread: the half-width of ``m``'s uniform and the std of ``s``, >= 0.
            Defaults: 0.1 and 0.1.
        eval_noise: also inject noise in evaluation. Default: ``False``.
        eps, momentum, affine, track_running_stats, device, dtype: as in ``BatchNorm``.

    Example:
        >>> layer = NoisyBatchNorm(4, seed=1)
        >>> layer(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        seed: int = 0,
        per: str = "element",
        mean_range: tuple[float, float] = (-0.5, 0.5),
        std_range: tuple[float, float] = (1.0, 1.25),
        mean_spread: float = 0.1,
        std_spread: float = 0.1,
        eval_noise: bool = False,
    ) -> None:
        owner = type(self).__name__
        if per not in ("element", "channel"):
            fail(
                ValueError,
                owner,
                "argument 'per'",
                "'element' or 'channel'",
                repr(per),
                "pass per='element' (the default) or per='channel'",
            )
        for name, (low, high) in (("mean_range", mean_range), ("std_range", std_range)):
            if not low <= high:
                fail(
                    ValueError,
                    owner,
                    f"argument '{name}'",
                    "(low, high) with low <= high",
                    repr((low, high)),
                    f"pass e.g. {name}=(-0.5, 0.5)",
                )
        for name, spread in (("mean_spread", mean_spread), ("std_spread", std_spread)):
            if not spread >= 0:
                fail(
                    ValueError,
                    owner,
                    f"argument '{name}'",
                    "a number >= 0 (a half-width / a standard deviation)",
                    repr(spread),
                    f"pass e.g. {name}=0.1",
                )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.per = per
        self.mean_range, self.std_range = tuple(mean_range), tuple(std_range)
        self.mean_spread, self.std_spread = float(mean_spread), float(std_spread)
        self.eval_noise = check_bool(eval_noise, name="eval_noise", owner=owner)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.hold_noise = False
        self._noise: tuple[Tensor, Tensor] | None = None

    def _check_input_dim(self, input: Tensor) -> None:  # torch's forward (tracing) calls it
        pass

    def draw_noise(
        self,
        shape: torch.Size | tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
        channels_last: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """One step's ``(s, m)`` for activations of ``shape`` (advances the generator).

        ``channels_last``: per-element noise is drawn in that layout (the same random stream laid
        out channels-last), so applying it needs no layout conversion -- which costs torch ~10x
        a copy."""
        g = self.generator
        # the step's levels stay 0-dim float64 tensors (no .item()), so torch.compile can trace
        u_mu = _rng.rand((), g, dtype=torch.float64)
        u_sigma = _rng.rand((), g, dtype=torch.float64, after=u_mu)
        per_element = self.per == "element"
        noise_shape = tuple(shape) if per_element else (*shape[:2], *([1] * (len(shape) - 2)))
        stored, back = noise_shape, tuple(range(len(noise_shape)))
        if per_element and channels_last:
            stored = (noise_shape[0], *noise_shape[2:], noise_shape[1])  # (N, *spatial, C)
            back = (0, len(stored) - 1, *range(1, len(stored) - 1))
        (mu_lo, mu_hi), (sigma_lo, sigma_hi) = self.mean_range, self.std_range
        if torch.compiler.is_compiling():
            if on_accelerator(device):  # drawn there, as eagerly (below); from the CPU, 846x
                # BatchNorm2d's compiled forward on an H200 at 128x128x56x56
                u, z = _rng.uniform_normal(stored, g, device, after=u_sigma)
                u_m, z_s = u.permute(back), z.permute(back)
            else:
                u_m = _rng.rand(stored, g, after=u_sigma).permute(back)
                z_s = _rng.randn(stored, g, after=u_m).permute(back)
            # in the noise's dtype, as a Python float would be: a float64 0-dim operand would
            # send every elementwise op below down torch's ~5x slower mixed-dtype path
            mu_t = (mu_lo + (mu_hi - mu_lo) * u_mu).to(u_m.dtype)
            sigma_t = (sigma_lo + (sigma_hi - sigma_lo) * u_sigma).to(u_m.dtype)
            m = mu_t + self.mean_spread * (2 * u_m - 1)
            s = sigma_t + self.std_spread * z_s
        else:
            # The same draws from the same stream, scaled by torch's generator kernels in the
            # pass that writes them (torch.rand/randn are uniform_(0, 1)/normal_(0, 1)): the
            # random numbers, not arithmetic passes over them, are the cost that remains.
            mu = mu_lo + (mu_hi - mu_lo) * u_mu.item()
            sigma = sigma_lo + (sigma_hi - sigma_lo) * u_sigma.item()
            # Tensors of the noise's layout (not views: the forward writes its output over m in
            # place), filled through their contiguous view in the stored order: as _rng draws,
            # the same stream.
            fmt = torch.contiguous_format
            if per_element and channels_last:  # not stored != noise_shape: C == H == W
                fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            where, fill = torch.device("cpu"), g
            if on_accelerator(device):
                # On an accelerator the noise is drawn there (drawn here and copied over it
                # cost ~500x BatchNorm2d's forward on an H200), by a generator of that device
                # seeded from this layer's own at each step: reproducible, but not the CPU's
                # stream. A fresh generator per step: nothing device-bound is kept on the layer.
                where = torch.device(device)
                fill = _rng.device_generator(g, where)
            m, s = (
                torch.empty(noise_shape, dtype=torch.float32, device=where, memory_format=fmt)
                for _ in "ms"
            )
            order = tuple(back.index(d) for d in range(len(back)))  # noise dims -> stored dims
            m.permute(order).uniform_(mu - self.mean_spread, mu + self.mean_spread, generator=fill)
            s.permute(order).normal_(sigma, self.std_spread, generator=fill)
        return s.to(device=device, dtype=dtype), m.to(device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        if is_traced(input):
            return super().forward(input)
        self._check_input(input)
        y = self._normalize_with(batch_norm_unchecked, input)
        if not (self.training or self.eval_noise):
            return y
        if self.hold_noise and self._noise is not None and self._noise[0].shape[0] == y.shape[0]:
            s, m = self._noise
        else:
            last = channels_last_format(y) is not None
            s, m = self.draw_noise(y.shape, y.device, y.dtype, channels_last=last)
            # kept only while held: two activation-sized tensors per layer otherwise
            self._noise = (s, m) if self.hold_noise else None
            if not self.hold_noise and m.shape == y.shape:
                return m.addcmul_(s, y)  # the output written over m (in y's layout); saves only s
        return torch.addcmul(m, s, y)  # noise in y's layout: the output keeps it

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per={self.per!r}, seed={self.seed}"  # type: ignore[no-untyped-call]


class MeanOnlyBatchNorm(InputChecks, nn.Module):
    """Mean-only batch norm (Salimans & Kingma 2016), the companion of weight normalization:
    ``y = x - mu_B + bias`` in training (only the mean is normalized; the gradient is centred),
    ``y = x - running_mean + bias`` in evaluation, with torch's running-mean rule
    (``momentum`` = weight of the new batch).

    Example:
        >>> MeanOnlyBatchNorm(3)(torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]))
        tensor([[-1., -1., -1.],
                [ 1.,  1.,  1.]], grad_fn=<AddBackward0>)
    """

    running_mean: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        momentum: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_positive_int(num_features, name="num_features", owner=owner)
        check_momentum(momentum, owner=owner, allow_none=False)
        self.momentum: float = float(momentum)
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        shape = channel_view_shape(input.dim(), self.num_features)
        if self.training:
            dims = [0, *range(2, input.dim())]
            mean = input.mean(dims)
            with torch.no_grad():
                new = torch.lerp(
                    self.running_mean, mean.detach().to(self.running_mean.dtype), self.momentum
                )
                store_if_finite_(
                    ((self.running_mean, new),), mean.detach(), owner=type(self).__name__
                )
                self.num_batches_tracked.add_(1)
        else:
            mean = self.running_mean
        return input - mean.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}"
