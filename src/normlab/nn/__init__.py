"""Norm layers as ``nn.Module`` shells over :mod:`normlab.functional`, and the name registry."""

from normlab.nn.batch_variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm,
    MeanOnlyBatchNorm,
    NoisyBatchNorm,
)
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.dropconnect import (
    DropConnectConv1d,
    DropConnectConv2d,
    DropConnectConv3d,
    DropConnectLinear,
)
from normlab.nn.frozen import FrozenBatchNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.lp_norm import L1BatchNorm, LinfBatchNorm, LpBatchNorm
from normlab.nn.normalization import ChannelLayerNorm, GroupNorm, LayerNorm
from normlab.nn.registry import (
    available_dropouts,
    available_norms,
    default_num_groups,
    get_dropout_layer,
    get_norm_layer,
    register_norm,
    weight_transform_of,
)
from normlab.nn.standardizer import InputStandardizer
from normlab.nn.stochastic import (
    SELU,
    AlphaDropout,
    Dropout,
    FeatureAlphaDropout,
    FeatureDropout1d,
    FeatureDropout2d,
    FeatureDropout3d,
)
from normlab.nn.sync import SyncBatchNorm
from normlab.nn.weight import WeightStandardization

__all__ = [
    "SELU",
    "AlphaDropout",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ChannelLayerNorm",
    "DropConnectConv1d",
    "DropConnectConv2d",
    "DropConnectConv3d",
    "DropConnectLinear",
    "Dropout",
    "FeatureAlphaDropout",
    "FeatureDropout1d",
    "FeatureDropout2d",
    "FeatureDropout3d",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InputStandardizer",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "L1BatchNorm",
    "LayerNorm",
    "LinfBatchNorm",
    "LpBatchNorm",
    "MeanOnlyBatchNorm",
    "NoisyBatchNorm",
    "SyncBatchNorm",
    "WeightStandardization",
    "available_dropouts",
    "available_norms",
    "default_num_groups",
    "get_dropout_layer",
    "get_norm_layer",
    "register_norm",
    "weight_transform_of",
]
