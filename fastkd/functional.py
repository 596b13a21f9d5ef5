"""One public function per loss: validate -> choose backend -> autograd Function.

The kernels compute each row's loss and its *unreduced* gradient in the forward pass; the
Function here reduces the row losses and, in backward, only scales the stored gradient.
"""
from __future__ import annotations

import functools
import math
from numbers import Number
from typing import Optional, Union

import torch

from . import _backend, _buffers
from .reference.divergences import DIVERGENCES

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("batchmean", "sum", "none")


# ----------------------------------------------------------------------------- validation
def _check_float(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or "
                        f"float64), got {x.dtype}")


def _check_logits(name: str, x) -> None:
    _check_float(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension [..., V], got a 0-d tensor")


def _is_number(value) -> bool:
    """A real number, not a bool (True would silently read as 1)."""
    return isinstance(value, Number) and not isinstance(value, (bool, complex))


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_unit(name: str, value) -> float:
    if not _is_number(value) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_weight(name: str, value) -> float:
    if not _is_number(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_vocab(vs: int, vt: int, vocab_size, s_name: str, t_name: str) -> int:
    """The vocabulary both sides are compared over: all of it, or the first vocab_size."""
    for name, v in ((s_name, vs), (t_name, vt)):
        if v < 1:
            raise ValueError(f"{name} has an empty vocabulary (V = 0): nothing to distill")
    if vocab_size is None:
        if vs != vt:
            raise ValueError(f"{s_name} has {vs} vocabulary entries and {t_name} {vt}; "
                             f"pass vocab_size=k to compare only the first k of both")
        return vs
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
            1 <= vocab_size <= min(vs, vt)):
        raise ValueError(f"vocab_size must be an int in [1, {min(vs, vt)}] (the smaller "
                         f"vocabulary), got {vocab_size!r}")
    return vocab_size


def _check_softcap(softcap) -> None:
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, Number)
                                or not (0.0 < float(softcap) < math.inf)):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")


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
def _differentiable_once(backward):
    """For the backward of a Function whose gradient was computed in the forward: a double
    backward (create_graph=True, e.g. a gradient penalty through the loss) would get a gradient
    with no graph, i.e. silently zero second derivatives, so it is refused instead.
    (torch's once_differentiable lets it through when the grad_outputs need no grad.)"""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError("fastkd losses are differentiable once: their gradient is computed "
                               "in the forward pass, so a double backward (create_graph=True) is "
                               "not supported")
        return backward(ctx, *grads)

    return run


def _kernel(family: str, backend):
    """The forward op of a family: a backend's, or a ready kernel (vocab-parallel ones from
    fastkd.distributed, which share the op's signature)."""
    return backend if callable(backend) else _backend.op(family, backend)


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
            buf = _buffers.empty_like(full, zero=partial)  # CPU: last step's pages, resident
            view = _rows3d(buf)[0]
            return buf, (view[..., :vocab] if partial else view)

        gs_full, gs = grad_buffer(student, s3, need_gs, inplace and not s_copied)
        gt_full, gt = grad_buffer(teacher, t3, need_gt, False)
        params, reduction, denom = _fold_denominator(params, (5, 6), reduction, denom,
                                                     need_gs or need_gt)
        if loss.numel() > 0:
            _kernel(family, backend)(s3[..., :vocab], t3[..., :vocab], lab, loss, gs, gt,
                                     *params)
        else:
            loss.zero_()
        ctx.reduction = reduction
        ctx.used = False
        ctx.lead_shape = lead_shape
        ctx.save_for_backward(gs_full, gt_full, denom)
        return _reduce(loss, reduction, denom, lead_shape, student.dtype)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out):
        gs, gt, denom = ctx.saved_tensors
        gs, gt = _scale_stored_grads(ctx, grad_out, denom, (gs, gt))
        return (gs, gt) + (None,) * 10


def _on_host(t: torch.Tensor) -> bool:
    """True when reading t's value costs no device sync and no graph break (eager, CPU)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and \
        not isinstance(t, torch._subclasses.FakeTensor)


def _fold_denominator(params, weight_idx, reduction, denom, need_grad):
    """On CPU, fold batchmean's 1/denominator into the soft/hard weights the kernel applies.

    The stored gradient then already carries it, and a backward with grad_output == 1 (the
    usual loss.backward()) returns it without another pass over N x V. Reading the CPU
    denominator is free; on accelerators it would be a sync, so there nothing changes.
    """
    if reduction != "batchmean" or not need_grad or not _on_host(denom):
        return params, reduction, denom
    d = float(denom)
    params = tuple(p / d if i in weight_idx else p for i, p in enumerate(params))
    return params, "sum", None


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
    if inplace and ctx.reduction == "sum" and grad_out.numel() == 1 and _on_host(grad_out) \
            and float(grad_out) == 1.0:
        return bufs  # already exact: nothing to scale
    # float64 gradients are scaled in float64 (grad_output and 1/denominator are not rounded
    # to float32 first)
    acc = torch.float64 if not inplace else torch.float32
    g = grad_out.to(acc)
    if ctx.reduction == "none":
        scale = g.unsqueeze(-1)
    elif ctx.reduction == "batchmean":
        scale = g / denom.to(acc)
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
        gs_full = _buffers.empty_like(student) if need_gs else None
        params, reduction, denom = _fold_denominator(params, (6, 7), reduction, denom, need_gs)
        if loss.numel() > 0:
            _kernel("sparse_kd", backend)(
                s3, idx, val, lab, loss, None if gs_full is None else _rows3d(gs_full)[0],
                *params)
        ctx.reduction = reduction
        ctx.used = False
        ctx.save_for_backward(gs_full, denom)
        return _reduce(loss, reduction, denom, lead_shape, student.dtype)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out):
        gs, denom = ctx.saved_tensors
        (gs,) = _scale_stored_grads(ctx, grad_out, denom, (gs,))
        return (gs,) + (None,) * 8


def _fresh(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` as a new tensor, never ``x`` itself or a view of it: what every
    autograd.Function here returns. Under torch.compile in torch 2.11, a Function whose output
    aliases one of its forward's intermediates (a no-op ``.to()``, a ``reshape`` view) gave its
    inputs zero gradients (tests/test_functional.py::test_compiled_gradients_are_eager_gradients)."""
    return x.to(dtype, copy=True)


def _reduce(loss, reduction, denom, lead_shape, dtype):
    if reduction == "none":
        return _fresh(loss.reshape(lead_shape), dtype)
    total = loss.sum()
    if reduction == "batchmean":
        total = total / denom
    return _fresh(total, dtype)


def _denominator(labels, n_rows: int, ignore_index: int, num_items_in_batch, device):
    """batchmean's divisor as a 0-d float32 tensor, computed on device (no host sync)."""
    if num_items_in_batch is not None:
        n = num_items_in_batch
        if isinstance(n, torch.Tensor):
            if n.numel() != 1 or n.dtype == torch.bool or n.dtype.is_complex:
                raise ValueError(f"num_items_in_batch must be a positive number or a one-element "
                                 f"real tensor, got a {n.dtype} tensor of shape {tuple(n.shape)}")
            n = n.reshape(()).to(device=device, dtype=torch.float32)
            ok = torch.isfinite(n) & (n > 0)
            if _on_host(n):
                if not bool(ok):
                    raise ValueError(f"num_items_in_batch must be positive and finite, got {n.item()}")
            else:  # no host sync on accelerators: an asynchronous device-side assert
                torch._assert_async(ok, "num_items_in_batch must be positive and finite")
            return n
        if not _is_number(n) or not (0 < float(n) < math.inf):
            raise ValueError(f"num_items_in_batch must be a positive finite number or a tensor, "
                             f"got {n!r}")
        return torch.tensor(float(n), device=device)
    if labels is None:
        return torch.tensor(float(max(n_rows, 1)), device=device)
    return (labels != ignore_index).sum().clamp_(min=1).to(torch.float32)


def _vocab_parallel(family: str, process_group, backend, vocab_size, local_vocab: int, device):
    """(kernel, whole vocabulary) for vocabulary-sliced inputs (fastkd.distributed)."""
    from . import distributed

    distributed.check_process_group(process_group)
    if backend not in (None, "torch"):
        raise ValueError(f"backend={backend!r} cannot run vocab-parallel inputs; with "
                         f"process_group fastkd runs its sharded torch kernels (backend=None)")
    if vocab_size is not None:
        raise ValueError("vocab_size cannot be combined with process_group: drop the padded "
                         "vocabulary entries from the last rank's slice instead")
    return distributed.vocab_parallel_kernel(family, process_group, local_vocab, device)


def _kd_options(divergence, temperature, beta, skew, ignore_index, hard_label_weight,
                soft_label_weight, reduction, num_items_in_batch, labels):
    """Validate the keywords every logits-divergence loss shares; (divergence code, numbers)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got {divergence!r}")
    beta = _check_unit("beta", beta)
    skew = _check_unit("skew", skew)
    if not _is_number(temperature) or not (0.0 < float(temperature) < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    hard = _check_weight("hard_label_weight", hard_label_weight)
    soft = _check_weight("soft_label_weight", soft_label_weight)
    _check_reduction(reduction, num_items_in_batch)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2 ** 63 <= ignore_index < 2 ** 63:
        raise ValueError(f"ignore_index must fit in int64 (labels are int64), got {ignore_index}")
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
            inplace: bool = False, backend: Optional[str] = None,
            process_group=None) -> torch.Tensor:
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
    process_group: the logits are vocab-parallel over this torch.distributed group: each rank
    passes its slice ``[..., V_rank]`` of both (rank order = vocabulary order; slices may be
    uneven; labels are global ids). Every rank gets the loss of the whole vocabulary and the
    gradient of its slice. See :mod:`fastkd.distributed` for what is communicated.
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
    vocab = _check_vocab(vs, vt, vocab_size, "student_logits", "teacher_logits")
    code, opts = _kd_options(divergence, temperature, beta, skew, ignore_index,
                             hard_label_weight, soft_label_weight, reduction, num_items_in_batch,
                             labels)
    _check_softcap(softcap)
    if process_group is not None:
        name, total = _vocab_parallel("kd", process_group, backend, vocab_size, vocab,
                                      student_logits.device)
    else:
        name, total = _backend.choose("kd", student_logits.device, backend,
                                      student_logits.dtype, vocab), vocab
    if labels is not None:
        _check_labels(labels, student_logits.shape[:-1], student_logits.device, total,
                      ignore_index, check_range=hard_label_weight != 0.0)
    grad_on = torch.is_grad_enabled()
    need_gs = grad_on and student_logits.requires_grad
    need_gt = grad_on and teacher_logits.requires_grad
    n_rows = student_logits.numel() // max(vs, 1)
    denom = (_denominator(labels, n_rows, ignore_index, num_items_in_batch, student_logits.device)
             if reduction == "batchmean" else None)
    T, beta, skew, soft_w, hard_w = opts
    params = (code, T, beta, skew, int(ignore_index), soft_w, hard_w,
              _check_flag("scale_temperature", scale_temperature), float(softcap or 0.0))
    if _check_flag("inplace", inplace) and any(
            st == 0 and n > 1 for st, n in zip(student_logits.stride(), student_logits.shape)):
        raise ValueError("inplace=True writes the gradient over student_logits, but its elements "
                         "share memory (a stride-0 dim, e.g. from expand()); pass inplace=False")
    return _KDFunction.apply(student_logits, teacher_logits, labels, denom, "kd", name, vocab,
                             reduction, inplace, need_gs, need_gt, params)


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
    if k < 1 or (isinstance(vocab, int) and k > vocab):
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
                   validate: bool = True, backend: Optional[str] = None,
                   process_group=None) -> torch.Tensor:
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
    process_group: the student's logits are vocab-parallel (as in :func:`kd_loss`); teacher
    indices are global vocabulary ids, the same on every rank.
    Other keywords as in :func:`kd_loss`.
    """
    _check_logits("student_logits", student_logits)
    if tail not in ("renormalize", "bucket"):
        raise ValueError(f'tail must be "renormalize" or "bucket", got {tail!r}')
    code, (T, beta, skew, soft_w, hard_w) = _kd_options(
        divergence, temperature, beta, skew, ignore_index, hard_label_weight, soft_label_weight,
        reduction, num_items_in_batch, labels)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if vocab < 1:
        raise ValueError("student_logits has an empty vocabulary (V = 0): nothing to distill")
    _check_flag("validate", validate)
    for name, x in (("teacher_indices", teacher_indices), ("teacher_values", teacher_values)):
        if isinstance(x, torch.Tensor) and x.device != student_logits.device:
            raise ValueError(f"{name} must be on student_logits' device {student_logits.device}, "
                             f"got {x.device}")
    if process_group is not None:
        name, total = _vocab_parallel("sparse_kd", process_group, backend, None, vocab,
                                      student_logits.device)
    else:
        name, total = _backend.choose("sparse_kd", student_logits.device, backend,
                                      student_logits.dtype, vocab), vocab
    _check_sparse_teacher(teacher_indices, teacher_values, lead, total, tail, validate)
    if labels is not None:
        _check_labels(labels, lead, student_logits.device, total, ignore_index,
                      check_range=hard_w != 0.0)
    need_gs = torch.is_grad_enabled() and student_logits.requires_grad
    n_rows = student_logits.numel() // max(vocab, 1)
    denom = (_denominator(labels, n_rows, ignore_index, num_items_in_batch, student_logits.device)
             if reduction == "batchmean" else None)
    params = (code, T, beta, skew, 0 if tail == "renormalize" else 1, int(ignore_index), soft_w,
              hard_w, _check_flag("scale_temperature", scale_temperature))
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
        if x is not None and x.dtype != hidden.dtype:
            raise TypeError(f"{prefix}_{name} ({x.dtype}) must have {prefix}_hidden's dtype "
                            f"{hidden.dtype} (the lm_head matmul runs in one dtype)")


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
                         backend: Optional[str] = None, process_group=None,
                         fp32_grad_accumulation: bool = True) -> torch.Tensor:
    """:func:`kd_loss` of ``student_hidden @ student_weight.T + student_bias`` against the
    teacher's, without ever holding either model's N x V logits.

    Hidden states are ``[..., H]`` (student and teacher H may differ); weights are lm_head
    weights ``[V, H]``. Gradients flow to student_hidden, student_weight and student_bias; the
    teacher side is a constant. Tokens are processed ``chunk_size`` rows at a time (default:
    about 128 MiB of chunk logits on CPU, 256 MiB on GPU); rows whose label is ``ignore_index``
    cost no matmul. ``backend`` picks the kd kernel run on each chunk. Other keywords as in
    :func:`kd_loss`.

    fp32_grad_accumulation: the weight's (and bias's) gradient is summed over the chunks in
    float32 (default), then returned in the weight's dtype. ``False`` sums it in the weight's
    own dtype instead: no V x H float32 buffer (1 GiB at V=128256, H=2048), at the price of one
    rounding per chunk in bfloat16/float16. float32/float64 weights are unaffected.

    process_group: vocab-parallel lm_heads (each rank holds the same rows of the vocabulary of
    both weights, and biases; rank order = vocabulary order) with the hidden states replicated
    on every rank. The loss and the hidden states' gradient are the whole vocabulary's (the
    latter all-reduced here, so do not all-reduce it again), the weights' gradients their slice.
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
    vocab = _check_vocab(student_weight.shape[0], teacher_weight.shape[0], vocab_size,
                         "student_weight", "teacher_weight")
    code, (T, beta, skew, soft_w, hard_w) = _kd_options(
        divergence, temperature, beta, skew, ignore_index, hard_label_weight, soft_label_weight,
        reduction, num_items_in_batch, labels)
    _check_softcap(softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(fp32_grad_accumulation, bool):
        raise TypeError(f"fp32_grad_accumulation must be a bool, got {fp32_grad_accumulation!r}")
    if process_group is not None:
        name, total = _vocab_parallel("kd", process_group, backend, vocab_size, vocab, dev)
    else:
        name, total = _backend.choose("kd", dev, backend, student_hidden.dtype, vocab), vocab
    if labels is not None:
        _check_labels(labels, lead, dev, total, ignore_index, check_range=hard_w != 0.0)

    from .fused_linear import FusedLinearKDFunction, default_chunk_size

    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    n_rows = hs.shape[0]
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)
    rows = None
    if lab is not None:  # the one host sync: how many rows need matmul work
        rows = torch.nonzero(lab != ignore_index).squeeze(1)
        if rows.numel() == n_rows:  # nothing ignored: plain slices, no gathers
            rows = None
    denom = (_denominator(labels, n_rows, ignore_index, num_items_in_batch, dev)
             if reduction == "batchmean" else None)
    chunk = chunk_size or default_chunk_size(max(n_rows, 1), vocab, hs.dtype, ht.dtype, dev)
    grad_on = torch.is_grad_enabled()
    need = tuple(grad_on and x is not None and x.requires_grad
                 for x in (student_hidden, student_weight, student_bias))
    params = (code, T, beta, skew, int(ignore_index), soft_w, hard_w,
              _check_flag("scale_temperature", scale_temperature),
              float(softcap or 0.0))
    out = FusedLinearKDFunction.apply(
        hs, student_weight, student_bias, ht, teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), lab, rows, denom, name,
        reduction, vocab, chunk, params, need, process_group, fp32_grad_accumulation)
    return out.reshape(lead) if reduction == "none" else out


# --- relational
# RKD distance / angle and similarity-preserving: losses on the geometry of a batch of
# embeddings [N, ...] (flattened to [N, D]; student and teacher D may differ). The ops
# (fastkd/reference/relational.py is their contract) return the loss and the student's
# gradient in one call; backward only scales that gradient. The teacher is a constant.
RELATIONAL_FAMILIES = ("rkd_distance", "rkd_angle", "similarity_preserving")


def _check_embeddings(student, teacher, min_rows: int = 2) -> None:
    for name, x in (("student", student), ("teacher", teacher)):
        _check_float(name, x)
        if x.dim() < 1:
            raise ValueError(f"{name} must be a batch of embeddings [N, ...], got a 0-d tensor")
    if teacher.device != student.device:
        raise ValueError(f"teacher must be on student's device {student.device}, got {teacher.device}")
    n = student.shape[0]
    if teacher.shape[0] != n:
        raise ValueError(f"student and teacher must hold the same number N of embeddings (dim 0), "
                         f"got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if n < min_rows:
        raise ValueError(f"student must hold at least N=2 embeddings (relations need pairs), "
                         f"got shape {tuple(student.shape)}")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.numel() == 0:
            raise ValueError(f"{name} embeddings are empty (shape {tuple(x.shape)}); need D >= 1")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, Number) or not (0.0 < float(eps) < math.inf):
        raise ValueError(f"eps must be a positive finite number (it clamps squared distances), "
                         f"got {eps!r}")
    return float(eps)


def _check_huber_delta(huber_delta) -> float:
    if isinstance(huber_delta, bool) or not isinstance(huber_delta, Number) or not (
            0.0 <= float(huber_delta) < math.inf):
        raise ValueError(f"huber_delta must be a finite number >= 0 (0 is L1), got {huber_delta!r}")
    return float(huber_delta)


class _RelationalFunction(torch.autograd.Function):
    """One relational op in forward (loss + unscaled student gradient); backward scales it."""

    @staticmethod
    def forward(ctx, student, teacher, family, backend, need_gs, params):
        n = student.shape[0]
        s2 = student.reshape(n, -1).contiguous()
        t2 = teacher.reshape(n, -1).contiguous()
        wide = torch.float64 in (student.dtype, teacher.dtype)
        loss = torch.empty((), dtype=torch.float64 if wide else torch.float32,
                           device=student.device)
        gs = torch.empty(s2.shape, dtype=s2.dtype, device=s2.device) if need_gs else None
        _backend.op(family, backend)(s2, t2, loss, gs, *params)
        ctx.reduction = "sum"  # a scalar loss: backward multiplies by grad_output only
        ctx.used = False
        ctx.shape = student.shape
        ctx.save_for_backward(gs)
        return _fresh(loss, student.dtype)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out):
        (gs,) = ctx.saved_tensors
        (gs,) = _scale_stored_grads(ctx, grad_out, None, (gs,))
        return (None if gs is None else gs.view(ctx.shape),) + (None,) * 5


def _global_batch(student, teacher, process_group):
    """Validate one rank's embeddings and, with a process group, all-gather the global batch
    (fastkd.distributed.gather_rows: gradients flow back to each rank's own rows)."""
    _check_embeddings(student, teacher, min_rows=1 if process_group is not None else 2)
    if process_group is None:
        return student, teacher
    from . import distributed

    distributed.check_process_group(process_group)
    student = distributed.gather_rows(student, process_group)
    teacher = distributed.gather_rows(teacher.detach(), process_group)
    _check_embeddings(student, teacher)
    return student, teacher


def _relational(family: str, student, teacher, backend, params) -> torch.Tensor:
    name = _backend.choose(family, student.device, backend, student.dtype, student.shape[0])
    need_gs = torch.is_grad_enabled() and student.requires_grad
    return _RelationalFunction.apply(student, teacher.detach(), family, name, need_gs, params)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, *, eps: float = 1e-12,
                      huber_delta: float = 1.0, backend: Optional[str] = None,
                      process_group=None) -> torch.Tensor:
    """RKD distance loss (Park et al. 2019) between two batches of embeddings ``[N, ...]``.

    d_ij = sqrt(max(|x_i - x_j|^2, eps)) (0 on the diagonal), each side divided by the mean of
    its N(N-1) off-diagonal entries; the loss is the mean over all N^2 entries of smooth-L1
    (beta = ``huber_delta``) between the student's and the teacher's normalized distances.
    Duplicated rows sit at sqrt(eps) and pass no gradient to each other. Never holds an
    N x N matrix (cpp, triton); the teacher gets no gradient.
    process_group: each rank passes its part of the batch; the loss is the global batch's
    (every rank computes it on the all-gathered embeddings) and each rank gets the gradient of
    its own rows. The same keyword in rkd_angle_loss, rkd_loss, similarity_preserving_loss.
    """
    student, teacher = _global_batch(student, teacher, process_group)
    params = (_check_eps(eps), _check_huber_delta(huber_delta))
    return _relational("rkd_distance", student, teacher, backend, params)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, *, huber_delta: float = 1.0,
                   backend: Optional[str] = None, process_group=None) -> torch.Tensor:
    """RKD angle loss (Park et al. 2019) between two batches of embeddings ``[N, ...]``.

    a_ijk = e_ij . e_ik with e_ij the unit vector from x_i to x_j (0 when x_j = x_i); the loss
    is the mean over all N^3 triples of smooth-L1 (beta = ``huber_delta``) between the student's
    and the teacher's angles. Computed from Gram tiles: never an N x N x D or N^3 tensor
    (cpp, triton). The teacher gets no gradient.
    """
    student, teacher = _global_batch(student, teacher, process_group)
    return _relational("rkd_angle", student, teacher, backend, (_check_huber_delta(huber_delta),))


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, *, distance_weight: float = 1.0,
             angle_weight: float = 2.0, eps: float = 1e-12, huber_delta: float = 1.0,
             backend: Optional[str] = None, process_group=None) -> torch.Tensor:
    """``distance_weight * rkd_distance_loss + angle_weight * rkd_angle_loss`` (Park et al.'s
    defaults 1 and 2); a term whose weight is 0 is not computed."""
    student, teacher = _global_batch(student, teacher, process_group)
    dw = _check_weight("distance_weight", distance_weight)
    aw = _check_weight("angle_weight", angle_weight)
    eps, delta = _check_eps(eps), _check_huber_delta(huber_delta)
    terms = []
    if dw != 0.0:
        terms.append(dw * _relational("rkd_distance", student, teacher, backend, (eps, delta)))
    if aw != 0.0:
        terms.append(aw * _relational("rkd_angle", student, teacher, backend, (delta,)))
    if not terms:
        return torch.zeros((), dtype=student.dtype, device=student.device)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor, *,
                               backend: Optional[str] = None,
                               process_group=None) -> torch.Tensor:
    """Similarity-preserving loss (Tung and Mori 2019) between two batches ``[N, ...]``.

    G = X X^T with each row L2-normalized (F.normalize(G)); the loss is the sum of squared
    differences between the student's and the teacher's normalized Gram matrices over N^2.
    The teacher gets no gradient.
    ``FASTKD_SP_FORM=features`` (or ``auto``: where it needs fewer multiply-adds) makes the cpp
    backend compute it from D x D feature Grams, O(N D^2) instead of O(N^2 D), with larger
    fp32 rounding errors (README, "Similarity-preserving from feature Grams").
    """
    form = _backend.env("FASTKD_SP_FORM")
    if form not in ("", "pairs", "features", "auto"):
        raise ValueError(f"FASTKD_SP_FORM must be pairs, features or auto, got {form!r}")
    student, teacher = _global_batch(student, teacher, process_group)
    return _relational("similarity_preserving", student, teacher, backend, ())


def feature_hint_loss(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FitNets hint loss: mean squared error between the projected student and the teacher.

    ``weight`` [Ct, Cs] (and ``bias`` [Ct]) project the student's features: a 1x1 convolution
    over the channels of ``[N, Cs, H, W]`` inputs, a Linear over the last dim of any other
    shape. The teacher (a constant) must have the projected shape.

    Plain torch ops, no fused kernel: the projection is a matmul (N Cs Ct FLOPs, three times
    that with backward) and the MSE one elementwise pass over N Ct values, so fusing them
    would save a few percent of the time on CPU.
    """
    for name, x in (("student", student), ("teacher", teacher), ("weight", weight)):
        _check_float(name, x)
    if student.dim() < 2:
        raise ValueError(f"student must be [N, ..., C] or [N, C, H, W], got {tuple(student.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [teacher_dim, student_dim], got {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != weight.dtype:
            raise TypeError(f"bias must be a tensor of weight's dtype {weight.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    conv = student.dim() == 4
    channels = student.shape[1] if conv else student.shape[-1]
    if channels != weight.shape[1]:
        where = "dim 1 (channels of [N, C, H, W])" if conv else "last dim"
        raise ValueError(f"student's {where} is {channels}, but weight expects student_dim="
                         f"{weight.shape[1]}")
    if weight.dtype != student.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match student's {student.dtype} "
                        f"(move the module with .to(dtype))")
    if conv:
        proj = torch.nn.functional.conv2d(student, weight[:, :, None, None], bias)
    else:
        proj = torch.nn.functional.linear(student, weight, bias)
    if teacher.shape != proj.shape:
        raise ValueError(f"teacher must have the projected student's shape {tuple(proj.shape)}, "
                         f"got {tuple(teacher.shape)}")
    # in float32 at least, and in the wider dtype of the two (a float32 teacher is not rounded
    # to a bfloat16 student's precision), returned in the student's dtype like every fastkd loss
    wide = torch.promote_types(torch.promote_types(proj.dtype, teacher.dtype), torch.float32)
    return torch.nn.functional.mse_loss(proj.to(wide), teacher.detach().to(wide)).to(proj.dtype)


# --- attention
# Attention transfer (CNN feature maps), attention maps (TinyBERT / MiniLM) and attention
# relations (MiniLMv2). fastkd/reference/attention.py is the contract of their ops and pins the
# semantics. The teacher is a constant in all three (detached, as in the papers' code).
from .reference.attention import MAP_KINDS  # noqa: E402

ATTENTION_FAMILIES = ("attention_transfer", "attention_map", "attention_relation")
AT_REDUCTIONS = ("mean", "sum", "none")
MAP_REDUCTIONS = ("batchmean", "sum", "none")
_QKV = ("q", "k", "v")


def _check_attention_mask(mask, B: int, L: int, device):
    """A bool [B, L] tensor (True = token) from a bool or integer mask, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be a bool or integer tensor [B, L] with 1 for tokens "
                        f"and 0 for padding, got {mask.dtype} (an additive float mask would be "
                        f"read backwards)")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"attention_mask must be [B, L] = [{B}, {L}] (1 = token, 0 = padding), "
                         f"got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"attention_mask must be on {device}, got {mask.device}")
    return (mask != 0).contiguous()


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


class _AttentionTransferFunction(torch.autograd.Function):
    """attention_transfer_fwd once (per-sample loss + unscaled gradient); backward scales it."""

    @staticmethod
    def forward(ctx, student, teacher, backend, reduction, need_gs, p):
        B, Cs = student.shape[:2]
        s3 = _last_contiguous(student.reshape(B, Cs, -1))
        t3 = _last_contiguous(teacher.reshape(B, teacher.shape[1], -1))
        N = s3.shape[-1]
        wide = torch.float64 in (student.dtype, teacher.dtype)
        loss = torch.empty((B,), dtype=torch.float64 if wide else torch.float32,
                           device=student.device)
        gs = torch.empty(s3.shape, dtype=student.dtype, device=student.device) if need_gs else None
        _backend.op("attention_transfer", backend)(s3, t3, loss, gs, p)
        ctx.reduction = "sum"  # backward gets a ready, broadcastable scale
        ctx.used = False
        ctx.at = (reduction, B, N, student.shape)
        ctx.save_for_backward(gs)
        if reduction == "none":
            out = loss / N
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() / (B * N)
        return _fresh(out, student.dtype)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out):
        (gs,) = ctx.saved_tensors
        reduction, B, N, shape = ctx.at
        if reduction == "none":
            scale = grad_out.reshape(B, 1, 1) / N
        elif reduction == "sum":
            scale = grad_out
        else:
            scale = grad_out / (B * N)
        (gs,) = _scale_stored_grads(ctx, scale, None, (gs,))
        return (None if gs is None else gs.reshape(shape),) + (None,) * 5


def _check_feature_pair(i, s, t) -> None:
    sfx = "" if i is None else f"[{i}]"
    _check_float(f"student_features{sfx}", s)
    _check_float(f"teacher_features{sfx}", t)
    for name, x in ((f"student_features{sfx}", s), (f"teacher_features{sfx}", t)):
        if x.dim() < 3:
            raise ValueError(f"{name} must be feature maps [B, C, H, W] (or [B, C, ...]), got "
                             f"shape {tuple(x.shape)}")
    if t.device != s.device:
        raise ValueError(f"teacher_features{sfx} must be on student_features{sfx}' device "
                         f"{s.device}, got {t.device}")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"student_features{sfx} and teacher_features{sfx} must share the batch "
                         f"size, got {tuple(s.shape)} and {tuple(t.shape)}")
    if s.shape[2:] != t.shape[2:]:
        raise ValueError(f"student_features{sfx} and teacher_features{sfx} must have the same "
                         f"spatial size (channels may differ), got {tuple(s.shape)} and "
                         f"{tuple(t.shape)}; resize one of them (e.g. F.interpolate) first")
    if s.numel() == 0 or t.numel() == 0:
        raise ValueError(f"student_features{sfx} and teacher_features{sfx} must be non-empty, got "
                         f"{tuple(s.shape)} and {tuple(t.shape)}")


def attention_transfer_loss(student_features, teacher_features, *, p: float = 2,
                            reduction: str = "mean", backend: Optional[str] = None) -> torch.Tensor:
    """Attention transfer (Zagoruyko and Komodakis 2017) between feature maps ``[B, C, H, W]``.

    a(F) = F.normalize(mean over channels of |F|^p, over the H*W positions of each sample);
    loss = mean over B*H*W of (a(student) - a(teacher))^2, as in the authors' ``at_loss``.
    Channels may differ between student and teacher; batch and spatial sizes must match.
    Lists (or tuples) of feature pairs give the sum of the pairs' losses.

    reduction: ``"mean"`` (over B*H*W), ``"sum"`` (over B*H*W) or ``"none"`` (per sample, the
    mean over H*W: shape [B]). p: a number >= 1. The teacher is a constant.
    """
    if isinstance(student_features, (list, tuple)) or isinstance(teacher_features, (list, tuple)):
        if not (isinstance(student_features, (list, tuple)) and
                isinstance(teacher_features, (list, tuple))):
            raise TypeError("student_features and teacher_features must both be tensors or both "
                            "be lists of tensors")
        if len(student_features) != len(teacher_features) or not student_features:
            raise ValueError(f"student_features and teacher_features must be non-empty lists of "
                             f"the same length, got {len(student_features)} and "
                             f"{len(teacher_features)}")
        pairs = list(enumerate(zip(student_features, teacher_features)))
    else:
        pairs = [(None, (student_features, teacher_features))]
    if isinstance(p, bool) or not isinstance(p, Number) or not (1.0 <= float(p) < math.inf):
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")
    if reduction not in AT_REDUCTIONS:
        raise ValueError(f"reduction must be one of {AT_REDUCTIONS}, got {reduction!r}")
    for i, (s, t) in pairs:
        _check_feature_pair(i, s, t)
    B = pairs[0][1][0].shape[0]
    if any(s.shape[0] != B for _, (s, _) in pairs) and reduction == "none":
        raise ValueError('reduction="none" needs the same batch size in every feature pair')
    grad_on = torch.is_grad_enabled()
    total = None
    for _, (s, t) in pairs:
        name = _backend.choose("attention_transfer", s.device, backend)
        out = _AttentionTransferFunction.apply(s, t.detach(), name, reduction,
                                               grad_on and s.requires_grad, float(p))
        total = out if total is None else total + out
    return total


# attention maps
class _AttentionMapFunction(torch.autograd.Function):
    """attention_map_fwd once (row losses + unscaled gradient); backward scales it."""

    @staticmethod
    def forward(ctx, student, teacher, mask, denom, backend, reduction, need_gs, params):
        s4, t4 = _last_contiguous(student), _last_contiguous(teacher)
        B, H, L, _ = s4.shape
        wide = torch.float64 in (student.dtype, teacher.dtype)
        loss = torch.empty((B, H, L), dtype=torch.float64 if wide else torch.float32,
                           device=student.device)
        gs = torch.empty(s4.shape, dtype=student.dtype, device=student.device) if need_gs else None
        _backend.op("attention_map", backend)(s4, t4, mask, loss, gs, *params)
        ctx.reduction = reduction
        ctx.used = False
        ctx.save_for_backward(gs, denom)
        return _reduce(loss, reduction, denom, (B, H, L), student.dtype)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out):
        gs, denom = ctx.saved_tensors
        (gs,) = _scale_stored_grads(ctx, grad_out, denom, (gs,))
        return (gs,) + (None,) * 7


def _check_head_map(head_map, Hs: int, Ht: int):
    """head_map as a list of tuples of teacher heads (one tuple per student head)."""
    if head_map is None:
        if Hs != Ht:
            raise ValueError(f"student_attn has {Hs} heads and teacher_attn {Ht}; pass head_map "
                             f"(for each student head a teacher head, or a list of teacher heads "
                             f"to average)")
        return None
    if isinstance(head_map, (str, bytes)) or not hasattr(head_map, "__len__"):
        raise TypeError(f"head_map must be a list with one entry per student head, got "
                        f"{type(head_map).__name__}")
    if len(head_map) != Hs:
        raise ValueError(f"head_map must have one entry per student head ({Hs}), got {len(head_map)}")
    from numbers import Integral

    def index(h):
        return not isinstance(h, bool) and isinstance(h, Integral) and 0 <= h < Ht

    groups = []
    for e in head_map:
        g = (e,) if isinstance(e, Integral) else tuple(e) if isinstance(e, (list, tuple)) else None
        if not g or not all(index(h) for h in g):
            raise ValueError(f"head_map entries must be teacher head indices in [0, {Ht}) or "
                             f"non-empty lists of them, got {e!r}")
        groups.append(tuple(int(h) for h in g))
    return groups


def _map_teacher_heads(teacher, groups, mask, kind, scores):
    """The teacher map per student head: one head, or the mean of a group's heads.

    kl averages attention probabilities (a group's softmaxes, for scores), so the result is
    probabilities; mse averages the maps as given. Returns (teacher, teacher holds scores).
    """
    if groups is None:
        return teacher, scores
    if all(len(g) == 1 for g in groups):
        idx = torch.tensor([g[0] for g in groups], device=teacher.device)
        return teacher.index_select(1, idx), scores
    acc = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    t = teacher.to(acc)
    if kind == "kl" and scores:
        if mask is not None:
            t = t.masked_fill(~mask[:, None, None, :], float("-inf"))
        t = torch.softmax(t, dim=-1).nan_to_num_(0.0)  # fully padded rows: ignored anyway
        scores = False
    M = torch.zeros((len(groups), teacher.shape[1]), dtype=acc, device=teacher.device)
    for i, g in enumerate(groups):
        for h in g:
            M[i, h] += 1.0 / len(g)
    return torch.einsum("gh,bhij->bgij", M, t), scores


def attention_map_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor, *,
                       kind: str = "kl", inputs: str = "probs",
                       attention_mask: Optional[torch.Tensor] = None, head_map=None,
                       reduction: str = "batchmean",
                       backend: Optional[str] = None) -> torch.Tensor:
    """Distill transformer attention maps ``[B, H, L, L]`` (TinyBERT, MiniLM).

    kind="kl": per query row, KL(teacher row || student row) summed over the keys.
    kind="mse": squared error per entry (TinyBERT). inputs="probs": the maps are attention
    probabilities; inputs="scores": pre-softmax scores (kl applies the softmax over the valid keys;
    mse compares scores as TinyBERT does, with entries <= -100, i.e. additive-mask entries, as 0).
    attention_mask [B, L] (1 = token) removes padded keys and padded query rows.
    head_map: for each student head a teacher head index, or a list of teacher heads whose maps
    are averaged (kl averages their probabilities); needed when the head counts differ.

    reduction: "batchmean" = kl: sum over valid rows / (H * valid query rows), i.e. the mean per
    valid query row over batch x heads; mse: sum / (H * valid entries), the mean squared error
    over valid (query, key) entries. "sum", or "none" (per query row [B, H, L]: the row's KL or
    its sum of squared errors, 0 on padded rows). The teacher is a constant.
    """
    _check_float("student_attn", student_attn)
    _check_float("teacher_attn", teacher_attn)
    for name, x in (("student_attn", student_attn), ("teacher_attn", teacher_attn)):
        if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"{name} must be attention maps [B, H, L, L], got {tuple(x.shape)}")
    if teacher_attn.device != student_attn.device:
        raise ValueError(f"teacher_attn must be on student_attn's device {student_attn.device}, "
                         f"got {teacher_attn.device}")
    B, Hs, L, _ = student_attn.shape
    if teacher_attn.shape[0] != B or teacher_attn.shape[2] != L:
        raise ValueError(f"student_attn and teacher_attn must share batch size and length L, got "
                         f"{tuple(student_attn.shape)} and {tuple(teacher_attn.shape)}")
    if kind not in MAP_KINDS:
        raise ValueError(f"kind must be one of {tuple(MAP_KINDS)}, got {kind!r}")
    if inputs not in ("probs", "scores"):
        raise ValueError(f'inputs must be "probs" or "scores", got {inputs!r}')
    if reduction == "mean":
        raise ValueError('reduction="mean" is ambiguous here; use "batchmean" (kl: mean per '
                         'valid query row over batch x heads; mse: mean over valid entries), '
                         '"sum" or "none"')
    if reduction not in MAP_REDUCTIONS:
        raise ValueError(f"reduction must be one of {MAP_REDUCTIONS}, got {reduction!r}")
    groups = _check_head_map(head_map, Hs, teacher_attn.shape[1])
    mask = _check_attention_mask(attention_mask, B, L, student_attn.device)
    scores = inputs == "scores"
    teacher, t_scores = _map_teacher_heads(teacher_attn.detach(), groups, mask, kind, scores)
    name = _backend.choose("attention_map", student_attn.device, backend, student_attn.dtype, L)
    need_gs = torch.is_grad_enabled() and student_attn.requires_grad
    denom = None
    if reduction == "batchmean":
        dev = student_attn.device
        if mask is None:
            count = torch.tensor(float(Hs * B * L * (L if kind == "mse" else 1)), device=dev)
        else:
            n = mask.sum(1).to(torch.float32)
            count = Hs * ((n * n).sum() if kind == "mse" else n.sum())
        denom = count.clamp(min=1.0)
    params = (MAP_KINDS[kind], scores, t_scores)
    return _AttentionMapFunction.apply(student_attn, teacher, mask, denom, name, reduction,
                                       need_gs, params)


# attention relations
class _AttentionRelationFunction(torch.autograd.Function):
    """One relation (m, n): the forward op saves row log-sum-exps, the backward op recomputes.

    ``xs_n`` / ``xt_n`` is None when it is the same tensor as ``xs_m`` / ``xt_m`` (q-q relations):
    torch.compile cannot trace a Function that gets one tensor twice.
    """

    @staticmethod
    def forward(ctx, xs_m, xs_n, xt_m, xt_n, mask, weight, backend, heads, scale_s, scale_t):
        ctx.same = xs_n is None
        xs_m = _last_contiguous(xs_m)
        xs_n = xs_m if xs_n is None else _last_contiguous(xs_n)
        xt_m = _last_contiguous(xt_m)
        xt_n = xt_m if xt_n is None else _last_contiguous(xt_n)
        B, L, _ = xs_m.shape
        acc = weight.dtype
        loss = torch.empty((B, heads, L), dtype=acc, device=xs_m.device)
        lse_s = torch.empty_like(loss)
        lse_t = torch.empty_like(loss)
        _backend.op("attention_relation", backend)(xs_m, xs_n, xt_m, xt_n, mask, heads, scale_s,
                                                   scale_t, loss, lse_s, lse_t)
        ctx.cfg = (backend, heads, scale_s, scale_t)
        ctx.save_for_backward(xs_m, xs_n, xt_m, xt_n, mask, weight, lse_s, lse_t)
        return _fresh((loss.sum((1, 2)) * weight).sum(), xs_m.dtype)

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out):
        xs_m, xs_n, xt_m, xt_n, mask, weight, lse_s, lse_t = ctx.saved_tensors
        backend, heads, scale_s, scale_t = ctx.cfg
        gm = torch.empty(xs_m.shape, dtype=xs_m.dtype, device=xs_m.device) \
            if ctx.needs_input_grad[0] else None
        gn = torch.empty(xs_n.shape, dtype=xs_n.dtype, device=xs_n.device) \
            if ctx.needs_input_grad[1] or (ctx.same and gm is not None) else None
        if gm is not None or gn is not None:
            w = (weight * grad_out.to(weight.dtype)).contiguous()
            _relation_bwd_op(backend)(xs_m, xs_n, xt_m, xt_n, mask, heads, scale_s, scale_t,
                                      lse_s, lse_t, w, gm, gn)
        if ctx.same:
            return (None if gm is None else gm.add_(gn), None) + (None,) * 8
        return (gm, gn) + (None,) * 8


def _relation_bwd_op(backend: str):
    _backend.op("attention_relation", backend)  # imports the triton module / loads native ops
    if backend == "torch":
        from .reference import attention

        return attention.attention_relation_bwd
    if backend == "triton":
        return torch.ops.fastkd_triton.attention_relation_bwd
    return torch.ops.fastkd.attention_relation_bwd


def _states(name: str, states, needed) -> dict:
    if isinstance(states, dict):
        d = states
    elif isinstance(states, (list, tuple)):
        if len(states) != 3:
            raise ValueError(f"{name} as a tuple must be (q, k, v), got {len(states)} entries")
        d = dict(zip(_QKV, states))
    else:
        raise TypeError(f"{name} must be a dict with keys 'q', 'k', 'v' or a (q, k, v) tuple, got "
                        f"{type(states).__name__}")
    out = {}
    for key in needed:
        if key not in d:
            raise ValueError(f"{name} has no {key!r} entry, which relations need")
        x = d[key]
        _check_float(f"{name}[{key!r}]", x)
        if x.dim() != 3:
            raise ValueError(f"{name}[{key!r}] must be [B, L, D], got {tuple(x.shape)}")
        out[key] = x
    return out


def attention_relation_loss(student_states, teacher_states, *, num_relation_heads: int,
                            relations=(("q", "q"), ("k", "k"), ("v", "v")),
                            attention_mask: Optional[torch.Tensor] = None,
                            backend: Optional[str] = None) -> torch.Tensor:
    """Self-attention relation distillation (MiniLMv2), never materializing L x L (cpp, triton).

    ``*_states``: dicts {"q", "k", "v"} (or (q, k, v) tuples) of one layer's projections
    ``[B, L, D]``; student and teacher D may differ. Each is split into ``num_relation_heads``
    heads of D/A channels; for a relation (m, n), R = softmax(X_m X_n^T / sqrt(D/A)) over the
    valid keys, and the relation loss is KL(R_teacher || R_student) summed over keys, averaged
    over relation heads and valid query rows of each sample, then over the samples that have a
    token (a fully padded sequence counts for nothing), then over ``relations``.
    attention_mask [B, L] (1 = token) removes padded keys from the softmax and padded query
    rows from the average. The teacher is a constant.
    """
    if isinstance(relations, (str, bytes)) or not hasattr(relations, "__iter__"):
        raise TypeError(f"relations must be a sequence of (m, n) pairs of 'q', 'k', 'v', got "
                        f"{relations!r}")
    rels = [tuple(r) if isinstance(r, (list, tuple)) else r for r in relations]
    if not rels or any(not isinstance(r, tuple) or len(r) != 2 or any(x not in _QKV for x in r)
                       for r in rels):
        raise ValueError(f"relations must be a non-empty sequence of (m, n) pairs of 'q', 'k', "
                         f"'v', got {relations!r}")
    if isinstance(num_relation_heads, bool) or not isinstance(num_relation_heads, int) or \
            num_relation_heads < 1:
        raise ValueError(f"num_relation_heads must be a positive int, got {num_relation_heads!r}")
    A = num_relation_heads
    needed = sorted({x for r in rels for x in r}, key=_QKV.index)
    st = _states("student_states", student_states, needed)
    tt = _states("teacher_states", teacher_states, needed)
    first = st[needed[0]]
    B, L, dev = first.shape[0], first.shape[1], first.device
    for name, d in (("student_states", st), ("teacher_states", tt)):
        for key, x in d.items():
            if x.shape[:2] != (B, L):
                raise ValueError(f"{name}[{key!r}] must be [B, L, D] with B={B}, L={L}, got "
                                 f"{tuple(x.shape)}")
            if x.device != dev:
                raise ValueError(f"{name}[{key!r}] must be on {dev}, got {x.device}")
            if x.shape[2] < 1 or x.shape[2] % A:
                raise ValueError(f"num_relation_heads={A} must divide the width of {name}[{key!r}] "
                                 f"({x.shape[2]}), which must be at least 1")
        for m, n in rels:
            if d[m].shape[2] != d[n].shape[2]:
                raise ValueError(f"{name}[{m!r}] and {name}[{n!r}] must have the same width to "
                                 f"relate, got {d[m].shape[2]} and {d[n].shape[2]}")
            if d[m].dtype != d[n].dtype:
                raise TypeError(f"{name}[{m!r}] and {name}[{n!r}] must share a dtype, got "
                                f"{d[m].dtype} and {d[n].dtype}")
    mask = _check_attention_mask(attention_mask, B, L, dev)
    # each relation runs in float64 when one of its four states is float64, else float32
    acc = torch.float64
    # per-sample weight of a row KL: 1 / (A * valid rows * samples with a token * relations)
    if mask is None:
        weight = torch.full((B,), 1.0 / (A * max(L, 1) * max(B, 1) * len(rels)), dtype=acc,
                            device=dev)
    else:
        n = mask.sum(1).to(acc)
        nonempty = n > 0
        samples = nonempty.sum().clamp(min=1).to(acc)
        weight = torch.where(nonempty, 1.0 / (A * n.clamp(min=1.0) * samples * len(rels)),
                             torch.zeros((), dtype=acc, device=dev))
    name = _backend.choose("attention_relation", dev, backend)
    total = None
    for m, n in rels:
        xs_m, xs_n = st[m], st[n]
        ds, dt = xs_m.shape[2] // A, tt[m].shape[2] // A
        wide = torch.float64 in (xs_m.dtype, tt[m].dtype)  # (m, n) share a dtype per side
        out = _AttentionRelationFunction.apply(
            xs_m, None if xs_n is xs_m else xs_n, tt[m].detach(),
            None if tt[n] is tt[m] else tt[n].detach(), mask,
            weight if wide else weight.float(), name, A, 1.0 / math.sqrt(ds), 1.0 / math.sqrt(dt))
        total = out if total is None else total + out
    return total
