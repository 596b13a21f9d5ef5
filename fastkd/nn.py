"""Thin torch.nn.Module wrappers: each holds a loss's configuration and calls fastkd.functional."""
from __future__ import annotations

from typing import Optional

import torch

from . import _backend
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
                 backend: Optional[str] = None, process_group=None):
        super().__init__()
        _backend.check_name(backend)  # a typo fails here, not at the first batch
        self.process_group = process_group  # vocab-parallel logits (fastkd.distributed)
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
                         num_items_in_batch=num_items_in_batch,
                         process_group=self.process_group, **self.kwargs)

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
                 backend: Optional[str] = None, process_group=None):
        super().__init__()
        _backend.check_name(backend)  # a typo fails here, not at the first batch
        self.process_group = process_group
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
                                num_items_in_batch=num_items_in_batch,
                                process_group=self.process_group, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class FusedLinearKDLoss(torch.nn.Module):
    """Module form of :func:`fastkd.fused_linear_kd_loss`: KD from hidden states and lm_head
    weights without materializing the logits. Takes kd_loss's keywords plus ``chunk_size`` and
    ``fp32_grad_accumulation``.

    >>> crit = fastkd.FusedLinearKDLoss(divergence="jsd", temperature=2.0)
    >>> loss = crit(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)
    """

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0,
                 beta: float = 0.5, skew: float = 0.1, ignore_index: int = -100,
                 hard_label_weight: float = 0.0, soft_label_weight: float = 1.0,
                 scale_temperature: bool = True, softcap: Optional[float] = None,
                 vocab_size: Optional[int] = None, reduction: str = "batchmean",
                 chunk_size: Optional[int] = None, backend: Optional[str] = None,
                 process_group=None, fp32_grad_accumulation: bool = True):
        super().__init__()
        _backend.check_name(backend)  # a typo fails here, not at the first batch
        self.process_group = process_group
        if not isinstance(fp32_grad_accumulation, bool):
            raise TypeError(f"fp32_grad_accumulation must be a bool, got {fp32_grad_accumulation!r}")
        self.kwargs = dict(divergence=divergence, temperature=temperature, beta=beta, skew=skew,
                           ignore_index=ignore_index, hard_label_weight=hard_label_weight,
                           soft_label_weight=soft_label_weight,
                           scale_temperature=scale_temperature, softcap=softcap,
                           vocab_size=vocab_size, reduction=reduction, chunk_size=chunk_size,
                           backend=backend, fp32_grad_accumulation=fp32_grad_accumulation)
        probe = torch.zeros(1, vocab_size or 2)
        F.kd_loss(probe, probe, None, **{k: v for k, v in self.kwargs.items()
                                         if k not in ("chunk_size", "backend", "hard_label_weight",
                                                      "fp32_grad_accumulation")},
                  backend="torch")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, num_items_in_batch=None):
        return F.fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden,
                                      teacher_weight, labels, student_bias=student_bias,
                                      teacher_bias=teacher_bias,
                                      num_items_in_batch=num_items_in_batch,
                                      process_group=self.process_group, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


# --- relational
class RKDDistanceLoss(torch.nn.Module):
    """Module form of :func:`fastkd.rkd_distance_loss`.

    >>> crit = fastkd.RKDDistanceLoss(huber_delta=1.0)
    >>> loss = crit(student_embeddings, teacher_embeddings)   # [N, ...] each
    """

    def __init__(self, eps: float = 1e-12, huber_delta: float = 1.0,
                 backend: Optional[str] = None, process_group=None):
        super().__init__()
        _backend.check_name(backend)  # a typo fails here, not at the first batch
        self.kwargs = dict(eps=F._check_eps(eps), huber_delta=F._check_huber_delta(huber_delta),
                           backend=backend, process_group=process_group)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.rkd_distance_loss(student, teacher, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class RKDAngleLoss(torch.nn.Module):
    """Module form of :func:`fastkd.rkd_angle_loss`."""

    def __init__(self, huber_delta: float = 1.0, backend: Optional[str] = None,
                 process_group=None):
        super().__init__()
        _backend.check_name(backend)  # a typo fails here, not at the first batch
        self.kwargs = dict(huber_delta=F._check_huber_delta(huber_delta), backend=backend,
                           process_group=process_group)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.rkd_angle_loss(student, teacher, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class RKDLoss(torch.nn.Module):
    """Module form of :func:`fastkd.rkd_loss`: distance_weight * distance + angle_weight * angle.

    >>> crit = fastkd.RKDLoss(distance_weight=25.0, angle_weight=50.0)   # Park et al.'s CUB weights
    """

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0,
                 eps: float = 1e-12, huber_delta: float = 1.0, backend: Optional[str] = None,
                 process_group=None):
        super().__init__()
        _backend.check_name(backend)  # a typo fails here, not at the first batch
        self.kwargs = dict(distance_weight=F._check_weight("distance_weight", distance_weight),
                           angle_weight=F._check_weight("angle_weight", angle_weight),
                           eps=F._check_eps(eps), huber_delta=F._check_huber_delta(huber_delta),
                           backend=backend, process_group=process_group)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.rkd_loss(student, teacher, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class SimilarityPreservingLoss(torch.nn.Module):
    """Module form of :func:`fastkd.similarity_preserving_loss`."""

    def __init__(self, backend: Optional[str] = None, process_group=None):
        super().__init__()
        _backend.check_name(backend)  # a typo fails here, not at the first batch
        self.backend = backend
        self.process_group = process_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.similarity_preserving_loss(student, teacher, backend=self.backend,
                                            process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class FeatureHintLoss(torch.nn.Module):
    """FitNets hint loss: a learnable projection of the student's features to the teacher's
    width, then the mean squared error (:func:`fastkd.feature_hint_loss`).

    ``[N, C, H, W]`` features are projected by a 1x1 convolution over the channels, any other
    shape by a Linear over the last dim; ``self.proj`` is an ``nn.Linear(student_dim,
    teacher_dim)`` either way (its weight is the 1x1 kernel). Add its parameters to the
    optimizer.

    >>> hint = fastkd.FeatureHintLoss(student_dim=256, teacher_dim=1024)
    >>> loss = hint(student_feats, teacher_feats)
    """

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        for name, v in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.proj = torch.nn.Linear(student_dim, teacher_dim, bias=bias, device=device,
                                    dtype=dtype)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.feature_hint_loss(student, teacher, self.proj.weight, self.proj.bias)


# --- attention
class AttentionTransferLoss(torch.nn.Module):
    """Module form of :func:`fastkd.attention_transfer_loss` (Zagoruyko and Komodakis).

    >>> at = fastkd.AttentionTransferLoss(p=2)
    >>> loss = at([s_feat1, s_feat2], [t_feat1, t_feat2])   # [B, C, H, W] pairs, summed
    """

    def __init__(self, p: float = 2, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        _backend.check_name(backend)  # a typo fails here, not at the first batch
        self.kwargs = dict(p=p, reduction=reduction, backend=backend)
        probe = torch.zeros(1, 1, 1, 1)
        F.attention_transfer_loss(probe, probe, **{**self.kwargs, "backend": "torch"})

    def forward(self, student_features, teacher_features) -> torch.Tensor:
        return F.attention_transfer_loss(student_features, teacher_features, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class AttentionMapLoss(torch.nn.Module):
    """Module form of :func:`fastkd.attention_map_loss` (TinyBERT, MiniLM attention maps).

    >>> crit = fastkd.AttentionMapLoss(kind="kl", inputs="probs")
    >>> loss = crit(student_attn, teacher_attn, attention_mask)   # [B, H, L, L] maps
    """

    def __init__(self, kind: str = "kl", inputs: str = "probs", head_map=None,
                 reduction: str = "batchmean", backend: Optional[str] = None):
        super().__init__()
        _backend.check_name(backend)  # a typo fails here, not at the first batch
        self.kwargs = dict(kind=kind, inputs=inputs, head_map=head_map, reduction=reduction,
                           backend=backend)
        if head_map is None:
            probe = torch.full((1, 1, 1, 1), 1.0)
            F.attention_map_loss(probe, probe, **{**self.kwargs, "backend": "torch"})
        else:  # validate everything but the head indices (the teacher's head count is unknown)
            F.attention_map_loss(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1),
                                 **{**self.kwargs, "head_map": None, "backend": "torch"})

    def forward(self, student_attn, teacher_attn, attention_mask=None) -> torch.Tensor:
        return F.attention_map_loss(student_attn, teacher_attn, attention_mask=attention_mask,
                                    **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class AttentionRelationLoss(torch.nn.Module):
    """Module form of :func:`fastkd.attention_relation_loss` (MiniLMv2 self-attention relations).

    >>> crit = fastkd.AttentionRelationLoss(num_relation_heads=12)
    >>> loss = crit({"q": q_s, "k": k_s, "v": v_s}, {"q": q_t, "k": k_t, "v": v_t}, attention_mask)
    """

    def __init__(self, num_relation_heads: int, relations=(("q", "q"), ("k", "k"), ("v", "v")),
                 backend: Optional[str] = None):
        super().__init__()
        _backend.check_name(backend)  # a typo fails here, not at the first batch
        self.kwargs = dict(num_relation_heads=num_relation_heads,
                           relations=tuple(tuple(r) if isinstance(r, list) else r
                                           for r in relations)
                           if isinstance(relations, (list, tuple)) else relations,
                           backend=backend)
        A = num_relation_heads if isinstance(num_relation_heads, int) and \
            not isinstance(num_relation_heads, bool) and num_relation_heads > 0 else 1
        probe = torch.zeros(1, 1, A)
        F.attention_relation_loss((probe, probe, probe), (probe, probe, probe),
                                  **{**self.kwargs, "backend": "torch"})

    def forward(self, student_states, teacher_states, attention_mask=None) -> torch.Tensor:
        return F.attention_relation_loss(student_states, teacher_states,
                                         attention_mask=attention_mask, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
