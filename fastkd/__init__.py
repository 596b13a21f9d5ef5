"""fastkd: fused knowledge-distillation losses for PyTorch."""
from ._backend import available_backends
from .functional import kd_loss
from .nn import KDLoss

__version__ = "0.1.0"
__all__ = ["kd_loss", "KDLoss", "available_backends", "__version__"]
