"""recompute_population_stats against float64 oracles."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab.nn as nl
from normlab.surgery import recompute_population_stats


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 16, bias=False),
        nl.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(16, 12, bias=False),
        nn.BatchNorm1d(12),
        nn.ReLU(),  # torch's layer too
        nn.Linear(12, 8),
        nl.BatchNorm1d(8),
    )


def _data(n: int = 301, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0]) + 1.5


def _batches(
    x: torch.Tensor, size: int, *, order: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = x if order is None else x[order]
    return [(x[i : i + size], torch.zeros(len(x[i : i + size]))) for i in range(0, len(x), size)]


def _oracle_inference(
    model: nn.Sequential, x: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Full-batch train-mode forward in float64 with the unbiased variance (the eval convention)."""
    ref = copy.deepcopy(model).double().eval()
    stats = []
    h = x.double()
    with torch.no_grad():
        for m in ref:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                mean, var = h.mean(0), h.var(0, unbiased=True)
                stats.append((mean, var))
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
            h = m(h)
    return stats


def _oracle_pooled(
    model: nn.Sequential, batches: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch, upstream norms use batch statistics; inputs of each norm pooled over all batches."""
    ref = copy.deepcopy(model).double().eval()
    inputs: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for xb in batches:
            h, k = xb.double(), 0
            for m in ref:
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    if len(inputs) <= k:
                        inputs.append([])
                    inputs[k].append(h)
                    h = (h - h.mean(0)) / torch.sqrt(
                        h.var(0, unbiased=False) + m.eps
                    ) * m.weight + m.bias
                    k += 1
                else:
                    h = m(h)
    return [(torch.cat(v).mean(0), torch.cat(v).var(0, unbiased=True)) for v in inputs]


def _stats(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (m.running_mean.double(), m.running_var.double())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _assert_stats(got, expected, rtol: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    assert len(got) == len(expected)
    for (m, v), (rm, rv) in zip(got, expected, strict=True):
        torch.testing.assert_close(m, rm, rtol=rtol, atol=rtol * rm.abs().max().item())
        torch.testing.assert_close(v, rv, rtol=rtol, atol=rtol * rv.abs().max().item())


def _randomized(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                m.running_mean.fill_(5.0)
    return model


def test_inference_mode_equals_a_full_batch_forward() -> None:
    model, x = _randomized(_mlp()), _data()
    expected = _oracle_inference(model, x)
    report = recompute_population_stats(model, _batches(x, 64))
    _assert_stats(_stats(model), expected)
    assert report.num_passes == 3  # a chain: one pass per layer
    assert report.samples == 301
    assert report.batches == 5
    assert report.passes == (("1",), ("5",), ("8",))
    ref = copy.deepcopy(model).double().eval()
    for m, (mean, var) in zip(
        [m for m in ref if isinstance(m, nn.modules.batchnorm._BatchNorm)], expected, strict=True
    ):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    test = _data(40, seed=9)
    torch.testing.assert_close(
        model.eval()(test).double(), ref(test.double()), rtol=1e-5, atol=1e-5
    )


def test_inference_mode_is_invariant_to_batch_size_and_order() -> None:
    x = _data()
    results = []
    for size, order in [
        (64, None),
        (7, None),
        (301, None),
        (50, torch.randperm(301, generator=torch.Generator().manual_seed(5))),
    ]:
        model = _randomized(_mlp())
        recompute_population_stats(model, _batches(x, size, order=order))
        results.append(_stats(model))
    for other in results[1:]:
        _assert_stats(other, results[0], rtol=1e-6)


def test_pooled_mode_equals_pooled_moments_with_upstream_batch_statistics() -> None:
    model, x = _randomized(_mlp()), _data()
    batches = _batches(x, 64)
    expected = _oracle_pooled(model, [b for b, _ in batches])
    report = recompute_population_stats(model, batches, mode="pooled")
    assert report.num_passes == 1
    _assert_stats(_stats(model), expected)


class _Branches(nn.Module):
    """Two independent batch norms, then one that depends on both: two passes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False)
        self.bn_a, self.bn_b = nl.BatchNorm1d(6), nn.BatchNorm1d(6)
        self.head, self.bn_out = nn.Linear(6, 3), nl.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn_a(self.a(x))) + torch.tanh(self.bn_b(self.b(x)))
        return self.bn_out(self.head(h))


def test_independent_layers_share_a_pass() -> None:
    torch.manual_seed(0)
    model, x = _Branches(), _data(200)[:, :4]
    report = recompute_population_stats(model, _batches(x, 32))
    assert report.passes == (("bn_a", "bn_b"), ("bn_out",))
    # Oracle: full-batch train-mode statistics, the upstream layers normalizing with the unbiased
    # variance (the eval convention): momentum 1 copies the batch statistics into the buffers.
    x64 = x.double()
    ref = copy.deepcopy(model).double().train()
    for bn in (ref.bn_a, ref.bn_b, ref.bn_out):
        bn.momentum = 1.0
    with torch.no_grad():
        ref(x64)  # fixes bn_a and bn_b (their inputs do not depend on other norms)
        ref.bn_a.eval()
        ref.bn_b.eval()
        ref(x64)  # bn_out now sees the eval-mode upstream
    for name in ("bn_a", "bn_b", "bn_out"):  # momentum 1: the full batch's (unbiased) statistics
        ours, theirs = getattr(model, name), getattr(ref, name)
        torch.testing.assert_close(
            ours.running_mean.double(), theirs.running_mean, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            ours.running_var.double(), theirs.running_var, rtol=1e-5, atol=1e-6
        )


def test_conv_batch_and_instance_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nl.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nl.InstanceNorm2d(4, affine=True, track_running_stats=True),
    )
    x = torch.randn(30, 2, 6, 6) * 2 + 1
    report = recompute_population_stats(model, _batches(x, 8))
    assert report.num_passes == 2
    with torch.no_grad():
        h = model[0](x).double()
        torch.testing.assert_close(
            model[1].running_mean.double(), h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            model[1].running_var.double(), h.var((0, 2, 3)), rtol=1e-5, atol=1e-6
        )
        h = model[3](model[2](model[1].eval()(model[0](x)))).double()
        torch.testing.assert_close(
            model[4].running_mean.double(), h.mean((2, 3)).mean(0), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            model[4].running_var.double(), h.var((2, 3)).mean(0), rtol=1e-5, atol=1e-6
        )


def test_differs_from_update_bn_which_weights_batches_equally_and_leaves_dropout_on() -> None:
    x = _data()
    ours, theirs = _randomized(_mlp()), _randomized(_mlp())
    recompute_population_stats(ours, _batches(x, 64), mode="pooled")
    torch.manual_seed(0)
    torch.optim.swa_utils.update_bn(_batches(x, 64), theirs)
    gap = max(
        (a - b).abs().max().item() / b.abs().max().item()
        for (_, a), (_, b) in zip(_stats(ours), _stats(theirs), strict=True)
    )
    assert gap > 1e-2


def test_caller_state_is_restored_also_on_error() -> None:
    model = _randomized(_mlp())
    model.train()
    model[1].eval()
    model[1].momentum = None
    model[4].weight.requires_grad_(False)
    hooks_before = len(model[1]._forward_pre_hooks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    bad = [(_data(10), 0), (torch.randn(10, 7), 0)]  # the second batch has the wrong width
    with pytest.raises(RuntimeError):
        recompute_population_stats(model, bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.training for m in model.modules()] == modes
    assert model[1].momentum is None
    assert not model[4].weight.requires_grad
    assert len(model[1]._forward_pre_hooks) == hooks_before
    recompute_population_stats(model, _batches(_data(), 64))
    assert [m.training for m in model.modules()] == modes
    assert not model[4].weight.requires_grad


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda: recompute_population_stats(nn.Linear(3, 2), [torch.randn(4, 3)]),
            ValueError,
            r"recompute_population_stats: the model must be a model with at least one running-statistics "
            r"layer \(e\.g\. BatchNorm\), got Linear without one\. Fix",
        ),
        (
            lambda: recompute_population_stats(_mlp(), []),
            ValueError,
            r"'data' must be at least one batch, got no batch \(empty data\)",
        ),
        (
            lambda: recompute_population_stats(_mlp(), [_data(8)], mode="ema"),
            ValueError,
            r"argument 'mode' must be 'inference' or 'pooled', got 'ema'",
        ),
        (
            lambda: recompute_population_stats(_mlp(), iter([_data(8)])),
            ValueError,
            r"'data' for mode='inference' must be re-iterable \(one pass per dependency level\), got a "
            r"one-shot list_iterator\. Fix: pass a list",
        ),
        (
            lambda: recompute_population_stats(_mlp(), [{"x": _data(8)}]),
            TypeError,
            r"each batch of 'data' must be a tensor.* Fix: pass input_fn=",
        ),
    ],
)
def test_errors(call, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match):
        call()


def test_input_fn_and_generators_in_pooled_mode() -> None:
    model, x = _randomized(_mlp()), _data()
    expected = _oracle_pooled(model, [b for b, _ in _batches(x, 64)])
    gen = ({"x": b} for b, _ in _batches(x, 64))
    recompute_population_stats(model, gen, mode="pooled", input_fn=lambda batch: batch["x"])
    _assert_stats(_stats(model), expected)


def _worker(rank: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x = _data()
        shard = x[:150] if rank == 0 else x[150:]  # unequal shards: 150 and 151 samples
        model = _randomized(_mlp())
        report = recompute_population_stats(model, _batches(shard, 64))
        assert report.world_size == 2
        if rank == 0:
            torch.save([(m.clone(), v.clone()) for m, v in _stats(model)], result_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_result_equals_single_process(tmp_path: Path) -> None:
    """Two gloo processes, each with its own shard, end with the statistics of the union."""
    init, out = str(tmp_path / "init"), str(tmp_path / "stats.pt")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(init, out), nprocs=2, join=True)
    model = _randomized(_mlp())
    recompute_population_stats(model, _batches(_data(), 64))
    _assert_stats(torch.load(out, weights_only=True), _stats(model), rtol=1e-6)


def test_frozen_batch_norms_are_left_alone() -> None:
    from normlab.surgery import freeze_batchnorm

    model = freeze_batchnorm(_randomized(_mlp()))
    model[5] = nl.BatchNorm1d(12)  # one live layer among frozen ones
    frozen = model[1].running_mean.clone()
    report = recompute_population_stats(model, _batches(_data(), 64))
    assert report.layers == ("5",)
    assert torch.equal(model[1].running_mean, frozen)


def test_num_batches_limits_each_pass_and_progress_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, x = _randomized(_mlp()), _data()
    with caplog.at_level("INFO", logger="normlab.surgery.population"):
        report = recompute_population_stats(model, _batches(x, 64), num_batches=2)
    assert (report.samples, report.batches) == (128, 2)
    expected = _oracle_inference(model, x[:128])
    _assert_stats(_stats(model), expected)
    assert "inference pass 3/3: 1 layers, 128 samples in 2 batches" in caplog.text


def _fixed_point_oracle(
    model: nn.Module, batches: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inference-consistent statistics without any dependency analysis: in a float64 copy, set
    every batch norm to the (mean, unbiased var) of its inputs over all ``batches`` (each passed
    as the model sees it), and repeat as many times as there are batch norms (a layer at depth d
    is exact after d rounds)."""
    ref = copy.deepcopy(model).double().eval()
    norms = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for _ in range(len(norms)):
        seen: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in norms}
        handles = [
            m.register_forward_pre_hook(lambda mod, inp, seen=seen: seen[mod].append(inp[0]))
            for m in norms
        ]
        with torch.no_grad():
            for xb in batches:
                ref(xb.double() if xb.is_floating_point() else xb)
        for h in handles:
            h.remove()
        for m in norms:
            h = torch.cat(seen[m])
            dims = [0, *range(2, h.dim())]
            m.running_mean.copy_(h.mean(dims))
            m.running_var.copy_(h.var(dims, unbiased=True))
    return [(m.running_mean, m.running_var) for m in norms]


class _Tricky(nn.Module):
    """Dependencies the autograd graph does not show: detach, no_grad, a hard gate, argmax routing."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.l1, self.l2 = nn.Linear(5, 6, bias=False), nn.Linear(5, 6, bias=False)
        self.bn1, self.bn2 = nl.BatchNorm1d(6), nl.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "no_grad":
            with torch.no_grad():
                h = self.bn1(self.l1(x))
        else:
            h = self.bn1(self.l1(x))
        if self.kind == "detach":
            z = h.detach() + self.l2(x)
        elif self.kind == "gate":
            z = self.l2(x) * (h > 0).to(x.dtype)
        elif self.kind == "argmax":
            z = self.l2(x) + 3.0 * nn.functional.one_hot(h.argmax(1), 6).to(x.dtype)
        else:
            z = h * self.l2(x)
        return self.bn2(z)


@pytest.mark.parametrize("kind", ["detach", "no_grad", "gate", "argmax"])
def test_hidden_dependencies_are_found(kind: str) -> None:
    torch.manual_seed(0)
    model, x = _randomized(_Tricky(kind)), _data(200)
    report = recompute_population_stats(model, _batches(x, 32))
    assert report.passes == (("bn1",), ("bn2",))
    _assert_stats(_stats(model), _fixed_point_oracle(model, [x]))


class _Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 6, bias=False), nl.BatchNorm1d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(6, 4), nl.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x) - self.encoder(x.flip(0) * 2 - 1))


@pytest.mark.parametrize("mode", ["inference", "pooled"])
def test_a_layer_called_twice_pools_both_calls(mode: str) -> None:
    torch.manual_seed(0)
    model, x = _randomized(_Siamese()), _data(192)
    recompute_population_stats(model, [x[i : i + 64] for i in range(0, 192, 64)], mode=mode)
    if mode == "inference":
        _assert_stats(
            _stats(model), _fixed_point_oracle(model, [x[i : i + 64] for i in range(0, 192, 64)])
        )
    else:
        enc = model.encoder[0]
        with torch.no_grad():
            both = torch.cat(
                [enc(x[i : i + 64]) for i in range(0, 192, 64)]
                + [enc(x[i : i + 64].flip(0) * 2 - 1) for i in range(0, 192, 64)]
            )
        torch.testing.assert_close(
            model.encoder[1].running_mean.double(), both.double().mean(0), rtol=1e-5, atol=1e-6
        )


def test_integer_inputs_and_affine_free_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(20, 6),
        nn.Flatten(),
        nl.BatchNorm1d(18, affine=False),
        nn.Linear(18, 4),
        nl.BatchNorm1d(4),
    )
    tokens = torch.randint(0, 20, (160, 3), generator=torch.Generator().manual_seed(1))
    report = recompute_population_stats(model, [tokens[i : i + 32] for i in range(0, 160, 32)])
    assert report.num_passes == 2
    _assert_stats(_stats(model), _fixed_point_oracle(model, [tokens]))


def test_data_dependent_branches_are_refused() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nl.BatchNorm1d(5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x) if x.shape[0] > 8 else x

    model = Branchy()
    before = model.bn.running_mean.clone()
    with pytest.raises(
        RuntimeError,
        match=r"recompute_population_stats: every layer being estimated must "
        r"be called as often in each forward as in the first one, got \['BatchNorm1d'\] "
        r"called less often for batch 1\. Fix: use the same code path",
    ):
        recompute_population_stats(model, [_data(16), _data(4)])
    assert torch.equal(model.bn.running_mean, before)


def test_unreached_layers_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nl.BatchNorm1d(5), nl.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Partial()
    with caplog.at_level("WARNING"):
        report = recompute_population_stats(model, [_data(16)])
    assert report.skipped == ("unused",)
    assert "layers not called by the model" in caplog.text


def test_unbatched_instance_norm_input() -> None:
    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nl.InstanceNorm1d(3, track_running_stats=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([self.norm(sample) for sample in x])  # (C, L) per call

    model, x = Unbatched(), torch.randn(6, 3, 10) * 2 + 1
    recompute_population_stats(model, [x], mode="pooled")
    torch.testing.assert_close(
        model.norm.running_mean.double(), x.double().mean(2).mean(0), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        model.norm.running_var.double(), x.double().var(2).mean(0), rtol=1e-5, atol=1e-6
    )


def test_non_iterable_data_gets_a_clear_error() -> None:
    with pytest.raises(
        TypeError, match=r"'data' must be a tensor, a numpy array, or an iterable of batches"
    ):
        recompute_population_stats(_mlp(), 5)
