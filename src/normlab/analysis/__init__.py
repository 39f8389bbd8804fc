"""Measurements on any ``nn.Module``: they return data (frozen dataclasses, tensors), never plot,
never write files, and leave the model exactly as they found it."""

from normlab.analysis.activations import ActivationStats, activation_statistics
from normlab.analysis.hessian import (
    Eigenvalues,
    SpectralDensity,
    Trace,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    lanczos,
    spectral_density,
    top_eigenvalues,
    trace_estimate,
)
from normlab.analysis.mc import MCPrediction, is_stochastic, mc_predict

__all__ = [
    "ActivationStats",
    "Eigenvalues",
    "MCPrediction",
    "SpectralDensity",
    "Trace",
    "activation_statistics",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "is_stochastic",
    "lanczos",
    "mc_predict",
    "spectral_density",
    "top_eigenvalues",
    "trace_estimate",
]
