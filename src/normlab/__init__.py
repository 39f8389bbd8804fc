"""normlab: normalization and stochastic regularization for PyTorch -- correct, fast, measurable.

>>> import normlab
>>> bn = normlab.nn.BatchNorm2d(8)
>>> isinstance(bn, torch.nn.BatchNorm2d), bn(torch.randn(4, 8, 3, 3)).shape
(True, torch.Size([4, 8, 3, 3]))
"""

from normlab import functional, nn

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "nn"]
