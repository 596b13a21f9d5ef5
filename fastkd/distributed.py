"""Distributed distillation on torch.distributed: vocab-parallel logits losses and
global-batch relational losses. fastkd uses the caller's process group (NCCL, gloo, ...) and
only its collectives; it opens no connections of its own.

Vocab-parallel (tensor parallelism over the vocabulary, as in Megatron-LM): every rank holds
the same rows and a slice [v0, v1) of the vocabulary of both models' logits; slices may be
uneven and rank order is vocabulary order. A row's loss needs only a few scalars per row from
the other slices, so the kd kernel (the contract of ``fastkd/reference/divergences.py``) runs as
three sweeps over the local slice with collectives between them:

1. statistics: the local log-sum-exp of the student and the teacher at T (and of the student
   at T = 1 for the hard-label term), then all-reduce MAX and all-reduce SUM of exp(lse - max):
   the global log-normalizers;
2. sums: with the global normalizers every entry's divergence terms are local; the local sums
   of the loss terms, of h and of k (the softmax corrections of the gradients, see the
   reference), and the label's logit (nonzero only on the rank that owns the label), then one
   all-reduce SUM;
3. gradient: local, into the caller's buffer, as every fastkd kernel computes it in the forward.
   The backward only scales it: it communicates nothing.

Per call: one all-gather of W ints (the slice sizes) and three all-reduces of at most 4 x N
floats for N rows, never logits. sparse_kd_loss needs the student's log-probabilities at the
teacher's k indices from whichever rank owns them: one all-reduce of N x (k + 1) floats in place
of step 2. fused_linear_kd_loss runs this per chunk of rows and adds the one collective the math
of a vocab-parallel lm_head needs: an all-reduce of the hidden states' gradient.

Global-batch relational losses all-gather the embeddings (uneven per-rank batches allowed) and
compute the loss over the whole batch on every rank; the gradient of a rank's own rows is its
slice of the full gradient, so the backward communicates nothing either.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .reference.divergences import _cap, divergence_terms
from .reference.sparse import _terms as sparse_terms_at_entries

_BLOCK_ELEMS = 1 << 22  # entries of one row block of the local slice: bounds fp32 temporaries


def check_process_group(process_group):
    """The group itself, after checking that it is one and that torch.distributed is up."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group was given but torch.distributed is not initialized; "
                           "call torch.distributed.init_process_group first")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError("process_group must be a torch.distributed.ProcessGroup (e.g. "
                        "torch.distributed.group.WORLD or one from new_group), got "
                        f"{type(process_group).__name__}")
    return process_group


def _gather_sizes(values, group, device) -> torch.Tensor:
    """[W, len(values)] int64: every rank's values, in rank order."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out)


def shard_offset(local_size: int, group, device):
    """(offset, total): where this rank's vocabulary slice starts, and the whole vocabulary.

    Python ints on CPU; 0-d device tensors elsewhere, so that nothing waits on the host."""
    sizes = _gather_sizes([local_size], group, device)[:, 0]
    rank = dist.get_rank(group)
    offset, total = sizes[:rank].sum(), sizes.sum()
    if sizes.device.type == "cpu":
        return int(offset), int(total)
    return offset, total


def _all_logsumexp(local: torch.Tensor, group) -> torch.Tensor:
    """log(sum over ranks of exp(local)), elementwise: two all-reduces of local's size."""
    m = local.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that are -inf everywhere
    s = torch.exp(local - m)
    dist.all_reduce(s, group=group)
    return m + torch.log(s)


def _row_blocks(B: int, R: int, V: int):
    step = max(1, _BLOCK_ELEMS // max(V, 1))
    for b in range(B):
        for r0 in range(0, R, step):
            yield b, slice(r0, min(r0 + step, R))


class _LocalLabels:
    """The labels seen from one vocabulary slice: which rows' labels it owns, and where."""

    def __init__(self, labels, ignore_index: int, offset, V: int):
        self.valid = None if labels is None else labels != ignore_index
        self.own = self.idx = None
        if labels is not None:
            local = labels - offset
            self.own = self.valid & (local >= 0) & (local < V)
            self.idx = local.clamp(0, max(V - 1, 0))

    def logit(self, z, b, rows):
        """z[label] on the owning rank, 0 elsewhere: [rows]."""
        picked = z.gather(-1, self.idx[b, rows].unsqueeze(-1)).squeeze(-1)
        return torch.where(self.own[b, rows], picked, torch.zeros_like(picked))

    def add_hard(self, g, z, lse1, weight: float, b, rows):
        """g += weight * (softmax(z) - onehot(label)) with the global normalizer lse1."""
        g = g + weight * torch.exp(z - lse1.unsqueeze(-1))
        onehot = torch.zeros_like(g).scatter_(-1, self.idx[b, rows].unsqueeze(-1),
                                              self.own[b, rows].unsqueeze(-1).to(g.dtype))
        return g - weight * onehot

    def mask(self, x, b=None, rows=None):
        if self.valid is None:
            return x
        v = self.valid if b is None else self.valid[b, rows]
        if x.dim() > v.dim():
            v = v.unsqueeze(-1)
        return torch.where(v, x, torch.zeros_like(x))


def _acc_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def vocab_parallel_kd_fwd(student, teacher, labels, loss, grad_student, grad_teacher,
                          divergence: int, temperature: float, beta: float, skew: float,
                          ignore_index: int, soft_weight: float, hard_weight: float,
                          scale_temperature: bool, softcap: float, *, group, offset) -> None:
    """``kd_fwd`` of fastkd/reference/divergences.py over vocabulary slices.

    Same arguments and contract, except that student, teacher [B, R, V] and the gradient
    buffers hold this rank's slice of the vocabulary, which starts at ``offset``; labels are
    global vocabulary ids. Every rank gets the whole row losses.
    """
    B, R, V = student.shape
    T = float(temperature)
    acc = _acc_dtype(student, teacher)
    lab = _LocalLabels(labels, ignore_index, offset, V)
    hard = hard_weight != 0.0
    dev = student.device

    def block(b, rows):
        s, ds = _cap(student[b, rows].to(acc), softcap)
        t, dt = _cap(teacher[b, rows].to(acc), softcap)
        return s, ds, t, dt

    stats = torch.zeros((3 if hard else 2, B, R), dtype=acc, device=dev)
    picked = torch.zeros((B, R), dtype=acc, device=dev)
    for b, rows in _row_blocks(B, R, V):
        s, _, t, _ = block(b, rows)
        stats[0, b, rows] = torch.logsumexp(s / T, -1)
        stats[1, b, rows] = torch.logsumexp(t / T, -1)
        if hard:
            stats[2, b, rows] = torch.logsumexp(s, -1)
            picked[b, rows] = lab.logit(s, b, rows)
    lse = _all_logsumexp(stats, group)

    def terms(b, rows, s, t):
        lq = s / T - lse[0, b, rows].unsqueeze(-1)
        lp = t / T - lse[1, b, rows].unsqueeze(-1)
        q, p = lq.exp(), lp.exp()
        ell, h, k = divergence_terms(divergence, p, lp, q, lq, beta, skew)
        return q, p, ell, h, k

    sums = torch.zeros((4, B, R), dtype=acc, device=dev)
    sums[3] = picked
    for b, rows in _row_blocks(B, R, V):
        s, _, t, _ = block(b, rows)
        _, _, ell, h, k = terms(b, rows, s, t)
        sums[0, b, rows] = ell.sum(-1)
        sums[1, b, rows] = h.sum(-1)
        if grad_teacher is not None:
            sums[2, b, rows] = k.sum(-1)
    dist.all_reduce(sums, group=group)

    scale = T * T if scale_temperature else 1.0
    row = soft_weight * scale * sums[0]
    if hard:
        row = row + hard_weight * (lse[2] - sums[3])
    loss.copy_(lab.mask(row))
    if grad_student is None and grad_teacher is None:
        return
    c = soft_weight * scale / T
    for b, rows in _row_blocks(B, R, V):
        s, ds, t, dt = block(b, rows)
        q, p, _, h, k = terms(b, rows, s, t)
        if grad_student is not None:
            g = c * (h - q * sums[1, b, rows].unsqueeze(-1))
            if hard:
                g = lab.add_hard(g, s, lse[2, b, rows], hard_weight, b, rows)
            if ds is not None:
                g = g * ds
            grad_student[b, rows] = lab.mask(g, b, rows)
        if grad_teacher is not None:
            g = c * (k - p * sums[2, b, rows].unsqueeze(-1))
            if dt is not None:
                g = g * dt
            grad_teacher[b, rows] = lab.mask(g, b, rows)


def vocab_parallel_sparse_kd_fwd(student, indices, values, labels, loss, grad_student,
                                 divergence: int, temperature: float, beta: float, skew: float,
                                 tail: int, ignore_index: int, soft_weight: float,
                                 hard_weight: float, scale_temperature: bool, *, group,
                                 offset) -> None:
    """``sparse_kd_fwd`` of fastkd/reference/sparse.py with the student sliced over the
    vocabulary (this rank's slice starts at ``offset``); teacher indices and labels are global
    vocabulary ids, identical on every rank."""
    B, R, V = student.shape
    T = float(temperature)
    acc = _acc_dtype(student, values)
    dev = student.device
    lab = _LocalLabels(labels, ignore_index, offset, V)
    hard = hard_weight != 0.0
    local = indices - offset
    own = (local >= 0) & (local < V)
    local = local.clamp(0, max(V - 1, 0))

    stats = torch.zeros((2 if hard else 1, B, R), dtype=acc, device=dev)
    # the student's logits / T at the teacher's indices (summed over ranks: one owner each),
    # and the label's logit in the last column
    at_idx = torch.zeros((B, R, indices.shape[-1] + 1), dtype=acc, device=dev)
    for b, rows in _row_blocks(B, R, V):
        z = student[b, rows].to(acc)
        stats[0, b, rows] = torch.logsumexp(z / T, -1)
        picked = (z / T).gather(-1, local[b, rows])
        at_idx[b, rows, :-1] = torch.where(own[b, rows], picked, torch.zeros_like(picked))
        if hard:
            stats[1, b, rows] = torch.logsumexp(z, -1)
            at_idx[b, rows, -1] = lab.logit(z, b, rows)
    lse = _all_logsumexp(stats, group)
    dist.all_reduce(at_idx, group=group)

    # g_S: the whole gradient at the teacher's entries, h_i - q_i H, computed directly (as
    # q_i gamma + e_i it would cancel two terms of up to 1/TAIL_FLOOR in the bucket tail)
    D, gamma, _, g_S = sparse_terms_at_entries(at_idx[..., :-1] - lse[0].unsqueeze(-1), values,
                                               divergence, T, beta, skew, tail)
    scale = T * T if scale_temperature else 1.0
    row = soft_weight * scale * D
    if hard:
        row = row + hard_weight * (lse[1] - at_idx[..., -1])
    loss.copy_(lab.mask(row))
    if grad_student is None:
        return
    c = soft_weight * scale / T
    K = indices.shape[-1]
    # entries another rank owns are written to K spare columns (one each, so every target of
    # the scatter is distinct), dropped afterwards
    spare = V + torch.arange(K, device=dev)
    for b, rows in _row_blocks(B, R, V):
        z = student[b, rows].to(acc)
        g = torch.exp(z / T - lse[0, b, rows].unsqueeze(-1)) * gamma[b, rows]
        g = torch.cat([g, g.new_zeros(g.shape[:-1] + (K,))], -1)
        g.scatter_(-1, torch.where(own[b, rows], local[b, rows], spare), g_S[b, rows].to(g.dtype))
        g = c * g[..., :V]
        if hard:
            g = lab.add_hard(g, z, lse[1, b, rows], hard_weight, b, rows)
        grad_student[b, rows] = lab.mask(g, b, rows)


def vocab_parallel_kernel(family: str, group, local_vocab: int, device):
    """(kernel with the family's op signature, whole vocabulary size) for this rank's slice."""
    offset, total = shard_offset(local_vocab, group, device)
    fn = {"kd": vocab_parallel_kd_fwd, "sparse_kd": vocab_parallel_sparse_kd_fwd}[family]
    return functools.partial(fn, group=group, offset=offset), total


# ----------------------------------------------------------------------------- global batch
class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (dim 0; counts may differ); the gradient of this rank's
    rows is its slice of the incoming gradient, which every rank computes in full."""

    @staticmethod
    def forward(ctx, x, group):
        sizes = _gather_sizes([x.shape[0], x[0:1].numel()], group, x.device).tolist()
        widths = {w for n, w in sizes if n > 0}
        if len(widths) > 1:
            raise ValueError(f"every rank's embeddings must have the same size per row; got "
                             f"rows x width per rank {[tuple(s) for s in sizes]}")
        counts = [n for n, _ in sizes]
        top = max(counts)
        padded = x.new_zeros((top,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        rank = dist.get_rank(group)
        ctx.start, ctx.n = sum(counts[:rank]), x.shape[0]
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start: ctx.start + ctx.n], None


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``x`` [n_rank, ...] over ``group`` along dim 0, in rank order, with gradients
    flowing back to each rank's own rows (uneven n_rank allowed)."""
    return _AllGatherRows.apply(x, group)
