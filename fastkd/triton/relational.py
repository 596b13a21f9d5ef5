"""Triton kernels of the relational families: RKD distance, RKD angle, similarity-preserving.

The math, the gradient formulas and the edge cases (eps, duplicated rows) are those of
``fastkd.reference.relational`` (its module docstring is the contract). This file reads
tile helpers -> kernels -> launchers -> op registration.

Every kernel builds its Gram tiles from the embeddings with ``tl.dot`` (IEEE fp32 by default,
never plain TF32: distances come from |x_i|^2 + |x_j|^2 - 2 x_i.x_j and would lose their digits;
``FASTKD_TRITON_FP32_DOT=tf32x3`` opts into three-pass TF32, see ``fp32_dot_precision``) and keeps only
per-row vectors between passes, so extra memory is O(N D) (the centred fp32 copies and the
gradient) plus O(N):

* distance: pass 1 sums each row of d (the means), pass 2 the smooth-L1 loss and c; with a
  gradient, pass 1 also gives B = sum_j (x_i - x_j)/d_ij and pass 2 A = sum_j g_ij (x_i -
  x_j)/d_ij, and the launcher forms (2/mu)(A - c B);
* similarity-preserving: pass 1 the row norms |G_i|^2, |Gt_i|^2 and G_i.Gt_i, pass 2 the loss
  and the gradient (Z + Z^T) X, whose weights (v_i + v_j) G_ij - (w_i + w_j) Gt_ij are known
  once the norms are;
* angle: one program per block of anchors m; for each block k it sweeps the third index l in
  blocks, evaluating [BM, BK, BL] tiles of angles for the triples (m, k, l), (k, m, l) and
  (l, m, k), which give the loss and the N x N gradient weights W_mk one tile at a time.

A program that writes a gradient owns a BLOCK_DO-wide slice of its rows' output and
recomputes its Gram tiles (the grid's second axis); the loss is written by the first slice.
Squared distances within rounding of 0 (r <= REFINE (|x_i|^2 + |x_j|^2)) are recomputed from
differences, tile by tile, so duplicated rows give exactly 0. All arithmetic is float32
(float64 inputs included; a float64 ``loss`` is filled from float32 math). No atomics, no host
syncs, fixed reduction orders: the same inputs give bitwise the same outputs.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from fastkd.triton import fp32_dot_precision, gpu_layout, on_tensor_device

REFINE = tl.constexpr(1.0 / 64)


# ----------------------------------------------------------------------------------------------
# tile helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gram_tile(x_ptr, offs_i, offs_j, mi, mj, D, BI: tl.constexpr, BJ: tl.constexpr,
               BD: tl.constexpr, PREC: tl.constexpr):
    """G[i, j] = x_i . x_j for a [BI, BJ] tile (0 outside the masks), in x's dtype (float32, or
    float64 for the angle)."""
    acc = tl.zeros((BI, BJ), dtype=x_ptr.dtype.element_ty)
    for d0 in range(0, D, BD):
        od = d0 + tl.arange(0, BD)
        md = od < D
        a = tl.load(x_ptr + offs_i[:, None] * D + od[None, :], mask=mi[:, None] & md[None, :], other=0.0)
        b = tl.load(x_ptr + offs_j[:, None] * D + od[None, :], mask=mj[:, None] & md[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC)
    return acc


@triton.jit
def _exact_sq_tile(x_ptr, offs_i, offs_j, mi, mj, D, BI: tl.constexpr, BJ: tl.constexpr,
                   BD: tl.constexpr):
    """r[i, j] = |x_i - x_j|^2 from differences (exactly 0 for equal rows); a [BI, BJ, BD]
    temporary, so BD is small here."""
    acc = tl.zeros((BI, BJ), dtype=x_ptr.dtype.element_ty)
    for d0 in range(0, D, BD):
        od = d0 + tl.arange(0, BD)
        md = od < D
        a = tl.load(x_ptr + offs_i[:, None] * D + od[None, :], mask=mi[:, None] & md[None, :], other=0.0)
        b = tl.load(x_ptr + offs_j[:, None] * D + od[None, :], mask=mj[:, None] & md[None, :], other=0.0)
        diff = a[:, None, :] - b[None, :, :]
        acc += tl.sum(diff * diff, axis=2)
    return acc


@triton.jit
def _dist_tile(x_ptr, sq_ptr, offs_i, offs_j, mi, mj, D, BI: tl.constexpr, BJ: tl.constexpr,
               BD: tl.constexpr, PREC: tl.constexpr):
    """(G, r): the Gram tile and squared distances, near-zero ones recomputed exactly."""
    G = _gram_tile(x_ptr, offs_i, offs_j, mi, mj, D, BI, BJ, BD, PREC)
    sqi = tl.load(sq_ptr + offs_i, mask=mi, other=0.0)
    sqj = tl.load(sq_ptr + offs_j, mask=mj, other=0.0)
    r = sqi[:, None] + sqj[None, :] - 2.0 * G
    near = (r <= (sqi[:, None] + sqj[None, :]) * REFINE) & mi[:, None] & mj[None, :]
    if tl.max(near.to(tl.int32)) > 0:
        r = tl.where(near, _exact_sq_tile(x_ptr, offs_i, offs_j, mi, mj, D, BI, BJ, 4), r)
    return G, r


@triton.jit
def _inv_dist(r, valid):
    """w = 1/sqrt(r), 0 where r = 0 (equal rows, the diagonal) or outside the tile."""
    pos = valid & (r > 0.0)
    return tl.where(pos, 1.0 / tl.sqrt(tl.where(pos, r, 1.0)), 0.0)


@triton.jit
def _huber(z, delta, inv_delta, L1: tl.constexpr):
    az = tl.abs(z)
    if L1:
        return az
    return tl.where(az < delta, 0.5 * inv_delta * z * z, az - 0.5 * delta)


@triton.jit
def _huber_grad(z, inv_delta, L1: tl.constexpr):
    if L1:
        return tl.where(z > 0.0, 1.0, tl.where(z < 0.0, -1.0, 0.0))
    return tl.minimum(tl.maximum(z * inv_delta, -1.0), 1.0)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rkd_distance_kernel(xs, sqs, xt, sqt, scal_ptr, row1_ptr, row2_ptr, out_ptr, N, Ds, Dt,
                         eps, inv_n2, delta, inv_delta,
                         PASS: tl.constexpr, WANT_GRAD: tl.constexpr, L1: tl.constexpr,
                         BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr,
                         PREC: tl.constexpr):
    """Pass 1: row1 = sum_j d^s_ij, row2 = sum_j d^t_ij, out = B. Pass 2: row1 = sum_j h,
    row2 = sum_j g_ij y_ij, out = A. scal_ptr holds (1/mu_s, 1/mu_t) in pass 2."""
    pid_i = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_i = pid_i * BI + tl.arange(0, BI)
    mi = offs_i < N
    od = pid_d * BDO + tl.arange(0, BDO)
    mdo = od < Ds
    if PASS == 2:
        inv_mu_s = tl.load(scal_ptr)
        inv_mu_t = tl.load(scal_ptr + 1)
    acc = tl.zeros((BI, BDO), dtype=tl.float32)
    rs = tl.zeros((BI,), dtype=tl.float32)
    a1 = tl.zeros((BI,), dtype=tl.float32)
    a2 = tl.zeros((BI,), dtype=tl.float32)
    for j0 in range(0, N, BJ):
        offs_j = j0 + tl.arange(0, BJ)
        mj = offs_j < N
        _, r_s = _dist_tile(xs, sqs, offs_i, offs_j, mi, mj, Ds, BI, BJ, BD, PREC)
        _, r_t = _dist_tile(xt, sqt, offs_i, offs_j, mi, mj, Dt, BI, BJ, BD, PREC)
        valid = mi[:, None] & mj[None, :] & (offs_i[:, None] != offs_j[None, :])
        d_s = tl.sqrt(tl.maximum(r_s, eps, propagate_nan=tl.PropagateNan.ALL))  # NaN in, NaN out
        d_t = tl.sqrt(tl.maximum(r_t, eps, propagate_nan=tl.PropagateNan.ALL))
        live = valid & (r_s >= eps)
        if PASS == 1:
            a1 += tl.sum(tl.where(valid, d_s, 0.0), axis=1)
            a2 += tl.sum(tl.where(valid, d_t, 0.0), axis=1)
            w = tl.where(live, 1.0 / d_s, 0.0)
        else:
            y = d_s * inv_mu_s
            z = y - d_t * inv_mu_t
            a1 += tl.sum(tl.where(valid, _huber(z, delta, inv_delta, L1), 0.0), axis=1)
            g = _huber_grad(z, inv_delta, L1) * inv_n2
            a2 += tl.sum(tl.where(valid, g * y, 0.0), axis=1)
            w = tl.where(live, g / d_s, 0.0)
        if WANT_GRAD:
            xj = tl.load(xs + offs_j[:, None] * Ds + od[None, :], mask=mj[:, None] & mdo[None, :], other=0.0)
            acc += tl.dot(w, xj, input_precision=PREC)
            rs += tl.sum(w, axis=1)
    if pid_d == 0:
        tl.store(row1_ptr + offs_i, a1, mask=mi)
        tl.store(row2_ptr + offs_i, a2, mask=mi)
    if WANT_GRAD:  # sum_j w_ij (x_i - x_j)
        xi = tl.load(xs + offs_i[:, None] * Ds + od[None, :], mask=mi[:, None] & mdo[None, :], other=0.0)
        tl.store(out_ptr + offs_i[:, None] * Ds + od[None, :], rs[:, None] * xi - acc,
                 mask=mi[:, None] & mdo[None, :])


@triton.jit
def _sp_norms_kernel(xs, xt, ss_ptr, tt_ptr, st_ptr, N, Ds, Dt,
                     BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    offs_i = pid * BI + tl.arange(0, BI)
    mi = offs_i < N
    ss = tl.zeros((BI,), dtype=tl.float32)
    tt = tl.zeros((BI,), dtype=tl.float32)
    st = tl.zeros((BI,), dtype=tl.float32)
    for j0 in range(0, N, BJ):
        offs_j = j0 + tl.arange(0, BJ)
        mj = offs_j < N
        gs = _gram_tile(xs, offs_i, offs_j, mi, mj, Ds, BI, BJ, BD, PREC)
        gt = _gram_tile(xt, offs_i, offs_j, mi, mj, Dt, BI, BJ, BD, PREC)
        ss += tl.sum(gs * gs, axis=1)
        tt += tl.sum(gt * gt, axis=1)
        st += tl.sum(gs * gt, axis=1)
    tl.store(ss_ptr + offs_i, ss, mask=mi)
    tl.store(tt_ptr + offs_i, tt, mask=mi)
    tl.store(st_ptr + offs_i, st, mask=mi)


@triton.jit
def _sp_kernel(xs, xt, rowv_ptr, loss_rows, out_ptr, N, Ds, Dt, WANT_GRAD: tl.constexpr,
               BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, BDO: tl.constexpr,
               PREC: tl.constexpr):
    """loss_rows[i] = sum_j (G_ij/n_i - Gt_ij/m_i)^2; out = (Z + Z^T) X, with rowv_ptr holding
    (1/n, 1/m, v, w) as four N-vectors."""
    pid_i = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_i = pid_i * BI + tl.arange(0, BI)
    mi = offs_i < N
    od = pid_d * BDO + tl.arange(0, BDO)
    mdo = od < Ds
    in_i = tl.load(rowv_ptr + offs_i, mask=mi, other=0.0)
    im_i = tl.load(rowv_ptr + N + offs_i, mask=mi, other=0.0)
    v_i = tl.load(rowv_ptr + 2 * N + offs_i, mask=mi, other=0.0)
    w_i = tl.load(rowv_ptr + 3 * N + offs_i, mask=mi, other=0.0)
    acc = tl.zeros((BI, BDO), dtype=tl.float32)
    a = tl.zeros((BI,), dtype=tl.float32)
    for j0 in range(0, N, BJ):
        offs_j = j0 + tl.arange(0, BJ)
        mj = offs_j < N
        gs = _gram_tile(xs, offs_i, offs_j, mi, mj, Ds, BI, BJ, BD, PREC)
        gt = _gram_tile(xt, offs_i, offs_j, mi, mj, Dt, BI, BJ, BD, PREC)
        e = gs * in_i[:, None] - gt * im_i[:, None]  # 0 outside the tile (zero Gram entries)
        a += tl.sum(e * e, axis=1)
        if WANT_GRAD:
            v_j = tl.load(rowv_ptr + 2 * N + offs_j, mask=mj, other=0.0)
            w_j = tl.load(rowv_ptr + 3 * N + offs_j, mask=mj, other=0.0)
            y = (v_i[:, None] + v_j[None, :]) * gs - (w_i[:, None] + w_j[None, :]) * gt
            xj = tl.load(xs + offs_j[:, None] * Ds + od[None, :], mask=mj[:, None] & mdo[None, :], other=0.0)
            acc += tl.dot(y, xj, input_precision=PREC)
    if pid_d == 0:
        tl.store(loss_rows + offs_i, a, mask=mi)
    if WANT_GRAD:
        tl.store(out_ptr + offs_i[:, None] * Ds + od[None, :], acc, mask=mi[:, None] & mdo[None, :])


@triton.jit
def _rkd_angle_kernel(xs, sqs, xt, sqt, loss_part, out_ptr, N, Ds, Dt, delta, inv_delta, w_scale,
                      WANT_GRAD: tl.constexpr, L1: tl.constexpr, BM: tl.constexpr,
                      BD: tl.constexpr, BDO: tl.constexpr, PREC: tl.constexpr):
    """loss_part[pid] = sum of h over the triples (m, ., .) of this block; out = W X - rowsum(W) X
    for the block's rows, W_mk = w_scale (P - q_mk - q_km + t_mk + t_km) (w_scale = 2/N^3).

    xs, xt, sqs, sqt are float64: the Gram tiles and the numerators G_kl - G_ml + sq_m - G_mk
    (which cancel down to u_mk . u_ml) are float64, each numerator rounded to float32 once it is
    formed; the rest is float32. In float32 Gram entries a near-duplicate pair's angles came out
    wrong (see the reference's "Precision")."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mm = offs_m < N
    od = pid_d * BDO + tl.arange(0, BDO)
    mdo = od < Ds
    sqm_s = tl.load(sqs + offs_m, mask=mm, other=0.0)
    sqm_t = tl.load(sqt + offs_m, mask=mm, other=0.0)
    acc = tl.zeros((BM, BDO), dtype=tl.float64)
    rs = tl.zeros((BM,), dtype=tl.float64)
    lacc = tl.zeros((BM, BM), dtype=tl.float32)
    for k0 in range(0, N, BM):
        offs_k = k0 + tl.arange(0, BM)
        mk = offs_k < N
        vmk = mm[:, None] & mk[None, :]
        gmk_s, r = _dist_tile(xs, sqs, offs_m, offs_k, mm, mk, Ds, BM, BM, BD, "ieee")
        wmk64 = _inv_dist(r, vmk)
        wmk_s = wmk64.to(tl.float32)
        gmk_t, r = _dist_tile(xt, sqt, offs_m, offs_k, mm, mk, Dt, BM, BM, BD, "ieee")
        wmk_t = _inv_dist(r, vmk).to(tl.float32)
        sqk_s = tl.load(sqs + offs_k, mask=mk, other=0.0)
        sqk_t = tl.load(sqt + offs_k, mask=mk, other=0.0)
        q = tl.zeros((BM, BM), dtype=tl.float32)
        s = tl.zeros((BM, BM), dtype=tl.float32)
        p = tl.zeros((BM, BM), dtype=tl.float32)
        for l0 in range(0, N, BM):
            offs_l = l0 + tl.arange(0, BM)
            ml = offs_l < N
            gml_s, r = _dist_tile(xs, sqs, offs_m, offs_l, mm, ml, Ds, BM, BM, BD, "ieee")
            wml_s = _inv_dist(r, mm[:, None] & ml[None, :]).to(tl.float32)
            gml_t, r = _dist_tile(xt, sqt, offs_m, offs_l, mm, ml, Dt, BM, BM, BD, "ieee")
            wml_t = _inv_dist(r, mm[:, None] & ml[None, :]).to(tl.float32)
            gkl_s, r = _dist_tile(xs, sqs, offs_k, offs_l, mk, ml, Ds, BM, BM, BD, "ieee")
            wkl_s = _inv_dist(r, mk[:, None] & ml[None, :]).to(tl.float32)
            gkl_t, r = _dist_tile(xt, sqt, offs_k, offs_l, mk, ml, Dt, BM, BM, BD, "ieee")
            wkl_t = _inv_dist(r, mk[:, None] & ml[None, :]).to(tl.float32)
            # T1, triples (m, k, l): a = (G_kl - G_ml + sq_m - G_mk) w_mk w_ml   [m, k, l]
            a_s = (gkl_s[None, :, :] - gml_s[:, None, :] + (sqm_s[:, None] - gmk_s)[:, :, None]).to(tl.float32) * \
                (wmk_s[:, :, None] * wml_s[:, None, :])
            a_t = (gkl_t[None, :, :] - gml_t[:, None, :] + (sqm_t[:, None] - gmk_t)[:, :, None]).to(tl.float32) * \
                (wmk_t[:, :, None] * wml_t[:, None, :])
            z = a_s - a_t
            lacc += tl.sum(_huber(z, delta, inv_delta, L1), axis=2)
            if WANT_GRAD:
                g = _huber_grad(z, inv_delta, L1)
                q += tl.sum(g * wml_s[:, None, :], axis=2)
                s += tl.sum(g * a_s, axis=2)
                # T2, triples (k, m, l): a = (G_ml - G_kl + sq_k - G_km) w_km w_kl   [m, k, l]
                a_s = (gml_s[:, None, :] - gkl_s[None, :, :] + (sqk_s[None, :] - gmk_s)[:, :, None]).to(tl.float32) * \
                    (wmk_s[:, :, None] * wkl_s[None, :, :])
                a_t = (gml_t[:, None, :] - gkl_t[None, :, :] + (sqk_t[None, :] - gmk_t)[:, :, None]).to(tl.float32) * \
                    (wmk_t[:, :, None] * wkl_t[None, :, :])
                g = _huber_grad(a_s - a_t, inv_delta, L1)
                q += tl.sum(g * wkl_s[None, :, :], axis=2)
                s += tl.sum(g * a_s, axis=2)
                # T3, triples (l, m, k): a = (G_mk - G_ml - G_kl + sq_l) w_ml w_kl   [m, k, l]
                sql_s = tl.load(sqs + offs_l, mask=ml, other=0.0)
                sql_t = tl.load(sqt + offs_l, mask=ml, other=0.0)
                ww_s = wml_s[:, None, :] * wkl_s[None, :, :]
                a_s = (gmk_s[:, :, None] - gml_s[:, None, :] - gkl_s[None, :, :] +
                       sql_s[None, None, :]).to(tl.float32) * ww_s
                a_t = (gmk_t[:, :, None] - gml_t[:, None, :] - gkl_t[None, :, :] +
                       sql_t[None, None, :]).to(tl.float32) * (wml_t[:, None, :] * wkl_t[None, :, :])
                p += tl.sum(_huber_grad(a_s - a_t, inv_delta, L1) * ww_s, axis=2)
        if WANT_GRAD:
            # q and s hold q_mk + q_km and s_mk + s_km over w_mk (w_km = w_mk)
            W = w_scale * (p.to(tl.float64) - wmk64 * q.to(tl.float64) + wmk64 * wmk64 * s.to(tl.float64))
            W = tl.where(vmk & (offs_m[:, None] != offs_k[None, :]), W, 0.0)
            xk = tl.load(xs + offs_k[:, None] * Ds + od[None, :], mask=mk[:, None] & mdo[None, :], other=0.0)
            acc += tl.dot(W, xk)
            rs += tl.sum(W, axis=1)
    if pid_d == 0:
        tl.store(loss_part + pid_m, tl.sum(tl.sum(lacc, axis=1), axis=0))
    if WANT_GRAD:
        xm = tl.load(xs + offs_m[:, None] * Ds + od[None, :], mask=mm[:, None] & mdo[None, :], other=0.0)
        tl.store(out_ptr + offs_m[:, None] * Ds + od[None, :], (acc - rs[:, None] * xm).to(tl.float32),
                 mask=mm[:, None] & mdo[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _out_block(D: int, cap: int) -> int:
    """BLOCK_DO on a GPU: the whole gradient row when it fits under ``cap`` (a power of 2 >= 32),
    since every further slice of it recomputes all of the program's Gram tiles (or, for the
    angle, its O(N^2) triples) once more."""
    return min(cap, max(32, triton.next_power_of_2(D)))


def _blocks(x: torch.Tensor, family: str):
    """(BI, BJ, BD, BDO, num_warps). Interpreter: small tiles (numpy per op). GPU: chosen from
    sm_90 compiles (registers per thread, spills: ``python tests/_triton_offline.py
    relational``), not yet from timings: distance 16 x 32 tiles with up to 256 gradient
    columns per program, 225 registers and no spill at 8 warps (32 x 32 with 256 columns
    spills 624 B); similarity-preserving 32 x 32 with up to 512 columns, 182 registers, no
    spill. Before, both took 64 columns: at D = 512, eight slices and eight times the Grams."""
    if not gpu_layout(x):
        return 16, 16, 32, 32, 4
    D = x.shape[1]
    if family == "rkd_distance":
        return 16, 32, 32, _out_block(D, 256), 8
    return 32, 32, 32, _out_block(D, 512), 8


def _prep(x: torch.Tensor, centre: bool, dtype=torch.float32):
    """Contiguous copy in ``dtype`` (centred when asked) and its squared row norms."""
    x = x.to(dtype)
    if centre:
        x = x - x.mean(0, keepdim=True)
    x = x.contiguous()
    return x, (x * x).sum(1).contiguous()


def _check(name: str, student, teacher, loss, grad_student):
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{name}: student and teacher must be [N, D] with the same N, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[0] < 2 or student.shape[1] < 1 or teacher.shape[1] < 1:
        raise ValueError(f"{name}: needs N >= 2 and D >= 1, got {tuple(student.shape)}, {tuple(teacher.shape)}")
    if loss.numel() != 1 or loss.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: loss must be a one-element float32 tensor, got {loss.dtype} {tuple(loss.shape)}")
    if grad_student is not None and (grad_student.shape != student.shape or grad_student.dtype != student.dtype):
        raise ValueError(f"{name}: grad_student must have student's shape and dtype")


def _huber_args(delta: float):
    return float(delta), (1.0 / delta if delta > 0 else 0.0), delta == 0.0


@on_tensor_device
def rkd_distance_triton(student, teacher, loss, grad_student, eps: float, huber_delta: float) -> None:
    _check("rkd_distance_fwd", student, teacher, loss, grad_student)
    N = student.shape[0]
    xs, sqs = _prep(student, True)
    xt, sqt = _prep(teacher, True)
    Ds, Dt = xs.shape[1], xt.shape[1]
    BI, BJ, BD, BDO, warps = _blocks(xs, "rkd_distance")
    want = grad_student is not None
    grid = (triton.cdiv(N, BI), triton.cdiv(Ds, BDO) if want else 1)
    delta, inv_delta, l1 = _huber_args(huber_delta)
    row1 = torch.empty(N, dtype=torch.float32, device=xs.device)
    row2 = torch.empty_like(row1)
    Bv = torch.empty_like(xs) if want else row1
    scal = torch.empty(2, dtype=torch.float32, device=xs.device)
    common = dict(WANT_GRAD=want, L1=l1, BI=BI, BJ=BJ, BD=BD, BDO=BDO, PREC=fp32_dot_precision(),
                  num_warps=warps)
    _rkd_distance_kernel[grid](xs, sqs, xt, sqt, scal, row1, row2, Bv, N, Ds, Dt, float(eps),
                               1.0 / (N * N), delta, inv_delta, PASS=1, **common)
    pairs = float(N * (N - 1))
    inv_mu = pairs / torch.stack([row1.double().sum(), row2.double().sum()])
    scal.copy_(inv_mu)
    A = torch.empty_like(xs) if want else row1
    _rkd_distance_kernel[grid](xs, sqs, xt, sqt, scal, row1, row2, A, N, Ds, Dt, float(eps),
                               1.0 / (N * N), delta, inv_delta, PASS=2, **common)
    loss.copy_(row1.double().sum() / (N * N))
    if want:
        c = row2.double().sum() / pairs
        grad_student.copy_((A - c.float() * Bv) * (2.0 * inv_mu[0]).float())


@on_tensor_device
def similarity_preserving_triton(student, teacher, loss, grad_student) -> None:
    _check("similarity_preserving_fwd", student, teacher, loss, grad_student)
    N = student.shape[0]
    xs, _ = _prep(student, False)
    xt, _ = _prep(teacher, False)
    Ds, Dt = xs.shape[1], xt.shape[1]
    BI, BJ, BD, BDO, warps = _blocks(xs, "similarity_preserving")
    want = grad_student is not None
    ss = torch.empty(N, dtype=torch.float32, device=xs.device)
    tt, st = torch.empty_like(ss), torch.empty_like(ss)
    prec = fp32_dot_precision()
    _sp_norms_kernel[(triton.cdiv(N, BI),)](xs, xt, ss, tt, st, N, Ds, Dt, BI=BI, BJ=BJ, BD=BD, PREC=prec)
    ns, nt = ss.double().sqrt(), tt.double().sqrt()
    n, m = ns.clamp_min(1e-12), nt.clamp_min(1e-12)
    inv_n2 = 1.0 / (N * N)
    rho = 2.0 * inv_n2 * (ss / (n * n) - st / (n * m))
    v = (2.0 * inv_n2 - torch.where(ns >= 1e-12, rho, torch.zeros_like(rho))) / (n * n)
    w = 2.0 * inv_n2 / (n * m)
    rowv = torch.cat([1.0 / n, 1.0 / m, v, w]).float().contiguous()
    loss_rows = torch.empty_like(ss)
    out = torch.empty_like(xs) if want else ss
    grid = (triton.cdiv(N, BI), triton.cdiv(Ds, BDO) if want else 1)
    _sp_kernel[grid](xs, xt, rowv, loss_rows, out, N, Ds, Dt, WANT_GRAD=want, BI=BI, BJ=BJ, BD=BD,
                     BDO=BDO, PREC=prec, num_warps=warps)
    loss.copy_(loss_rows.double().sum() * inv_n2)
    if want:
        grad_student.copy_(out)


@on_tensor_device
def rkd_angle_triton(student, teacher, loss, grad_student, huber_delta: float) -> None:
    _check("rkd_angle_fwd", student, teacher, loss, grad_student)
    N = student.shape[0]
    xs, sqs = _prep(student, True, torch.float64)  # float64 Gram tiles: see the kernel
    xt, sqt = _prep(teacher, True, torch.float64)
    Ds, Dt = xs.shape[1], xt.shape[1]
    on_gpu = gpu_layout(xs)
    # GPU: the whole gradient row per program up to 512 columns (each further slice would
    # redo the block's O(N^2) triples); 416 B of spills at D = 512, 288 B with 64 columns
    BM, BD, BDO = (16, 32, _out_block(Ds, 512)) if on_gpu else (16, 32, 32)
    want = grad_student is not None
    grid = (triton.cdiv(N, BM), triton.cdiv(Ds, BDO) if want else 1)
    delta, inv_delta, l1 = _huber_args(huber_delta)
    loss_part = torch.empty(grid[0], dtype=torch.float32, device=xs.device)
    out = torch.empty(xs.shape, dtype=torch.float32, device=xs.device) if want else loss_part
    n3 = float(N) ** 3
    # 8 warps: compiled for sm_90 the kernel needs 255 registers either way, and at 4 warps it
    # spills 1.4 KB per thread with a gradient (0.3-0.4 KB at 8); both keep 8 warps on an SM
    _rkd_angle_kernel[grid](xs, sqs, xt, sqt, loss_part, out, N, Ds, Dt, delta, inv_delta,
                            2.0 / n3, WANT_GRAD=want, L1=l1, BM=BM, BD=BD, BDO=BDO,
                            PREC=fp32_dot_precision(), num_warps=8 if on_gpu else 4)
    loss.copy_(loss_part.double().sum() / n3)
    if want:
        grad_student.copy_(out)


# ----------------------------------------------------------------------------------------------
# op registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastkd_triton::rkd_distance_fwd", mutates_args=("loss", "grad_student"))
def rkd_distance_fwd(student: torch.Tensor, teacher: torch.Tensor, loss: torch.Tensor,
                     grad_student: Optional[torch.Tensor], eps: float, huber_delta: float) -> None:
    rkd_distance_triton(student, teacher, loss, grad_student, eps, huber_delta)


@rkd_distance_fwd.register_fake
def _rkd_distance_fwd_fake(student, teacher, loss, grad_student, eps, huber_delta) -> None:
    return None


@torch.library.custom_op("fastkd_triton::rkd_angle_fwd", mutates_args=("loss", "grad_student"))
def rkd_angle_fwd(student: torch.Tensor, teacher: torch.Tensor, loss: torch.Tensor,
                  grad_student: Optional[torch.Tensor], huber_delta: float) -> None:
    rkd_angle_triton(student, teacher, loss, grad_student, huber_delta)


@rkd_angle_fwd.register_fake
def _rkd_angle_fwd_fake(student, teacher, loss, grad_student, huber_delta) -> None:
    return None


@torch.library.custom_op("fastkd_triton::similarity_preserving_fwd", mutates_args=("loss", "grad_student"))
def similarity_preserving_fwd(student: torch.Tensor, teacher: torch.Tensor, loss: torch.Tensor,
                              grad_student: Optional[torch.Tensor]) -> None:
    similarity_preserving_triton(student, teacher, loss, grad_student)


@similarity_preserving_fwd.register_fake
def _similarity_preserving_fwd_fake(student, teacher, loss, grad_student) -> None:
    return None
