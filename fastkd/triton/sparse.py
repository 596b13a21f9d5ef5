"""Triton kernel of the ``sparse_kd`` family: distillation from a sparse top-k teacher.

The math, the tails and the gradient ``g_j = q_j * gamma + [j = idx_i] * e_i`` are those of
``fastkd.reference.sparse`` (its module docstring is the contract); the per-bucket terms are
the ``_terms`` of the kd kernel (``fastkd.triton.divergences``), fed log-probabilities. This
file reads kernel -> launcher -> op registration.

Each program owns one row at a time (a grid-stride loop over rows; the launcher caps the grid
at PROGRAMS_PER_SM programs per SM on a GPU so that the rows in flight fit in L2):

* pass 1 over the row in BLOCK chunks: per-lane online max / sum-exp of a = z/T and, with hard
  labels and T != 1, of z (one max for both). Skipped when nothing needs the student's full
  normalizer: tail="renormalize" with a divergence other than forward_kl and no hard labels
  (D and its gradient then live on the k entries only).
* the k entries in KBLOCK chunks (one chunk up to k = MAX_KBLOCK): the student's logits at the
  teacher's indices are gathered from the row (L2/L1-resident after pass 1), the teacher's
  log-probs (renormalized, or bucket values plus the tail bucket), the student's bucket
  log-probs, then D = sum ell and H = sum h over the buckets. The tail masses are 1 - sum
  over the k entries (the student's against the row's max and sum from pass 1), floored at
  the reference's TAIL_FLOOR.
* last pass (backwards, so that it starts with the chunks pass 1 read last): the dense part
  c * q_j * gamma (+ the hard-label part) over the whole row, then a barrier, then the k-wide
  scatter that overwrites those k entries with their full value, c * (h_i - q_i H) plus the
  hard-label part recomputed from the gathered logit. The scatter re-gathers the student's
  logits, so ``grad_student`` must not alias ``student`` (the op declares only it as mutated).

All arithmetic is float32 (float64 inputs included; a float64 ``loss`` buffer is filled from
float32 math), gradients are stored in the buffer's dtype. No atomics, no host syncs, a fixed
reduction order: the same inputs give bitwise the same outputs. Indices must be distinct and in
[0, V) within each row (the caller validates them): duplicates would race in the scatter;
an index out of range gives its row a NaN loss and gradient, never an out-of-bounds access.

NaN (the contract's rule): a NaN the row reads makes a lane's running max NaN (NaN-propagating
maxima, as in the kd kernel), hence the row's log-sum-exps, every q or p of that side, D and H;
the tail floors are NaN-propagating maxima too, and gamma of the renormalized divergences (0) is
NaN when H is, so that the last pass writes NaN over the whole row; no read is added.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from fastkd.reference.divergences import DIVERGENCES
from fastkd.reference.sparse import TAIL_FLOOR as TAIL_FLOOR_VALUE
from fastkd.triton import gpu_layout, on_tensor_device
from fastkd.triton.divergences import (NEG_INF, _leading_strides, _log, _mixture_weights,
                                       _online_lse, _terms)

TAILS = {"renormalize": 0, "bucket": 1}
TAIL_FLOOR = tl.constexpr(TAIL_FLOOR_VALUE)


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _online_lse_pair(m, sa, s1, z, inv_T):
    """_online_lse for two streams sharing one running max m of z: sa sums exp((z - m) / T),
    s1 sums exp(z - m) (T > 0, so max(z / T) = max(z) / T)."""
    m_new = tl.maximum(m, z, propagate_nan=tl.PropagateNan.ALL)  # a NaN z: m and sums NaN
    d = -tl.abs(z - m)
    dead = m_new == NEG_INF
    ea = tl.where(dead, 0.0, tl.exp(d * inv_T))
    e1 = tl.where(dead, 0.0, tl.exp(d))
    up = z > m
    sa = sa * tl.where(up, ea, 1.0) + tl.where(up, 1.0, ea)
    s1 = s1 * tl.where(up, e1, 1.0) + tl.where(up, 1.0, e1)
    return m_new, sa, s1


@triton.jit
def _combine_lse(m, s, scale):
    """log sum over lanes of s * exp((m - max m) * scale), plus max m * scale; -inf if all -inf
    (the sum is then 0)."""
    ref, total = _combine_max_sum(m, s, scale)
    return ref + tl.log(total)


@triton.jit
def _combine_max_sum(m, s, scale):
    """(max m * scale, sum over lanes of s * exp((m - max m) * scale)); the max is taken as 0
    when all are -inf. _combine_lse's log-sum-exp is the first plus the log of the second."""
    mx = tl.max(m, 0)
    sh = tl.where(mx == NEG_INF, 0.0, mx)
    return sh * scale, tl.sum(s * tl.exp((m - sh) * scale), 0)


@triton.jit
def _gather_k(s_row, idx_row, val_row, ks, K, V):
    """One KBLOCK chunk of the teacher (indices, values) and the student's logits there.

    Lanes past k, and lanes whose index is outside [0, V) (validate=False), read nothing and
    hold -inf; the latter are never stored to either. Returns the lane mask, the in-range
    mask, idx, v, z.
    """
    kmask = ks < K
    idx = tl.load(idx_row + ks, mask=kmask, other=0)
    ok = kmask & (idx >= 0) & (idx < V)
    v = tl.load(val_row + ks, mask=kmask, other=0.0).to(tl.float32)
    z = tl.load(s_row + idx, mask=ok, other=0.0).to(tl.float32)
    return kmask, ok, idx, tl.where(kmask, v, NEG_INF), tl.where(ok, z, NEG_INF)


@triton.jit
def _bucket_logprobs(v, z, inv_T, lse_a, lse_b, lse_k, DIV: tl.constexpr, TAIL: tl.constexpr):
    """(lp, lq) of the k buckets; -inf on lanes past k, so those add nothing to any term."""
    a = z * inv_T
    if TAIL == 0:
        lp = v * inv_T - lse_b
        if DIV == 0:  # forward_kl: the student normalized over the full vocabulary
            lq = a - lse_a
        else:  # renormalized over the k entries
            lq = a - lse_k
    else:
        lp = v
        lq = a - lse_a
    return lp, lq


@triton.jit
def _dense_grad(z, cols, label, inv_T, lse_a, lse_1, c_gamma, hard_weight,
                SOFT_DENSE: tl.constexpr, USE_HARD: tl.constexpr, UNIT_T: tl.constexpr):
    """c * gamma * q_j (+ hard_weight * (softmax(z)_j - [j == label])) at logits z, columns cols."""
    g = tl.zeros_like(z)
    if SOFT_DENSE:
        q = tl.exp(z * inv_T - lse_a)
        g += c_gamma * q
    if USE_HARD:
        if UNIT_T and SOFT_DENSE:
            q1 = q
        else:
            q1 = tl.exp(z - lse_1)
        g += hard_weight * (q1 - tl.where(cols == label, 1.0, 0.0))
    return g


@triton.jit
def _sparse_kd_row(
    row, s_ptr, idx_ptr, val_ptr, labels_ptr, loss_ptr, gs_ptr,
    R, V, K,
    s_sb, s_sr, gs_sb, gs_sr,
    inv_T, w_p, w_q, log_wp, log_wq, ignore_index, soft_coef, grad_coef, hard_weight,
    DIV: tl.constexpr, TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_GS: tl.constexpr,
    USE_HARD: tl.constexpr, UNIT_T: tl.constexpr, SOFT_DENSE: tl.constexpr,
    BLOCK: tl.constexpr, KBLOCK: tl.constexpr,
):
    """One row (int64 ``row``: B*R*V exceeds 2**31 at LLM shapes): its loss and gradient."""
    bi = row // R
    ri = row % R
    s_row = s_ptr + bi * s_sb + ri * s_sr
    gs_row = gs_ptr + bi * gs_sb + ri * gs_sr
    idx_row = idx_ptr + row * K
    val_row = val_ptr + row * K
    offs = tl.arange(0, BLOCK)
    kofs = tl.arange(0, KBLOCK)
    n_chunks = tl.cdiv(V, BLOCK)
    n_kchunks = tl.cdiv(K, KBLOCK)

    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        if label == ignore_index:  # loss 0, gradient 0; the logits are never read
            tl.store(loss_ptr + row, tl.zeros([], loss_ptr.dtype.element_ty))
            if HAS_GS:
                zero = tl.zeros([BLOCK], gs_ptr.dtype.element_ty)
                for start in range(0, V, BLOCK):
                    tl.store(gs_row + start + offs, zero, mask=start + offs < V)
            return
    if USE_HARD:
        # a label outside [0, V) gives a NaN loss rather than an out-of-bounds read
        lab_ok = (label >= 0) & (label < V)
        z_lab = tl.load(s_row + tl.where(lab_ok, label, 0), mask=lab_ok, other=float("nan"))
        z_lab = z_lab.to(tl.float32)

    # ---- pass 1: per-lane online max / sum-exp of a = z/T (and of z for the hard loss) ---------
    lse_a = 0.0
    lse_1 = 0.0
    ref_a = 0.0  # bucket: the row's max of a, and sum_a = sum exp(a - ref_a) over the row
    sum_a = 1.0
    if SOFT_DENSE or USE_HARD:
        m = tl.full([BLOCK], NEG_INF, tl.float32)
        sa = tl.zeros([BLOCK], tl.float32)
        s1 = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n_chunks):
            cols = i * BLOCK + offs
            mask = cols < V
            z = tl.load(s_row + cols, mask=mask, other=0.0, eviction_policy="evict_last")
            z = tl.where(mask, z.to(tl.float32), NEG_INF)
            if SOFT_DENSE and USE_HARD and not UNIT_T:
                m, sa, s1 = _online_lse_pair(m, sa, s1, z, inv_T)
            elif SOFT_DENSE:
                m, sa, alpha, w = _online_lse(m, sa, z * inv_T)
            else:
                m, s1, alpha, w = _online_lse(m, s1, z)
        # (bucket: lse_a from the max and sum its tail needs too, the same arithmetic)
        if SOFT_DENSE and USE_HARD and not UNIT_T:
            if TAIL == 1:
                ref_a, sum_a = _combine_max_sum(m, sa, inv_T)
                lse_a = ref_a + tl.log(sum_a)
            else:
                lse_a = _combine_lse(m, sa, inv_T)
            lse_1 = _combine_lse(m, s1, 1.0)
        elif SOFT_DENSE:
            if TAIL == 1:
                ref_a, sum_a = _combine_max_sum(m, sa, 1.0)
                lse_a = ref_a + tl.log(sum_a)
            else:
                lse_a = _combine_lse(m, sa, 1.0)
            lse_1 = lse_a  # only used when T == 1
        else:
            lse_1 = _combine_lse(m, s1, 1.0)

    # ---- the k entries, pass A: normalizers over k (renormalize) or the tails (bucket) --------
    lse_b = 0.0
    lse_k = 0.0
    lp_tail = 0.0
    lq_tail = 0.0
    q_tail = 0.0
    mb = tl.full([KBLOCK], NEG_INF, tl.float32)
    sb = tl.zeros([KBLOCK], tl.float32)
    mk = tl.full([KBLOCK], NEG_INF, tl.float32)
    sk = tl.zeros([KBLOCK], tl.float32)
    sum_p = tl.zeros([KBLOCK], tl.float32)
    sum_q = tl.zeros([KBLOCK], tl.float32)
    n_bad = tl.zeros([KBLOCK], tl.int32)
    for j in range(0, n_kchunks):
        kmask, k_ok, idx, v, z = _gather_k(s_row, idx_row, val_row, j * KBLOCK + kofs, K, V)
        n_bad += tl.where(kmask & (k_ok == 0), 1, 0)
        if TAIL == 0:
            mb, sb, alpha_b, w_b = _online_lse(mb, sb, v * inv_T)
            if DIV != 0:
                mk, sk, alpha_k, w_k = _online_lse(mk, sk, z * inv_T)
        else:
            sum_p += tl.exp(v)
            sum_q += tl.exp(z * inv_T - ref_a)
    if TAIL == 0:
        lse_b = _combine_lse(mb, sb, 1.0)
        if DIV != 0:
            lse_k = _combine_lse(mk, sk, 1.0)
    else:
        # the tails, floored (the reference's TAIL_FLOOR); the student's as (sum_a - sum_S) / sum_a:
        # no rounded log-sum-exp in it, so it is good to a few ulps of 1 whatever the logits' size
        # (NaN-propagating maxima: tl.maximum's default would floor a NaN mass)
        p_tail = tl.maximum(1.0 - tl.sum(sum_p, 0), TAIL_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        q_tail = tl.maximum((sum_a - tl.sum(sum_q, 0)) / sum_a, 0.0,
                            propagate_nan=tl.PropagateNan.ALL)
        q_floor = tl.maximum(q_tail, TAIL_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        lp_tail = tl.log(p_tail)
        lq_tail = tl.log(q_floor)

    # ---- pass B: D = sum ell, H = sum h over the buckets ----------------------------------------
    acc_l = tl.zeros([KBLOCK], tl.float32)
    acc_h = tl.zeros([KBLOCK], tl.float32)
    for j in range(0, n_kchunks):
        kmask, k_ok, idx, v, z = _gather_k(s_row, idx_row, val_row, j * KBLOCK + kofs, K, V)
        lp, lq = _bucket_logprobs(v, z, inv_T, lse_a, lse_b, lse_k, DIV, TAIL)
        q, p, ell, h, k_unused = _terms(lq, lp, 0.0, 0.0, w_p, w_q, log_wp, log_wq, DIV)
        acc_l += tl.where(kmask, ell, 0.0)
        acc_h += tl.where(kmask, h, 0.0)
    # an index outside [0, V): a NaN loss and gradient rather than an out-of-bounds access
    bad = tl.sum(n_bad, 0) > 0
    D = tl.where(bad, float("nan"), tl.sum(acc_l, 0))
    H = tl.where(bad, float("nan"), tl.sum(acc_h, 0))
    ratio = 0.0
    if TAIL == 1:
        # (no `_` targets: a name bound outside a loop and re-bound inside with another shape
        # breaks compilation, which the interpreter does not check)
        tail_terms = _terms(lq_tail, lp_tail, 0.0, 0.0, w_p, w_q, log_wp, log_wq, DIV)
        D += tail_terms[2]
        # dD/dq~ of the floored tail, which moves with q_tail (the contract's r)
        ratio = tail_terms[3] / q_floor
        H += ratio * q_tail

    row_loss = soft_coef * D
    if USE_HARD:
        row_loss += hard_weight * (lse_1 - z_lab)
    tl.store(loss_ptr + row, row_loss.to(loss_ptr.dtype.element_ty))

    if HAS_GS:
        # g_j = c * (q_j * gamma + [j = idx_i] e_i), the contract's gamma and e_i per tail
        if TAIL == 0:
            if DIV == 0:
                gamma = -H
            else:
                gamma = tl.where(H != H, H, 0.0)  # 0, or NaN for a NaN row
        else:
            gamma = ratio - H
        c_gamma = grad_coef * gamma

        # ---- last pass (backwards): the dense part over the whole row ------------------------
        for i in range(0, n_chunks):
            cols = (n_chunks - 1 - i) * BLOCK + offs
            mask = cols < V
            if SOFT_DENSE or USE_HARD:
                z = tl.load(s_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
                g = _dense_grad(z.to(tl.float32), cols, label, inv_T, lse_a, lse_1, c_gamma,
                                hard_weight, SOFT_DENSE, USE_HARD, UNIT_T)
                if not SOFT_DENSE:  # the soft part is 0 here, or NaN (gamma) for a NaN row
                    g = tl.where(gamma != gamma, gamma, g)
            else:
                g = tl.zeros([BLOCK], tl.float32) + gamma  # 0, or NaN for a NaN row
            tl.store(gs_row + cols, g.to(gs_ptr.dtype.element_ty), mask=mask,
                     eviction_policy="evict_first")
        # the scatter below overwrites entries another thread of this program just stored
        tl.debug_barrier()

        # ---- the k entries again: their full gradient, scattered ----------------------------
        # c * (q_i gamma + e_i) = c * (h_i - q_i H) for every tail (q: the bucket's student
        # probability), computed so: gamma and e_i each hold r, up to 1 / TAIL_FLOOR
        for j in range(0, n_kchunks):
            kmask, k_ok, idx, v, z = _gather_k(s_row, idx_row, val_row, j * KBLOCK + kofs, K, V)
            lp, lq = _bucket_logprobs(v, z, inv_T, lse_a, lse_b, lse_k, DIV, TAIL)
            q, p, ell, h, k_unused = _terms(lq, lp, 0.0, 0.0, w_p, w_q, log_wp, log_wq, DIV)
            g = _dense_grad(z, idx, label, inv_T, lse_a, lse_1, 0.0, hard_weight,
                            SOFT_DENSE, USE_HARD, UNIT_T) + grad_coef * (h - q * H)
            tl.store(gs_row + idx, g.to(gs_ptr.dtype.element_ty), mask=k_ok)


@triton.jit
def _sparse_kd_fwd_kernel(
    s_ptr, idx_ptr, val_ptr, labels_ptr, loss_ptr, gs_ptr,
    n_rows, R, V, K,
    s_sb, s_sr, gs_sb, gs_sr,
    inv_T, w_p, w_q, log_wp, log_wq, ignore_index, soft_coef, grad_coef, hard_weight,
    DIV: tl.constexpr, TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_GS: tl.constexpr,
    USE_HARD: tl.constexpr, UNIT_T: tl.constexpr, SOFT_DENSE: tl.constexpr,
    BLOCK: tl.constexpr, KBLOCK: tl.constexpr,
):
    # a grid-stride loop over rows: the launcher caps the grid so that the rows in flight (each
    # re-read from L2 by its last pass) fit in L2; with one program per row it runs once
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        _sparse_kd_row(
            row, s_ptr, idx_ptr, val_ptr, labels_ptr, loss_ptr, gs_ptr, R, V, K,
            s_sb, s_sr, gs_sb, gs_sr, inv_T, w_p, w_q, log_wp, log_wq, ignore_index, soft_coef,
            grad_coef, hard_weight, DIV, TAIL, HAS_LABELS, HAS_GS, USE_HARD, UNIT_T, SOFT_DENSE,
            BLOCK, KBLOCK)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
MAX_BLOCK_GPU = 4096
MAX_BLOCK_INTERPRET = 512  # the interpreter runs numpy per op: a few mid-size chunks are fastest
MAX_KBLOCK = 1024  # k up to this is one chunk; larger k loops over the teacher's entries
# Programs per SM on a GPU (None: one program per row). A row's last pass re-reads it and
# should hit L2: at V = 128256 in bf16 a row is 256 KB, and with 28-84 registers per thread
# up to four 16-warp programs would share an SM (132 * 4 rows in flight > the 50 MB L2).
PROGRAMS_PER_SM: Optional[int] = 2
MAX_PROGRAMS: Optional[int] = None  # a cap on any device; tests set it to exercise the row loop
_SM_COUNT = {}


def _num_programs(device: torch.device, n_rows: int) -> int:
    cap = n_rows if MAX_PROGRAMS is None else MAX_PROGRAMS
    if device.type == "cuda" and PROGRAMS_PER_SM is not None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:  # a property query once per device, no sync
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        cap = min(cap, _SM_COUNT[index] * PROGRAMS_PER_SM)
    return max(1, min(n_rows, cap))


@on_tensor_device
def sparse_kd_fwd_triton(student, indices, values, labels, loss, grad_student, divergence: int,
                         temperature: float, beta: float, skew: float, tail: int,
                         ignore_index: int, soft_weight: float, hard_weight: float,
                         scale_temperature: bool) -> None:
    """Fill ``loss`` [B, R] and optionally ``grad_student``; see the reference ``sparse_kd_fwd``."""
    if student.dim() != 3:
        raise ValueError(f"student must be 3-D [B, R, V], got shape {tuple(student.shape)}")
    B, R, V = student.shape
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (B, R) or indices.dtype != torch.int64 \
            or not indices.is_contiguous():
        raise ValueError(f"indices must be contiguous int64 [B, R, K], got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    K = indices.shape[2]
    if values.shape != indices.shape or not values.dtype.is_floating_point \
            or not values.is_contiguous():
        raise ValueError(f"values must be a contiguous float tensor shaped like indices "
                         f"{tuple(indices.shape)}, got {values.dtype} {tuple(values.shape)}")
    if divergence not in DIVERGENCES.values():
        raise ValueError(f"unknown divergence code {divergence}")
    if tail not in TAILS.values():
        raise ValueError(f"unknown tail code {tail}")
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
    if V == 0 or K == 0:
        raise ValueError(f"sparse_kd needs V >= K >= 1, got V={V}, K={K}")
    s_sb, s_sr = _leading_strides(student, "student")
    gs_sb = gs_sr = 0
    if grad_student is not None:
        if grad_student.shape != student.shape or grad_student.dtype != student.dtype:
            raise ValueError(f"grad_student must be {student.dtype} {tuple(student.shape)}, got "
                             f"{grad_student.dtype} {tuple(grad_student.shape)}")
        gs_sb, gs_sr = _leading_strides(grad_student, "grad_student")

    T = float(temperature)
    soft_coef = soft_weight * (T * T if scale_temperature else 1.0)
    w_p, w_q = _mixture_weights(divergence, beta, skew)
    max_block = MAX_BLOCK_GPU if gpu_layout(student) else MAX_BLOCK_INTERPRET
    block = min(max(triton.next_power_of_2(V), 16), max_block)
    kblock = min(max(triton.next_power_of_2(K), 16), MAX_KBLOCK)
    # as the kd kernel: 8 elements per thread, 16 warps at BLOCK=4096 (one 16-byte load when
    # V and the row strides are multiples of 16 elements: Triton's divisibility specialization).
    # ptxas sm_90, all 36 variants with labels and gradient: 28-84 registers, 0-14 local
    # loads/stores of per-row scalars, none inside a chunk loop.
    num_warps = max(4, min(16, block // 256))
    _sparse_kd_fwd_kernel[(_num_programs(student.device, B * R),)](
        student, indices, values,
        labels if labels is not None else loss,  # placeholders are never dereferenced
        loss,
        grad_student if grad_student is not None else student,
        B * R, R, V, K, s_sb, s_sr, gs_sb, gs_sr,
        1.0 / T, w_p, w_q, _log(w_p), _log(w_q), int(ignore_index),
        soft_coef, soft_coef / T, float(hard_weight),
        DIV=int(divergence), TAIL=int(tail), HAS_LABELS=labels is not None,
        HAS_GS=grad_student is not None, USE_HARD=use_hard, UNIT_T=T == 1.0,
        # the soft gradient has a dense q_j * gamma part (and D needs log-sum-exp(z/T))
        SOFT_DENSE=tail == TAILS["bucket"] or divergence == DIVERGENCES["forward_kl"],
        BLOCK=block, KBLOCK=kblock, num_warps=num_warps,
    )


# ----------------------------------------------------------------------------------------------
# op registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastkd_triton::sparse_kd_fwd", mutates_args=("loss", "grad_student"))
def sparse_kd_fwd(student: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  labels: Optional[torch.Tensor], loss: torch.Tensor,
                  grad_student: Optional[torch.Tensor], divergence: int, temperature: float,
                  beta: float, skew: float, tail: int, ignore_index: int, soft_weight: float,
                  hard_weight: float, scale_temperature: bool) -> None:
    sparse_kd_fwd_triton(student, indices, values, labels, loss, grad_student, divergence,
                         temperature, beta, skew, tail, ignore_index, soft_weight, hard_weight,
                         scale_temperature)


@sparse_kd_fwd.register_fake
def _sparse_kd_fwd_fake(student, indices, values, labels, loss, grad_student, divergence,
                        temperature, beta, skew, tail, ignore_index, soft_weight, hard_weight,
                        scale_temperature) -> None:
    return None
