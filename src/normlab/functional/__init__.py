"""Pure tensor -> tensor normalization math (no modules, no state beyond the buffers passed in).

Functions that use batch statistics take ``training`` as a required keyword. The shared statistics
core (moments, normalize, running-statistics update) is in :mod:`normlab.functional._core`.
"""

from normlab.functional._core import (
    Moments,
    NonFiniteStatisticsWarning,
    moments,
    normalize,
    pool_moments,
    update_running_stats_,
)
from normlab.functional.batch_norm import batch_norm, instance_norm
from normlab.functional.normalization import channel_layer_norm, group_norm, layer_norm

__all__ = [
    "Moments",
    "NonFiniteStatisticsWarning",
    "batch_norm",
    "channel_layer_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize",
    "pool_moments",
    "update_running_stats_",
]
