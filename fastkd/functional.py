"""One public function per loss: validate -> choose backend -> autograd Function.

The kernels compute each row's loss and its *unreduced* gradient in the forward pass; the
Function here reduces the row losses and, in backward, only scales the stored gradient.
"""
from __future__ import annotations

import math
from numbers import Number
from typing import Optional, Union

import torch

from . import _backend
from .reference.divergences import DIVERGENCES

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("batchmean", "sum", "none")


# ----------------------------------------------------------------------------- validation
def _check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or "
                        f"float64), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension [..., V], got a 0-d tensor")


def _check_unit(name: str, value) -> float:
    if not isinstance(value, Number) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_weight(name: str, value) -> float:
    if not isinstance(value, Number) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_reduction(reduction, num_items_in_batch) -> None:
    if reduction == "mean":
        raise ValueError(
            'reduction="mean" is refused: in torch.nn.KLDivLoss it also divides by the vocabulary '
            'size, which is almost never wanted. Use "batchmean" (per valid row), "sum" or "none".')
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction != "batchmean":
        raise ValueError('num_items_in_batch is only used with reduction="batchmean"')


def _check_labels(labels, lead_shape, device, vocab: int, ignore_index: int, check_range: bool):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels must have the logits' leading shape {tuple(lead_shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device {device}, got {labels.device}")
    if check_range:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(bad.any()):
                raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index="
                                 f"{ignore_index}; found {labels[bad][:5].tolist()}")
        else:  # no host sync on accelerators (or graph break): an asynchronous assert instead
            torch._assert_async(~bad.any(), "labels out of range [0, V) (and not ignore_index)")


def _rows3d(x: torch.Tensor):
    """A [B, R, V] view of [..., V] logits, and whether it had to be a copy.

    [B, T, V] stays as it is, so a time-shifted ``logits[:, :-1]`` is read in place; more
    leading dims are merged into B when their strides allow, else copied. Decided from shapes
    and strides alone, so torch.compile traces it.
    """
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        return _rows3d(x.contiguous())[0], True
    if x.dim() == 1:
        return x.view(1, 1, -1), False
    if x.dim() == 2:
        return x.unsqueeze(0), False
    if x.dim() == 3:
        return x, False
    lead = [(n, st) for n, st in zip(x.shape[:-2], x.stride()[:-2]) if n != 1]
    mergeable = all(lead[i][1] == lead[i + 1][1] * lead[i + 1][0] for i in range(len(lead) - 1))
    # reshape returns a view exactly when the leading dims merge
    return x.reshape(-1, x.shape[-2], x.shape[-1]), not mergeable


# ----------------------------------------------------------------------------- autograd
class _KDFunction(torch.autograd.Function):
    """Runs a family's forward op once; backward scales the gradients it stored."""

    @staticmethod
    def forward(ctx, student, teacher, labels, denom, family, backend, vocab, reduction, inplace,
                need_gs, need_gt, params):
        lead_shape = student.shape[:-1]
        s3, s_copied = _rows3d(student)
        t3, _ = _rows3d(teacher)
        B, R = s3.shape[0], s3.shape[1]
        lab = None if labels is None else labels.reshape(B, R).to(torch.int64).contiguous()
        wide = torch.float64 in (student.dtype, teacher.dtype)  # float64 in, float64 math (gradcheck)
        loss = torch.empty((B, R), dtype=torch.float64 if wide else torch.float32,
                           device=student.device)

        def grad_buffer(full, x3, need, allow_inplace):
            if not need:
                return None, None
            if allow_inplace and x3.shape[-1] == vocab:
                # inplace: the gradient overwrites the logits (rows are read before written)
                return full, x3
            partial = x3.shape[-1] != vocab
            buf = (torch.zeros if partial else torch.empty)(full.shape, dtype=full.dtype,
                                                            device=full.device)
            view = _rows3d(buf)[0]
            return buf, (view[..., :vocab] if partial else view)

        gs_full, gs = grad_buffer(student, s3, need_gs, inplace and not s_copied)
        gt_full, gt = grad_buffer(teacher, t3, need_gt, False)
        if loss.numel() > 0:
            _backend.op(family, backend)(s3[..., :vocab], t3[..., :vocab], lab, loss, gs, gt,
                                         *params)
        else:
            loss.zero_()
        ctx.reduction = reduction
        ctx.used = False
        ctx.lead_shape = lead_shape
        ctx.save_for_backward(gs_full, gt_full, denom)
        return _reduce(loss, reduction, denom, lead_shape, student.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        gs, gt, denom = ctx.saved_tensors
        gs, gt = _scale_stored_grads(ctx, grad_out, denom, (gs, gt))
        return (gs, gt) + (None,) * 10


def _scale_stored_grads(ctx, grad_out, denom, bufs):
    """Backward of a loss whose unreduced gradients were computed in the forward.

    The stored gradients are scaled in place (no second N x V buffer), so one forward serves
    one backward. float64 keeps them intact: gradcheck re-runs backward.
    """
    inplace = not any(b is not None and b.dtype == torch.float64 for b in bufs)
    if ctx.used and inplace:
        raise RuntimeError("fastkd: this loss was already backpropagated; its gradient is "
                           "computed in the forward and scaled in place, so a second "
                           "backward (retain_graph=True) needs the loss recomputed")
    ctx.used = True
    g = grad_out.float()
    if ctx.reduction == "none":
        scale = g.unsqueeze(-1)
    elif ctx.reduction == "batchmean":
        scale = g / denom
    else:
        scale = g
    return tuple(None if b is None else (b.mul_(scale) if inplace else b * scale) for b in bufs)


class _SparseKDFunction(torch.autograd.Function):
    """sparse_kd_fwd once in forward (row losses + unreduced dense student gradient)."""

    @staticmethod
    def forward(ctx, student, indices, values, labels, denom, backend, reduction, need_gs,
                params):
        lead_shape = student.shape[:-1]
        s3, _ = _rows3d(student)
        B, R, V = s3.shape
        K = indices.shape[-1]
        idx = indices.reshape(B, R, K).to(torch.int64).contiguous()
        val = values.reshape(B, R, K).contiguous()
        lab = None if labels is None else labels.reshape(B, R).to(torch.int64).contiguous()
        wide = torch.float64 in (student.dtype, values.dtype)
        loss = torch.empty((B, R), dtype=torch.float64 if wide else torch.float32,
                           device=student.device)
        gs_full = torch.empty(student.shape, dtype=student.dtype, device=student.device) \
            if need_gs else None
        if loss.numel() > 0:
            _backend.op("sparse_kd", backend)(
                s3, idx, val, lab, loss, None if gs_full is None else _rows3d(gs_full)[0],
                *params)
        ctx.reduction = reduction
        ctx.used = False
        ctx.save_for_backward(gs_full, denom)
        return _reduce(loss, reduction, denom, lead_shape, student.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        gs, denom = ctx.saved_tensors
        (gs,) = _scale_stored_grads(ctx, grad_out, denom, (gs,))
        return (gs,) + (None,) * 8


def _reduce(loss, reduction, denom, lead_shape, dtype):
    if reduction == "none":
        return loss.reshape(lead_shape).to(dtype)
    total = loss.sum()
    if reduction == "batchmean":
        total = total / denom
    return total.to(dtype)


def _denominator(labels, n_rows: int, ignore_index: int, num_items_in_batch, device):
    """batchmean's divisor as a float32 tensor, computed on device (no host sync)."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            return num_items_in_batch.to(device=device, dtype=torch.float32)
        if not isinstance(num_items_in_batch, Number) or num_items_in_batch <= 0:
            raise ValueError(f"num_items_in_batch must be a positive number or a tensor, "
                             f"got {num_items_in_batch!r}")
        return torch.tensor(float(num_items_in_batch), device=device)
    if labels is None:
        return torch.tensor(float(max(n_rows, 1)), device=device)
    return (labels != ignore_index).sum().clamp_(min=1).to(torch.float32)


def _kd_options(divergence, temperature, beta, skew, ignore_index, hard_label_weight,
                soft_label_weight, reduction, num_items_in_batch, labels):
    """Validate the keywords every logits-divergence loss shares; (divergence code, numbers)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got {divergence!r}")
    beta = _check_unit("beta", beta)
    skew = _check_unit("skew", skew)
    if not isinstance(temperature, Number) or not (0.0 < float(temperature) < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    hard = _check_weight("hard_label_weight", hard_label_weight)
    soft = _check_weight("soft_label_weight", soft_label_weight)
    _check_reduction(reduction, num_items_in_batch)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hard != 0.0 and labels is None:
        raise ValueError("hard_label_weight != 0 needs labels")
    # TRL's generalized JSD: the endpoints are the plain KLs, not the degenerate mixture.
    code = DIVERGENCES[divergence]
    if divergence == "jsd" and beta in (0.0, 1.0):
        code = DIVERGENCES["forward_kl" if beta == 0.0 else "reverse_kl"]
    return code, (float(temperature), beta, skew, soft, hard)


# ----------------------------------------------------------------------------- kd_loss
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: Optional[torch.Tensor] = None, *, divergence: str = "forward_kl",
            temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
            ignore_index: int = -100, hard_label_weight: float = 0.0,
            soft_label_weight: float = 1.0, scale_temperature: bool = True,
            softcap: Optional[float] = None, vocab_size: Optional[int] = None,
            reduction: str = "batchmean",
            num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
            inplace: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Temperature-softmax distillation loss between student and teacher logits ``[..., V]``.

    Row loss = soft_label_weight * D(p, q) * (T**2 if scale_temperature) + hard_label_weight *
    CE(student at T=1, labels), with p = softmax(cap(teacher)/T), q = softmax(cap(student)/T),
    cap(z) = softcap * tanh(z / softcap). D is one of ``forward_kl`` KL(p||q), ``reverse_kl``
    KL(q||p), ``jsd`` (generalized, weight ``beta``; 0 -> forward_kl, 1 -> reverse_kl),
    ``skew_forward_kl`` KL(p || skew p + (1-skew) q), ``skew_reverse_kl`` KL(q || (1-skew) p +
    skew q), ``tvd`` 0.5 sum |p - q|. Rows whose label is ``ignore_index`` count for nothing.

    reduction: ``"batchmean"`` (sum over valid rows / their count, or / ``num_items_in_batch``),
    ``"sum"``, or ``"none"`` (per-row losses, 0 on ignored rows).
    vocab_size: compare only the first ``vocab_size`` entries of both logits (a padded teacher).
    inplace: write the student gradient over ``student_logits`` (saves one N x V buffer; the
    tensor holds the gradient afterwards, so do not read it again).
    backend: ``"torch"``, ``"cpp"``, ``"triton"``, ``"cuda"`` or None (fastest available here).
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits must be on student_logits' device "
                         f"{student_logits.device}, got {teacher_logits.device}")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student_logits and teacher_logits must share their leading shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        if vs != vt:
            raise ValueError(f"student_logits has {vs} vocabulary entries and teacher_logits {vt}; "
                             f"pass vocab_size=k to compare only the first k of both")
        vocab = vs
    else:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
                1 <= vocab_size <= min(vs, vt)):
            raise ValueError(f"vocab_size must be an int in [1, {min(vs, vt)}] (the smaller "
                             f"vocabulary), got {vocab_size!r}")
        vocab = vocab_size
    code, opts = _kd_options(divergence, temperature, beta, skew, ignore_index,
                             hard_label_weight, soft_label_weight, reduction, num_items_in_batch,
                             labels)
    if softcap is not None and (not isinstance(softcap, Number) or not (0.0 < float(softcap) < math.inf)):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    if labels is not None:
        _check_labels(labels, student_logits.shape[:-1], student_logits.device, vocab,
                      ignore_index, check_range=hard_label_weight != 0.0)

    name = _backend.choose("kd", student_logits.device, backend)
    grad_on = torch.is_grad_enabled()
    need_gs = grad_on and student_logits.requires_grad
    need_gt = grad_on and teacher_logits.requires_grad
    n_rows = student_logits.numel() // max(vs, 1)
    denom = (_denominator(labels, n_rows, ignore_index, num_items_in_batch, student_logits.device)
             if reduction == "batchmean" else None)
    T, beta, skew, soft_w, hard_w = opts
    params = (code, T, beta, skew, int(ignore_index), soft_w, hard_w, bool(scale_temperature),
              float(softcap or 0.0))
    return _KDFunction.apply(student_logits, teacher_logits, labels, denom, "kd", name, vocab,
                             reduction, bool(inplace), need_gs, need_gt, params)


# ----------------------------------------------------------------------------- sparse_kd_loss
def _check_sparse_teacher(indices, values, lead_shape, vocab: int, tail: str, validate: bool):
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or \
            indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError("teacher_indices must be an integer tensor [..., k], got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    _check_logits("teacher_values", values)
    if indices.dim() < 1 or tuple(indices.shape[:-1]) != tuple(lead_shape):
        raise ValueError(f"teacher_indices must be [..., k] with the logits' leading shape "
                         f"{tuple(lead_shape)}, got {tuple(indices.shape)}")
    if values.shape != indices.shape:
        raise ValueError(f"teacher_values must have teacher_indices' shape {tuple(indices.shape)}, "
                         f"got {tuple(values.shape)}")
    k = indices.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_indices must hold between 1 and V={vocab} entries per row, got {k}")
    if not validate:
        return
    srt = indices.sort(-1).values
    bad_range = (srt[..., :1] < 0).any() | (srt[..., -1:] >= vocab).any()
    dup = (srt[..., 1:] == srt[..., :-1]).any()
    over = (values.double().exp().sum(-1) > 1.0 + 1e-3).any() if tail == "bucket" else None
    if indices.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad_range):
            raise ValueError(f"teacher_indices must lie in [0, {vocab})")
        if bool(dup):
            raise ValueError("teacher_indices must be distinct within each row (found a duplicate)")
        if over is not None and bool(over):
            raise ValueError('tail="bucket" needs teacher_values to be log-probabilities '
                             '(their exp sums to at most 1 per row)')
    else:  # no host sync on accelerators: asynchronous device-side asserts
        torch._assert_async(~bad_range, "teacher_indices out of range [0, V)")
        torch._assert_async(~dup, "teacher_indices hold a duplicate within a row")


def sparse_kd_loss(student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                   teacher_values: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                   divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                   skew: float = 0.1, tail: str = "renormalize", ignore_index: int = -100,
                   hard_label_weight: float = 0.0, soft_label_weight: float = 1.0,
                   scale_temperature: bool = True, reduction: str = "batchmean",
                   num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
                   validate: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """Distill from a teacher stored as its top-k entries per token.

    ``teacher_indices`` long ``[..., k]`` and ``teacher_values`` ``[..., k]`` (the teacher's
    logits, or its log-probabilities at T for ``tail="bucket"``). The student is normalized
    over its full vocabulary, log q = log_softmax(student_logits / T).

    tail="renormalize": p = softmax(teacher_values / T) over the k entries; forward_kl is
    sum_k p_k (log p_k - log q_k); the other divergences compare p with the student
    renormalized over the same k entries.
    tail="bucket": both sides get a (k+1)-th bucket with the remaining mass (1 - sum of the k),
    and the divergence runs over the k+1 buckets.

    The student gradient is dense over V, computed in the same pass. validate=False skips the
    index checks (range, duplicates) for callers who guarantee them.
    Other keywords as in :func:`kd_loss`.
    """
    _check_logits("student_logits", student_logits)
    if tail not in ("renormalize", "bucket"):
        raise ValueError(f'tail must be "renormalize" or "bucket", got {tail!r}')
    code, (T, beta, skew, soft_w, hard_w) = _kd_options(
        divergence, temperature, beta, skew, ignore_index, hard_label_weight, soft_label_weight,
        reduction, num_items_in_batch, labels)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    for name, x in (("teacher_indices", teacher_indices), ("teacher_values", teacher_values)):
        if isinstance(x, torch.Tensor) and x.device != student_logits.device:
            raise ValueError(f"{name} must be on student_logits' device {student_logits.device}, "
                             f"got {x.device}")
    _check_sparse_teacher(teacher_indices, teacher_values, lead, vocab, tail, validate)
    if labels is not None:
        _check_labels(labels, lead, student_logits.device, vocab, ignore_index,
                      check_range=hard_w != 0.0)
    name = _backend.choose("sparse_kd", student_logits.device, backend)
    need_gs = torch.is_grad_enabled() and student_logits.requires_grad
    n_rows = student_logits.numel() // max(vocab, 1)
    denom = (_denominator(labels, n_rows, ignore_index, num_items_in_batch, student_logits.device)
             if reduction == "batchmean" else None)
    params = (code, T, beta, skew, 0 if tail == "renormalize" else 1, int(ignore_index), soft_w,
              hard_w, bool(scale_temperature))
    return _SparseKDFunction.apply(student_logits, teacher_indices, teacher_values.detach(),
                                   labels, denom, name, reduction, need_gs, params)


# ----------------------------------------------------------------------------- fused_linear_kd_loss
def _check_linear(prefix: str, hidden, weight, bias):
    _check_logits(f"{prefix}_hidden", hidden)
    _check_logits(f"{prefix}_weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}_weight must be [V, H] (an lm_head weight), got "
                         f"{tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{prefix}_hidden's last dim {hidden.shape[-1]} must equal "
                         f"{prefix}_weight's hidden size {weight.shape[1]}")
    if bias is not None:
        _check_logits(f"{prefix}_bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}_bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{prefix}_{name} must be on {prefix}_hidden's device {hidden.device}")


def fused_linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                         teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                         labels: Optional[torch.Tensor] = None, *,
                         student_bias: Optional[torch.Tensor] = None,
                         teacher_bias: Optional[torch.Tensor] = None,
                         chunk_size: Optional[int] = None, divergence: str = "forward_kl",
                         temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                         ignore_index: int = -100, hard_label_weight: float = 0.0,
                         soft_label_weight: float = 1.0, scale_temperature: bool = True,
                         softcap: Optional[float] = None, vocab_size: Optional[int] = None,
                         reduction: str = "batchmean",
                         num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
                         backend: Optional[str] = None) -> torch.Tensor:
    """:func:`kd_loss` of ``student_hidden @ student_weight.T + student_bias`` against the
    teacher's, without ever holding either model's N x V logits.

    Hidden states are ``[..., H]`` (student and teacher H may differ); weights are lm_head
    weights ``[V, H]``. Gradients flow to student_hidden, student_weight and student_bias; the
    teacher side is a constant. Tokens are processed ``chunk_size`` rows at a time (default:
    about 64 MiB of chunk logits on CPU, 256 MiB on GPU); rows whose label is ``ignore_index``
    cost no matmul. ``backend`` picks the kd kernel run on each chunk. Other keywords as in
    :func:`kd_loss`.
    """
    _check_linear("student", student_hidden, student_weight, student_bias)
    _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    dev = student_hidden.device
    if teacher_hidden.device != dev:
        raise ValueError(f"teacher_hidden must be on student_hidden's device {dev}, got "
                         f"{teacher_hidden.device}")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"student_hidden and teacher_hidden must share their leading shape, got "
                         f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
    vs, vt = student_weight.shape[0], teacher_weight.shape[0]
    if vocab_size is None:
        if vs != vt:
            raise ValueError(f"student_weight has {vs} vocabulary rows and teacher_weight {vt}; "
                             f"pass vocab_size=k to compare only the first k of both")
        vocab = vs
    else:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
                1 <= vocab_size <= min(vs, vt)):
            raise ValueError(f"vocab_size must be an int in [1, {min(vs, vt)}], got {vocab_size!r}")
        vocab = vocab_size
    code, (T, beta, skew, soft_w, hard_w) = _kd_options(
        divergence, temperature, beta, skew, ignore_index, hard_label_weight, soft_label_weight,
        reduction, num_items_in_batch, labels)
    if softcap is not None and (not isinstance(softcap, Number) or not (0.0 < float(softcap) < math.inf)):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if labels is not None:
        _check_labels(labels, lead, dev, vocab, ignore_index, check_range=hard_w != 0.0)

    from .fused_linear import FusedLinearKDFunction, default_chunk_size

    name = _backend.choose("kd", dev, backend)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    n_rows = hs.shape[0]
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)
    rows = None
    if lab is not None:  # the one host sync: how many rows need matmul work
        rows = torch.nonzero(lab != ignore_index).squeeze(1)
    denom = (_denominator(labels, n_rows, ignore_index, num_items_in_batch, dev)
             if reduction == "batchmean" else None)
    chunk = chunk_size or default_chunk_size(max(n_rows, 1), vocab, hs.dtype, ht.dtype, dev)
    grad_on = torch.is_grad_enabled()
    need = tuple(grad_on and x is not None and x.requires_grad
                 for x in (student_hidden, student_weight, student_bias))
    params = (code, T, beta, skew, int(ignore_index), soft_w, hard_w, bool(scale_temperature),
              float(softcap or 0.0))
    out = FusedLinearKDFunction.apply(
        hs, student_weight, student_bias, ht, teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), lab, rows, denom, name,
        reduction, vocab, chunk, params, need)
    return out.reshape(lead) if reduction == "none" else out
