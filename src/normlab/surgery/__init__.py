"""Whole-model transforms: population statistics, conversion, fusion, freezing, conventions.

Every transform except :func:`recompute_population_stats` (whose job is to fill the buffers)
returns a new model and leaves the caller's untouched.
"""

from normlab.surgery.conventions import (
    keras_to_torch_momentum,
    load_keras_batchnorm,
    torch_to_keras_momentum,
)
from normlab.surgery.convert import (
    convert_norm,
    convert_sync_batchnorm,
    foldable,
    freeze_batchnorm,
    fusable_pairs,
    fuse_batchnorm,
)
from normlab.surgery.population import PopulationStatsReport, recompute_population_stats
from normlab.surgery.walk import copy_norm_state, replace_modules
from normlab.surgery.weights import (
    apply_weight_norm,
    init_self_normalizing_,
    init_weight_norm_,
    standardize_weights,
    weight_layers,
)

__all__ = [
    "PopulationStatsReport",
    "apply_weight_norm",
    "convert_norm",
    "convert_sync_batchnorm",
    "copy_norm_state",
    "foldable",
    "freeze_batchnorm",
    "fusable_pairs",
    "fuse_batchnorm",
    "init_self_normalizing_",
    "init_weight_norm_",
    "keras_to_torch_momentum",
    "load_keras_batchnorm",
    "recompute_population_stats",
    "replace_modules",
    "standardize_weights",
    "torch_to_keras_momentum",
    "weight_layers",
]
