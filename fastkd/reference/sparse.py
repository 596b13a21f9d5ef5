"""Distillation from a sparse top-k teacher (offline teacher logits): the reference.

The contract of ``sparse_kd_fwd`` for every backend (cpp ``csrc/cpu/sparse.cpp``, triton
``fastkd/triton/sparse.py``). Per row, with a = z/T the student's logits over its full
vocabulary (lq = a - logsumexp(a)), S = {idx_1..idx_k} the teacher's indices, v its values:

    tail = "renormalize" (code 0):
        lp_i = log_softmax(v / T)_i over the k entries.
        forward_kl : D = sum_i p_i (lp_i - lq[idx_i])   (student normalized over the full V)
        otherwise  : D(p, q') with lq'_i = lq[idx_i] - logsumexp_i lq[idx_i]  (student
                     renormalized over S), any divergence of reference/divergences.py
    tail = "bucket" (code 1): v are the teacher's full-vocabulary log-probabilities at T.
        lp_i = v_i, p_tail = 1 - sum_i p_i;  lq_i = lq[idx_i], q_tail = 1 - sum_i q_i,
        D(p, q) over the k+1 buckets, any divergence (tails clamped at 0).

Per bucket i (the tail is bucket k), h_i = dD/dlq_i as in the divergence table, H = sum h.
The dense student gradient of D with respect to a is

    g_j = q_j * gamma + [j = idx_i] * e_i
        renormalize, forward_kl : gamma = -H,                   e_i = h_i
        renormalize, otherwise  : gamma = 0,                    e_i = h_i - q'_i H
        bucket                  : gamma = h_tail/q_tail - H,    e_i = h_i - q[idx_i] h_tail/q_tail
                                  (h_tail/q_tail = 0 when q_tail = 0)

and the row loss and its gradient with respect to z follow kd_fwd exactly (T**2 scaling,
soft/hard weights, hard-label cross-entropy at temperature 1, ignored rows 0). Indices must
be distinct within a row and lie in [0, V). The teacher values get no gradient.
"""
from __future__ import annotations

import torch

from .divergences import divergence_terms, hard_labels_and_mask

TAILS = {"renormalize": 0, "bucket": 1}


def _log1m_sum_exp(l):
    """log(1 - sum_i exp(l_i)) clamped: the tail bucket's log-mass (-inf when it is empty)."""
    tail = (1.0 - l.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    return tail, torch.log(tail)


def sparse_terms(lq, values, divergence: int, temperature: float, beta: float, skew: float,
                 tail: int):
    """The part of a row that lives on the k teacher entries.

    lq: the student's full-vocabulary log-probabilities at T gathered at the teacher's indices
    [..., K]; values: the teacher's values [..., K]. Returns (D [...], gamma [..., 1],
    e [..., K]) of the table above, so that d D / d a_j = q_j * gamma + [j = idx_i] * e_i.
    (A vocabulary-sharded student needs only lq from the other shards: fastkd.distributed.)
    """
    v = values.to(lq.dtype)
    fkl_full = tail == 0 and divergence == 0
    if tail == 0:
        lp = torch.log_softmax(v / float(temperature), dim=-1)
        lqb = lq if fkl_full else lq - torch.logsumexp(lq, dim=-1, keepdim=True)
    else:
        lp = v
        _, lp_tail = _log1m_sum_exp(lp)
        q_tail, lq_tail = _log1m_sum_exp(lq)
        lp = torch.cat([lp, lp_tail], -1)
        lqb = torch.cat([lq, lq_tail], -1)
    pb, qb = lp.exp(), lqb.exp()
    ell, h, _ = divergence_terms(divergence, pb, lp, qb, lqb, beta, skew)
    H = h.sum(-1, keepdim=True)
    if fkl_full:
        gamma, e = -H, h
    elif tail == 0:
        gamma, e = torch.zeros_like(H), h - qb * H
    else:
        ht = h[..., -1:]
        ratio = torch.where(q_tail > 0, ht / torch.where(q_tail > 0, q_tail, torch.ones_like(q_tail)),
                            torch.zeros_like(ht))
        gamma = ratio - H
        e = h[..., :-1] - lq.exp() * ratio
    return ell.sum(-1), gamma, e


def sparse_kd_fwd(student, indices, values, labels, loss, grad_student, divergence: int,
                  temperature: float, beta: float, skew: float, tail: int, ignore_index: int,
                  soft_weight: float, hard_weight: float, scale_temperature: bool) -> None:
    """Fill ``loss`` [B, R] and optionally ``grad_student`` [B, R, V].

    student: [B, R, V] (last dim contiguous, any leading strides); indices: int64 [B, R, K];
    values: float [B, R, K]; labels: int64 [B, R] or None.
    """
    T = float(temperature)
    acc = torch.float64 if torch.float64 in (student.dtype, values.dtype) else torch.float32
    z = student.to(acc)
    lq_full = torch.log_softmax(z / T, dim=-1)
    D, gamma, e = sparse_terms(lq_full.gather(-1, indices), values, divergence, T, beta, skew,
                               tail)
    scale = T * T if scale_temperature else 1.0
    row, add_hard, mask_rows = hard_labels_and_mask(soft_weight * scale * D, z, labels,
                                                    ignore_index, hard_weight)
    loss.copy_(row)
    if grad_student is None:
        return
    g = lq_full.exp() * gamma
    g = g.scatter_add(-1, indices, e)
    grad_student.copy_(mask_rows(add_hard(g * (soft_weight * scale / T))))
