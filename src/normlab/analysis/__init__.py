"""Measurements on any ``nn.Module``: they return data (frozen dataclasses, tensors), never plot,
never write files, and leave the model exactly as they found it."""

from normlab.analysis.activations import ActivationStats, activation_statistics
from normlab.analysis.mc import MCPrediction, is_stochastic, mc_predict

__all__ = [
    "ActivationStats",
    "MCPrediction",
    "activation_statistics",
    "is_stochastic",
    "mc_predict",
]
