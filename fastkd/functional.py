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
        # The stored gradients are scaled in place (no second N x V buffer), so one forward
        # serves one backward. float64 keeps them intact: gradcheck re-runs backward.
        inplace = not any(b is not None and b.dtype == torch.float64 for b in (gs, gt))
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
        out = []
        for buf in (gs, gt):
            if buf is None:
                out.append(None)
            else:
                out.append(buf.mul_(scale) if inplace else buf * scale)
        return (out[0], out[1]) + (None,) * 10


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
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got {divergence!r}")
    beta = _check_unit("beta", beta)
    skew = _check_unit("skew", skew)
    if not isinstance(temperature, Number) or not (0.0 < float(temperature) < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if softcap is not None and (not isinstance(softcap, Number) or not (0.0 < float(softcap) < math.inf)):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    hard_label_weight = _check_weight("hard_label_weight", hard_label_weight)
    soft_label_weight = _check_weight("soft_label_weight", soft_label_weight)
    _check_reduction(reduction, num_items_in_batch)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hard_label_weight != 0.0 and labels is None:
        raise ValueError("hard_label_weight != 0 needs labels")
    if labels is not None:
        _check_labels(labels, student_logits.shape[:-1], student_logits.device, vocab,
                      ignore_index, check_range=hard_label_weight != 0.0)

    # TRL's generalized JSD: the endpoints are the plain KLs, not the degenerate mixture.
    code = DIVERGENCES[divergence]
    if divergence == "jsd" and beta in (0.0, 1.0):
        code = DIVERGENCES["forward_kl" if beta == 0.0 else "reverse_kl"]

    name = _backend.choose("kd", student_logits.device, backend)
    grad_on = torch.is_grad_enabled()
    need_gs = grad_on and student_logits.requires_grad
    need_gt = grad_on and teacher_logits.requires_grad
    n_rows = student_logits.numel() // max(vs, 1)
    denom = (_denominator(labels, n_rows, ignore_index, num_items_in_batch, student_logits.device)
             if reduction == "batchmean" else None)
    params = (code, float(temperature), beta, skew, int(ignore_index), soft_label_weight,
              hard_label_weight, bool(scale_temperature), float(softcap or 0.0))
    return _KDFunction.apply(student_logits, teacher_logits, labels, denom, "kd", name, vocab,
                             reduction, bool(inplace), need_gs, need_gt, params)
