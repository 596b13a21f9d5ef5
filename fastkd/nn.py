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


class SparseKDLoss(torch.nn.Module):
    """Module form of :func:`fastkd.sparse_kd_loss` (a top-k teacher); same keywords.

    >>> crit = fastkd.SparseKDLoss(temperature=2.0, tail="bucket")
    >>> loss = crit(student_logits, teacher_indices, teacher_values, labels)
    """

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0,
                 beta: float = 0.5, skew: float = 0.1, tail: str = "renormalize",
                 ignore_index: int = -100, hard_label_weight: float = 0.0,
                 soft_label_weight: float = 1.0, scale_temperature: bool = True,
                 reduction: str = "batchmean", validate: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        self.kwargs = dict(divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                           tail=tail, ignore_index=ignore_index,
                           hard_label_weight=hard_label_weight,
                           soft_label_weight=soft_label_weight,
                           scale_temperature=scale_temperature, reduction=reduction,
                           validate=validate, backend=backend)
        probe = torch.zeros(1, 2)
        F.sparse_kd_loss(probe, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1),
                         **{**self.kwargs, "hard_label_weight": 0.0, "backend": "torch"})

    def forward(self, student_logits, teacher_indices, teacher_values, labels=None,
                num_items_in_batch=None):
        return F.sparse_kd_loss(student_logits, teacher_indices, teacher_values, labels,
                                num_items_in_batch=num_items_in_batch, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class FusedLinearKDLoss(torch.nn.Module):
    """Module form of :func:`fastkd.fused_linear_kd_loss`: KD from hidden states and lm_head
    weights without materializing the logits. Takes kd_loss's keywords plus ``chunk_size``.

    >>> crit = fastkd.FusedLinearKDLoss(divergence="jsd", temperature=2.0)
    >>> loss = crit(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)
    """

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0,
                 beta: float = 0.5, skew: float = 0.1, ignore_index: int = -100,
                 hard_label_weight: float = 0.0, soft_label_weight: float = 1.0,
                 scale_temperature: bool = True, softcap: Optional[float] = None,
                 vocab_size: Optional[int] = None, reduction: str = "batchmean",
                 chunk_size: Optional[int] = None, backend: Optional[str] = None):
        super().__init__()
        self.kwargs = dict(divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                           ignore_index=ignore_index, hard_label_weight=hard_label_weight,
                           soft_label_weight=soft_label_weight,
                           scale_temperature=scale_temperature, softcap=softcap,
                           vocab_size=vocab_size, reduction=reduction, chunk_size=chunk_size,
                           backend=backend)
        probe = torch.zeros(1, vocab_size or 2)
        F.kd_loss(probe, probe, None, **{k: v for k, v in self.kwargs.items()
                                         if k not in ("chunk_size", "backend", "hard_label_weight")},
                  backend="torch")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, num_items_in_batch=None):
        return F.fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden,
                                      teacher_weight, labels, student_bias=student_bias,
                                      teacher_bias=teacher_bias,
                                      num_items_in_batch=num_items_in_batch, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
