"""Reference models for the studies, built from the norm registry (so every norm fits every
model): an MLP, a VGG-style CNN (1-D or 2-D) and a deep linear network."""

from __future__ import annotations

import math

import torch
from torch import nn

from normlab._checks import check_choice, fail
from normlab.experiments.config import RunConfig
from normlab.nn import (
    SELU,
    AlphaDropout,
    DropConnectLinear,
    Dropout,
    get_norm_layer,
    weight_transform_of,
)
from normlab.nn.init import lecun_normal_
from normlab.surgery import apply_weight_norm, standardize_weights

__all__ = ["build_model", "count_parameters"]


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "tanh": nn.Tanh(), "selu": SELU(), "sigmoid": nn.Sigmoid()}[name]


def _stochastic(cfg: RunConfig) -> list[nn.Module]:
    if cfg.dropout == "dropout":
        return [Dropout(cfg.p)]
    if cfg.dropout == "alpha":
        return [AlphaDropout(cfg.p)]
    return []


def _block(cfg: RunConfig, layer: nn.Module, features: int, spatial_dims: int) -> list[nn.Module]:
    """``layer -> norm -> activation -> dropout`` (the order of Ioffe & Szegedy and Santurkar).
    A DropConnect layer holds its activation (its Gaussian inference samples through it): then
    ``layer(+activation) -> norm``. A deep linear network has no activation (in DropConnect
    neither)."""
    out = [layer]
    if isinstance(layer, DropConnectLinear):
        if cfg.norm != "none":
            out.append(
                get_norm_layer(cfg.norm, features, spatial_dims=spatial_dims, **_norm_options(cfg))
            )
        return out
    if cfg.norm != "none":
        out.append(
            get_norm_layer(cfg.norm, features, spatial_dims=spatial_dims, **_norm_options(cfg))
        )
    if cfg.arch != "dln":  # a deep linear network: no activation, but dropout if asked
        out.append(_activation(cfg.activation))
    out.extend(_stochastic(cfg))
    return out


def _norm_options(cfg: RunConfig) -> dict[str, object]:
    """``bn_momentum`` for the norms with running statistics; ghost batch norm splits each batch
    into virtual batches of ``batch_size / 4`` (2 ... 32 samples); batch renorm's schedule is
    scaled to the run's length."""
    options: dict[str, object] = {}
    if cfg.norm in ("batch", "renorm", "ghost", "l1", "linf", "noisy", "instance", "weight"):
        options["momentum"] = cfg.bn_momentum
    if cfg.norm == "ghost":
        options["virtual_batch_size"] = max(2, min(32, cfg.batch_size // 4))
    if cfg.norm == "noisy":
        options["seed"] = cfg.seed
    if cfg.norm == "renorm":
        # The paper's schedule (plain BN for 5k steps, ramps ending at 25k/40k) scaled to the run:
        # with the defaults a run of a few thousand steps would never leave the warm-up.
        options.update(
            warmup_steps=max(1, cfg.steps // 16),
            r_max_steps=max(2, cfg.steps // 2),
            d_max_steps=max(2, 5 * cfg.steps // 16),
        )
    return options


def _linear(cfg: RunConfig, n_in: int, n_out: int, hidden: bool) -> nn.Module:
    bias = cfg.norm == "none" or not hidden  # a norm's mean subtraction cancels a bias
    if hidden and cfg.dropout == "dropconnect":
        return DropConnectLinear(
            n_in,
            n_out,
            bias,
            p=cfg.p,
            mode="batch",
            inference=cfg.dropconnect_inference,
            activation=None if cfg.arch == "dln" else _activation(cfg.activation),
            samples=200,  # Gaussian inference draws: 1000 cost 5x more for no visible change here
            seed=cfg.seed,
        )
    return nn.Linear(n_in, n_out, bias)


def _mlp(
    cfg: RunConfig, input_shape: tuple[int, ...], classes: int, linear_net: bool
) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Flatten()]
    n = math.prod(input_shape)
    for _ in range(cfg.depth):
        layers += _block(cfg, _linear(cfg, n, cfg.width, hidden=True), cfg.width, 0)
        n = cfg.width
    layers.append(_linear(cfg, n, classes, hidden=False))
    del linear_net
    return layers


def _vgg(cfg: RunConfig, input_shape: tuple[int, ...], classes: int) -> list[nn.Module]:
    dims = len(input_shape) - 1
    if dims not in (1, 2):
        fail(
            ValueError,
            "build_model",
            "the input of arch='vgg'",
            "(C, L) or (C, H, W)",
            f"shape {input_shape}",
            "use arch='mlp' for flat features",
        )
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
    base = cfg.width  # 16: VGG-4 (16-16-32-32); 32 on 1-D data: the pilots' CNN1D (32-32-64-64)
    channels, size = input_shape[0], list(input_shape[1:])
    layers: list[nn.Module] = []
    for stage in (base, 2 * base):
        for _ in range(2):
            layers += _block(
                cfg, conv(channels, stage, 3, padding=1, bias=cfg.norm == "none"), stage, dims
            )
            channels = stage
        if min(size) >= 2:
            layers.append(pool(2))
            size = [s // 2 for s in size]
    layers += [nn.Flatten(), nn.Linear(channels * math.prod(size), classes)]
    return layers


def build_model(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """The model ``cfg`` describes, initialised from ``cfg.seed``.

    Example:
        >>> m = build_model(RunConfig(arch="mlp", depth=2, width=8), (1, 8, 8), 10)
        >>> [type(layer).__name__ for layer in m]
        ['Flatten', 'Linear', 'BatchNorm1d', 'ReLU', 'Linear', 'BatchNorm1d', 'ReLU', 'Linear']
    """
    check_choice(cfg.arch, ("mlp", "vgg", "dln"), name="arch", owner="build_model")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # construction draws from the global RNG; put it back after
    try:
        if cfg.arch == "vgg":
            layers = _vgg(cfg, input_shape, num_classes)
        else:
            layers = _mlp(cfg, input_shape, num_classes, linear_net=cfg.arch == "dln")
        model = nn.Sequential(*layers)
        _initialise(model, cfg)
    finally:
        torch.random.set_rng_state(generator_state)
    transform = weight_transform_of(cfg.norm)
    if transform == "standardize":
        model = standardize_weights(model)  # type: ignore[assignment]
    elif transform == "weight_norm":
        model = apply_weight_norm(model)  # type: ignore[assignment]
    return model


def _initialise(model: nn.Module, cfg: RunConfig) -> None:
    generator = torch.Generator().manual_seed(cfg.seed)
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        with torch.no_grad():
            if cfg.init == "glorot":
                nn.init.xavier_normal_(module.weight, generator=generator)
            elif cfg.init == "he":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            elif cfg.init == "lecun":
                lecun_normal_(module.weight, generator=generator)
            if cfg.init != "default" and module.bias is not None:
                module.bias.zero_()
            module.weight.mul_(cfg.init_scale)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
