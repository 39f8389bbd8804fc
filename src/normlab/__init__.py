"""normlab: normalization and stochastic regularization for PyTorch -- correct, fast, measurable.

>>> import normlab
>>> normlab.nn.BatchNorm2d(8)
BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
"""

from normlab import functional, nn

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "nn"]
