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
        lp_i = v_i, p_tail = max(1 - sum_i p_i, 0);  lq_i = lq[idx_i], q_tail = the student's
        mass outside S (1 - sum_i q_i where only that is known, as in sparse_terms);
        D(p, q) over the k+1 buckets, any divergence, the tail bucket holding the floored
        masses p~ = max(p_tail, TAIL_FLOOR), q~ = max(q_tail, TAIL_FLOOR).

The tail floor (TAIL_FLOOR = 2**-20, 16 float32 ulps of 1): the float32 kernels compute a
tail as 1 - sum of k probabilities, which is only good to a few ulps of 1, so when the k
entries hold nearly all of the mass (or k = V) both tails are rounding noise, 0 on one side
and ~1e-7 on the other, and log 0 made the bucket term inf. Floored, a tail below 2**-20
reads as 2**-20: two such tails are equal and their bucket term is 0 (k = V gives kd_loss),
every term stays finite, the loss is continuous in both tails and exact above the floor.
The gradient treats the floored student tail as moving with q_tail (straight-through), so a
student tail that collapsed below the floor is still pulled toward a teacher tail above it.

Per bucket i (the tail is bucket k), h_i = dD/dlq_i as in the divergence table, H = sum h.
The dense student gradient of D with respect to a is

    g_j = q_j * gamma + [j = idx_i] * e_i
        renormalize, forward_kl : gamma = -H,                   e_i = h_i
        renormalize, otherwise  : gamma = 0,                    e_i = h_i - q'_i H
        bucket                  : gamma = r - H,                e_i = h_i - q[idx_i] r
                                  r = h_tail / q~ (dD/dq~), H = sum_{i<k} h_i + r q_tail

and the row loss and its gradient with respect to z follow kd_fwd exactly (T**2 scaling,
soft/hard weights, hard-label cross-entropy at temperature 1, ignored rows 0). At a teacher
entry q_i gamma + e_i = h_i - qb_i H for every tail (qb_i: the entry's bucket probability of
the student), and every backend computes it so: r reaches 1/TAIL_FLOOR, where the sum
q_i gamma + e_i would cancel two such terms. Indices must
be distinct within a row and lie in [0, V). The teacher values get no gradient.

NaN (as kd_fwd): a NaN among the values a row reads (its teacher values, or its student logits:
all of them, except for tail="renormalize" with a divergence other than forward_kl and no hard
label, where D reads only the logits at the k indices and no backend reads the rest) makes that
row's loss and whole gradient NaN: the tail masses are clamped with NaN-keeping operations, and
gamma of the renormalized divergences (0) is NaN when H is, so that the dense part is NaN too.
Ignored rows stay 0.
"""
from __future__ import annotations

import torch

from .divergences import divergence_terms, hard_labels_and_mask

TAILS = {"renormalize": 0, "bucket": 1}
# The tail buckets' floor (see the module docstring); the same constant in every backend.
TAIL_FLOOR = 2.0 ** -20


def _tail_mass(l):
    """1 - sum_i exp(l_i), clamped at 0: a tail bucket's mass from the k log-probabilities
    (clamp_min keeps NaN, as every clamp of the tails here)."""
    return (1.0 - l.exp().sum(-1, keepdim=True)).clamp_min(0.0)


def _terms(lq, values, divergence: int, temperature: float, beta: float, skew: float,
           tail: int, lq_tail=None):
    """sparse_terms plus g_S [..., K] = q_i gamma + e_i, computed without cancellation."""
    v = values.to(lq.dtype)
    fkl_full = tail == 0 and divergence == 0
    if tail == 0:
        lp = torch.log_softmax(v / float(temperature), dim=-1)
        lqb = lq if fkl_full else lq - torch.logsumexp(lq, dim=-1, keepdim=True)
        pb, qb = lp.exp(), lqb.exp()
        ell, h, _ = divergence_terms(divergence, pb, lp, qb, lqb, beta, skew)
        H = h.sum(-1, keepdim=True)
        # 0 for the renormalized divergences, NaN when H is (the dense gradient of a NaN row)
        gamma = -H if fkl_full else torch.where(torch.isnan(H), H, torch.zeros_like(H))
        e = h if fkl_full else h - qb * H
        return ell.sum(-1), gamma, e, h - qb * H
    p_tail = _tail_mass(v)
    q_tail = _tail_mass(lq) if lq_tail is None else lq_tail.exp()
    pt, qt = p_tail.clamp_min(TAIL_FLOOR), q_tail.clamp_min(TAIL_FLOOR)
    lp, lqb = torch.cat([v, pt.log()], -1), torch.cat([lq, qt.log()], -1)
    pb, qb = lp.exp(), lqb.exp()
    ell, h, _ = divergence_terms(divergence, pb, lp, qb, lqb, beta, skew)
    q = qb[..., :-1]
    ratio = h[..., -1:] / qt
    H = h[..., :-1].sum(-1, keepdim=True) + ratio * q_tail
    return ell.sum(-1), ratio - H, h[..., :-1] - q * ratio, h[..., :-1] - q * H


def sparse_terms(lq, values, divergence: int, temperature: float, beta: float, skew: float,
                 tail: int, lq_tail=None):
    """The part of a row that lives on the k teacher entries.

    lq: the student's full-vocabulary log-probabilities at T gathered at the teacher's indices
    [..., K]; values: the teacher's values [..., K]; lq_tail [..., 1] (bucket, optional): the
    log of the student's mass outside the k entries, when the caller has it exactly (else it is
    1 - sum exp(lq), accurate only to the rounding of that sum). Returns (D [...],
    gamma [..., 1], e [..., K]) of the table above, so that
    d D / d a_j = q_j * gamma + [j = idx_i] * e_i.
    (A vocabulary-sharded student needs only lq from the other shards: fastkd.distributed.)
    """
    return _terms(lq, values, divergence, temperature, beta, skew, tail, lq_tail)[:3]


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
    # renormalize with a divergence other than forward_kl: D and its gradient depend on the k
    # gathered logits only (renormalized over them), and so does this reference, as the kernels,
    # which never read the rest of the row then (a NaN there does not reach the soft loss)
    dense = tail == 1 or divergence == 0
    lq_S = (lq_full if dense else z / T).gather(-1, indices)
    lq_tail = None
    if tail == 1:  # the student's mass outside the k entries, summed directly (no cancellation)
        rest = lq_full.scatter(-1, indices, torch.full_like(lq_full, float("-inf")))
        lq_tail = torch.logsumexp(rest, dim=-1, keepdim=True)
    D, gamma, _, g_S = _terms(lq_S, values, divergence, T, beta, skew,
                              tail, lq_tail)
    scale = T * T if scale_temperature else 1.0
    row, add_hard, mask_rows = hard_labels_and_mask(soft_weight * scale * D, z, labels,
                                                    ignore_index, hard_weight)
    loss.copy_(row)
    if grad_student is None:
        return
    g = (lq_full.exp() * gamma if dense else gamma.expand_as(z)).scatter(-1, indices, g_S)
    grad_student.copy_(mask_rows(add_hard(g * (soft_weight * scale / T))))
