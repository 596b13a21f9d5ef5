"""Fused linear KD: distill from hidden states and lm_head weights without N x V logits.

Tokens are processed in chunks of ``chunk_size`` rows. For each chunk the student and teacher
logits are formed by a matmul, the ``kd`` family's forward op (any backend: torch, cpp,
triton, cuda) turns the student chunk into its gradient in place, and that gradient is
multiplied straight into grad_hidden and an fp32 grad_weight accumulator. Only one chunk of
logits of each model exists at a time. Rows whose label is ``ignore_index`` are dropped
before any matmul (this needs the count of valid rows on the host: one sync per call).

For "sum" and "batchmean" every gradient is computed in the forward and backward only scales
it by grad_output; for "none" (per-row grad_output unknown in the forward) the backward
recomputes the chunks with each row's grad_output.

With a process group (vocab-parallel lm_heads, see fastkd.distributed) ``backend`` is the
sharded kd kernel, every chunk's row statistics are all-reduced inside it, and the hidden
states' gradient, a sum over the vocabulary slices, is all-reduced once at the end.
"""
from __future__ import annotations

import torch

from .functional import _differentiable_once


# Bytes of chunk logits (student + teacher) to aim for; bounds the working set.
_CHUNK_BYTES = {"cpu": 1 << 27, "cuda": 1 << 28}
_VOCAB_BLOCK = 16384  # grad_weight is accumulated in vocab blocks of this many rows


def default_chunk_size(n_rows: int, vocab: int, s_dtype, t_dtype, device) -> int:
    per_row = vocab * (torch.finfo(s_dtype).bits + torch.finfo(t_dtype).bits) // 8
    budget = _CHUNK_BYTES.get(torch.device(device).type, 1 << 28)
    c = max(16, min(4096, budget // max(per_row, 1)))
    p = 16  # the largest power of two <= c, friendly to matmul tiling (no int.bit_length:
    while p * 2 <= c:  # torch 2.4's dynamo cannot trace it)
        p *= 2
    return max(1, min(p, n_rows))


def _accumulate_weight_grad(acc, g, h):
    """acc[V, H] (fp32) += g[C, V]^T @ h[C, H], in vocab blocks to bound the temporary."""
    if acc.dtype == g.dtype:
        acc.addmm_(g.t(), h)
        return
    for v0 in range(0, g.shape[1], _VOCAB_BLOCK):
        v1 = min(v0 + _VOCAB_BLOCK, g.shape[1])
        acc[v0:v1] += (g[:, v0:v1].t() @ h).float()


def _linear_into(out, h, w, b):
    """F.linear(h, w, b) written into ``out`` (a reused chunk buffer). The gradients are
    computed by hand, so the inputs are detached: out= refuses inputs that require grad, and
    torch 2.4's dynamo traces a Function's forward with grad mode on."""
    h, w = h.detach(), w.detach()
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b.detach(), h, w.t(), out=out)


def chunked_kd(hs, ws, bs, ht, wt, bt, labels, rows, backend, vocab, chunk, params,
               need, row_scale=None, group=None, fp32_acc=True):
    """Run the chunk loop. Returns (loss_rows [N] fp32, grad_hs, grad_ws, grad_bs).

    hs [N, Hs], ws [Vs, Hs], bs [Vs] | None, and the teacher's likewise; labels [N] | None;
    rows: indices of the rows to compute (valid rows) or None for all. ``need`` says which of
    (hs, ws, bs) want gradients; ``row_scale`` [N] multiplies each row's gradient (backward of
    reduction="none"). ``group``: the vocab-parallel process group, or None. ``fp32_acc``:
    accumulate the weight and bias gradients in float32 (else in the weight's dtype: no
    V x H float32 buffer, one rounding per chunk).
    """
    from .functional import _kernel

    kd_fwd = _kernel("kd", backend)
    N = hs.shape[0]
    dev = hs.device
    wide = torch.float64 in (hs.dtype, ht.dtype)  # the kd kernel's float64 math (weights share them)
    loss_rows = torch.zeros(N, dtype=torch.float64 if wide else torch.float32, device=dev)
    grad_hs = torch.zeros_like(hs) if need[0] else None
    acc_dtype = torch.float64 if ws.dtype == torch.float64 else (
        torch.float32 if fp32_acc else ws.dtype)
    grad_ws = torch.zeros(ws.shape, dtype=acc_dtype, device=dev) if need[1] else None
    grad_bs = torch.zeros(bs.shape, dtype=acc_dtype, device=dev) if need[2] else None
    any_grad = any(need)
    ws_k, wt_k = ws[:vocab], wt[:vocab]
    bs_k = None if bs is None else bs[:vocab]
    bt_k = None if bt is None else bt[:vocab]
    n = N if rows is None else rows.numel()
    # One buffer per model for every chunk's logits: a fresh [chunk, V] tensor per chunk costs
    # page faults on CPU (a new mapping each time) and allocator traffic on GPU. Reusing it is
    # safe: a chunk's logits (the student's become its gradient) are consumed before the next.
    zs_buf = zt_buf = None
    if n > 0:
        rows_max = min(chunk, n)
        zs_buf = torch.empty((rows_max, vocab), dtype=torch.promote_types(hs.dtype, ws_k.dtype), device=dev)
        zt_buf = torch.empty((rows_max, vocab), dtype=torch.promote_types(ht.dtype, wt_k.dtype), device=dev)
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        idx = None if rows is None else rows[c0:c1]
        h_s = hs[c0:c1] if idx is None else hs.index_select(0, idx)
        h_t = ht[c0:c1] if idx is None else ht.index_select(0, idx)
        lab = None
        if labels is not None:
            lab = labels[c0:c1] if idx is None else labels.index_select(0, idx)
            lab = lab.reshape(1, -1)
        zs = _linear_into(zs_buf[:c1 - c0], h_s, ws_k, bs_k)
        zt = _linear_into(zt_buf[:c1 - c0], h_t, wt_k, bt_k)
        loss_c = torch.empty((1, c1 - c0), dtype=loss_rows.dtype, device=dev)
        zs3 = zs.unsqueeze(0)
        kd_fwd(zs3, zt.unsqueeze(0), lab, loss_c, zs3 if any_grad else None, None, *params)
        if idx is None:
            loss_rows[c0:c1] = loss_c[0]
        else:
            loss_rows.index_copy_(0, idx, loss_c[0])
        if not any_grad:
            continue
        g = zs  # now d loss_row / d logits, unreduced
        if row_scale is not None:
            rs = row_scale[c0:c1] if idx is None else row_scale.index_select(0, idx)
            g.mul_(rs.to(g.dtype).unsqueeze(1))
        if grad_hs is not None:
            if idx is None:
                torch.mm(g, ws_k, out=grad_hs[c0:c1])
            else:
                grad_hs.index_copy_(0, idx, g @ ws_k)
        if grad_ws is not None:
            _accumulate_weight_grad(grad_ws[:vocab], g, h_s)
        if grad_bs is not None:
            grad_bs[:vocab] += g.sum(0, dtype=acc_dtype)
    if group is not None and grad_hs is not None:
        torch.distributed.all_reduce(grad_hs, group=group)
    return loss_rows, grad_hs, grad_ws, grad_bs


class FusedLinearKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, rows, denom, backend, reduction, vocab,
                chunk, params, need, group=None, fp32_acc=True):
        from .functional import _reduce

        ctx.reduction = reduction
        ctx.used = False
        if reduction == "none":
            loss_rows, *_ = chunked_kd(hs, ws, bs, ht, wt, bt, labels, rows, backend, vocab,
                                       chunk, params, (False, False, False), group=group)
            ctx.meta = (backend, vocab, chunk, params, need, group, fp32_acc)
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, labels, rows)
        else:
            loss_rows, gh, gw, gb = chunked_kd(hs, ws, bs, ht, wt, bt, labels, rows, backend,
                                               vocab, chunk, params, need, group=group,
                                               fp32_acc=fp32_acc)
            ctx.save_for_backward(gh, gw, gb, denom)
        return _reduce(loss_rows, reduction, denom, hs.shape[:-1], hs.dtype)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out):
        from .functional import _scale_stored_grads

        if ctx.reduction == "none":
            hs, ws, bs, ht, wt, bt, labels, rows = ctx.saved_tensors
            backend, vocab, chunk, params, need, group, fp32_acc = ctx.meta
            _, gh, gw, gb = chunked_kd(hs, ws, bs, ht, wt, bt, labels, rows, backend, vocab,
                                       chunk, params, need, row_scale=grad_out,
                                       group=group, fp32_acc=fp32_acc)
        else:
            gh, gw, gb, denom = ctx.saved_tensors
            gh, gw, gb = _scale_stored_grads(ctx, grad_out, denom, (gh, gw, gb))
        return (gh, gw, gb) + (None,) * 14
