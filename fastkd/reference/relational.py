"""Relational and feature-geometry distillation (RKD distance, RKD angle, similarity-preserving):
the reference.

This file is the contract of the ``relational`` families for every backend (cpp in
``csrc/cpu/relational.cpp``, triton in ``fastkd/triton/relational.py``). Each op takes the
flattened embeddings of one batch and fills caller-allocated outputs:

    rkd_distance_fwd(student, teacher, loss, grad_student, eps, huber_delta)
    rkd_angle_fwd(student, teacher, loss, grad_student, huber_delta)
    similarity_preserving_fwd(student, teacher, loss, grad_student)

* ``student`` [N, Ds] and ``teacher`` [N, Dt] (contiguous, N >= 2, Ds and Dt may differ, any
  float dtype); the teacher is a constant and gets no gradient;
* ``loss``: a 0-d float32 tensor (float64 when an input is float64), filled with the loss;
* ``grad_student``: None, or [N, Ds] in the student's dtype, filled with d loss / d student
  (for grad_output = 1; ``fastkd.functional`` scales it in backward).

Arithmetic is float32 whatever the input dtype (float64 when an input is float64, for
gradcheck), except the angle's Gram-based parts, always float64 (see "RKD angle"). The gradient is computed in the forward pass: it needs the same tiles as the loss,
and recomputing them in a separate backward would cost more than the gradient itself.

Notation: x_i is row i of one side (student or teacher), u_ij = x_j - x_i, r_ij = |u_ij|^2,
h the smooth-L1 (Huber) function with beta = huber_delta (delta = 0 is L1, as in torch):

    h(z) = 0.5 z^2 / delta  if |z| < delta  else  |z| - 0.5 delta;     h'(z) = clamp(z/delta, -1, 1)

RKD distance (Park et al. 2019, as in their code)
    d_ij = sqrt(max(r_ij, eps)) for i != j, d_ii = 0. eps clamps the *squared* distance, so a
        duplicated pair (x_i = x_j) has d = sqrt(eps) and, eps being > 0, every off-diagonal
        entry is positive.
    mu = sum_{i != j} d_ij / (N (N - 1)): the mean of the off-diagonal entries, duplicates
        included at sqrt(eps). This is exactly Park's ``d[d > 0].mean()`` for any eps > 0.
    y_ij = d^s_ij / mu^s, z_ij = d^t_ij / mu^t;  loss = sum_{i,j} h(y_ij - z_ij) / N^2
        (the mean over all N^2 entries; the diagonal adds h(0) = 0).
    Gradient, with g_ij = h'(y_ij - z_ij) / N^2 and c = sum_{i != j} g_ij y_ij / (N (N - 1)):
        d loss / d x_i = (2 / mu) sum_{j != i} (g_ij - c) [r_ij >= eps] (x_i - x_j) / d_ij
    The clamp passes no gradient below eps (as torch.clamp), so duplicated rows get exactly 0
    from each other and the gradient stays finite.

RKD angle (Park et al. 2019)
    e_ij = u_ij / |u_ij|, and e_ij = 0 when u_ij = 0 (F.normalize maps a zero vector to 0; for
        0 < |u| < 1e-12 Park's normalize divides by 1e-12 where this divides by |u|).
    a_ijk = e_ij . e_ik, for all N^3 triples (a_iik = 0; a_ijj = 1 unless x_j = x_i).
    loss = sum_{i,j,k} h(a^s_ijk - a^t_ijk) / N^3.
    Kernels never form e (N x N x D): with G the Gram matrix, u_ij . u_ik = G_jk - G_ij - G_ik
    + G_ii, so a_ijk = (G_jk - G_ij - G_ik + G_ii) w_ij w_ik with w_ij = 1/|u_ij| (0 when
    u_ij = 0). Translation changes nothing, so kernels may centre each side first.
    Gradient: a zero difference u_ij is a constant 0 (no gradient through it). With
        g_ijk = h'(a^s_ijk - a^t_ijk) / N^3 and Q_ijk = 2 g_ijk w_ij w_ik (symmetric in j, k):
        q_ij = sum_k Q_ijk,   t_ij = 2 w_ij^2 sum_k g_ijk a_ijk,   P_jk = sum_i Q_ijk,
        W = P - q - q^T + t + t^T   (symmetric),
        d loss / d x_m = sum_k W_mk (x_k - x_m).
    So the gradient is an N x N matrix times the embeddings: N^3 scalar work, never N^3 D.
    Precision: the numerator cancels down to u_ij . u_ik, of size |u_ij| |u_ik|, while each G
    is rounded at eps |x|^2: at a pair much closer than the rows' spread, float32 Gram entries
    leave too few digits (the loss came out 7-14% off at pairs 1e-3 to 1e-4 apart). So the
    angle is computed in float64 whatever the input dtype, here and in the cpp kernel (about
    2x the float32 time); the triton kernel forms its Gram tiles, the numerators and the
    gradient product W X - rowsum(W) X (which cancels the same way) in float64.

Similarity-preserving (Tung and Mori 2019)
    G = X X^T; A_ij = G_ij / n_i with n_i = max(|G_i,:|, 1e-12): each row of the Gram matrix
    L2-normalized (F.normalize(G), as in the authors' code); B likewise for the teacher.
    loss = sum_{i,j} (A^s_ij - B_ij)^2 / N^2.
    Gradient, with R = 2 (A - B) / N^2, rho_i = sum_j R_ij A_ij and k_i = [|G_i,:| >= 1e-12]:
        Z_ij = (R_ij - k_i rho_i A_ij) / n_i,    d loss / d X = (Z + Z^T) X.
    Not translation invariant: no centring.

Kernels keep extra memory O(N D + N): they recompute Gram tiles (or strips of a fixed number
of rows) from the embeddings instead of holding N x N (distance, similarity) or N^3 (angle)
tensors. Two passes where a global quantity is needed first (the distance means; the
similarity row norms). This reference is the readable form: it materializes N x N matrices,
and N^3 angle terms for ``_ANGLE_CHUNK`` anchors i at a time.
"""
from __future__ import annotations

import torch

SP_EPS = 1e-12  # F.normalize's eps, on the norm of each Gram row
_ANGLE_CHUNK = 16  # anchors i per N^2-sized chunk of angle terms


def _acc(*xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def smooth_l1(z, delta: float):
    """(h(z), h'(z)) of the smooth-L1 loss with beta = delta (delta = 0: |z| and sign(z))."""
    if delta == 0.0:
        return z.abs(), torch.sign(z)
    az = z.abs()
    h = torch.where(az < delta, 0.5 * z * z / delta, az - 0.5 * delta)
    return h, (z / delta).clamp(-1.0, 1.0)


def _sq_dists(x):
    """r_ij = |x_i - x_j|^2 from differences (exactly 0 for duplicated rows)."""
    d = torch.cdist(x.unsqueeze(0), x.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0]
    return d * d


# ----------------------------------------------------------------------------- distance
def rkd_distance_fwd(student, teacher, loss, grad_student, eps: float, huber_delta: float) -> None:
    """Fill ``loss`` (0-d) and optionally ``grad_student`` [N, Ds]; see the module docstring."""
    acc = _acc(student, teacher)
    x, xt = student.to(acc), teacher.to(acc)
    x = x - x.mean(0, keepdim=True)  # translation-invariant; keeps rowsum(w) x - w x accurate
    N = x.shape[0]
    off = ~torch.eye(N, dtype=torch.bool, device=x.device)
    pairs = N * (N - 1)

    def normalized(v):
        r = _sq_dists(v)
        d = torch.where(off, r.clamp_min(eps).sqrt(), torch.zeros_like(r))
        mu = d.sum() / pairs
        return r, d, mu

    r, d, mu = normalized(x)
    _, dt, mut = normalized(xt)
    y, z = d / mu, dt / mut
    h, dh = smooth_l1(y - z, huber_delta)
    loss.copy_(h.sum() / (N * N))
    if grad_student is None:
        return
    g = torch.where(off, dh / (N * N), torch.zeros_like(dh))
    c = (g * y).sum() / pairs
    live = off & (r >= eps)
    w = torch.where(live, 2.0 * (g - c) / (mu * torch.where(live, d, torch.ones_like(d))),
                    torch.zeros_like(d))
    # sum_j w_ij (x_i - x_j) = rowsum(w)_i x_i - (w x)_i
    grad_student.copy_(w.sum(1, keepdim=True) * x - w @ x)


# ----------------------------------------------------------------------------- angle
def _angle_parts(v):
    """Gram matrix of the centred rows and w_ij = 1/|x_j - x_i| (0 for equal rows)."""
    v = v - v.mean(0, keepdim=True)
    G = v @ v.T
    r = _sq_dists(v)
    w = torch.where(r > 0, torch.rsqrt(torch.where(r > 0, r, torch.ones_like(r))), torch.zeros_like(r))
    return v, G, w


def _angles(G, w, i0, i1):
    """a[i, j, k] for anchors i in [i0, i1): (G_jk - G_ij - G_ik + G_ii) w_ij w_ik."""
    Gi, wi = G[i0:i1], w[i0:i1]
    gii = torch.diagonal(G)[i0:i1, None, None]
    num = G.unsqueeze(0) - Gi.unsqueeze(2) - Gi.unsqueeze(1) + gii
    return num * wi.unsqueeze(2) * wi.unsqueeze(1)


def rkd_angle_fwd(student, teacher, loss, grad_student, huber_delta: float) -> None:
    """Fill ``loss`` (0-d) and optionally ``grad_student`` [N, Ds]; see the module docstring."""
    acc = torch.float64  # whatever the inputs: see "RKD angle" in the module docstring
    x, G, w = _angle_parts(student.to(acc))
    _, Gt, wt = _angle_parts(teacher.to(acc))
    N = x.shape[0]
    total = torch.zeros((), dtype=acc, device=x.device)
    want_grad = grad_student is not None
    if want_grad:
        q = torch.zeros_like(G)  # q_ij = sum_k Q_ijk
        s = torch.zeros_like(G)  # sum_k g_ijk a_ijk
        P = torch.zeros_like(G)  # P_jk = sum_i Q_ijk
    for i0 in range(0, N, _ANGLE_CHUNK):
        i1 = min(i0 + _ANGLE_CHUNK, N)
        a = _angles(G, w, i0, i1)
        h, dh = smooth_l1(a - _angles(Gt, wt, i0, i1), huber_delta)
        total = total + h.sum()
        if want_grad:
            g = dh / (N ** 3)
            wi = w[i0:i1]
            Q = 2.0 * g * wi.unsqueeze(2) * wi.unsqueeze(1)
            q[i0:i1] = Q.sum(2)
            s[i0:i1] = (g * a).sum(2)
            P += Q.sum(0)
    loss.copy_(total / N ** 3)
    if want_grad:
        t = 2.0 * w * w * s
        W = P - q - q.T + t + t.T
        grad_student.copy_(W @ x - W.sum(1, keepdim=True) * x)


# ----------------------------------------------------------------------------- similarity-preserving
def _sp_rows(v):
    G = v @ v.T
    norm = G.norm(dim=1, keepdim=True)
    n = norm.clamp_min(SP_EPS)
    return G, G / n, n, norm >= SP_EPS


def similarity_preserving_fwd(student, teacher, loss, grad_student) -> None:
    """Fill ``loss`` (0-d) and optionally ``grad_student`` [N, Ds]; see the module docstring."""
    acc = _acc(student, teacher)
    x = student.to(acc)
    N = x.shape[0]
    _, A, n, k = _sp_rows(x)
    _, B, _, _ = _sp_rows(teacher.to(acc))
    diff = A - B
    loss.copy_((diff * diff).sum() / (N * N))
    if grad_student is None:
        return
    R = 2.0 * diff / (N * N)
    rho = (R * A).sum(1, keepdim=True)
    Z = (R - torch.where(k, rho, torch.zeros_like(rho)) * A) / n
    grad_student.copy_((Z + Z.T) @ x)
