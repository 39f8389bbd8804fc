"""Input standardization with statistics estimated on the training data only (the lecture's rule)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from normlab._batches import InputFn, iter_inputs
from normlab._checks import check_min_float, fail
from normlab.functional._core import Moments, keepdim_shape

__all__ = ["InputStandardizer"]


class InputStandardizer(nn.Module):
    """``y = (x - mean) / std`` with ``mean`` and ``std`` fitted once, on the training split.

    The lecture: "if you do these normalizations then you want to estimate them only on the
    training data set". :meth:`fit` streams over the training data once and stores the exact
    mean and (biased, like scikit-learn's ``StandardScaler`` and Keras' ``Normalization``) standard
    deviation as buffers, so they travel with the ``state_dict``; the module then works as the
    first layer of a model, identical in training and evaluation.

    Statistics are accumulated in float64 with Chan et al.'s parallel merge, so any batching of
    the same data gives the same result (to float64 rounding).

    Args:
        axis: the input dims that keep separate statistics; dim 0 (the batch) is always reduced.
            ``1`` (default): per feature for ``(N, F)``, per channel for ``(N, C, H, W)``;
            ``(1, 2, 3)``: per pixel; ``-1``: channels-last; ``None``: one scalar mean and std.
        std_floor: features are *constant* on the training data when their variance is within
            float64 rounding of 0 (scikit-learn's rule: ``var <= n*eps*var + (n*|mean|*eps)**2``)
            or their std is at most ``std_floor``; constant features are only centred (scale 1),
            never divided by ~0 -- no ``inf``/``nan``. Default 0.0 (scikit-learn's behaviour);
            raise it to leave near-constant features unscaled too.

    Shape:
        Input ``(N, *)`` of the rank seen by :meth:`fit`; output of the same shape (floating
        point; integer inputs such as ``uint8`` images give the default float dtype).

    Raises:
        ValueError: ``forward``/``inverse`` before ``fit``; a different rank or feature size than
            at fit time; empty or non-finite training data.

    Example:
        >>> s = InputStandardizer().fit(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        >>> s(torch.tensor([[2.0, 40.0]]))
        tensor([[0., 2.]])
        >>> s.inverse(s(torch.tensor([[2.0, 40.0]])))
        tensor([[ 2., 40.]])
    """

    count: Tensor
    mean: Tensor
    m2: Tensor

    def __init__(self, axis: int | Sequence[int] | None = 1, *, std_floor: float = 0.0) -> None:
        super().__init__()
        owner = type(self).__name__
        if axis is None:
            self.axis: tuple[int, ...] | None = None
        else:
            axes = (axis,) if isinstance(axis, int) else tuple(axis)
            if not axes or any(
                isinstance(a, bool) or not isinstance(a, int) or a == 0 for a in axes
            ):
                fail(
                    ValueError,
                    owner,
                    "argument 'axis'",
                    "None, or non-zero int dims (dim 0, the batch, is always reduced)",
                    repr(axis),
                    "pass axis=1 for per-feature/per-channel statistics, or axis=None for one scalar",
                )
            self.axis = axes
        self.std_floor = check_min_float(
            std_floor,
            name="std_floor",
            owner=owner,
            minimum=0.0,
            meaning="features with a smaller std are only centred",
            fix="pass std_floor=0.0 (only exactly constant features are left unscaled) or a small "
            "positive value",
        )
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(0, dtype=torch.float64))

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, data: Any, *, input_fn: InputFn | None = None) -> InputStandardizer:
        """Replace the statistics by those of ``data`` (one streaming pass); return ``self``.

        ``data``: a tensor, numpy array, or iterable/``DataLoader`` of tensors or ``(x, y)``
        tuples -- the **training** split only. If it raises, the old statistics are kept.
        """
        return self._accumulate(data, input_fn, fresh=True)

    def partial_fit(self, data: Any, *, input_fn: InputFn | None = None) -> InputStandardizer:
        """Add ``data`` to the statistics fitted so far (exactly as one fit on both would)."""
        return self._accumulate(data, input_fn, fresh=False)

    def _accumulate(self, data: Any, input_fn: InputFn | None, fresh: bool) -> InputStandardizer:
        owner = type(self).__name__
        total: Moments | None = None if fresh or not self.fitted else self._moments()
        for args in iter_inputs(data, owner=owner, input_fn=input_fn):
            x = torch.as_tensor(args[0])
            if x.dim() < 1 or x.shape[0] == 0:
                continue
            dims = self._reduced_dims(x.dim(), owner)
            batch = Moments.of(x, dims)
            kept = batch.mean.view(keepdim_shape(x.shape, dims))
            batch = Moments(batch.count.view_as(kept), kept, batch.m2.view_as(kept))
            if total is not None and total.mean.shape != batch.mean.shape:
                fail(
                    ValueError,
                    owner,
                    "the per-sample shape of every batch",
                    f"statistics of shape {tuple(total.mean.shape)}",
                    f"a batch of shape {tuple(x.shape)}",
                    "pass batches of one shape, or use axis= to pool the dims that vary",
                )
            total = batch if total is None else total.merge(batch)
        if total is None:
            fail(
                ValueError,
                owner,
                "'data'",
                "at least one sample",
                "no samples",
                "pass the training data",
            )
        if not (torch.isfinite(total.mean).all() and torch.isfinite(total.m2).all()):
            fail(
                ValueError,
                owner,
                "the training data",
                "finite",
                "NaN or inf values",
                "clean or drop the non-finite samples before fitting",
            )
        device = self.mean.device  # the module's device, whatever the data's
        self.count = total.count.flatten()[0].to(device)
        self.mean = total.mean.to(device)
        self.m2 = total.m2.to(device)
        return self

    def _reduced_dims(self, ndim: int, owner: str) -> tuple[int, ...]:
        if self.axis is None:
            return tuple(range(ndim))
        kept = {a % ndim for a in self.axis if -ndim <= a < ndim}
        if len(kept) != len(self.axis) or 0 in kept:
            fail(
                ValueError,
                owner,
                "argument 'axis'",
                f"dims of a {ndim}-D input other than 0",
                repr(self.axis),
                "choose axis for the input's rank (axis=1 is channels/features)",
            )
        return tuple(d for d in range(ndim) if d not in kept)

    # -- statistics ---------------------------------------------------------------------------

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has run (or fitted statistics were loaded)."""
        return bool(self.count > 0)

    def _moments(self) -> Moments:
        return Moments(self.count.expand_as(self.mean).clone(), self.mean, self.m2)

    @property
    def var(self) -> Tensor:
        """Biased variance of the training data (float64, broadcastable against the input)."""
        self._check_fitted()
        return self.m2 / self.count

    @property
    def std(self) -> Tensor:
        """Standard deviation of the training data (float64, broadcastable against the input)."""
        return self.var.sqrt()

    @property
    def constant(self) -> Tensor:
        """Which features are constant on the training data (see ``std_floor``), broadcastable."""
        var, eps = self.var, torch.finfo(torch.float64).eps
        n = self.count
        rounding = n * eps * var + (n * self.mean.abs() * eps) ** 2
        return (var <= rounding) | (var.sqrt() <= self.std_floor)

    @property
    def scale(self) -> Tensor:
        """What ``forward`` divides by: ``std``, or 1 for :attr:`constant` features."""
        return torch.where(self.constant, torch.ones_like(self.mean), self.std)

    # -- transform ----------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        x = self._checked(input)
        return ((x - self.mean.to(x.dtype)) / self.scale.to(x.dtype)).to(x.dtype)

    def inverse(self, input: Tensor) -> Tensor:
        """Undo :meth:`forward`: ``y * scale + mean``."""
        y = self._checked(input)
        return (y * self.scale.to(y.dtype) + self.mean.to(y.dtype)).to(y.dtype)

    def _checked(self, input: Tensor) -> Tensor:
        self._check_fitted()
        owner = type(self).__name__
        x = input if input.is_floating_point() else input.to(torch.get_default_dtype())
        shape = tuple(self.mean.shape)
        ok = x.dim() == len(shape) and all(
            s in (1, xs) for s, xs in zip(shape, x.shape, strict=True)
        )
        if not ok:
            fail(
                ValueError,
                owner,
                "the input shape",
                f"compatible with the fitted statistics of shape {shape}",
                str(tuple(x.shape)),
                "standardize inputs of the shape it was fitted on (refit with the right axis)",
            )
        return x

    def _check_fitted(self) -> None:
        if not self.fitted:
            fail(
                ValueError,
                type(self).__name__,
                "the standardizer",
                "fitted",
                "no statistics",
                "call .fit(training_data) first (the training split only)",
            )

    # -- persistence --------------------------------------------------------------------------

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The statistics' shape is only known after a fit: take it from the checkpoint.
        for name in ("mean", "m2"):
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor):
                setattr(
                    self,
                    name,
                    torch.empty(value.shape, dtype=torch.float64, device=self.count.device),
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn: Any, recurse: bool = True) -> InputStandardizer:
        # The statistics stay float64 whatever dtype the model is cast to (.half() would turn a
        # count of 100000 into inf); only device moves apply to them.
        saved = {name: getattr(self, name) for name in ("count", "mean", "m2")}
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        device = self.count.device
        for name, value in saved.items():
            setattr(self, name, value.to(device=device, dtype=torch.float64))
        return self

    def extra_repr(self) -> str:
        fitted = f"fitted on {int(self.count)} values each" if self.fitted else "not fitted"
        return f"axis={self.axis}, std_floor={self.std_floor}, {fitted}"
