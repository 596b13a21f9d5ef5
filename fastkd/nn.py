"""Thin torch.nn.Module wrappers: each holds a loss's configuration and calls fastkd.functional."""
from __future__ import annotations

from typing import Optional

import torch

from . import functional as F


class KDLoss(torch.nn.Module):
    """Module form of :func:`fastkd.kd_loss`; takes the same keywords.

    >>> crit = fastkd.KDLoss(divergence="jsd", beta=0.5, temperature=2.0)
    >>> loss = crit(student_logits, teacher_logits, labels)
    """

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                 skew: float = 0.1, ignore_index: int = -100, hard_label_weight: float = 0.0,
                 soft_label_weight: float = 1.0, scale_temperature: bool = True,
                 softcap: Optional[float] = None, vocab_size: Optional[int] = None,
                 reduction: str = "batchmean", inplace: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        self.kwargs = dict(divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                           ignore_index=ignore_index, hard_label_weight=hard_label_weight,
                           soft_label_weight=soft_label_weight,
                           scale_temperature=scale_temperature, softcap=softcap,
                           vocab_size=vocab_size, reduction=reduction, inplace=inplace,
                           backend=backend)
        # Fail at construction, not at the first batch: validate on a tiny CPU problem.
        probe = torch.zeros(1, vocab_size or 2)
        F.kd_loss(probe, probe, None, **{**self.kwargs, "hard_label_weight": 0.0,
                                         "inplace": False, "backend": "torch"})

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None, num_items_in_batch=None) -> torch.Tensor:
        return F.kd_loss(student_logits, teacher_logits, labels,
                         num_items_in_batch=num_items_in_batch, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
