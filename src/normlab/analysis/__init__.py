"""Measurements on any ``nn.Module``: they return data (frozen dataclasses, tensors), never plot,
never write files, and leave the model exactly as they found it."""

from normlab.analysis._common import without_norm_affine
from normlab.analysis.activations import (
    TRACKED,
    ActivationStats,
    ActivationTracker,
    activation_statistics,
    percentiles,
)
from normlab.analysis.hessian import (
    Eigenvalues,
    SpectralDensity,
    Trace,
    dense_hessian,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    lanczos,
    spectral_density,
    top_eigenvalues,
    trace_estimate,
)
from normlab.analysis.ics import CovariateShift, LayerShift, internal_covariate_shift
from normlab.analysis.landscape import (
    DEFAULT_MULTIPLIERS,
    Every,
    LandscapeProbe,
    LossSurface,
    landscape_probe,
    loss_surface,
    random_directions,
)
from normlab.analysis.mc import MCPrediction, is_stochastic, mc_predict

__all__ = [
    "DEFAULT_MULTIPLIERS",
    "TRACKED",
    "ActivationStats",
    "ActivationTracker",
    "CovariateShift",
    "Eigenvalues",
    "Every",
    "LandscapeProbe",
    "LayerShift",
    "LossSurface",
    "MCPrediction",
    "SpectralDensity",
    "Trace",
    "activation_statistics",
    "dense_hessian",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "internal_covariate_shift",
    "is_stochastic",
    "lanczos",
    "landscape_probe",
    "loss_surface",
    "mc_predict",
    "percentiles",
    "random_directions",
    "spectral_density",
    "top_eigenvalues",
    "trace_estimate",
    "without_norm_affine",
]
