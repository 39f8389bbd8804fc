"""The loss landscape around the parameters: Santurkar et al.'s probes along the gradient and
Li et al.'s filter-normalized slices.

Every evaluation swaps other tensors into the parameter slots for one forward and puts the
original ``Parameter`` objects back, so the values of the model's parameters are never written
to, and an exception cannot leave the model displaced (loss-landscapes, by contrast, leaves it moved with
``requires_grad=False``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import torch
from torch import Tensor, nn

from normlab._checks import check_choice, check_positive_int, fail
from normlab.analysis._common import LossFn, ParamFilter, measuring, trainable

__all__ = [
    "DEFAULT_MULTIPLIERS",
    "Every",
    "LandscapeProbe",
    "LossSurface",
    "landscape_probe",
    "loss_surface",
    "random_directions",
]

T = TypeVar("T")

#: Santurkar et al.'s VGG grid: eta in [1/2, 4] x lr, 8 points.
DEFAULT_MULTIPLIERS: tuple[float, ...] = tuple(0.5 + 0.5 * i for i in range(8))


@dataclass(frozen=True)
class LandscapeProbe:
    """Santurkar et al. (2018, Sec. 3.1) probes at one point along the gradient ``g`` of a batch.

    ``losses[i]`` is ``L(theta - step_sizes[i] * g)`` and ``grad_changes[i]`` is
    ``||grad L(theta - step_sizes[i] * g) - g||``; the properties give the paper's three curves.
    ``passes`` counts the forward+backward passes of the batch that were spent.
    """

    step_sizes: tuple[float, ...]
    loss: float
    losses: tuple[float, ...]
    grad_norm: float
    grad_changes: tuple[float, ...]
    bn_mode: str
    passes: int

    @property
    def loss_range(self) -> tuple[float, float]:
        """``(min, max)`` of the loss over the step sizes: Lipschitzness of the loss (Fig. 4a)."""
        return min(self.losses), max(self.losses)

    @property
    def gradient_predictiveness(self) -> tuple[float, float]:
        """``(min, max)`` of ``||grad L(theta - eta g) - grad L(theta)||`` (Fig. 4b)."""
        return min(self.grad_changes), max(self.grad_changes)

    @property
    def beta_smoothness(self) -> float:
        """Effective beta-smoothness ``max_eta ||grad L(theta - eta g) - g|| / ||eta g||``
        (Fig. 4c); 0 where the gradient is 0."""
        if self.grad_norm == 0:
            return 0.0
        return max(
            c / (eta * self.grad_norm)
            for c, eta in zip(self.grad_changes, self.step_sizes, strict=True)
        )


def _step_sizes(lr: float | None, step_sizes: Sequence[float] | None, owner: str) -> list[float]:
    if (lr is None) == (step_sizes is None):
        fail(
            ValueError,
            owner,
            "the step sizes",
            "given by exactly one of 'lr' (grid = multipliers x lr) or 'step_sizes'",
            f"lr={lr!r}, step_sizes={step_sizes!r}",
            "pass lr=optimizer.param_groups[0]['lr'], or step_sizes=[...]",
        )
    etas = (
        [float(lr) * m for m in DEFAULT_MULTIPLIERS] if lr is not None else list(step_sizes or [])
    )
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        fail(
            ValueError, owner, "argument 'lr'", "a positive finite number", repr(lr), "pass lr > 0"
        )
    if not etas or not all(math.isfinite(e) and e > 0 for e in etas):
        fail(
            ValueError,
            owner,
            "argument 'step_sizes'",
            "a non-empty sequence of positive finite step sizes",
            repr(step_sizes),
            "pass e.g. step_sizes=[0.05, 0.1, 0.2]",
        )
    return etas


def landscape_probe(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    lr: float | None = None,
    *,
    step_sizes: Sequence[float] | None = None,
    bn_mode: str = "train",
    stochastic: Literal["fixed", "eval"] = "fixed",
    parameters: ParamFilter | None = None,
) -> LandscapeProbe:
    """Loss and gradient along the gradient direction of one batch (Santurkar et al. 2018).

    Step sizes are ``lr x DEFAULT_MULTIPLIERS`` (1/2 ... 4 x lr, the paper's VGG grid) or the
    given ``step_sizes``. Costs ``1 + len(step_sizes)`` forward+backward passes (9 for the default
    grid). ``bn_mode="train"`` (default): batch statistics of the batch, the loss SGD optimizes,
    running statistics untouched. ``stochastic="fixed"``: dropout and noise layers keep one mask
    across all points. ``parameters`` selects which parameters form ``theta`` (default: all with
    ``requires_grad``; :func:`~normlab.analysis._common.without_norm_affine` leaves out biases and
    norm affine parameters).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        >>> batch = (torch.randn(32, 4), torch.randn(32, 1))
        >>> probe = landscape_probe(model, nn.functional.mse_loss, batch, lr=0.1)
        >>> len(probe.losses), probe.passes
        (8, 9)
    """
    owner = "landscape_probe"
    etas = _step_sizes(lr, step_sizes, owner)
    with measuring(
        model,
        loss_fn,
        batch,
        bn_mode=bn_mode,
        stochastic=stochastic,
        parameters=parameters,
        owner=owner,
    ) as m:
        theta = [p.detach() for p in m.params]
        loss, grad = m.value_and_grad(theta)
        g = torch.cat([t.reshape(-1) for t in grad]).double()
        losses, changes = [], []
        for eta in etas:
            moved = [t - eta * gi for t, gi in zip(theta, grad, strict=True)]
            value, grad_eta = m.value_and_grad(moved)
            losses.append(value)
            changes.append(
                float((torch.cat([t.reshape(-1) for t in grad_eta]).double() - g).norm())
            )
    return LandscapeProbe(
        tuple(etas), loss, tuple(losses), float(g.norm()), tuple(changes), bn_mode, 1 + len(etas)
    )


class Every(Generic[T]):
    """A training callback: ``callback(step, batch)`` runs ``measure(batch)`` on every
    ``every``-th step and keeps ``(step, result)`` in ``records``.

    Example (Santurkar probes every 50 steps at the optimizer's current learning rate):
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> probes = Every(50, lambda b: landscape_probe(
        ...     model, nn.functional.mse_loss, b, lr=opt.param_groups[0]["lr"]))
        >>> for step in range(100):
        ...     batch = (torch.randn(16, 4), torch.randn(16, 1))
        ...     _ = probes(step, batch)   # before the optimizer's step
        ...     opt.zero_grad(); nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
        ...     opt.step()
        >>> [step for step, _ in probes.records]
        [0, 50]
    """

    def __init__(self, every: int, measure: Callable[[Any], T]) -> None:
        check_positive_int(every, name="every", owner="Every")
        self.every = every
        self.measure = measure
        self.records: list[tuple[int, T]] = []

    def __call__(self, step: int, batch: Any) -> T | None:
        if step % self.every:
            return None
        result = self.measure(batch)
        self.records.append((step, result))
        return result


# -- loss surfaces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSurface:
    """Loss on a centred grid ``theta + x d_1 (+ y d_2)``: ``loss[i]`` (1-D) or ``loss[i, j]`` at
    ``(coordinates[0][i], coordinates[1][j])``. ``center_loss`` is the loss at ``theta``."""

    coordinates: tuple[Tensor, ...]
    loss: Tensor
    center_loss: float
    directions: tuple[dict[str, Tensor], ...]
    bn_mode: str


Normalization = Literal["filter", "layer", "none"]
OneDim = Literal["zero", "weights", "random"]


def random_directions(
    model: nn.Module,
    count: int = 2,
    *,
    seed: int = 0,
    normalization: Normalization = "filter",
    bias_and_norm: OneDim = "zero",
    parameters: ParamFilter | None = None,
) -> list[dict[str, Tensor]]:
    """Gaussian directions in parameter space, one ``{name: tensor}`` dict each (Li et al. 2018).

    ``normalization="filter"``: each filter (slice along dim 0) of a weight with 2+ dims is scaled
    to the norm of the same filter of the parameter; ``"layer"``: each tensor to the parameter's
    norm; ``"none"``: raw N(0, 1). 1-D parameters (biases, normalization gamma/beta) follow
    ``bias_and_norm``: ``"zero"`` (not moved; Li et al.'s ``--xignore biasbn``), ``"weights"``
    (the direction is the parameter itself, as Li et al. do without that flag) or ``"random"``
    (Gaussian scaled to the tensor's norm).
    """
    owner = "random_directions"
    check_positive_int(count, name="count", owner=owner)
    check_choice(normalization, ("filter", "layer", "none"), name="normalization", owner=owner)
    check_choice(bias_and_norm, ("zero", "weights", "random"), name="bias_and_norm", owner=owner)
    generator = torch.Generator().manual_seed(seed)
    named = trainable(model, owner, parameters)
    out = []
    for _ in range(count):
        direction = {}
        for name, p in named:
            theta = p.detach().double()
            d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if p.dim() <= 1:
                if bias_and_norm == "zero":
                    d = torch.zeros_like(d)
                elif bias_and_norm == "weights":
                    d = theta.clone()
                else:
                    d = d * theta.norm() / d.norm().clamp_min(1e-30)
            elif normalization == "filter":
                rows, target = d.reshape(d.shape[0], -1), theta.reshape(d.shape[0], -1)
                scale = target.norm(dim=1) / rows.norm(dim=1).clamp_min(1e-30)
                d = (rows * scale[:, None]).view_as(d)
            elif normalization == "layer":
                d = d * theta.norm() / d.norm().clamp_min(1e-30)
            direction[name] = d.to(p.dtype)
        out.append(direction)
    return out


def loss_surface(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    directions: int | Sequence[Mapping[str, Tensor]] = 2,
    *,
    steps: int = 21,
    distance: float = 1.0,
    seed: int = 0,
    normalization: Normalization = "filter",
    bias_and_norm: OneDim = "zero",
    bn_mode: str = "train",
    stochastic: Literal["fixed", "eval"] = "eval",
    memory_format: Literal["auto", "preserve"] = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> LossSurface:
    """1-D or 2-D slice of the loss around the parameters on a centred ``steps`` (x ``steps``)
    grid over ``[-distance, distance]``.

    ``directions``: 1 or 2 for random directions (see :func:`random_directions` for
    ``normalization``, ``bias_and_norm``, ``seed``), or the directions themselves as
    ``{parameter name: tensor}`` dicts (missing names are not moved). ``data``: one ``(x, y)``
    batch or a loader (sample-weighted mean). ``memory_format="auto"`` runs 2-D convolutions
    (of 4+ input channels) channels-last, where torch's CPU convolutions, batch norm and pooling
    are faster (max-pooling ~10x); values then differ from the default layout in float rounding
    only. ``progress(done, total)``
    is called after each grid row. The model is never modified.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> data = (torch.randn(64, 4), torch.randn(64, 1))
        >>> s = loss_surface(model, nn.functional.mse_loss, data, 1, steps=5)
        >>> s.loss.shape, s.coordinates[0].tolist()
        (torch.Size([5]), [-1.0, -0.5, 0.0, 0.5, 1.0])
    """
    owner = "loss_surface"
    check_positive_int(steps, name="steps", owner=owner)
    if not (math.isfinite(distance) and distance > 0):
        fail(
            ValueError,
            owner,
            "argument 'distance'",
            "a positive finite number",
            repr(distance),
            "pass distance=1.0",
        )
    check_choice(memory_format, ("auto", "preserve"), name="memory_format", owner=owner)
    named = trainable(model, owner)
    if isinstance(directions, int):
        if directions not in (1, 2):
            fail(
                ValueError,
                owner,
                "argument 'directions'",
                "1 or 2 (or a list of direction dicts)",
                repr(directions),
                "pass directions=2 for a plane",
            )
        dirs = random_directions(
            model, directions, seed=seed, normalization=normalization, bias_and_norm=bias_and_norm
        )
    else:
        dirs = [_checked_direction(d, named, owner) for d in directions]
        if len(dirs) not in (1, 2):
            fail(
                ValueError,
                owner,
                "argument 'directions'",
                "1 or 2 direction dicts",
                f"{len(dirs)}",
                "pass one direction for a line, two for a plane",
            )
    coords = torch.linspace(-distance, distance, steps, dtype=torch.float64)
    with measuring(model, loss_fn, data, bn_mode=bn_mode, stochastic=stochastic, owner=owner) as m:
        last = _channels_last(m.batches, model) if memory_format == "auto" else False
        batches = m.batches
        weights = [m.weight(b) for b in m.batches]
        theta = [p.detach() for p in m.params]
        moving = [[d.get(name) for d in dirs] for name in m.names]

        def at(point: Sequence[float]) -> float:
            values = []
            for t, ds in zip(theta, moving, strict=True):
                v = t
                for c, d in zip(point, ds, strict=True):
                    if d is not None and c != 0:
                        v = v + c * d
                values.append(_layout(v, last))
            total = 0.0
            for w, b in zip(weights, batches, strict=True):
                total += w * float(m.loss(b, values))
            return total

        with torch.no_grad(), _thin_convs_channels_last(model, last and bn_mode == "train"):
            center = at([0.0] * len(dirs))
            grid = torch.empty((steps,) * len(dirs), dtype=torch.float64)
            rows = steps if len(dirs) == 2 else 1
            for i in range(rows):
                if len(dirs) == 1:
                    for j in range(steps):
                        grid[j] = at([float(coords[j])])
                else:
                    for j in range(steps):
                        grid[i, j] = at([float(coords[i]), float(coords[j])])
                if progress is not None:
                    progress(i + 1, rows)
    return LossSurface(
        tuple(coords.clone() for _ in dirs),
        grid,
        center,
        tuple({k: v.clone() for k, v in d.items()} for d in dirs),
        bn_mode,
    )


def _checked_direction(
    direction: Mapping[str, Tensor], named: list[tuple[str, nn.Parameter]], owner: str
) -> dict[str, Tensor]:
    params = dict(named)
    if not isinstance(direction, Mapping):
        fail(
            TypeError,
            owner,
            "each direction",
            "a {parameter name: tensor} dict",
            type(direction).__name__,
            "pass dict(name=tensor, ...) per direction",
        )
    out = {}
    for name, d in direction.items():
        if name not in params:
            fail(
                ValueError,
                owner,
                f"direction key {name!r}",
                "the name of a trainable parameter (model.named_parameters())",
                "an unknown name",
                "use names from model.named_parameters()",
            )
        if tuple(d.shape) != tuple(params[name].shape):
            fail(
                ValueError,
                owner,
                f"direction {name!r}",
                f"of shape {tuple(params[name].shape)}",
                f"shape {tuple(d.shape)}",
                "give each direction the shape of its parameter",
            )
        out[name] = d.detach().to(params[name].dtype)
    return out


def _channels_last(batches: list[Any], model: nn.Module) -> bool:
    return all(isinstance(x, Tensor) and x.dim() == 4 for x, _ in batches) and any(
        isinstance(mod, nn.Conv2d) for mod in model.modules()
    )


@contextmanager
def _thin_convs_channels_last(model: nn.Module, active: bool) -> Iterator[None]:
    """While active, 2-D convolutions of 1-3 input channels hand on channels-last outputs (through
    forward hooks, removed on exit): their own output is channels-first whatever the weight's
    layout, and torch's training-mode batch-norm statistics are fast on channels-last tensors
    only (~10 % per grid point on the benchmark CNN; in eval mode the conversion does not pay)."""
    handles = []
    if active:

        def to_channels_last(module: nn.Module, args: Any, out: Any) -> Any:
            if isinstance(out, Tensor) and out.dim() == 4:
                return out.contiguous(memory_format=torch.channels_last)
            return out

        handles = [
            mod.register_forward_hook(to_channels_last)
            for mod in model.modules()
            if isinstance(mod, nn.Conv2d) and mod.in_channels < 4
        ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _layout(t: Tensor, channels_last: bool) -> Tensor:
    """Conv weights with 4+ input channels channels-last: the convolution then runs (and hands
    on its output) channels-last. Thin first layers (1-3 channels) are faster as they are."""
    if channels_last and t.dim() == 4 and t.shape[1] >= 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t
