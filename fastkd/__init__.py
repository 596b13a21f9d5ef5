"""fastkd: fused knowledge-distillation losses for PyTorch."""
from ._backend import available_backends
from .functional import fused_linear_kd_loss, kd_loss, sparse_kd_loss
from .nn import FusedLinearKDLoss, KDLoss, SparseKDLoss

__version__ = "0.1.0"
__all__ = ["kd_loss", "KDLoss", "sparse_kd_loss", "SparseKDLoss", "fused_linear_kd_loss",
           "FusedLinearKDLoss", "available_backends", "__version__"]
