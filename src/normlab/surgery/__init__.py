"""Whole-model transforms: population statistics, conversion, fusion, freezing, conventions.

Every transform except :func:`recompute_population_stats` (whose job is to fill the buffers)
returns a new model and leaves the caller's untouched.
"""

from normlab.surgery.conventions import (
    keras_to_torch_momentum,
    load_keras_batchnorm,
    torch_to_keras_momentum,
)
from normlab.surgery.convert import convert_norm, freeze_batchnorm, fusable_pairs, fuse_batchnorm
from normlab.surgery.population import PopulationStatsReport, recompute_population_stats
from normlab.surgery.walk import copy_norm_state, replace_modules

__all__ = [
    "PopulationStatsReport",
    "convert_norm",
    "copy_norm_state",
    "freeze_batchnorm",
    "fusable_pairs",
    "fuse_batchnorm",
    "keras_to_torch_momentum",
    "load_keras_batchnorm",
    "recompute_population_stats",
    "replace_modules",
    "torch_to_keras_momentum",
]
