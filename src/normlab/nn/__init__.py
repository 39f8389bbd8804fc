"""Norm layers as ``nn.Module`` shells over :mod:`normlab.functional`, and the name registry."""

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.frozen import FrozenBatchNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.normalization import ChannelLayerNorm, GroupNorm, LayerNorm
from normlab.nn.registry import available_norms, default_num_groups, get_norm_layer, register_norm
from normlab.nn.standardizer import InputStandardizer

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ChannelLayerNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "InputStandardizer",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "available_norms",
    "default_num_groups",
    "get_norm_layer",
    "register_norm",
]
