"""normlab: normalization and stochastic regularization for PyTorch -- correct, fast, measurable.

>>> import normlab
>>> bn = normlab.nn.BatchNorm2d(8)
>>> isinstance(bn, torch.nn.BatchNorm2d), bn(torch.randn(4, 8, 3, 3)).shape
(True, torch.Size([4, 8, 3, 3]))
"""

import importlib
from typing import Any

from normlab import functional, nn

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "nn"]

_LAZY = ("surgery", "analysis", "audit", "data", "experiments", "report")


def __getattr__(name: str) -> Any:
    """The heavier subpackages load on first use: ``normlab.audit(model, data)`` just works."""
    if name in _LAZY:
        return importlib.import_module(f"normlab.{name}")
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")
