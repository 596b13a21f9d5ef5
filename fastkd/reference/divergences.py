"""Temperature-softmax divergences between teacher and student logits: the reference.

This file is the contract every backend of the ``kd`` family implements (cpp in
``csrc/cpu/divergences.cpp``, triton in ``fastkd/triton/divergences.py``). One call,
``kd_fwd``, computes for every row at once

* ``loss[r]``: the row loss, 0 on ignored rows, and
* the *unreduced* gradients of ``loss[r]`` with respect to the row's student logits
  (and teacher logits when asked), written into caller-allocated buffers, 0 on ignored rows.

The autograd Function in ``fastkd.functional`` only reduces ``loss`` and, in backward,
scales the stored gradient by ``grad_output`` (and 1/count for batchmean).

Math, per row, with a = cap(s)/T, b = cap(t)/T, q = softmax(a), p = softmax(b),
lq = log q, lp = log p, cap(z) = c*tanh(z/c) (identity when softcap == 0):

Each divergence D(p, q) has per-entry gradients h_j = dD/dlq_j and k_j = dD/dlp_j
(treating lq and lp as free), and then through the softmax

    dD/da_j = h_j - q_j * sum(h),        dD/db_j = k_j - p_j * sum(k).

    divergence        D                           h_j                              k_j
    forward_kl        sum p (lp - lq)             -p_j                             p_j (lp_j - lq_j + 1)
    reverse_kl        sum q (lq - lp)             q_j (lq_j - lp_j + 1)            -q_j
    jsd (0<beta<1)    beta KL(p||m)+(1-beta)KL(q||m), m = beta p + (1-beta) q
                                                  (1-beta) q_j (lq_j - lm_j)       beta p_j (lp_j - lm_j)
    skew_forward_kl   KL(p || r), r = a p + (1-a) q (a = skew)
                                                  -(1-a) p_j q_j / r_j             p_j (lp_j + 1 - lr_j - a p_j / r_j)
    skew_reverse_kl   KL(q || r), r = (1-a) p + a q
                                                  q_j (lq_j + 1 - lr_j - a q_j / r_j)   -(1-a) q_j p_j / r_j
    tvd               0.5 sum |p - q|             0.5 q_j sign(q_j - p_j)          0.5 p_j sign(p_j - q_j)

with 0 * log 0 = 0 (an entry whose probability is 0 adds nothing, and x/r with r = 0 is 0).
NaN propagates: a NaN logit in a counted row makes that row's loss and gradients NaN (as in
torch's kl_div), so these zero masks test ``== 0`` and let anything else through, NaN included,
and sign(NaN) is NaN.
jsd with beta == 0 or 1 never reaches a kernel: ``fastkd.functional`` maps it to forward_kl
or reverse_kl (TRL's convention; the mixture formula degenerates to 0 there).

    soft  = D * (T**2 if scale_temperature else 1)
    hard  = logsumexp(cap(s)) - cap(s)[label]          (temperature 1; only when hard_weight != 0)
    loss  = soft_weight * soft + hard_weight * hard

    d loss / d s_j = cap'(s_j) * (soft_weight * scale / T * dD/da_j
                                  + hard_weight * (softmax(cap(s))_j - [j == label]))
    d loss / d t_j = cap'(t_j) *  soft_weight * scale / T * dD/db_j
    cap'(z) = 1 - tanh(z/c)**2   (1 without softcap)

Rows whose label equals ``ignore_index`` get loss 0 and gradient 0 whatever their logits hold
(NaN included); a NaN logit in any other row makes its loss and gradients NaN.
All arithmetic is float32 whatever the input dtype (float64 when an input is float64, for
gradcheck); gradients are stored in the buffers' dtype.
"""
from __future__ import annotations

import torch

# Integer codes shared by every backend (the C++ and Triton kernels switch on these).
DIVERGENCES = {
    "forward_kl": 0,
    "reverse_kl": 1,
    "jsd": 2,
    "skew_forward_kl": 3,
    "skew_reverse_kl": 4,
    "tvd": 5,
}


def _xlogy_ratio(x, lx, ly):
    """x * (lx - ly) with 0 where x == 0 (0 * log 0 = 0, whatever ly is); NaN x stays NaN."""
    return torch.where(x == 0, torch.zeros_like(x), x * (lx - ly))


def _safe_div(x, y):
    """x / y with 0 where y == 0; NaN y stays NaN."""
    zero = y == 0
    return torch.where(zero, torch.zeros_like(x), x / torch.where(zero, torch.ones_like(y), y))


def _sign(d):
    """sign(d), NaN where d is NaN (torch.sign gives 0 there, which would hide it)."""
    return torch.where(torch.isnan(d), d, torch.sign(d))


def _log_mix(w1, l1, w2, l2):
    """log(w1 * exp(l1) + w2 * exp(l2)) for weights in (0, 1), stable, -inf when both are -inf."""
    x = l1 + torch.log(torch.tensor(w1, dtype=l1.dtype)) if w1 > 0 else torch.full_like(l1, float("-inf"))
    y = l2 + torch.log(torch.tensor(w2, dtype=l2.dtype)) if w2 > 0 else torch.full_like(l2, float("-inf"))
    return torch.logaddexp(x, y)


def divergence_terms(code: int, p, lp, q, lq, beta: float, skew: float):
    """Per-entry loss terms and the h, k gradients of the table above, all [..., V]."""
    if code == 0:  # forward_kl
        ell = _xlogy_ratio(p, lp, lq)
        h = -p
        k = ell + p
    elif code == 1:  # reverse_kl
        ell = _xlogy_ratio(q, lq, lp)
        h = ell + q
        k = -q
    elif code == 2:  # jsd, 0 < beta < 1
        lm = _log_mix(beta, lp, 1.0 - beta, lq)
        tp = _xlogy_ratio(p, lp, lm)
        tq = _xlogy_ratio(q, lq, lm)
        ell = beta * tp + (1.0 - beta) * tq
        h = (1.0 - beta) * tq
        k = beta * tp
    elif code == 3:  # skew_forward_kl: KL(p || skew*p + (1-skew)*q)
        lr = _log_mix(skew, lp, 1.0 - skew, lq)
        r = torch.exp(lr)
        ell = _xlogy_ratio(p, lp, lr)
        h = -(1.0 - skew) * _safe_div(p * q, r)
        k = ell + p - skew * _safe_div(p * p, r)
    elif code == 4:  # skew_reverse_kl: KL(q || (1-skew)*p + skew*q)
        lr = _log_mix(1.0 - skew, lp, skew, lq)
        r = torch.exp(lr)
        ell = _xlogy_ratio(q, lq, lr)
        h = ell + q - skew * _safe_div(q * q, r)
        k = -(1.0 - skew) * _safe_div(q * p, r)
    elif code == 5:  # tvd
        d = q - p
        sg = _sign(d)
        ell = 0.5 * d.abs()
        h = 0.5 * q * sg
        k = -0.5 * p * sg
    else:
        raise ValueError(f"unknown divergence code {code}")
    return ell, h, k


def _cap(z, softcap: float):
    """softcap(z) and its derivative; (z, None) without softcap."""
    if softcap == 0.0:
        return z, None
    th = torch.tanh(z / softcap)
    return softcap * th, 1.0 - th * th


def hard_labels_and_mask(row, z1, labels, ignore_index: int, hard_weight: float):
    """Add the hard-label cross-entropy of logits z1 (temperature 1) to the soft row losses and
    zero the ignored rows. Returns (row losses, add_hard(g), mask_rows(g)): the same two steps
    for a gradient [..., V] (add_hard adds d CE / d z1; mask_rows zeroes ignored rows)."""
    valid = safe = ls1 = None
    if labels is not None:
        valid = labels != ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    if hard_weight != 0.0:
        ls1 = torch.log_softmax(z1, dim=-1)
        row = row - hard_weight * ls1.gather(-1, safe).squeeze(-1)
    if valid is not None:
        row = torch.where(valid, row, torch.zeros_like(row))

    def add_hard(g):
        if hard_weight == 0.0:
            return g
        onehot = torch.zeros_like(g).scatter_(-1, safe, 1.0)
        return g + hard_weight * (ls1.exp() - onehot)

    def mask_rows(g):
        return g if valid is None else torch.where(valid.unsqueeze(-1), g, torch.zeros_like(g))

    return row, add_hard, mask_rows


def kd_fwd(student, teacher, labels, loss, grad_student, grad_teacher, divergence: int,
           temperature: float, beta: float, skew: float, ignore_index: int,
           soft_weight: float, hard_weight: float, scale_temperature: bool, softcap: float) -> None:
    """Fill ``loss`` [B, R] (float32) and the optional gradient buffers [B, R, V].

    student, teacher: [B, R, V] with the same V, last dim contiguous, any float dtype.
    labels: int64 [B, R] or None. softcap: 0.0 means none.
    """
    T = float(temperature)
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    s, ds = _cap(student.to(acc), softcap)
    t, dt = _cap(teacher.to(acc), softcap)
    a, b = s / T, t / T
    lq = torch.log_softmax(a, dim=-1)
    lp = torch.log_softmax(b, dim=-1)
    q, p = lq.exp(), lp.exp()
    ell, h, k = divergence_terms(divergence, p, lp, q, lq, beta, skew)
    scale = T * T if scale_temperature else 1.0
    row, add_hard, mask_rows = hard_labels_and_mask(
        soft_weight * scale * ell.sum(-1), s, labels, ignore_index, hard_weight)
    loss.copy_(row)

    c = soft_weight * scale / T
    if grad_student is not None:
        g = add_hard(c * (h - q * h.sum(-1, keepdim=True)))
        if ds is not None:
            g = g * ds
        grad_student.copy_(mask_rows(g))
    if grad_teacher is not None:
        g = c * (k - p * k.sum(-1, keepdim=True))
        if dt is not None:
            g = g * dt
        grad_teacher.copy_(mask_rows(g))
