"""Triton kernels of the attention families: attention transfer, attention maps, attention relations.

The math, the gradients and the edge cases (masks, 0 log 0, TinyBERT's score floor) are those of
``fastkd.reference.attention`` (its module docstring is the contract). This file reads kernels ->
launchers -> op registration, one family after the other.

* transfer: three launches over a [B, N] fp32 scratch (N = H*W): per (sample, position block) the
  channel means of |F|^p of both sides; per sample the norms, the loss and the per-position
  gradient coefficient; per (sample, position block, channel block) the gradient.
* maps: ROWS query rows per program, walking the keys in BLOCK-wide chunks with the per-lane
  online log-sum-exp of the kd kernel (``_online_lse``); a second pass writes loss and gradient.
* relations (flash-attention style, never an L x L tile of a whole head): the forward keeps, per
  query row, running maxima and sums of both softmaxes and the KL relative to them, and writes
  the row loss and both row log-sum-exps ([B, A, L]); the backward recomputes score tiles from
  the saved log-sum-exps, once per query block for grad_m and once per key block for grad_n
  (no atomics). Scores of fp32 inputs use IEEE fp32 dots (never plain TF32: they go through
  exp; three-pass TF32 by opt-in, ``fastkd.triton.fp32_dot_precision``); 16-bit inputs use
  their own dtype with fp32 accumulation, and the gradient dots split the fp32 (q - p) tile
  into a 16-bit high and low part (two dots, ~16 significant bits).

All arithmetic is float32 (float64 inputs are read as float32; a float64 ``loss`` is filled from
float32 math). No atomics, no host syncs, fixed reduction orders: bitwise deterministic.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from fastkd.reference.attention import AT_EPS, MAP_KINDS, SCORE_FLOOR
from fastkd.triton import fp32_dot_precision, gpu_layout, on_tensor_device
from fastkd.triton.divergences import NEG_INF, _online_lse

_FLOOR = tl.constexpr(SCORE_FLOOR)


# ----------------------------------------------------------------------------------------------
# attention transfer
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pow_abs(x, p, P_MODE: tl.constexpr):
    """|x|^p; P_MODE 2: p = 2, 1: p = 1, 0: any p >= 1."""
    if P_MODE == 2:
        return x * x
    elif P_MODE == 1:
        return tl.abs(x)
    else:
        ax = tl.abs(x)
        return tl.where(ax > 0, tl.exp(p * tl.log(tl.where(ax > 0, ax, 1.0))), 0.0)


@triton.jit
def _dpow_abs(x, p, P_MODE: tl.constexpr):
    """d|x|^p / dx."""
    sg = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    if P_MODE == 2:
        return 2.0 * x
    elif P_MODE == 1:
        return sg
    else:
        ax = tl.abs(x)
        return tl.where(ax > 0, p * tl.exp((p - 1.0) * tl.log(tl.where(ax > 0, ax, 1.0))), 0.0) * sg


@triton.jit
def _at_channel_mean(x_ptr, C, N, sb, sc, b, offs, m, p, P_MODE: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    base = x_ptr + b * sb + offs
    for c in range(0, C):
        x = tl.load(base + c * sc, mask=m, other=0.0).to(tl.float32)
        acc += _pow_abs(x, p, P_MODE)
    return acc / C


@triton.jit
def _at_sums_kernel(s_ptr, t_ptr, as_ptr, at_ptr, Cs, Ct, N, s_sb, s_sc, t_sb, t_sc, p,
                    P_MODE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    a_s = _at_channel_mean(s_ptr, Cs, N, s_sb, s_sc, b, offs, m, p, P_MODE, BLOCK)
    a_t = _at_channel_mean(t_ptr, Ct, N, t_sb, t_sc, b, offs, m, p, P_MODE, BLOCK)
    tl.store(as_ptr + b * N + offs, a_s, mask=m)
    tl.store(at_ptr + b * N + offs, a_t, mask=m)


@triton.jit
def _at_norm_kernel(as_ptr, at_ptr, loss_ptr, N, eps, HAS_GS: tl.constexpr, BLOCK: tl.constexpr):
    """Per sample: the loss, and (HAS_GS) d loss / d a_s written over a_s."""
    b = tl.program_id(0).to(tl.int64)
    a_row = as_ptr + b * N
    t_row = at_ptr + b * N
    ss = tl.zeros([BLOCK], tl.float32)
    tt = tl.zeros([BLOCK], tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        m = offs < N
        a = tl.load(a_row + offs, mask=m, other=0.0)
        t = tl.load(t_row + offs, mask=m, other=0.0)
        ss += a * a
        tt += t * t
    n_s = tl.sqrt(tl.sum(ss, 0))
    den_s = tl.maximum(n_s, eps)
    den_t = tl.maximum(tl.sqrt(tl.sum(tt, 0)), eps)
    acc_l = tl.zeros([BLOCK], tl.float32)
    acc_d = tl.zeros([BLOCK], tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        m = offs < N
        A = tl.load(a_row + offs, mask=m, other=0.0) / den_s
        d = A - tl.load(t_row + offs, mask=m, other=0.0) / den_t
        acc_l += d * d
        acc_d += A * 2.0 * d
    tl.store(loss_ptr + b, tl.sum(acc_l, 0).to(loss_ptr.dtype.element_ty))
    if HAS_GS:
        dot = tl.sum(acc_d, 0)
        for n0 in range(0, N, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            m = offs < N
            A = tl.load(a_row + offs, mask=m, other=0.0) / den_s
            g = 2.0 * (A - tl.load(t_row + offs, mask=m, other=0.0) / den_t)
            c = tl.where(n_s >= eps, (g - A * dot) / den_s, g / eps)
            tl.store(a_row + offs, c, mask=m)


@triton.jit
def _at_grad_kernel(s_ptr, c_ptr, gs_ptr, Cs, N, s_sb, s_sc, g_sb, g_sc, p, inv_C, CH,
                    P_MODE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    c0 = tl.program_id(2) * CH
    coef = tl.load(c_ptr + b * N + offs, mask=m, other=0.0) * inv_C
    for c in range(c0, tl.minimum(c0 + CH, Cs)):
        x = tl.load(s_ptr + b * s_sb + c * s_sc + offs, mask=m, other=0.0).to(tl.float32)
        g = coef * _dpow_abs(x, p, P_MODE)
        tl.store(gs_ptr + b * g_sb + c * g_sc + offs, g.to(gs_ptr.dtype.element_ty), mask=m)


def _check_last_contiguous(x, name, dim):
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, got strides {x.stride()}")


def _p_mode(p: float) -> int:
    return 2 if p == 2.0 else (1 if p == 1.0 else 0)


@on_tensor_device
def attention_transfer_fwd_triton(student, teacher, loss, grad_student, p: float) -> None:
    """Fill ``loss`` [B] and optionally ``grad_student``; see the reference."""
    _check_last_contiguous(student, "student", 3)
    _check_last_contiguous(teacher, "teacher", 3)
    B, Cs, N = student.shape
    Ct = teacher.shape[1]
    if teacher.shape[0] != B or teacher.shape[2] != N:
        raise ValueError(f"teacher {tuple(teacher.shape)} does not match student {tuple(student.shape)}")
    if B == 0:
        return
    dev = student.device
    a_s = torch.empty((B, N), dtype=torch.float32, device=dev)
    a_t = torch.empty((B, N), dtype=torch.float32, device=dev)
    block = min(max(triton.next_power_of_2(N), 16), 1024 if gpu_layout(student) else 256)
    nb = triton.cdiv(N, block)
    mode = _p_mode(float(p))
    _at_sums_kernel[(B, nb)](student, teacher, a_s, a_t, Cs, Ct, N, student.stride(0),
                             student.stride(1), teacher.stride(0), teacher.stride(1), float(p),
                             P_MODE=mode, BLOCK=block)
    _at_norm_kernel[(B,)](a_s, a_t, loss, N, AT_EPS, HAS_GS=grad_student is not None, BLOCK=block)
    if grad_student is not None:
        _check_last_contiguous(grad_student, "grad_student", 3)
        ch = 32 if gpu_layout(student) else Cs
        _at_grad_kernel[(B, nb, triton.cdiv(Cs, ch))](
            student, a_s, grad_student, Cs, N, student.stride(0), student.stride(1),
            grad_student.stride(0), grad_student.stride(1), float(p), 1.0 / Cs, ch,
            P_MODE=mode, BLOCK=block)


# ----------------------------------------------------------------------------------------------
# attention maps
# ----------------------------------------------------------------------------------------------
@triton.jit
def _lane_lse(m, z, ok):
    """Per row (axis 1): (shift, log of the shifted sum) of per-lane (max, sum-exp) states, as the
    kd kernel keeps them; rows that are not ``ok`` get a harmless (0, 0)."""
    row_m = tl.max(m, 1)
    sh = tl.where(row_m == NEG_INF, 0.0, row_m)
    tot = tl.sum(z * tl.exp(m - sh[:, None]), 1)
    return sh, tl.log(tl.where(ok, tot, 1.0))


@triton.jit
def _map_keys(mask_ptr, b, cols, rvalid, L, HAS_MASK: tl.constexpr):
    """[ROWS, BLOCK] valid (query row, key) pairs."""
    key = rvalid[:, None] & (cols < L)[None, :]
    if HAS_MASK:
        km = tl.load(mask_ptr + b[:, None] * L + cols[None, :], mask=key, other=0)
        key = key & (km != 0)
    return key


@triton.jit
def _map_kernel(s_ptr, t_ptr, mask_ptr, loss_ptr, gs_ptr, n_rows, H, L,
                s_sb, s_sh, s_sl, t_sb, t_sh, t_sl, g_sb, g_sh, g_sl,
                KIND: tl.constexpr, S_SCORES: tl.constexpr, T_SCORES: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_GS: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr):
    """ROWS query rows per program (index r = (b * H + h) * L + i), keys in BLOCK-wide chunks.
    Padded query rows are never read: loss 0 and gradient 0."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_r = r < n_rows
    r = tl.where(in_r, r, 0)
    i = r % L
    h = (r // L) % H
    b = r // (L * H)
    s_row = s_ptr + b * s_sb + h * s_sh + i * s_sl
    t_row = t_ptr + b * t_sb + h * t_sh + i * t_sl
    g_row = gs_ptr + b * g_sb + h * g_sh + i * g_sl
    rvalid = in_r
    if HAS_MASK:
        rvalid = rvalid & (tl.load(mask_ptr + b * L + i, mask=in_r, other=0) != 0)
    offs = tl.arange(0, BLOCK)

    # pass 1 (kl with a scores side): per-lane online log-sum-exps; teacher mass P for probs
    ms = tl.full([ROWS, BLOCK], NEG_INF, tl.float32)
    zs = tl.zeros([ROWS, BLOCK], tl.float32)
    mt = tl.full([ROWS, BLOCK], NEG_INF, tl.float32)
    zt = tl.zeros([ROWS, BLOCK], tl.float32)
    pm = tl.zeros([ROWS, BLOCK], tl.float32)
    if KIND == 0:
        if S_SCORES or T_SCORES:
            for j0 in range(0, L, BLOCK):
                cols = j0 + offs
                key = _map_keys(mask_ptr, b, cols, rvalid, L, HAS_MASK)
                if S_SCORES:
                    s = tl.load(s_row[:, None] + cols[None, :], mask=key, other=0.0).to(tl.float32)
                    ms, zs, _, _ = _online_lse(ms, zs, tl.where(key, s, NEG_INF))
                t = tl.load(t_row[:, None] + cols[None, :], mask=key, other=0.0).to(tl.float32)
                if T_SCORES:
                    mt, zt, _, _ = _online_lse(mt, zt, tl.where(key, t, NEG_INF))
                else:
                    pm += t
    zero = tl.zeros([ROWS], tl.float32)
    sh_s, ls_s, sh_t, ls_t = zero, zero, zero, zero
    if KIND == 0 and S_SCORES:
        sh_s, ls_s = _lane_lse(ms, zs, rvalid)
    if KIND == 0 and T_SCORES:
        sh_t, ls_t = _lane_lse(mt, zt, rvalid)
        P = tl.full([ROWS], 1.0, tl.float32)
    else:
        P = tl.sum(pm, 1)

    # pass 2: loss terms and the gradient
    acc = tl.zeros([ROWS, BLOCK], tl.float32)
    for j0 in range(0, L, BLOCK):
        cols = j0 + offs
        key = _map_keys(mask_ptr, b, cols, rvalid, L, HAS_MASK)
        s = tl.load(s_row[:, None] + cols[None, :], mask=key, other=0.0).to(tl.float32)
        t = tl.load(t_row[:, None] + cols[None, :], mask=key, other=0.0).to(tl.float32)
        if KIND == 0:
            if T_SCORES:
                lp = (t - sh_t[:, None]) - ls_t[:, None]
                p = tl.where(key, tl.exp(lp), 0.0)
            else:
                p = t
                lp = tl.log(tl.where(p > 0, p, 1.0))
            if S_SCORES:
                lq = (s - sh_s[:, None]) - ls_s[:, None]
                q = tl.where(key, tl.exp(lq), 0.0)
                g = q * P[:, None] - p
            else:
                s1 = tl.where(key, s, 1.0)
                lq = tl.log(s1)
                g = tl.where(p > 0, -p / s1, 0.0)
            acc += tl.where(p > 0, p * (lp - lq), 0.0)
        else:
            keep = key
            if S_SCORES:
                keep = keep & (s > _FLOOR)
                s = tl.where(s > _FLOOR, s, 0.0)
            if T_SCORES:
                t = tl.where(t > _FLOOR, t, 0.0)
            d = tl.where(key, s - t, 0.0)
            acc += d * d
            g = tl.where(keep, 2.0 * d, 0.0)
        if HAS_GS:
            tl.store(g_row[:, None] + cols[None, :], tl.where(key, g, 0.0).to(gs_ptr.dtype.element_ty),
                     mask=in_r[:, None] & (cols < L)[None, :])
    tl.store(loss_ptr + r, tl.where(rvalid, tl.sum(acc, 1), 0.0).to(loss_ptr.dtype.element_ty),
             mask=in_r)


MAX_BLOCK_GPU = 2048  # keys per chunk of a map row
MAX_BLOCK_INTERPRET = 1024


def _mask_u8(mask):
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 2 or not mask.is_contiguous():
        raise ValueError(f"mask must be a contiguous bool [B, L] tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    return mask.view(torch.uint8)


@on_tensor_device
def attention_map_fwd_triton(student, teacher, mask, loss, grad_student, kind: int,
                             student_scores: bool, teacher_scores: bool) -> None:
    """Fill ``loss`` [B, H, L] and optionally ``grad_student``; see the reference."""
    _check_last_contiguous(student, "student", 4)
    _check_last_contiguous(teacher, "teacher", 4)
    B, H, L, L2 = student.shape
    if teacher.shape != student.shape or L2 != L:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must "
                         f"be the same [B, H, L, L]")
    if kind not in MAP_KINDS.values():
        raise ValueError(f"unknown attention map kind {kind}")
    if loss.shape != (B, H, L) or not loss.is_contiguous():
        raise ValueError(f"loss must be contiguous [B, H, L], got {tuple(loss.shape)}")
    m8 = _mask_u8(mask)
    if B * H * L == 0:
        return
    g = grad_student
    if g is not None:
        _check_last_contiguous(g, "grad_student", 4)
    block = min(max(triton.next_power_of_2(L), 16),
                MAX_BLOCK_GPU if gpu_layout(student) else MAX_BLOCK_INTERPRET)
    # [rows, block] tiles of 4K entries in the interpreter (numpy per op), 2K on a GPU (five
    # per-lane state tiles live in registers: 4K entries need ~255 registers per thread)
    rows = max(1, (2048 if gpu_layout(student) else 4096) // block)
    n_rows = B * H * L
    _map_kernel[(triton.cdiv(n_rows, rows),)](
        student, teacher, m8 if m8 is not None else loss, loss, g if g is not None else student,
        n_rows, H, L, student.stride(0), student.stride(1), student.stride(2),
        teacher.stride(0), teacher.stride(1), teacher.stride(2),
        *(g.stride()[:3] if g is not None else (0, 0, 0)),
        KIND=int(kind), S_SCORES=bool(student_scores), T_SCORES=bool(teacher_scores),
        HAS_MASK=m8 is not None, HAS_GS=g is not None, ROWS=rows, BLOCK=block, num_warps=8)


# ----------------------------------------------------------------------------------------------
# attention relations
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rows(ptr, sb, sl, b, rows, rmask, col0, dh, LOWP: tl.constexpr, BD: tl.constexpr):
    """A [len(rows), BD] tile of one head (channels col0 .. col0 + dh), 0 outside and on the rows
    of padded tokens (never read, whatever they hold)."""
    d = tl.arange(0, BD)
    x = tl.load(ptr + b * sb + rows[:, None] * sl + col0 + d[None, :],
                mask=rmask[:, None] & (d[None, :] < dh), other=0.0)
    if not LOWP:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dot_nt(a, b, PREC: tl.constexpr):
    """a @ b^T in fp32."""
    return tl.dot(a, tl.trans(b), input_precision=PREC, out_dtype=tl.float32)


@triton.jit
def _dot_split(a, x, LOWP: tl.constexpr, PREC: tl.constexpr):
    """fp32 a @ x: in fp32 (PREC), or for 16-bit x as two 16-bit dots of a's high and low parts."""
    if LOWP:
        hi = a.to(x.dtype)
        lo = (a - hi.to(tl.float32)).to(x.dtype)
        return tl.dot(hi, x, out_dtype=tl.float32) + tl.dot(lo, x, out_dtype=tl.float32)
    else:
        return tl.dot(a, x, input_precision=PREC, out_dtype=tl.float32)


@triton.jit
def _key_valid(mask_ptr, b, cols, L, HAS_MASK: tl.constexpr):
    v = cols < L
    if HAS_MASK:
        v = v & (tl.load(mask_ptr + b * L + cols, mask=cols < L, other=0) != 0)
    return v


@triton.jit
def _block_and_head(L, BLOCK: tl.constexpr):
    """(row block, b * A + a) of this program. One flat grid axis, the blocks of a head adjacent
    (they share its key tiles in L2): a second axis of B * A would be capped at 65535."""
    nblk = tl.cdiv(L, BLOCK)
    pid = tl.program_id(0)
    return pid % nblk, (pid // nblk).to(tl.int64)


@triton.jit
def _relation_fwd_kernel(
    xm_ptr, xn_ptr, ym_ptr, yn_ptr, mask_ptr, loss_ptr, lse_s_ptr, lse_t_ptr,
    L, A, ds, dt, scale_s, scale_t,
    xm_sb, xm_sl, xn_sb, xn_sl, ym_sb, ym_sl, yn_sb, yn_sl,
    HAS_MASK: tl.constexpr, LOWP_S: tl.constexpr, LOWP_T: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BDS: tl.constexpr, BDT: tl.constexpr,
):
    pid, bh = _block_and_head(L, BM)
    b = bh // A
    a = bh % A
    rows = pid * BM + tl.arange(0, BM)
    in_rows = rows < L
    rvalid = _key_valid(mask_ptr, b, rows, L, HAS_MASK)
    xm = _rows(xm_ptr, xm_sb, xm_sl, b, rows, rvalid, a * ds, ds, LOWP_S, BDS)
    ym = _rows(ym_ptr, ym_sb, ym_sl, b, rows, rvalid, a * dt, dt, LOWP_T, BDT)
    # Per row: running maxima m, sums l of exp(x - m), and acc = sum_j e^(t_j - m_t) *
    # ((t_j - m_t) - (s_j - m_s)). Then KL = acc / l_t - log l_t + log l_s: the terms are
    # relative to the row maxima, so nothing cancels at the scale of the scores.
    m_s = tl.full([BM], NEG_INF, tl.float32)
    m_t = tl.full([BM], NEG_INF, tl.float32)
    l_s = tl.zeros([BM], tl.float32)
    l_t = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM], tl.float32)
    for n0 in range(0, L, BN):
        cols = n0 + tl.arange(0, BN)
        kvalid = _key_valid(mask_ptr, b, cols, L, HAS_MASK)
        xn = _rows(xn_ptr, xn_sb, xn_sl, b, cols, kvalid, a * ds, ds, LOWP_S, BDS)
        yn = _rows(yn_ptr, yn_sb, yn_sl, b, cols, kvalid, a * dt, dt, LOWP_T, BDT)
        s = tl.where(kvalid[None, :], _dot_nt(xm, xn, PREC) * scale_s, NEG_INF)
        t = tl.where(kvalid[None, :], _dot_nt(ym, yn, PREC) * scale_t, NEG_INF)
        ms_new = tl.maximum(m_s, tl.max(s, 1))
        mt_new = tl.maximum(m_t, tl.max(t, 1))
        ms_safe = tl.where(ms_new == NEG_INF, 0.0, ms_new)
        mt_safe = tl.where(mt_new == NEG_INF, 0.0, mt_new)
        alpha_s = tl.exp(m_s - ms_safe)
        alpha_t = tl.exp(m_t - mt_safe)
        shift = tl.where(l_t > 0, (mt_safe - m_t) - (ms_safe - m_s), 0.0)
        acc = alpha_t * (acc - shift * l_t)
        et = tl.exp(t - mt_safe[:, None])
        diff = tl.where(kvalid[None, :], (t - mt_safe[:, None]) - (s - ms_safe[:, None]), 0.0)
        acc += tl.sum(et * diff, 1)
        l_s = l_s * alpha_s + tl.sum(tl.exp(s - ms_safe[:, None]), 1)
        l_t = l_t * alpha_t + tl.sum(et, 1)
        m_s = ms_new
        m_t = mt_new
    ok = rvalid & (l_t > 0)
    l_s1 = tl.where(ok, l_s, 1.0)
    l_t1 = tl.where(ok, l_t, 1.0)
    kl = acc / l_t1 - tl.log(l_t1) + tl.log(l_s1)
    out = (b * A + a) * L + rows
    tl.store(loss_ptr + out, tl.where(ok, kl, 0.0).to(loss_ptr.dtype.element_ty), mask=in_rows)
    tl.store(lse_s_ptr + out, tl.where(ok, m_s + tl.log(l_s1), 0.0).to(lse_s_ptr.dtype.element_ty),
             mask=in_rows)
    tl.store(lse_t_ptr + out, tl.where(ok, m_t + tl.log(l_t1), 0.0).to(lse_t_ptr.dtype.element_ty),
             mask=in_rows)


@triton.jit
def _relation_bwd_m_kernel(
    xm_ptr, xn_ptr, ym_ptr, yn_ptr, mask_ptr, lse_s_ptr, lse_t_ptr, w_ptr, g_ptr,
    L, A, ds, dt, scale_s, scale_t,
    xm_sb, xm_sl, xn_sb, xn_sl, ym_sb, ym_sl, yn_sb, yn_sl, g_sb, g_sl,
    HAS_MASK: tl.constexpr, LOWP_S: tl.constexpr, LOWP_T: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BDS: tl.constexpr, BDT: tl.constexpr,
):
    """grad_m rows of one query block: sum over key blocks of dS X_n."""
    pid, bh = _block_and_head(L, BM)
    b = bh // A
    a = bh % A
    rows = pid * BM + tl.arange(0, BM)
    in_rows = rows < L
    rvalid = _key_valid(mask_ptr, b, rows, L, HAS_MASK)
    xm = _rows(xm_ptr, xm_sb, xm_sl, b, rows, rvalid, a * ds, ds, LOWP_S, BDS)
    ym = _rows(ym_ptr, ym_sb, ym_sl, b, rows, rvalid, a * dt, dt, LOWP_T, BDT)
    lse_s = tl.load(lse_s_ptr + (b * A + a) * L + rows, mask=in_rows, other=0.0).to(tl.float32)
    lse_t = tl.load(lse_t_ptr + (b * A + a) * L + rows, mask=in_rows, other=0.0).to(tl.float32)
    acc = tl.zeros([BM, BDS], tl.float32)
    for n0 in range(0, L, BN):
        cols = n0 + tl.arange(0, BN)
        kvalid = _key_valid(mask_ptr, b, cols, L, HAS_MASK)
        xn = _rows(xn_ptr, xn_sb, xn_sl, b, cols, kvalid, a * ds, ds, LOWP_S, BDS)
        yn = _rows(yn_ptr, yn_sb, yn_sl, b, cols, kvalid, a * dt, dt, LOWP_T, BDT)
        q = tl.exp(_dot_nt(xm, xn, PREC) * scale_s - lse_s[:, None])
        p = tl.exp(_dot_nt(ym, yn, PREC) * scale_t - lse_t[:, None])
        d = tl.where(rvalid[:, None] & kvalid[None, :], q - p, 0.0)
        acc += _dot_split(d, xn, LOWP_S, PREC)
    w = tl.load(w_ptr + b).to(tl.float32) * scale_s
    dcol = tl.arange(0, BDS)
    tl.store(g_ptr + b * g_sb + rows[:, None] * g_sl + a * ds + dcol[None, :],
             (acc * w).to(g_ptr.dtype.element_ty), mask=in_rows[:, None] & (dcol[None, :] < ds))


@triton.jit
def _relation_bwd_n_kernel(
    xm_ptr, xn_ptr, ym_ptr, yn_ptr, mask_ptr, lse_s_ptr, lse_t_ptr, w_ptr, g_ptr,
    L, A, ds, dt, scale_s, scale_t,
    xm_sb, xm_sl, xn_sb, xn_sl, ym_sb, ym_sl, yn_sb, yn_sl, g_sb, g_sl,
    HAS_MASK: tl.constexpr, LOWP_S: tl.constexpr, LOWP_T: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BDS: tl.constexpr, BDT: tl.constexpr,
):
    """grad_n rows of one key block: sum over query blocks of dS^T X_m (tiles computed transposed)."""
    pid, bh = _block_and_head(L, BN)
    b = bh // A
    a = bh % A
    cols = pid * BN + tl.arange(0, BN)
    in_cols = cols < L
    kvalid = _key_valid(mask_ptr, b, cols, L, HAS_MASK)
    xn = _rows(xn_ptr, xn_sb, xn_sl, b, cols, kvalid, a * ds, ds, LOWP_S, BDS)
    yn = _rows(yn_ptr, yn_sb, yn_sl, b, cols, kvalid, a * dt, dt, LOWP_T, BDT)
    acc = tl.zeros([BN, BDS], tl.float32)
    for m0 in range(0, L, BM):
        rows = m0 + tl.arange(0, BM)
        in_rows = rows < L
        rvalid = _key_valid(mask_ptr, b, rows, L, HAS_MASK)
        xm = _rows(xm_ptr, xm_sb, xm_sl, b, rows, rvalid, a * ds, ds, LOWP_S, BDS)
        ym = _rows(ym_ptr, ym_sb, ym_sl, b, rows, rvalid, a * dt, dt, LOWP_T, BDT)
        lse_s = tl.load(lse_s_ptr + (b * A + a) * L + rows, mask=in_rows, other=0.0).to(tl.float32)
        lse_t = tl.load(lse_t_ptr + (b * A + a) * L + rows, mask=in_rows, other=0.0).to(tl.float32)
        qT = tl.exp(_dot_nt(xn, xm, PREC) * scale_s - lse_s[None, :])
        pT = tl.exp(_dot_nt(yn, ym, PREC) * scale_t - lse_t[None, :])
        dT = tl.where(kvalid[:, None] & rvalid[None, :], qT - pT, 0.0)
        acc += _dot_split(dT, xm, LOWP_S, PREC)
    w = tl.load(w_ptr + b).to(tl.float32) * scale_s
    dcol = tl.arange(0, BDS)
    tl.store(g_ptr + b * g_sb + cols[:, None] * g_sl + a * ds + dcol[None, :],
             (acc * w).to(g_ptr.dtype.element_ty), mask=in_cols[:, None] & (dcol[None, :] < ds))


def _relation_setup(student_m, student_n, teacher_m, teacher_n, mask, num_heads):
    for name, x in (("student_m", student_m), ("student_n", student_n),
                    ("teacher_m", teacher_m), ("teacher_n", teacher_n)):
        _check_last_contiguous(x, name, 3)
    B, L, Ds = student_m.shape
    Dt = teacher_m.shape[2]
    if student_n.shape != (B, L, Ds) or teacher_m.shape[:2] != (B, L) or \
            teacher_n.shape != teacher_m.shape:
        raise ValueError("student_m/student_n must be [B, L, Ds] and teacher_m/teacher_n "
                         "[B, L, Dt] with the same B and L")
    if student_m.dtype != student_n.dtype or teacher_m.dtype != teacher_n.dtype:
        raise ValueError("student_m/student_n (and teacher_m/teacher_n) must share a dtype")
    if num_heads < 1 or Ds % num_heads or Dt % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide Ds={Ds} and Dt={Dt}")
    ds, dt = Ds // num_heads, Dt // num_heads
    # 16-bit tiles go to tl.dot as they are (fp32 accumulation). The interpreter's dot reads
    # bfloat16 as its raw uint16 bits, so there bf16 tiles are widened first (fp16 still tests the
    # 16-bit path).
    lowp = (torch.float16,) if student_m.device.type == "cpu" else (torch.float16, torch.bfloat16)
    lowp_s = student_m.dtype in lowp
    lowp_t = teacher_m.dtype in lowp
    block = 64 if L > 32 else 32
    if not gpu_layout(student_m):
        block = min(block, max(16, triton.next_power_of_2(L)))
    meta = dict(HAS_MASK=mask is not None, LOWP_S=lowp_s, LOWP_T=lowp_t, PREC=fp32_dot_precision(), BM=block,
                BN=block, BDS=max(16, triton.next_power_of_2(ds)),
                BDT=max(16, triton.next_power_of_2(dt)), num_warps=4)
    strides = (student_m.stride(0), student_m.stride(1), student_n.stride(0), student_n.stride(1),
               teacher_m.stride(0), teacher_m.stride(1), teacher_n.stride(0), teacher_n.stride(1))
    return B, L, ds, dt, meta, strides


@on_tensor_device
def attention_relation_fwd_triton(student_m, student_n, teacher_m, teacher_n, mask,
                                  num_heads: int, scale_s: float, scale_t: float, loss,
                                  lse_student, lse_teacher) -> None:
    """Fill ``loss``, ``lse_student``, ``lse_teacher`` [B, A, L]; see the reference."""
    B, L, ds, dt, meta, strides = _relation_setup(student_m, student_n, teacher_m, teacher_n,
                                                  mask, num_heads)
    for name, x in (("loss", loss), ("lse_student", lse_student), ("lse_teacher", lse_teacher)):
        if x.shape != (B, num_heads, L) or not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous [B, A, L], got {tuple(x.shape)}")
    if B * L == 0:
        return
    m8 = _mask_u8(mask)
    grid = (triton.cdiv(L, meta["BM"]) * B * num_heads,)
    _relation_fwd_kernel[grid](
        student_m, student_n, teacher_m, teacher_n, m8 if m8 is not None else loss, loss,
        lse_student, lse_teacher, L, num_heads, ds, dt, float(scale_s), float(scale_t),
        *strides, **meta)


@on_tensor_device
def attention_relation_bwd_triton(student_m, student_n, teacher_m, teacher_n, mask,
                                  num_heads: int, scale_s: float, scale_t: float, lse_student,
                                  lse_teacher, weight, grad_m, grad_n) -> None:
    """Fill ``grad_m`` and ``grad_n`` [B, L, Ds] (each optional); see the reference."""
    B, L, ds, dt, meta, strides = _relation_setup(student_m, student_n, teacher_m, teacher_n,
                                                  mask, num_heads)
    if weight.shape != (B,) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous [B], got {tuple(weight.shape)}")
    if B * L == 0:
        return
    m8 = _mask_u8(mask)
    args = (student_m, student_n, teacher_m, teacher_n, m8 if m8 is not None else weight,
            lse_student, lse_teacher, weight)
    nums = (L, num_heads, ds, dt, float(scale_s), float(scale_t), *strides)
    for g, kernel, blk in ((grad_m, _relation_bwd_m_kernel, "BM"),
                           (grad_n, _relation_bwd_n_kernel, "BN")):
        if g is None:
            continue
        _check_last_contiguous(g, "grad", 3)
        if g.shape != student_m.shape:
            raise ValueError(f"grad buffers must be {tuple(student_m.shape)}, got {tuple(g.shape)}")
        kernel[(triton.cdiv(L, meta[blk]) * B * num_heads,)](*args, g, *nums, g.stride(0),
                                                              g.stride(1), **meta)


# ----------------------------------------------------------------------------------------------
# op registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastkd_triton::attention_transfer_fwd",
                         mutates_args=("loss", "grad_student"))
def attention_transfer_fwd(student: torch.Tensor, teacher: torch.Tensor, loss: torch.Tensor,
                           grad_student: Optional[torch.Tensor], p: float) -> None:
    attention_transfer_fwd_triton(student, teacher, loss, grad_student, p)


@attention_transfer_fwd.register_fake
def _attention_transfer_fwd_fake(student, teacher, loss, grad_student, p) -> None:
    return None


@torch.library.custom_op("fastkd_triton::attention_map_fwd", mutates_args=("loss", "grad_student"))
def attention_map_fwd(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor],
                      loss: torch.Tensor, grad_student: Optional[torch.Tensor], kind: int,
                      student_scores: bool, teacher_scores: bool) -> None:
    attention_map_fwd_triton(student, teacher, mask, loss, grad_student, kind, student_scores,
                             teacher_scores)


@attention_map_fwd.register_fake
def _attention_map_fwd_fake(student, teacher, mask, loss, grad_student, kind, student_scores,
                            teacher_scores) -> None:
    return None


@torch.library.custom_op("fastkd_triton::attention_relation_fwd",
                         mutates_args=("loss", "lse_student", "lse_teacher"))
def attention_relation_fwd(student_m: torch.Tensor, student_n: torch.Tensor,
                           teacher_m: torch.Tensor, teacher_n: torch.Tensor,
                           mask: Optional[torch.Tensor], num_heads: int, scale_s: float,
                           scale_t: float, loss: torch.Tensor, lse_student: torch.Tensor,
                           lse_teacher: torch.Tensor) -> None:
    attention_relation_fwd_triton(student_m, student_n, teacher_m, teacher_n, mask, num_heads,
                                  scale_s, scale_t, loss, lse_student, lse_teacher)


@attention_relation_fwd.register_fake
def _attention_relation_fwd_fake(student_m, student_n, teacher_m, teacher_n, mask, num_heads,
                                 scale_s, scale_t, loss, lse_student, lse_teacher) -> None:
    return None


@torch.library.custom_op("fastkd_triton::attention_relation_bwd", mutates_args=("grad_m", "grad_n"))
def attention_relation_bwd(student_m: torch.Tensor, student_n: torch.Tensor,
                           teacher_m: torch.Tensor, teacher_n: torch.Tensor,
                           mask: Optional[torch.Tensor], num_heads: int, scale_s: float,
                           scale_t: float, lse_student: torch.Tensor, lse_teacher: torch.Tensor,
                           weight: torch.Tensor, grad_m: Optional[torch.Tensor],
                           grad_n: Optional[torch.Tensor]) -> None:
    attention_relation_bwd_triton(student_m, student_n, teacher_m, teacher_n, mask, num_heads,
                                  scale_s, scale_t, lse_student, lse_teacher, weight, grad_m,
                                  grad_n)


@attention_relation_bwd.register_fake
def _attention_relation_bwd_fake(student_m, student_n, teacher_m, teacher_n, mask, num_heads,
                                 scale_s, scale_t, lse_student, lse_teacher, weight, grad_m,
                                 grad_n) -> None:
    return None
