"""Attention distillation (attention transfer, attention maps, attention relations): the reference.

This file is the contract of the three ``attention_*`` families for every backend (cpp in
``csrc/cpu/attention.cpp``, triton in ``fastkd/triton/attention.py``). Every op fills
caller-allocated outputs and returns nothing. Arithmetic is float32 whatever the input dtype
(float64 when an input is float64, for gradcheck); gradients are stored in the student's dtype.
The teacher is a constant everywhere: no op computes a teacher gradient (``fastkd.functional``
detaches it), as in the papers' code, where the teacher runs under ``torch.no_grad()``.

Attention transfer (Zagoruyko and Komodakis 2017, their ``at``/``at_loss``)
    attention_transfer_fwd(student, teacher, loss, grad_student, p)
    student [B, Cs, N], teacher [B, Ct, N] (N = H*W; channels may differ), last dim contiguous.
    a = mean_c |F_c|^p  (per position, over the channels)      A = a / max(|a|_2, 1e-12)
        (F.normalize over the N positions of each sample)
    loss[b] = sum_n (A_s - A_t)^2            (the per-sample *sum*; fastkd.functional divides)
    grad_student[b] = d loss[b] / d student[b]:
        g = 2 (A_s - A_t);  c = (g - A_s (A_s . g)) / |a_s|  if |a_s| >= 1e-12 else g / 1e-12
        d/dF_c,n = c_n * p |F_c,n|^(p-1) sign(F_c,n) / Cs       (p >= 1; p = 2: 2 F / Cs)

Attention maps (TinyBERT, MiniLM)
    attention_map_fwd(student, teacher, mask, loss, grad_student, kind, student_scores,
                      teacher_scores)
    student, teacher [B, H, L, L] (same H: head mapping happens before), last dim contiguous;
    mask: None or bool [B, L] (True = token); loss [B, H, L] (one value per query row);
    grad_student [B, H, L, L] or None; kind: MAP_KINDS; *_scores: that side holds pre-softmax
    scores (else probabilities). Valid keys of sample b: mask[b, j]; valid query rows: mask[b, i].
    kind = kl: per row, KL(p || q) = sum_{valid j} p_j (log p_j - log q_j), 0 log 0 = 0, with
        p = softmax over the valid keys of the teacher scores, or the teacher probabilities as
            given on the valid keys (not renormalized), likewise q for the student;
        gradient: scores  d/ds_j = q_j P - p_j   (P = sum_{valid j} p_j, 1 for teacher scores)
                  probs   d/ds_j = -p_j / s_j    (0 where p_j = 0; -inf where s_j = 0 < p_j)
        A student 0 (or -inf score) where the teacher has mass gives +inf, as math says.
    kind = mse: per row, sum_{valid j} (s'_j - t'_j)^2 and gradient 2 (s'_j - t'_j) [kept], where
        for scores x' = x if x > SCORE_FLOOR else 0 (TinyBERT zeroes its additive-mask entries
        this way, so -10000, finfo.min and -inf compare as 0 and pass no gradient); for
        probabilities x' = x.
    Masked keys and masked query rows contribute nothing and get gradient exactly 0; a fully
    padded sequence gives 0, never NaN, whatever its entries hold.

Attention relations (MiniLMv2), without L x L memory in the kernels
    attention_relation_fwd(student_m, student_n, teacher_m, teacher_n, mask, num_heads,
                           scale_s, scale_t, loss, lse_student, lse_teacher)
    attention_relation_bwd(student_m, student_n, teacher_m, teacher_n, mask, num_heads,
                           scale_s, scale_t, lse_student, lse_teacher, weight, grad_m, grad_n)
    student_* [B, L, Ds], teacher_* [B, L, Dt] (last dim contiguous), split into A = num_heads
    relation heads of Ds/A (Dt/A) channels: X^a = X[..., a*d:(a+1)*d].
        S^a = scale_s X_m^a (X_n^a)^T,   T^a = scale_t Y_m^a (Y_n^a)^T      [L, L] per (b, a)
        q = softmax over the valid keys of S (student), p likewise of T (teacher)
        loss[b, a, i] = KL(p_i || q_i) = sum_{valid j} p_ij (log p_ij - log q_ij), 0 on masked rows
        lse_*[b, a, i] = logsumexp over the valid keys of the row of S (T); 0 on masked rows
    The forward saves only the row log-sum-exps (O(B A L)); the backward recomputes the tiles:
        dS_ij = weight[b] * scale_s * (q_ij - p_ij) on valid rows and keys, else 0
        grad_m^a = dS X_n^a,   grad_n^a = dS^T X_m^a      (written, not accumulated)
    weight [B] is d(caller's scalar)/d loss[b, a, i] (the same for every row of a sample);
    grad_m, grad_n may each be None. When student_m and student_n are the same tensor (q-q
    relations) the caller adds the two gradients.
    Kernels stream key blocks with an online softmax and never hold an L x L tile of a whole
    head; this reference materializes [B, A, L, L].

Reductions (done by fastkd.functional from the ops' per-sample / per-row outputs), pinned here:
* attention_transfer_loss: "mean" = sum_b loss[b] / (B N) (the authors' mean over B*H*W);
  "sum" = sum_b loss[b]; "none" = loss[b] / N. Lists of feature pairs: the sum of their losses.
* attention_map_loss "batchmean": kl = sum of row losses / (H * number of valid query rows in the
  batch), i.e. the mean per valid query row over batch x heads; mse = sum / (H * number of valid
  (query, key) entries) = sum / (H sum_b n_b^2), the mean squared error over valid entries (with
  no mask, TinyBERT's F.mse_loss). "sum"; "none" = loss [B, H, L]. Divisors are clamped to >= 1,
  so a batch without a token gives 0, never NaN.
* attention_relation_loss: per sample, the mean of loss[b, a, i] over heads and valid query rows
  (weight[b] = 1 / (A n_b)), then the mean over the samples that have at least one token (a fully
  padded sequence counts for nothing and does not dilute the mean), then the mean over the listed
  relations. The teacher relation R_t is a constant: the gradient of KL(R_t || R_s) with respect
  to the student only, (R_s - R_t) per score, the same as that of the cross-entropy.
"""
from __future__ import annotations

import torch

MAP_KINDS = {"kl": 0, "mse": 1}
SCORE_FLOOR = -100.0  # TinyBERT: scores <= -1e2 are additive-mask entries, compared as 0
AT_EPS = 1e-12  # F.normalize's eps


def _acc(*xs):
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) \
        else torch.float32


# ----------------------------------------------------------------------------- transfer
def _pow_abs(x, p: float):
    """(|x|^p, d|x|^p/dx) elementwise."""
    if p == 2.0:
        return x * x, 2.0 * x
    if p == 1.0:
        return x.abs(), torch.sign(x)
    ax = x.abs()
    return ax.pow(p), p * ax.pow(p - 1.0) * torch.sign(x)


def attention_transfer_fwd(student, teacher, loss, grad_student, p: float) -> None:
    """Fill ``loss`` [B] and optionally ``grad_student`` [B, Cs, N]; see the module docstring."""
    acc = _acc(student, teacher)
    s, t = student.to(acc), teacher.to(acc)
    ps, dps = _pow_abs(s, p)
    a_s = ps.mean(1)
    a_t = _pow_abs(t, p)[0].mean(1)
    n_s = a_s.norm(dim=1, keepdim=True)
    A_s = a_s / n_s.clamp_min(AT_EPS)
    A_t = a_t / a_t.norm(dim=1, keepdim=True).clamp_min(AT_EPS)
    diff = A_s - A_t
    loss.copy_((diff * diff).sum(1))
    if grad_student is None:
        return
    g = 2.0 * diff
    c = torch.where(n_s >= AT_EPS, (g - A_s * (A_s * g).sum(1, keepdim=True)) / n_s.clamp_min(AT_EPS),
                    g / AT_EPS)
    grad_student.copy_(c.unsqueeze(1) * dps / s.shape[1])


# ----------------------------------------------------------------------------- maps
def _log_probs(x, key, scores: bool):
    """(probabilities, log-probabilities) of one side on the valid keys (0, -inf elsewhere)."""
    if scores:
        lx = torch.log_softmax(x.masked_fill(~key, float("-inf")), dim=-1)
        return lx.exp(), lx
    px = torch.where(key, x, torch.zeros_like(x))
    return px, torch.log(px)


def attention_map_fwd(student, teacher, mask, loss, grad_student, kind: int, student_scores: bool,
                      teacher_scores: bool) -> None:
    """Fill ``loss`` [B, H, L] and optionally ``grad_student`` [B, H, L, L]; see the docstring."""
    acc = _acc(student, teacher)
    s, t = student.to(acc), teacher.to(acc)
    B, _, L, _ = s.shape
    if mask is None:
        mask = torch.ones((B, L), dtype=torch.bool, device=s.device)
    key = mask[:, None, None, :]
    row = mask[:, None, :]
    zero = torch.zeros((), dtype=acc, device=s.device)
    if kind == MAP_KINDS["kl"]:
        p, lp = _log_probs(t, key, teacher_scores)
        q, lq = _log_probs(s, key, student_scores)
        ell = torch.where(p > 0, p * (lp - lq), zero)
        if student_scores:
            g = q * p.sum(-1, keepdim=True) - p
        else:
            g = torch.where(p > 0, -p / s, zero)
    elif kind == MAP_KINDS["mse"]:
        if student_scores:
            keep = s > SCORE_FLOOR
            s = torch.where(keep, s, zero)
        if teacher_scores:
            t = torch.where(t > SCORE_FLOOR, t, zero)
        d = torch.where(key, s - t, zero)
        ell = d * d
        g = 2.0 * d
        if student_scores:
            g = torch.where(keep, g, zero)
    else:
        raise ValueError(f"unknown attention map kind {kind}")
    loss.copy_(torch.where(row, ell.sum(-1), zero))
    if grad_student is not None:
        grad_student.copy_(torch.where(row.unsqueeze(-1) & key, g, zero))


# ----------------------------------------------------------------------------- relations
def _heads(x, num_heads: int, acc):
    """[B, L, D] -> [B, A, L, D/A] in the accumulation dtype."""
    B, L, D = x.shape
    return x.to(acc).reshape(B, L, num_heads, D // num_heads).transpose(1, 2)


def _merge(x):
    """[B, A, L, d] -> [B, L, A*d]."""
    B, A, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, A * d)


def _relation_scores(student_m, student_n, teacher_m, teacher_n, mask, num_heads, scale_s,
                     scale_t):
    acc = _acc(student_m, student_n, teacher_m, teacher_n)
    B, L = student_m.shape[:2]
    if mask is None:
        mask = torch.ones((B, L), dtype=torch.bool, device=student_m.device)

    def heads(x):  # padded tokens' rows are never read, whatever they hold
        return _heads(x.to(acc).masked_fill(~mask[:, :, None], 0.0), num_heads, acc)

    xm, xn = heads(student_m), heads(student_n)
    S = scale_s * (xm @ xn.transpose(-1, -2))
    T = scale_t * (heads(teacher_m) @ heads(teacher_n).transpose(-1, -2))
    key = mask[:, None, None, :]
    S = S.masked_fill(~key, float("-inf"))
    T = T.masked_fill(~key, float("-inf"))
    return xm, xn, S, T, mask[:, None, :], key


def attention_relation_fwd(student_m, student_n, teacher_m, teacher_n, mask, num_heads: int,
                           scale_s: float, scale_t: float, loss, lse_student, lse_teacher) -> None:
    """Fill ``loss``, ``lse_student``, ``lse_teacher`` [B, A, L]; see the module docstring."""
    _, _, S, T, row, _ = _relation_scores(student_m, student_n, teacher_m, teacher_n, mask,
                                          num_heads, scale_s, scale_t)
    lse_s = torch.logsumexp(S, dim=-1)
    lse_t = torch.logsumexp(T, dim=-1)
    lp = T - lse_t.unsqueeze(-1)
    lq = S - lse_s.unsqueeze(-1)
    p = lp.exp()
    zero = torch.zeros((), dtype=S.dtype, device=S.device)
    kl = torch.where(p > 0, p * (lp - lq), zero).sum(-1)
    loss.copy_(torch.where(row, kl, zero))
    lse_student.copy_(torch.where(row, lse_s, zero))
    lse_teacher.copy_(torch.where(row, lse_t, zero))


def attention_relation_bwd(student_m, student_n, teacher_m, teacher_n, mask, num_heads: int,
                           scale_s: float, scale_t: float, lse_student, lse_teacher, weight,
                           grad_m, grad_n) -> None:
    """Fill ``grad_m`` and ``grad_n`` [B, L, Ds] (each optional); see the module docstring."""
    xm, xn, S, T, row, key = _relation_scores(student_m, student_n, teacher_m, teacher_n, mask,
                                              num_heads, scale_s, scale_t)
    acc = S.dtype
    q = (S - lse_student.to(acc).unsqueeze(-1)).exp()
    p = (T - lse_teacher.to(acc).unsqueeze(-1)).exp()
    w = weight.to(acc)[:, None, None, None] * scale_s
    dS = torch.where(row.unsqueeze(-1) & key, w * (q - p), torch.zeros((), dtype=acc, device=S.device))
    if grad_m is not None:
        grad_m.copy_(_merge(dS @ xn))
    if grad_n is not None:
        grad_n.copy_(_merge(dS.transpose(-1, -2) @ xm))
