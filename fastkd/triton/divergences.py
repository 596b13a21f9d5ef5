"""Triton kernel of the ``kd`` family: temperature-softmax divergences, fused with their gradients.

The math, the h/k gradient table and the edge cases are those of ``fastkd.reference.divergences``
(its module docstring is the contract). This file reads kernel -> launcher -> op registration.

One program owns one row and walks it in BLOCK-wide chunks:

* pass 1: online max / sum-exp of a = cap(s)/T and b = cap(t)/T, kept per lane (one exp per
  entry and stream) and combined at the end; with hard labels and T != 1 also that of cap(s)
  (at T == 1 it is a's); for forward_kl / reverse_kl also the loss, online.
* pass 2 (jsd, skew_*, tvd only): sum(ell), sum(h), sum(k), which need the final log-sum-exps.
* last pass: the gradients, written after the row has been fully read, so ``grad_student`` may be
  ``student`` itself (inplace).

A row is re-read from L2 if it is still there (at V = 128256 in bf16 the two rows are 0.5 MB, one
row in flight per SM): passes alternate direction so that a re-read starts with the chunks read
last, earlier passes load with evict_last, the last pass and the gradient stores with evict_first.

NaN: a NaN logit makes its lane's running max NaN (a NaN-propagating maximum), hence the lane's
sum, the row's log-sum-exp and every probability of that side of the row; the zero masks test
``== 0`` (not ``> 0``) so that nothing masks it out again: the row's loss and gradients are NaN,
at no extra cost.

All arithmetic is float32, float64 inputs included (the float64 path of the contract is for
gradcheck of the reference and cpp; here a float64 ``loss`` buffer is accepted and filled from
float32 math); gradients are stored in the buffers' dtype. No atomics, no host syncs, a fixed
reduction order: the same inputs give bitwise the same outputs.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastkd.reference.divergences import DIVERGENCES
from fastkd.triton import gpu_layout, on_tensor_device

NEG_INF = tl.constexpr(float("-inf"))
# No NaN global: Triton checks at every launch that each global constexpr a kernel used still
# equals its compiled value, and NaN != NaN, so such a kernel raised on every GPU launch (the
# interpreter skips that check). Kernels write float("nan") where they need one.


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # libdevice's tanh has no interpreter implementation, so: an odd polynomial (fit to < 1.4
    # half-ulps) where 1 - 2/(e^2x + 1) would cancel, that formula elsewhere.
    ax = tl.abs(x)
    s = x * x
    r = -0.005718891508877277
    r = r * s + 0.02065306343138218
    r = r * s - 0.053744640201330185
    r = r * s + 0.13331513106822968
    r = r * s - 0.3333328664302826
    small = x + x * s * r
    big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.625, small, big)


@triton.jit
def _load_scaled(row_ptr, cols, mask, inv_T, softcap, USE_SOFTCAP: tl.constexpr,
                 EVICT: tl.constexpr):
    """(cap(z), cap(z)/T, cap'(z)) in float32; -inf logits on lanes past the row's end."""
    z = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    if USE_SOFTCAP:
        th = _tanh(z / softcap)
        z = softcap * th
        dz = 1.0 - th * th
    else:
        dz = 1.0
    z = tl.where(mask, z, NEG_INF)
    return z, z * inv_T, dz


@triton.jit
def _online_lse(m, z, x):
    """Add x to per-lane running (max m, sum z of exp(. - m)) with one exp instead of two.

    Returns the new m and z, the factor alpha that rescaled the old sum and the weight w of x
    (exp(x - new max)): one of them is 1. While everything is -inf, z stays 0, never NaN. A NaN
    x makes m and z NaN for good (tl.maximum's default drops NaN, and a NaN first entry of a lane
    would then vanish as if it were -inf).
    """
    m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp(-tl.abs(x - m))
    e = tl.where(m_new == NEG_INF, 0.0, e)
    up = x > m
    alpha = tl.where(up, e, 1.0)
    w = tl.where(up, 1.0, e)
    return m_new, z * alpha + w, alpha, w


@triton.jit
def _logaddexp(x, y):
    mx = tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)
    mn = tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)
    # both -inf: -inf, not NaN
    return mx + tl.log(1.0 + tl.exp(mn - tl.where(mx == NEG_INF, 0.0, mx)))


@triton.jit
def _terms(a, b, lse_a, lse_b, w_p, w_q, log_wp, log_wq, DIV: tl.constexpr):
    # a, b may come shifted by their row max, lse_a, lse_b then by the same
    """q, p and the per-entry loss ell and gradients h = dD/dlq, k = dD/dlp (contract table).

    The mixture divergences use r = w_p p + w_q q through rho_p = w_p p / r and
    rho_q = w_q q / r, both in [0, 1], so no ratio can overflow (x/r with r = 0 is 0). Masks
    test == 0 / == -inf so that NaN passes through.
    """
    lq = a - lse_a
    lp = b - lse_b
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == 0:  # forward_kl
        ell = tl.where(p == 0, 0.0, p * (lp - lq))
        h = -p
        k = ell + p
    elif DIV == 1:  # reverse_kl
        ell = tl.where(q == 0, 0.0, q * (lq - lp))
        h = ell + q
        k = -q
    elif DIV == 5:  # tvd
        d = q - p
        sg = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d - d))  # d - d: 0, or NaN for NaN d
        ell = 0.5 * tl.abs(d)
        h = 0.5 * q * sg
        k = -0.5 * p * sg
    else:
        lr = _logaddexp(lp + log_wp, lq + log_wq)
        lr_dead = lr == NEG_INF
        lr_safe = tl.where(lr_dead, 0.0, lr)
        if DIV == 2:  # jsd: w_p = beta, w_q = 1 - beta, r = m
            tp = tl.where(p == 0, 0.0, p * (lp - lr))
            tq = tl.where(q == 0, 0.0, q * (lq - lr))
            ell = w_p * tp + w_q * tq
            h = w_q * tq
            k = w_p * tp
        elif DIV == 3:  # skew_forward_kl: KL(p || r), w_p = skew
            ell = tl.where(p == 0, 0.0, p * (lp - lr))
            rho_q = tl.where(lr_dead, 0.0, tl.exp(log_wq + lq - lr_safe))
            h = -p * rho_q
            k = ell + p * rho_q
        else:  # DIV == 4, skew_reverse_kl: KL(q || r), w_q = skew
            ell = tl.where(q == 0, 0.0, q * (lq - lr))
            rho_p = tl.where(lr_dead, 0.0, tl.exp(log_wp + lp - lr_safe))
            h = ell + q * rho_p
            k = -q * rho_p
    return q, p, ell, h, k


@triton.jit
def _kd_fwd_kernel(
    s_ptr, t_ptr, labels_ptr, loss_ptr, gs_ptr, gt_ptr,
    R, V,
    s_sb, s_sr, t_sb, t_sr, gs_sb, gs_sr, gt_sb, gt_sr,
    inv_T, softcap, w_p, w_q, log_wp, log_wq, ignore_index, soft_coef, grad_coef, hard_weight,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_GS: tl.constexpr, HAS_GT: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_HARD: tl.constexpr, UNIT_T: tl.constexpr, BLOCK: tl.constexpr,
    FUSED_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: B*R*V exceeds 2**31 at LLM shapes
    bi = row // R
    ri = row % R
    s_row = s_ptr + bi * s_sb + ri * s_sr
    t_row = t_ptr + bi * t_sb + ri * t_sr
    gs_row = gs_ptr + bi * gs_sb + ri * gs_sr
    gt_row = gt_ptr + bi * gt_sb + ri * gt_sr
    offs = tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(V, BLOCK)

    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        if label == ignore_index:  # loss 0, gradient 0; the logits are never read
            tl.store(loss_ptr + row, tl.zeros([], loss_ptr.dtype.element_ty))
            if HAS_GS:
                zero_s = tl.zeros([BLOCK], gs_ptr.dtype.element_ty)
                for start in range(0, V, BLOCK):
                    tl.store(gs_row + start + offs, zero_s, mask=start + offs < V)
            if HAS_GT:
                zero_t = tl.zeros([BLOCK], gt_ptr.dtype.element_ty)
                for start in range(0, V, BLOCK):
                    tl.store(gt_row + start + offs, zero_t, mask=start + offs < V)
            return
    if USE_HARD:
        # the label's logit, read before any gradient write (inplace); a label outside [0, V)
        # gives a NaN loss rather than an out-of-bounds read
        lab_ok = (label >= 0) & (label < V)
        s_lab = tl.load(s_row + tl.where(lab_ok, label, 0), mask=lab_ok, other=float("nan")).to(tl.float32)
        if USE_SOFTCAP:
            s_lab = softcap * _tanh(s_lab / softcap)

    # ---- pass 1: per-lane online max / sum-exp (and the KL losses) --------------------------
    ma = tl.full([BLOCK], NEG_INF, tl.float32)
    mb = tl.full([BLOCK], NEG_INF, tl.float32)
    m1 = tl.full([BLOCK], NEG_INF, tl.float32)  # cap(s): the temperature-1 softmax (hard loss)
    za = tl.zeros([BLOCK], tl.float32)
    zb = tl.zeros([BLOCK], tl.float32)
    z1 = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n_chunks):
        cols = i * BLOCK + offs
        mask = cols < V
        sc, a, _ = _load_scaled(s_row, cols, mask, inv_T, softcap, USE_SOFTCAP, "evict_last")
        _, b, _ = _load_scaled(t_row, cols, mask, inv_T, softcap, USE_SOFTCAP, "evict_last")
        ma, za, _, _ = _online_lse(ma, za, a)
        mb, zb, _, _ = _online_lse(mb, zb, b)
        if USE_HARD and not UNIT_T:
            m1, z1, _, _ = _online_lse(m1, z1, sc)

    # combine the lanes (tl.max may drop a NaN lane max; that lane's z is NaN, so the sum is)
    row_ma = tl.max(ma, 0)
    row_mb = tl.max(mb, 0)
    sha = tl.where(row_ma == NEG_INF, 0.0, row_ma)
    shb = tl.where(row_mb == NEG_INF, 0.0, row_mb)
    wa = tl.exp(ma - sha)
    wb = tl.exp(mb - shb)
    sum_a = tl.sum(za * wa, 0)
    sum_b = tl.sum(zb * wb, 0)
    # log-sum-exps kept as (max, log of the shifted sum): entries enter as (x - max) - log(sum),
    # an exact subtraction then a small one, instead of x - lse with lse rounded at |x|'s scale
    lsa = tl.log(sum_a)
    lsb = tl.log(sum_b)
    sh1 = sha  # T == 1: the temperature-1 softmax is q
    ls1 = lsa
    if USE_HARD and not UNIT_T:
        row_m1 = tl.max(m1, 0)
        sh1 = tl.where(row_m1 == NEG_INF, 0.0, row_m1)
        ls1 = tl.log(tl.sum(z1 * tl.exp(m1 - sh1), 0))

    # D and the gradient sums H = sum h, K = sum k. D is summed from the per-entry terms
    # p (lp - lq) etc. once the log-sum-exps are known, not online: an online E_p[b - a] minus
    # (lse_b - lse_a) cancels catastrophically for large logits. forward_kl's gradient needs no
    # D (h = -p), so there D is summed in the gradient pass itself (FUSED_D): two reads.
    if FUSED_D:
        H = -1.0
        K = 0.0
        D = 0.0
    else:
        # ---- pass 2 (backwards): sum ell, sum h, sum k -------------------------------------
        acc_l = tl.zeros([BLOCK], tl.float32)
        acc_h = tl.zeros([BLOCK], tl.float32)
        acc_k = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n_chunks):
            cols = (n_chunks - 1 - i) * BLOCK + offs
            mask = cols < V
            _, a, _ = _load_scaled(s_row, cols, mask, inv_T, softcap, USE_SOFTCAP, "evict_last")
            _, b, _ = _load_scaled(t_row, cols, mask, inv_T, softcap, USE_SOFTCAP, "evict_last")
            q, p, ell, h, k = _terms(a - sha, b - shb, lsa, lsb, w_p, w_q, log_wp, log_wq, DIV)
            acc_l += ell
            if HAS_GS:
                acc_h += h
            if HAS_GT:
                acc_k += k
        D = tl.sum(acc_l, 0)
        H = tl.sum(acc_h, 0)
        K = tl.sum(acc_k, 0)

    # ---- last pass: gradients (the opposite direction of the previous pass) -----------------
    if HAS_GS or HAS_GT or FUSED_D:
        acc_d = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n_chunks):
            if FUSED_D:
                cols = (n_chunks - 1 - i) * BLOCK + offs
            else:
                cols = i * BLOCK + offs
            mask = cols < V
            sc, a, dcs = _load_scaled(s_row, cols, mask, inv_T, softcap, USE_SOFTCAP, "evict_first")
            _, b, dct = _load_scaled(t_row, cols, mask, inv_T, softcap, USE_SOFTCAP, "evict_first")
            q, p, ell, h, k = _terms(a - sha, b - shb, lsa, lsb, w_p, w_q, log_wp, log_wq, DIV)
            if FUSED_D:
                acc_d += ell
            if HAS_GS:
                g = grad_coef * (h - q * H)
                if USE_HARD:
                    if UNIT_T:
                        q1 = q
                    else:
                        q1 = tl.exp((sc - sh1) - ls1)
                    g += hard_weight * (q1 - tl.where(cols == label, 1.0, 0.0))
                if USE_SOFTCAP:
                    g = g * dcs
                tl.store(gs_row + cols, g.to(gs_ptr.dtype.element_ty), mask=mask,
                         eviction_policy="evict_first")
            if HAS_GT:
                g = grad_coef * (k - p * K)
                if USE_SOFTCAP:
                    g = g * dct
                tl.store(gt_row + cols, g.to(gt_ptr.dtype.element_ty), mask=mask,
                         eviction_policy="evict_first")
        if FUSED_D:
            D = tl.sum(acc_d, 0)

    row_loss = soft_coef * D
    if USE_HARD:
        row_loss += hard_weight * ((sh1 - s_lab) + ls1)
    tl.store(loss_ptr + row, row_loss.to(loss_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
MAX_BLOCK_GPU = 4096
MAX_BLOCK_INTERPRET = 512  # the interpreter runs numpy per op: a few mid-size chunks are fastest


def _log(w: float) -> float:
    return math.log(w) if w > 0.0 else float("-inf")


def _mixture_weights(divergence: int, beta: float, skew: float):
    """(w_p, w_q) of the mixture r = w_p p + w_q q used by jsd and the skew divergences."""
    if divergence == DIVERGENCES["jsd"]:
        return beta, 1.0 - beta
    if divergence == DIVERGENCES["skew_forward_kl"]:
        return skew, 1.0 - skew
    if divergence == DIVERGENCES["skew_reverse_kl"]:
        return 1.0 - skew, skew
    return 0.5, 0.5  # unused


def _leading_strides(x: torch.Tensor, name: str):
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D [B, R, V], got shape {tuple(x.shape)}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, got strides {x.stride()}")
    return x.stride(0), x.stride(1)


@on_tensor_device
def kd_fwd_triton(student, teacher, labels, loss, grad_student, grad_teacher, divergence: int,
                  temperature: float, beta: float, skew: float, ignore_index: int,
                  soft_weight: float, hard_weight: float, scale_temperature: bool,
                  softcap: float) -> None:
    """Fill ``loss`` [B, R] and the optional gradient buffers; see the reference ``kd_fwd``."""
    B, R, V = student.shape
    if teacher.shape != student.shape:
        raise ValueError(f"teacher shape {tuple(teacher.shape)} != student shape "
                         f"{tuple(student.shape)}")
    if divergence not in DIVERGENCES.values():
        raise ValueError(f"unknown divergence code {divergence}")
    use_hard = hard_weight != 0.0
    if use_hard and labels is None:
        raise ValueError("hard_weight != 0 needs labels")
    if labels is not None and (labels.shape != (B, R) or labels.dtype != torch.int64
                               or not labels.is_contiguous()):
        raise ValueError(f"labels must be contiguous int64 [B, R], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if loss.shape != (B, R) or loss.dtype not in (torch.float32, torch.float64) \
            or not loss.is_contiguous():
        raise ValueError(f"loss must be contiguous float32 [B, R], got {loss.dtype} "
                         f"{tuple(loss.shape)}")
    if B * R == 0:
        return
    if V == 0:
        loss.zero_()
        return
    s_sb, s_sr = _leading_strides(student, "student")
    t_sb, t_sr = _leading_strides(teacher, "teacher")
    gs_sb = gs_sr = gt_sb = gt_sr = 0
    if grad_student is not None:
        if grad_student.shape != student.shape:
            raise ValueError(f"grad_student shape {tuple(grad_student.shape)} != "
                             f"{tuple(student.shape)}")
        gs_sb, gs_sr = _leading_strides(grad_student, "grad_student")
    if grad_teacher is not None:
        if grad_teacher.shape != teacher.shape:
            raise ValueError(f"grad_teacher shape {tuple(grad_teacher.shape)} != "
                             f"{tuple(teacher.shape)}")
        gt_sb, gt_sr = _leading_strides(grad_teacher, "grad_teacher")

    T = float(temperature)
    soft_coef = soft_weight * (T * T if scale_temperature else 1.0)
    w_p, w_q = _mixture_weights(divergence, beta, skew)
    max_block = MAX_BLOCK_GPU if gpu_layout(student) else MAX_BLOCK_INTERPRET
    block = min(max(triton.next_power_of_2(V), 16), max_block)
    # 8 elements (one 16-byte bf16 load per input) per thread; at BLOCK=4096 that is 16 warps
    # and ~100-115 registers (ptxas, sm_90), one row per SM. 8 warps would need 170-250.
    num_warps = max(4, min(16, block // 256))
    _kd_fwd_kernel[(B * R,)](
        student, teacher,
        labels if labels is not None else loss,  # placeholders are never dereferenced
        loss,
        grad_student if grad_student is not None else student,
        grad_teacher if grad_teacher is not None else teacher,
        R, V, s_sb, s_sr, t_sb, t_sr, gs_sb, gs_sr, gt_sb, gt_sr,
        1.0 / T, float(softcap), w_p, w_q, _log(w_p), _log(w_q), int(ignore_index),
        soft_coef, soft_coef / T, float(hard_weight),
        DIV=int(divergence), HAS_LABELS=labels is not None, HAS_GS=grad_student is not None,
        HAS_GT=grad_teacher is not None, USE_SOFTCAP=softcap != 0.0, USE_HARD=use_hard,
        UNIT_T=T == 1.0, BLOCK=block,
        FUSED_D=int(divergence) == 0 and grad_teacher is None, num_warps=num_warps,
    )


# ----------------------------------------------------------------------------------------------
# op registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastkd_triton::kd_fwd",
                         mutates_args=("loss", "grad_student", "grad_teacher"))
def kd_fwd(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
           loss: torch.Tensor, grad_student: Optional[torch.Tensor],
           grad_teacher: Optional[torch.Tensor], divergence: int, temperature: float, beta: float,
           skew: float, ignore_index: int, soft_weight: float, hard_weight: float,
           scale_temperature: bool, softcap: float) -> None:
    kd_fwd_triton(student, teacher, labels, loss, grad_student, grad_teacher, divergence,
                  temperature, beta, skew, ignore_index, soft_weight, hard_weight,
                  scale_temperature, softcap)


@kd_fwd.register_fake
def _kd_fwd_fake(student, teacher, labels, loss, grad_student, grad_teacher, divergence,
                 temperature, beta, skew, ignore_index, soft_weight, hard_weight,
                 scale_temperature, softcap) -> None:
    return None
