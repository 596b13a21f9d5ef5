"""fastkd: fused knowledge-distillation losses for PyTorch."""
from ._backend import available_backends
from .functional import fused_linear_kd_loss, kd_loss, sparse_kd_loss
from .nn import FusedLinearKDLoss, KDLoss, SparseKDLoss
from .functional import (feature_hint_loss, rkd_angle_loss, rkd_distance_loss, rkd_loss,  # noqa: E402
                         similarity_preserving_loss)
from .nn import (FeatureHintLoss, RKDAngleLoss, RKDDistanceLoss, RKDLoss,  # noqa: E402
                 SimilarityPreservingLoss)

__version__ = "0.1.0"
__all__ = ["kd_loss", "KDLoss", "sparse_kd_loss", "SparseKDLoss", "fused_linear_kd_loss",
           "FusedLinearKDLoss", "available_backends", "__version__"]
__all__ += ["rkd_distance_loss", "RKDDistanceLoss", "rkd_angle_loss", "RKDAngleLoss", "rkd_loss",
            "RKDLoss", "similarity_preserving_loss", "SimilarityPreservingLoss", "feature_hint_loss",
            "FeatureHintLoss"]
from .functional import (attention_map_loss, attention_relation_loss,  # noqa: E402
                         attention_transfer_loss)
from .nn import AttentionMapLoss, AttentionRelationLoss, AttentionTransferLoss  # noqa: E402

__all__ += ["attention_transfer_loss", "AttentionTransferLoss", "attention_map_loss",
            "AttentionMapLoss", "attention_relation_loss", "AttentionRelationLoss"]
from ._buffers import cpu_cache_info, empty_cache  # noqa: E402

__all__ += ["empty_cache", "cpu_cache_info"]
from ._tuning import autotune_backends  # noqa: E402

__all__ += ["autotune_backends"]
