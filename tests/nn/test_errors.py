"""Every user-facing error: the exception type and the message (argument, expected, got, fix)."""

from __future__ import annotations

import pytest
import torch

import normlab.functional as NF
import normlab.nn as nl


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (
            lambda: nl.BatchNorm2d(0),
            ValueError,
            r"BatchNorm2d: argument 'num_features' must be a positive int \(>= 1\), got 0\. Fix: pass",
        ),
        (
            lambda: nl.BatchNorm2d(3.0),
            TypeError,
            r"BatchNorm2d: argument 'num_features' must be a positive int, got float 3\.0\. Fix",
        ),
        (
            lambda: nl.BatchNorm2d(True),
            TypeError,
            r"'num_features' must be a positive int, got bool",
        ),
        (
            lambda: nl.BatchNorm1d(3, eps=0),
            ValueError,
            r"BatchNorm1d: argument 'eps' must be a finite float > 0, got 0\. Fix: pass a small "
            r"positive value such as eps=1e-5",
        ),
        (
            lambda: nl.LayerNorm(3, eps=-1e-5),
            ValueError,
            r"LayerNorm: argument 'eps' must be a finite",
        ),
        (
            lambda: nl.GroupNorm(4, 2, eps=float("nan")),
            ValueError,
            r"'eps' must be a finite float > 0, got nan",
        ),
        (
            lambda: nl.GroupNorm(4, 2, eps="1e-5"),
            TypeError,
            r"'eps' must be a positive float, got str",
        ),
        (
            lambda: nl.BatchNorm2d(3, momentum=1.5),
            ValueError,
            r"BatchNorm2d: argument 'momentum' must be None or a float in \[0, 1\], got 1\.5\. Fix: pass a "
            r"value in \[0, 1\], e\.g\. momentum=0\.1 \(torch convention: weight of the new batch\); a "
            r"percentage\? divide by 100",
        ),
        (
            lambda: nl.BatchNorm2d(3, momentum=-0.1),
            ValueError,
            r"'momentum' must be None or a float in \[0, 1\], got -0\.1",
        ),
        (
            lambda: nl.InstanceNorm2d(3, momentum="0.1"),
            TypeError,
            r"'momentum' must be None or a float",
        ),
        (
            lambda: nl.BatchNorm2d(3, affine=1),
            TypeError,
            r"BatchNorm2d: argument 'affine' must be True or False, got int 1\. Fix: pass affine=True",
        ),
        (
            lambda: nl.BatchNorm2d(3, track_running_stats=None),
            TypeError,
            r"'track_running_stats' must be True or False",
        ),
        (
            lambda: nl.GroupNorm(6, 4),
            ValueError,
            r"GroupNorm: num_features % num_groups must be 0, got 6 % 4 = 2\. Fix: choose num_groups "
            r"dividing 6, e\.g\. one of \[2, 3, 6\]",
        ),
        (
            lambda: nl.GroupNorm(6, 0),
            ValueError,
            r"GroupNorm: argument 'num_groups' must be a positive int",
        ),
        (
            lambda: nl.LayerNorm(()),
            ValueError,
            r"LayerNorm: argument 'normalized_shape' must be a non-empty",
        ),
        (lambda: nl.LayerNorm((3, 0)), ValueError, r"'normalized_shape' must be a positive int"),
    ],
)
def test_constructor_errors(make, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    ("layer", "x", "exc", "match"),
    [
        (
            nl.BatchNorm2d(3),
            torch.randn(2, 3, 4),
            ValueError,
            r"BatchNorm2d: the input must be a 4-D tensor \(N, C, H, W\), got a 3-D tensor of shape "
            r"\(2, 3, 4\)\. Fix: reshape the input or pick the layer",
        ),
        (
            nl.BatchNorm1d(3),
            torch.randn(2, 3, 4, 4),
            ValueError,
            r"BatchNorm1d: the input must be a 2 or 3-D tensor \(N, C\) or \(N, C, L\)",
        ),
        (
            nl.BatchNorm2d(3),
            torch.randn(2, 4, 5, 5),
            ValueError,
            r"BatchNorm2d: the input's size in dim 1 \(channels\) must be num_features=3, got 4 \(input "
            r"shape \(2, 4, 5, 5\)\)\. Fix: construct the layer with num_features=4",
        ),
        (
            nl.InstanceNorm2d(3),
            torch.randn(4, 5, 5),
            ValueError,
            r"InstanceNorm2d: the input's size in dim 0 \(channels\) must be num_features=3, got 4",
        ),
        (
            nl.GroupNorm(4, 2),
            torch.randn(2, 6, 3),
            ValueError,
            r"GroupNorm: the input's size in dim 1",
        ),
        (
            nl.ChannelLayerNorm(4),
            torch.randn(4),
            ValueError,
            r"ChannelLayerNorm: the input must be a 2-D to 8-D",
        ),
        (
            nl.BatchNorm2d(3),
            torch.ones(2, 3, 4, 4, dtype=torch.long),
            TypeError,
            r"BatchNorm2d: 'input' must be a floating-point tensor, got dtype torch\.int64\. Fix: convert "
            r"it with input\.float\(\)",
        ),
        (
            nl.LayerNorm(3),
            [1.0, 2.0, 3.0],
            TypeError,
            r"LayerNorm: 'input' must be a torch\.Tensor, got list",
        ),
        (
            nl.LayerNorm((3, 4)),
            torch.randn(2, 4, 3),
            ValueError,
            r"LayerNorm: the input's trailing dims must be normalized_shape=\(3, 4\), got input shape "
            r"\(2, 4, 3\)\. Fix: construct the layer with normalized_shape=\(4, 3\)",
        ),
        (
            nl.BatchNorm1d(3).train(),
            torch.randn(1, 3),
            ValueError,
            r"BatchNorm1d: the number of values per channel used for each statistic must be more than 1, "
            r"got 1 \(input shape \(1, 3\)\)\. Fix: use a batch of at least 2 samples, call \.eval\(\) "
            r"to use the running statistics, or use a batch-independent norm",
        ),
        (
            nl.BatchNorm1d(3, track_running_stats=False).eval(),
            torch.randn(1, 3),
            ValueError,
            r"values per channel used for each statistic must be more than 1",
        ),
        (
            nl.BatchNorm2d(3).train(),
            torch.randn(0, 3, 2, 2),
            ValueError,
            r"BatchNorm2d: the batch size when using batch statistics must be at least 1, got 0 "
            r"\(input shape \(0, 3, 2, 2\)\)\. Fix: skip empty batches before calling the layer",
        ),
        (
            nl.InstanceNorm2d(3, track_running_stats=True).train(),
            torch.randn(0, 3, 4, 4),
            ValueError,
            r"InstanceNorm2d: the batch size when using batch statistics must be at least 1, got 0",
        ),
        (
            nl.InstanceNorm1d(3).train(),
            torch.randn(2, 3, 1),
            ValueError,
            r"InstanceNorm1d: the number of spatial elements per instance used for each statistic must be "
            r"more than 1, got 1 .* Fix: instance norm needs a feature map larger than 1 element",
        ),
    ],
)
def test_forward_errors(layer, x, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match):
        layer(x)


def test_batch_of_one_is_fine_in_eval_with_running_stats() -> None:
    bn = nl.BatchNorm1d(3).eval()
    assert bn(torch.randn(1, 3)).shape == (1, 3)


def test_a_failed_forward_changes_nothing() -> None:
    bn = nl.BatchNorm1d(3, momentum=None).train()
    bn(torch.randn(4, 3))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1"):
        bn(torch.randn(1, 3))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert bn.training


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda: NF.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True),
            ValueError,
            r"batch_norm: running_mean and running_var must be both tensors or both None, got "
            r"running_mean=tensor, running_var=None\. Fix: pass both",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), None, None, torch.ones(4), training=True),
            ValueError,
            r"batch_norm: the shape of 'weight' must be \(3,\), one value per channel, got \(4,\)\. Fix: "
            r"pass a 1-D tensor with 3 elements, or None",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), None, None, [1.0, 1.0, 1.0], training=True),
            TypeError,
            r"'weight' must be a torch\.Tensor or None, got list",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), training=True, momentum=2.0),
            ValueError,
            r"batch_norm: argument 'momentum' must be a float in \[0, 1\], got 2\.0",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), training=True, eps=0.0),
            ValueError,
            r"'eps' must be a finite float > 0",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4), training=True),
            ValueError,
            r"batch_norm: the input must be a 2-D to 8-D tensor \(N, C, \*\), got a 1-D tensor of shape "
            r"\(4,\)\. Fix: add a batch dim with input\.unsqueeze\(0\)",
        ),
        (
            lambda: NF.instance_norm(torch.randn(4, 3), training=True),
            ValueError,
            r"instance_norm: the input must be a tensor \(N, C, \*\) with at least one spatial dim, got "
            r"shape \(4, 3\)\. Fix: instance norm normalizes over positions; for \(N, C\) features use LayerNorm",
        ),
        (
            lambda: NF.group_norm(torch.randn(4, 6), 4),
            ValueError,
            r"group_norm: num_features % num_groups must be 0",
        ),
        (
            lambda: NF.channel_layer_norm(torch.randn(4, 3, 2), torch.ones(2)),
            ValueError,
            r"the shape of 'weight' must be \(3,\)",
        ),
    ],
)
def test_functional_errors(call, exc, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=match):
        call()
