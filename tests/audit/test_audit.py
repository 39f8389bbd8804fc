"""normlab.audit: every check finds its flaw (with the right evidence) and stays quiet on a
model without it; a clean reference model has no finding; the model is never changed; the fixes
repair a copy."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab.nn as nl
from normlab.audit import CHECKS, AuditReport, apply_fixes, audit
from normlab.surgery import fuse_batchnorm, recompute_population_stats

torch.manual_seed(0)
X = torch.randn(512, 16)  # standardized features
Y = (X[:, 0] + X[:, 1] > 0).long()


def _mlp(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def _bn_mlp(bias: bool = False, momentum: float = 0.1) -> nn.Sequential:
    torch.manual_seed(1)
    return _mlp(
        nn.Linear(16, 32, bias=bias),
        nn.BatchNorm1d(32, momentum=momentum),
        nn.ReLU(),
        nn.Linear(32, 2),
    )


def _exact(model: nn.Module) -> nn.Module:
    recompute_population_stats(model, X)
    return model.eval()


def _checks(report: AuditReport) -> list[str]:
    return [f.check for f in report.findings]


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "grad": [p.requires_grad for p in model.parameters()],
        "momenta": [getattr(m, "momentum", None) for m in model.modules()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
        # autograd's version counters: an in-place restore would break a pending backward
        "versions": [t._version for t in (*model.parameters(), *model.buffers())],
    }


def _same(a: dict[str, object], b: dict[str, object]) -> bool:
    ta, tb = a["tensors"], b["tensors"]
    assert isinstance(ta, dict)
    assert isinstance(tb, dict)
    return (
        ta.keys() == tb.keys()
        and all(torch.equal(ta[k], tb[k]) for k in ta)
        and all(a[k] == b[k] for k in ("modes", "grad", "momenta", "hooks", "versions"))
    )


# -- 1. input scale -------------------------------------------------------------------------------


def test_unstandardized_inputs_are_found_and_standardized_ones_pass() -> None:
    model = _exact(_bn_mlp())
    raw = X * torch.logspace(0, 3, 16) + 50  # offsets and scales 1 ... 1000
    report = audit(model, raw, checks=["input-scale"])
    (finding,) = report.findings
    assert finding.modules == ("0",)  # measured at the first layer's input
    assert finding.evidence["std_range"][1] == pytest.approx(
        1000 * X[:, 15].std(correction=0).item(), rel=0.01
    )
    assert "InputStandardizer" in finding.fix
    assert audit(model, X, checks=["input-scale"]).ok
    # a model that standardizes its own input is fine with raw data
    own = _mlp(nl.InputStandardizer(axis=1).fit(raw), _bn_mlp())
    assert audit(own, raw, checks=["input-scale"]).ok

    class Inline(nn.Module):  # standardizes inside forward: the first layer's input is fine
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", raw.mean(0))
            self.register_buffer("std", raw.std(0))
            self.net = _bn_mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x - self.mean) / self.std)

    assert audit(Inline(), raw, checks=["input-scale"]).ok
    embed = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    assert audit(embed, torch.randint(0, 10, (64, 3)), checks=["input-scale"]).ok


# -- 2. bias before a norm ------------------------------------------------------------------------


def test_a_bias_feeding_batch_norm_is_found_and_removed_without_changing_outputs() -> None:
    model = _exact(_bn_mlp(bias=True))
    report = audit(model, X, checks=["bias-before-norm"])
    (finding,) = report.findings
    assert finding.evidence["pairs"] == [["0", "1"]]
    assert finding.evidence["parameters"] == 32
    fixed = apply_fixes(model, report)
    assert fixed[0].bias is None
    assert model[0].bias is not None
    torch.testing.assert_close(fixed.eval()(X), model.eval()(X))
    torch.testing.assert_close(fixed.train()(X), model.train()(X))
    assert audit(_exact(_bn_mlp(bias=False)), X, checks=["bias-before-norm"]).ok
    # a bias before layer norm is not cancelled by it: no finding
    ln = _mlp(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 2))
    assert audit(ln, X, checks=["bias-before-norm"]).ok


def test_a_bias_that_something_else_also_sees_is_not_redundant() -> None:
    class Residual(nn.Module):  # the biased output also feeds a residual add
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.bn = nn.BatchNorm1d(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            return self.bn(y) + y

    class InPlace(nn.Module):  # a functional in-place op between the layer and the norm
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.bn = nn.BatchNorm1d(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(F.relu(self.fc(x), inplace=True))

    for model in (Residual(), InPlace()):
        assert audit(_exact(model), X, checks=["bias-before-norm"]).ok, type(model).__name__


def test_data_flow_not_registration_order_decides() -> None:
    class Skip(nn.Module):  # registers linear next to the norm, but feeds the norm from elsewhere
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 32, bias=False)
            self.side = nn.Linear(16, 32)
            self.norm = nn.BatchNorm1d(32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.proj(x)) + self.side(x)

    assert audit(Skip(), X, checks=["bias-before-norm"]).ok


# -- 3. stale statistics --------------------------------------------------------------------------


def test_stale_running_statistics_are_measured_against_exact_ones() -> None:
    model = _bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(40):  # running stats (momentum 0.1) lag the weights that keep moving
        loss = F.cross_entropy(model.train()(X[i % 8 * 64 : i % 8 * 64 + 64] * 3), Y[:64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    report = audit(model, (X, Y), loss_fn=F.cross_entropy, checks=["stale-statistics"])
    (finding,) = report.findings
    ev = finding.evidence
    assert ev["loss_exact"] < ev["loss_running"]
    fixed = apply_fixes(model, report, X)
    assert audit(fixed, (X, Y), loss_fn=F.cross_entropy, checks=["stale-statistics"]).ok
    assert audit(_exact(_bn_mlp()), (X, Y), loss_fn=F.cross_entropy, checks=["stale-statistics"]).ok
    with pytest.raises(ValueError, match=r"apply_fixes: argument 'data' must be the training"):
        apply_fixes(model, report)


def test_without_targets_the_outputs_are_compared() -> None:
    fresh = _bn_mlp().eval()  # running stats 0/1, data's are not
    report = audit(fresh, X * 4 + 2, checks=["stale-statistics"])
    assert report.findings[0].evidence["relative_output_change"] > 0.05


# -- 4. dropout feeding a norm --------------------------------------------------------------------


def test_dropout_before_batch_norm_shows_the_variance_shift() -> None:
    torch.manual_seed(2)
    flawed = _mlp(
        nn.Linear(16, 32),
        nn.Dropout(0.5),
        nn.Linear(32, 32, bias=False),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 2),
    )
    report = audit(_exact(flawed), X, checks=["dropout-before-norm"])
    (finding,) = report.findings
    ratio = finding.evidence["variance_ratio_train_over_eval"]["3"]
    assert 1.5 < ratio < 2.5  # inverted dropout with p=0.5 about doubles the variance
    after = _mlp(
        nn.Linear(16, 32, bias=False),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 2),
    )
    assert audit(_exact(after), X, checks=["dropout-before-norm"]).ok


# -- 5. small batches -----------------------------------------------------------------------------


def test_small_batches_make_noisy_statistics() -> None:
    model = _exact(_bn_mlp())
    report = audit(model, X, batch_size=4, checks=["small-batch"])
    (finding,) = report.findings
    noise = finding.evidence["batch_mean_noise_in_population_stds"]["1"]
    assert noise == pytest.approx(4**-0.5, rel=0.3)  # the std of a mean of 4 samples
    assert audit(model, X, batch_size=256, checks=["small-batch"]).ok
    no_size = audit(model, X, checks=["small-batch"])
    assert no_size.ok
    assert "batch size" in no_size.skipped["small-batch"]
    loader = [(X[i : i + 8], Y[i : i + 8]) for i in range(0, 512, 8)]
    assert _checks(audit(model, loader, checks=["small-batch"])) == ["small-batch"]


# -- 6. self-normalizing networks and activation health -------------------------------------------


def _selu(init: str, drop: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(3)
    layers: list[nn.Module] = []
    for _ in range(8):
        linear = nn.Linear(16, 16)
        if init == "lecun":
            nl.init.lecun_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
        else:
            nn.init.normal_(linear.weight, std=0.6)
        layers += [linear, nn.SELU()]
        if drop is not None:
            layers.append(copy.deepcopy(drop))
    return _mlp(*layers).eval()


def test_selu_without_lecun_init_and_with_plain_dropout_are_found() -> None:
    report = audit(_selu("big", nn.Dropout(0.1)), X, checks=["self-normalizing"])
    titles = {f.title for f in report.findings}
    assert titles == {"plain dropout in a SELU network", "the SELU network is not self-normalizing"}
    drift = next(f for f in report.findings if "not self" in f.title)
    assert drift.evidence["weight_std_x_sqrt_fan_in"]["0"] == pytest.approx(2.4, rel=0.15)
    fixed = apply_fixes(_selu("big", nn.Dropout(0.1)), report)
    assert sum(isinstance(m, nl.AlphaDropout) for m in fixed.modules()) == 8
    assert audit(_selu("lecun", nl.AlphaDropout(0.1)), X, checks=["self-normalizing"]).ok


def test_dead_units_and_variance_drift_are_found() -> None:
    torch.manual_seed(4)
    dead = _mlp(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)  # every unit is negative before the ReLU
    report = audit(dead, X, checks=["activations"])
    assert report.findings[0].evidence["dead_fraction"] == {"1": 1.0}
    deep = _mlp(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.Tanh())])
    with torch.no_grad():
        for m in deep:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.5)  # each layer shrinks the signal: variance vanishes with depth
                m.bias.zero_()
    assert "activation variance drifts with depth" in {
        f.title for f in audit(deep, X, checks=["activations"]).findings
    }
    assert audit(_exact(_bn_mlp()), X, checks=["activations"]).ok


# -- 7. modes and conventions ---------------------------------------------------------------------


def test_mode_mistakes_are_found_and_fixed() -> None:
    left = _exact(_bn_mlp())
    left[1].train()  # the model is in eval mode, its batch norm is not
    assert _checks(audit(left, X, checks=["modes"])) == ["modes"]
    frozen = _exact(_bn_mlp())
    frozen[1].weight.requires_grad_(False)
    frozen[1].bias.requires_grad_(False)
    keras = _exact(_bn_mlp(momentum=0.99))
    for model, key in ((frozen, "frozen_affine_but_tracking"), (keras, "momentum")):
        report = audit(model, X, checks=["modes"])
        (finding,) = report.findings
        assert key in finding.evidence
        fixed = apply_fixes(model, report)
        assert audit(fixed, X, checks=["modes"]).ok, key
    assert apply_fixes(keras, audit(keras, X, checks=["modes"]))[1].momentum == pytest.approx(0.01)
    assert audit(_exact(_bn_mlp()), X, checks=["modes"]).ok


# -- 8. fusion ------------------------------------------------------------------------------------


def test_fusable_batch_norms_report_the_measured_speedup(monkeypatch: pytest.MonkeyPatch) -> None:
    from normlab.audit import checks

    torch.manual_seed(5)
    wide = _mlp(nn.Linear(16, 256, bias=False), nn.BatchNorm1d(256), nn.Linear(256, 2))
    monkeypatch.setattr(checks, "FUSION_SPEEDUP", 0.0)  # report whatever was measured
    (finding,) = audit(_exact(wide), X, checks=["fusion"]).findings
    ev = finding.evidence
    assert ev["pairs"] == [["0", "1"]]
    assert ev["eval_ms_per_batch"] > 0
    assert ev["fused_ms_per_batch"] > 0
    monkeypatch.setattr(checks, "FUSION_SPEEDUP", math.inf)  # no speed-up is enough: quiet
    assert audit(_exact(wide), X, checks=["fusion"]).ok
    fused = apply_fixes(wide, audit(wide, X, checks=["modes"]), fuse=True)  # without a finding
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fused.modules())
    torch.testing.assert_close(fused(X), wide.eval()(X), rtol=1e-4, atol=1e-5)
    no_bn = _mlp(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    assert audit(no_bn, X, checks=["fusion"]).ok
    # outside nn.Sequential the traced data flow finds the pair; a second reader blocks it

    class Block(nn.Module):
        def __init__(self, residual_reads_conv: bool) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.residual_reads_conv = residual_reads_conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + (y if self.residual_reads_conv else x)

    images = torch.randn(32, 3, 8, 8)
    monkeypatch.setattr(checks, "FUSION_SPEEDUP", 0.0)
    for reads, found in ((False, [["conv", "bn"]]), (True, None)):
        block = Block(reads)
        recompute_population_stats(block, images)
        report = audit(block.eval(), images, checks=["fusion"])
        assert (report.findings[0].evidence["pairs"] if report.findings else None) == found
        if found:
            fused = apply_fixes(block, report, fuse=True)
            assert isinstance(fused.bn, nn.Identity)
            torch.testing.assert_close(fused(images), block(images), rtol=1e-4, atol=1e-5)
    # a weight-normalized layer cannot take a folded weight: not a fusion candidate, no crash
    normed = _mlp(nn.utils.parametrizations.weight_norm(nn.Linear(16, 8)), nn.BatchNorm1d(8))
    report = audit(_exact(normed), X, checks=["fusion"])
    assert report.ok
    assert not report.skipped


# -- the whole audit ------------------------------------------------------------------------------


def test_a_clean_reference_model_has_no_finding_and_nothing_changes() -> None:
    from normlab.data import load_dataset
    from normlab.experiments.config import RunConfig
    from normlab.experiments.models import build_model

    data = load_dataset("digits")
    model = build_model(RunConfig(arch="vgg", width=16), data.input_shape, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(data.y_train), (128,), generator=gen)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    recompute_population_stats(model, data.x_train)
    model.eval()
    before = _state(model)
    rng = torch.random.get_rng_state()
    report = audit(model, (data.x_train, data.y_train), loss_fn=F.cross_entropy, batch_size=128)
    # fusing may or may not be measurably faster here (conv-dominated: ~0.85-0.95x on this
    # machine); that finding is timing, every other check is exact
    assert [f for f in report.findings if f.check != "fusion"] == [], str(report)
    assert report.checks == CHECKS
    assert not report.skipped
    assert _same(before, _state(model))
    assert torch.equal(rng, torch.random.get_rng_state())
    # the inference form of the same model passes everything
    fused = fuse_batchnorm(model)
    assert audit(fused, (data.x_train, data.y_train), loss_fn=F.cross_entropy).ok


def test_a_flawed_model_is_unchanged_and_the_report_serializes() -> None:
    model = _mlp(
        nn.Linear(16, 32),
        nn.Dropout(0.5),
        nn.Linear(32, 32),
        nn.BatchNorm1d(32, momentum=0.99),
        nn.ReLU(),
        nn.Linear(32, 2),
    )
    model.train()
    before = _state(model)
    report = audit(model, (X * 100, Y), loss_fn=F.cross_entropy, batch_size=8)
    assert _same(before, _state(model))
    found = set(_checks(report))
    assert {
        "input-scale",
        "bias-before-norm",
        "dropout-before-norm",
        "small-batch",
        "modes",
    } <= found
    assert [f.severity for f in report.findings] == sorted(
        (f.severity for f in report.findings), key=["error", "warning", "info"].index
    )
    record = json.loads(report.to_json())
    assert record["schema"] == "normlab.audit"
    assert record["version"] == 1
    assert len(record["findings"]) == len(report.findings)
    assert "input-scale" in str(report)


def test_a_failing_check_is_reported_and_the_model_unchanged() -> None:
    model = _bn_mlp().train()
    before = _state(model)

    def broken(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    report = audit(model, (X, Y), loss_fn=broken)  # the other checks still report
    assert report.skipped["stale-statistics"] == "failed: RuntimeError: boom"
    assert _same(before, _state(model))


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: audit(_bn_mlp(), X[:0]), ValueError, r"audit: 'data' must be a non-empty"),
        (lambda: audit(_bn_mlp(), 3), TypeError, r"audit: 'data' must be a tensor, an \(inputs"),
        (lambda: audit(_bn_mlp(), []), ValueError, r"'data' must be at least one batch"),
        (
            lambda: audit(_bn_mlp(), torch.randn(8, 5)),
            ValueError,
            r"audit: the model must be able to run on every batch of 'data', got RuntimeError on "
            r"batch 0: .*Fix: check that every batch holds the model's inputs",
        ),
        (lambda: audit(_bn_mlp().state_dict(), X), TypeError, r"argument 'model' must be a torch"),
        (lambda: audit(_bn_mlp(), X, checks=["bias"]), ValueError, r"argument 'checks' must be"),
        (lambda: audit(_bn_mlp(), X, batch_size=0), ValueError, r"batch_size"),
    ],
)
def test_bad_input(call, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()


def test_normlab_audit_is_callable_from_the_package() -> None:
    import normlab

    report = normlab.audit(_bn_mlp(bias=True), X, checks=["bias-before-norm"])
    assert _checks(report) == ["bias-before-norm"]
    assert normlab.audit.CHECKS == CHECKS
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        normlab.nope  # noqa: B018


# -- the reviewer's cases: shapes of models and data, and false positives ------------------------


def test_tuple_outputs_dict_batches_and_lists_of_batches() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _bn_mlp()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.net(x)
            return out, out.detach()

    stale = Pair().eval()
    report = audit(stale, X * 4 + 2, checks=["stale-statistics"])
    assert _checks(report) == ["stale-statistics"]
    assert report.skipped["stale-statistics"].startswith("partial")  # not "failed"
    model = _exact(_bn_mlp())
    batches = [{"features": X[i : i + 64]} for i in range(0, 512, 64)]
    report = audit(model, batches, input_fn=lambda b: (b["features"],), batch_size=64)
    assert report.samples == 512
    assert "small-batch" not in _checks(report)
    listed = audit(model, [X[:256], X[256:]], checks=["input-scale"])
    assert listed.samples == 512  # a list is batches, not (inputs, targets)


def test_no_finding_from_sampling_noise_or_mode_free_layers() -> None:
    big = torch.randn(20000, 16)
    model = _bn_mlp()
    recompute_population_stats(model, big)
    report = audit(model.eval(), big[:2000], checks=["stale-statistics"])
    assert report.ok, report.findings[0].evidence if report.findings else ""
    ln = _mlp(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 2)).eval()
    ln[1].train()  # layer norm computes the same in both modes
    assert audit(ln, X, checks=["modes"]).ok
    inference = _exact(_bn_mlp()).requires_grad_(False)  # nothing trains: nothing "frozen"
    assert audit(inference, X, checks=["modes"]).ok


def test_a_norm_frozen_by_eval_inside_a_training_model_is_found_and_only_it_frozen() -> None:
    model = _mlp(
        nn.Linear(16, 32, bias=False),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 32, bias=False),
        nn.BatchNorm1d(32),
        nn.Linear(32, 2),
    )
    _exact(model).train()
    model[1].eval()  # frozen the usual way
    report = audit(model, X, checks=["modes"])
    (finding,) = report.findings
    assert finding.evidence["frozen_affine_but_tracking"] == ["1"]
    fixed = apply_fixes(model, report)
    assert isinstance(fixed[1], nl.FrozenBatchNorm)
    assert type(fixed[4]) is nn.BatchNorm1d  # the other one still trains


def test_apply_fixes_takes_data_as_audit_does() -> None:
    model = _bn_mlp().eval()
    report = audit(model, (X * 4 + 2, Y), loss_fn=F.cross_entropy, checks=["stale-statistics"])
    assert report.findings
    fixed = apply_fixes(model, report, (X * 4 + 2, Y))  # the (inputs, targets) pair audit took
    assert audit(fixed, (X * 4 + 2, Y), loss_fn=F.cross_entropy, checks=["stale-statistics"]).ok


def test_quiet_on_healthy_activations_without_norms() -> None:
    torch.manual_seed(6)
    deep = _mlp(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.Tanh())])
    for m in deep:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight, gain=5 / 3)  # tanh's gain keeps the variance
    assert audit(deep, X, checks=["activations"]).ok
    saturated = _mlp(nn.Linear(16, 16), nn.Tanh())
    with torch.no_grad():
        saturated[0].weight.mul_(100)
    assert "layers with mostly saturated units" in {
        f.title for f in audit(saturated, X, checks=["activations"]).findings
    }
