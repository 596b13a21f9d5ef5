"""kd_loss end to end, every backend against an independent float64 oracle.

The oracle below is written from DESIGN.md's formulas with plain torch ops in float64 and
autograd for gradients; it shares no code with fastkd (not even the reference backend).
"""
import itertools
import math

import pytest
import torch

import fastkd
from conftest import HAS_CUDA, skip_unless_available

DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
BACKENDS = ["torch", "cpp", "triton", "cuda"]  # cuda runs (and triton on CUDA) only with a GPU
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 1.2e-7, torch.bfloat16: 7.8e-3, torch.float16: 9.8e-4, torch.float64: 2.2e-16}


# ----------------------------------------------------------------------------- oracle
def _kl(lx, ly):
    """sum exp(lx) (lx - ly) with 0 log 0 = 0 (double where keeps autograd NaN-free)."""
    x = lx.exp()
    pos = x > 0
    d = torch.where(pos, lx, torch.zeros_like(lx)) - torch.where(pos, ly, torch.zeros_like(ly))
    return torch.where(pos, x * d, torch.zeros_like(x)).sum(-1)


def _log_mix(w, lx, ly):
    """log(w exp(lx) + (1-w) exp(ly)), in log space so that tiny probabilities stay exact."""
    return torch.logaddexp(lx + math.log(w) if w > 0 else lx - math.inf,
                           ly + math.log(1 - w) if w < 1 else ly - math.inf)


def oracle_divergence(lt, ls, divergence, beta, skew):
    """D(p, q) over the last dim from log-probabilities lt = log p, ls = log q."""
    p, q = lt.exp(), ls.exp()
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _kl(lt, ls)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _kl(ls, lt)
    if divergence == "jsd":
        lm = _log_mix(beta, lt, ls)
        return beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
    if divergence == "skew_forward_kl":
        return _kl(lt, _log_mix(skew, lt, ls))
    if divergence == "skew_reverse_kl":
        return _kl(ls, _log_mix(1 - skew, lt, ls))
    return 0.5 * (p - q).abs().sum(-1)


def oracle(s, t, labels=None, divergence="forward_kl", temperature=1.0, beta=0.5, skew=0.1,
           ignore_index=-100, hard_label_weight=0.0, soft_label_weight=1.0,
           scale_temperature=True, softcap=None, vocab_size=None, reduction="batchmean",
           num_items_in_batch=None):
    """Loss from DESIGN.md 'Semantics' in float64; s and t are float64 tensors."""
    if vocab_size is not None:
        s, t = s[..., :vocab_size], t[..., :vocab_size]
    if labels is not None:  # ignored rows may hold anything: feed the math zeros instead
        keep = (labels != ignore_index).unsqueeze(-1)
        s, t = torch.where(keep, s, torch.zeros_like(s)), torch.where(keep, t, torch.zeros_like(t))
    cap = (lambda z: softcap * torch.tanh(z / softcap)) if softcap else (lambda z: z)
    T = temperature
    ls = torch.log_softmax(cap(s) / T, -1)
    lt = torch.log_softmax(cap(t) / T, -1)
    D = oracle_divergence(lt, ls, divergence, beta, skew)
    row = soft_label_weight * D * (T * T if scale_temperature else 1.0)
    return oracle_finish(row, cap(s), labels, ignore_index, hard_label_weight, reduction,
                         num_items_in_batch)


def oracle_finish(row, logits, labels, ignore_index, hard_label_weight, reduction,
                  num_items_in_batch):
    """Add the hard-label CE (logits at T=1), mask ignored rows, reduce."""
    if labels is not None:
        valid = labels != ignore_index
        lab = torch.where(valid, labels, torch.zeros_like(labels))
        if hard_label_weight:
            ce = -torch.log_softmax(logits, -1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
            row = row + hard_label_weight * ce
        row = torch.where(valid, row, torch.zeros_like(row))
        count = valid.sum().clamp(min=1)
    else:
        count = max(row.numel(), 1)
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / (num_items_in_batch if num_items_in_batch is not None else count)


# ----------------------------------------------------------------------------- helpers
def make_inputs(shape, dtype, device, label_mode="partial", scale=4.0, seed=0,
                teacher_dtype=None):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * scale).to(dtype).to(device)
    t = (torch.randn(shape, generator=g) * scale).to(teacher_dtype or dtype).to(device)
    labels = None
    if label_mode != "none":
        labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
        if label_mode == "partial":
            labels[torch.rand(shape[:-1], generator=g) < 0.3] = -100
        elif label_mode == "all_ignored":
            labels[...] = -100
        labels = labels.to(device)
    return s, t, labels


def _forward_backward(s, t, labels, backend, teacher_grad, gout, **kw):
    s1 = s.detach().clone().requires_grad_()
    t1 = t.detach().clone().requires_grad_(teacher_grad)
    out = fastkd.kd_loss(s1, t1, labels, backend=backend, **kw)
    (out.double() * gout).sum().backward()
    return out, s1.grad, (t1.grad if teacher_grad else None)


def run_both(s, t, labels, backend, teacher_grad=False, seed=1, **kw):
    """(fastkd loss, oracle loss, fastkd grads, oracle grads) with a random grad_output.

    The torch backend's result in the same dtype rides along on each fastkd tensor
    (``_baseline``): assert_close allows a kernel twice the error of that baseline
    (flash-attention's rule) on top of its fixed few-ulp tolerance.
    """
    s2 = s.detach().double().requires_grad_()
    t2 = t.detach().double().requires_grad_(teacher_grad)
    ref = oracle(s2, t2, labels, **kw)
    g = torch.Generator().manual_seed(seed)
    gout = (torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5).to(s.device)
    (ref * gout).sum().backward()
    out, gs, gt = _forward_backward(s, t, labels, backend, teacher_grad, gout, **kw)
    if backend != "torch":
        base = _forward_backward(s, t, labels, "torch", teacher_grad, gout, **kw)
        for x, b in zip((out, gs, gt), base):
            if x is not None:
                x._baseline = b
    return out, ref, (gs, gt), (s2.grad, t2.grad if teacher_grad else None)


def _max_err(a, e):
    return (a.double().cpu() - e.double().cpu()).abs().max().item() if e.numel() else 0.0


def assert_close(actual, expected, dtype, what, factor=None):
    """Error within a few storage roundings of dtype relative to the largest magnitude, or
    within twice the torch backend's own error in the same dtype when that rides along.

    float32 results carry the rounding of intermediates (logits / T, log-sum-exps of
    magnitude ~|z|/T, sums over V) that are far larger than the outputs themselves, so the
    float32 floor is 64 ulps of the largest output (~8e-6 relative); a wrong formula is off by
    O(1). bf16/fp16 are dominated by the final rounding of outputs: 4 ulps.
    """
    if factor is None:
        factor = 64.0 if dtype == torch.float32 else 4.0
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.equal(torch.isfinite(a), torch.isfinite(e)), f"{what}: finiteness differs"
    fin = torch.isfinite(e)
    a, e = a[fin], e[fin]
    mag = e.abs().max().item() if e.numel() else 0.0
    tol = factor * EPS[dtype] * max(mag, 1e-3) + 1e-6
    base = getattr(actual, "_baseline", None)
    if base is not None:
        tol = max(tol, 2.0 * _max_err(base.double().cpu()[fin], e))
    err = _max_err(a, e)
    assert err <= tol, f"{what}: max error {err:.3e} > tol {tol:.3e} (max |expected| {mag:.3e})"


# ----------------------------------------------------------------------------- the grid
GRID = list(itertools.product(
    ["batchmean", "sum", "none"], ["none", "partial", "all_ignored"], [0.0, 0.4],
    [None, 20.0], DTYPES, DIVS))


def _grid_params():
    out = []
    for b in BACKENDS:
        for i, (red, lab, hw, cap, dt, div) in enumerate(GRID):
            if lab == "none" and hw:
                continue  # hard labels need labels (an error, tested below)
            # The triton interpreter is ~100x slower than a GPU: on CPU it runs a covering
            # stride of the grid (every divergence meets every value of every axis); on a
            # GPU it runs all of it.
            if b == "triton" and not HAS_CUDA and i % 7:
                continue
            out.append(pytest.param(b, red, lab, hw, cap, dt, div,
                                    id=f"{b}-{red}-{lab}-hw{hw}-cap{cap}-{str(dt)[6:]}-{div}"))
    return out


@pytest.mark.parametrize("backend,reduction,label_mode,hard,softcap,dtype,divergence",
                         _grid_params())
def test_matches_oracle(backend, reduction, label_mode, hard, softcap, dtype, divergence):
    device = skip_unless_available(backend)
    shape = (3, 7, 401) if (reduction, hard) == ("none", 0.4) else (41, 1271)
    s, t, labels = make_inputs(shape, dtype, device, label_mode)
    kw = dict(divergence=divergence, temperature=2.0, beta=0.3, skew=0.2, reduction=reduction,
              hard_label_weight=hard, soft_label_weight=0.8, softcap=softcap)
    out, ref, (gs, _), (rgs, _) = run_both(s, t, labels, backend, **kw)
    assert_close(out, ref, dtype, "loss")
    assert_close(gs, rgs, dtype, "grad student")
    if label_mode == "all_ignored":
        assert (gs == 0).all() and (out == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_teacher_gradient(backend, divergence, softcap):
    """Self-distillation / mutual learning: the teacher gets a gradient when it requires one."""
    device = skip_unless_available(backend)
    s, t, labels = make_inputs((5, 3, 257), torch.float32, device, "partial", seed=3)
    kw = dict(divergence=divergence, temperature=1.5, beta=0.7, skew=0.3, softcap=softcap,
              hard_label_weight=0.5)
    out, ref, (gs, gt), (rgs, rgt) = run_both(s, t, labels, backend, teacher_grad=True, **kw)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(gs, rgs, torch.float32, "grad student")
    assert_close(gt, rgt, torch.float32, "grad teacher")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_teacher_gradient_by_default(backend):
    device = skip_unless_available(backend)
    s, t, _ = make_inputs((4, 33), torch.float32, device)
    s.requires_grad_()
    fastkd.kd_loss(s, t, backend=backend).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_mixed_dtypes(backend, divergence):
    device = skip_unless_available(backend)
    s, t, labels = make_inputs((9, 300), torch.bfloat16, device, teacher_dtype=torch.float32)
    out, ref, (gs, _), (rgs, _) = run_both(s, t, labels, backend, divergence=divergence,
                                           temperature=3.0)
    assert_close(out, ref, torch.bfloat16, "loss")
    assert_close(gs, rgs, torch.bfloat16, "grad student")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
def test_strided_inputs(backend, divergence):
    """Time-shifted [B, T, V] logits and row-strided 2-D logits are read in place."""
    device = skip_unless_available(backend)
    s, t, labels = make_inputs((2, 6, 129), torch.float32, device, seed=5)
    s_sh, t_sh, l_sh = s[:, :-1], t[:, 1:], labels[:, 1:]
    assert not s_sh.is_contiguous()
    kw = dict(divergence=divergence, hard_label_weight=0.3, temperature=0.7, reduction="none")
    out, ref, (gs, _), (rgs, _) = run_both(s_sh, t_sh, l_sh, backend, **kw)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(gs, rgs, torch.float32, "grad student")
    s2, t2 = s.reshape(12, 129)[:, :-2], t.reshape(12, 129)[:, 1:-1]  # row stride 129, V=127
    out, ref, (gs, _), (rgs, _) = run_both(s2, t2, None, backend, divergence=divergence)
    assert_close(out, ref, torch.float32, "loss (2-d strided)")
    assert_close(gs, rgs, torch.float32, "grad student (2-d strided)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_dim_and_single_row_shapes(backend):
    device = skip_unless_available(backend)
    for shape in [(2, 2, 3, 67), (1, 50), (67,)]:
        s, t, _ = make_inputs(shape, torch.float32, device, "none", seed=len(shape))
        out, ref, (gs, _), (rgs, _) = run_both(s, t, None, backend, divergence="jsd",
                                               reduction="none" if len(shape) > 1 else "sum")
        assert out.shape == ref.shape
        assert_close(out, ref, torch.float32, f"loss {shape}")
        assert_close(gs, rgs, torch.float32, f"grad {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_size_padded_teacher(backend):
    """A teacher padded past the student's vocabulary: only the first k entries count."""
    device = skip_unless_available(backend)
    s, _, labels = make_inputs((6, 100), torch.float32, device, seed=7)
    _, t, _ = make_inputs((6, 128), torch.float32, device, seed=8)
    out, ref, (gs, _), (rgs, _) = run_both(s, t, labels, backend, vocab_size=100,
                                           hard_label_weight=0.5, divergence="reverse_kl")
    assert_close(out, ref, torch.float32, "loss")
    assert_close(gs, rgs, torch.float32, "grad")
    s_pad = torch.cat([s, torch.randn(6, 4, device=device)], -1)  # student wider than k too
    out, ref, (gs, _), (rgs, _) = run_both(s_pad, t, None, backend, vocab_size=100)
    assert_close(out, ref, torch.float32, "loss (both padded)")
    assert_close(gs, rgs, torch.float32, "grad (both padded)")
    assert (gs[:, 100:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_gradient_overwrites_student(backend, dtype):
    device = skip_unless_available(backend)
    s, t, labels = make_inputs((2, 5, 211), dtype, device, seed=9)
    base = s.clone().requires_grad_()
    fastkd.kd_loss(base, t, labels, divergence="skew_forward_kl", hard_label_weight=0.2,
                   backend=backend).backward()
    w = torch.randn(211, 211, device=device).to(dtype)
    x = s.clone().requires_grad_()
    logits = x @ w  # a non-leaf, as from an lm_head
    logits_ptr = logits.data_ptr()
    loss = fastkd.kd_loss(logits, t, labels, divergence="skew_forward_kl",
                          hard_label_weight=0.2, inplace=True, backend=backend)
    captured = {}
    logits.register_hook(lambda g: captured.setdefault("g", g))
    loss.backward()
    assert captured["g"].data_ptr() == logits_ptr, "gradient was not written over the logits"
    ref = fastkd.kd_loss((x.detach() @ w).requires_grad_(), t, labels,
                         divergence="skew_forward_kl", hard_label_weight=0.2, backend="torch")
    assert torch.allclose(loss.float(), ref.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
def test_extreme_logits(backend, divergence):
    """Magnitude 1e4, teacher -inf entries, T in {0.5, 10}: finite where the math is finite."""
    device = skip_unless_available(backend)
    for T in (0.5, 10.0):
        s, t, labels = make_inputs((8, 333), torch.float32, device, scale=1e4, seed=11)
        if divergence != "reverse_kl":  # KL(q||p) is +inf wherever p = 0 (tested below)
            t[:, ::3] = float("-inf")
            t[0, :-1] = float("-inf")  # a one-hot teacher
        out, ref, (gs, _), (rgs, _) = run_both(s, t, labels, backend, divergence=divergence,
                                               temperature=T, hard_label_weight=0.1,
                                               reduction="none")
        assert torch.isfinite(ref).all()
        assert torch.isfinite(out).all() and torch.isfinite(gs).all()
        assert_close(out, ref, torch.float32, f"loss T={T}", factor=256)
        assert_close(gs, rgs, torch.float32, f"grad T={T}", factor=256)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_probability_gives_inf_as_math_says(backend):
    """p > 0 where q = 0: forward KL is +inf; the rows without that stay finite."""
    device = skip_unless_available(backend)
    s, t, _ = make_inputs((3, 50), torch.float32, device, "none", seed=19)
    s[1, 7] = float("-inf")
    out = fastkd.kd_loss(s, t, reduction="none", backend=backend)
    assert out[1] == float("inf") and torch.isfinite(out[[0, 2]]).all()
    rev = fastkd.kd_loss(t, s, reduction="none", divergence="reverse_kl", backend=backend)
    assert rev[1] == float("inf") and torch.isfinite(rev[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_never_nan(backend):
    """Ignored rows holding NaN/inf add nothing and get exactly zero gradient."""
    device = skip_unless_available(backend)
    s, t, labels = make_inputs((6, 97), torch.float32, device, "none", seed=12)
    labels = torch.tensor([-100, 3, -100, 5, 7, -100], device=device)
    s[0], t[2], s[5, 4], t[5, 0] = float("nan"), float("inf"), float("-inf"), float("nan")
    for div in DIVS:
        x = s.clone().requires_grad_()
        out = fastkd.kd_loss(x, t, labels, divergence=div, hard_label_weight=1.0,
                             backend=backend)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all(), div
        assert (x.grad[[0, 2, 5]] == 0).all(), div


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # triton interpreter
@pytest.mark.parametrize("opts", [dict(), dict(temperature=2.0, softcap=20.0, teacher_grad=True)],
                         ids=["plain", "T2-cap-tgrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("hard", [0.0, 0.5], ids=["soft", "hard"])
@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logit_makes_its_row_nan(backend, side, hard, dtype, opts):
    """A NaN logit in a counted row makes that row's loss and gradients NaN, as torch's kl_div
    does (an fp16 teacher that overflowed must not go unnoticed), on every divergence; the other
    rows are bitwise what they are without it, and an ignored row holding NaN still gives 0."""
    device = skip_unless_available(backend)
    opts = dict(opts)
    teacher_grad = opts.pop("teacher_grad", False)
    s, t, _ = make_inputs((6, 37), dtype, device, "none", seed=29)
    labels = torch.tensor([3, 5, -100, 7, 1, 11], device=device)
    nan_s, nan_t = s.clone(), t.clone()
    x = nan_t if side == "teacher" else nan_s
    x[1, 4] = float("nan")
    x[2, 9] = float("nan")  # ignored row
    x[3, ::2] = float("-inf")
    x[3, 5] = float("nan")  # NaN beats -inf entries (and the inf losses they may give)
    x[5, 11] = float("nan")  # at the label
    bad, good = [1, 3, 5], [0, 4]
    for div in DIVS:
        kw = dict(divergence=div, hard_label_weight=hard, reduction="none", **opts)
        out, gs, gt = _forward_backward(nan_s, nan_t, labels, backend, teacher_grad, 1.0, **kw)
        assert out[bad].isnan().all(), (div, out)
        assert gs[bad].isnan().all(), div
        assert out[2] == 0 and (gs[2] == 0).all(), div
        clean, cgs, cgt = _forward_backward(s, t, labels, backend, teacher_grad, 1.0, **kw)
        assert torch.isfinite(clean[good]).all()
        assert torch.equal(out[good], clean[good]) and torch.equal(gs[good], cgs[good]), div
        if teacher_grad:
            assert gt[bad].isnan().all() and (gt[2] == 0).all(), div
            assert torch.equal(gt[good], cgt[good]), div


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_only_mask_rows_without_the_hard_loss(backend):
    """With hard_label_weight=0 labels only say which rows count: a value outside [0, V) that is
    not ignore_index is a valid row (every backend alike, no error, no NaN); with the hard loss
    on, the same labels are an error."""
    device = skip_unless_available(backend)
    s, t, _ = make_inputs((5, 97), torch.float32, device, "none", seed=14)
    labels = torch.tensor([97, -100, -1, 4, 10**6], device=device)
    for reduction in ("batchmean", "none"):
        out, ref, (gs, _), (rgs, _) = run_both(s, t, labels, backend, divergence="jsd",
                                               reduction=reduction, temperature=1.5)
        assert_close(out, ref, torch.float32, f"loss ({reduction})")
        assert_close(gs, rgs, torch.float32, f"grad ({reduction})")
    if torch.device(device).type == "cpu":  # a GPU raises asynchronously (device assert), not checked here
        with pytest.raises(ValueError, match="labels must lie in"):
            fastkd.kd_loss(s, t, labels, hard_label_weight=0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_single_row(backend):
    device = skip_unless_available(backend)
    s, t, labels = make_inputs((1, 256000), torch.bfloat16, device, "none", seed=13)
    out, ref, (gs, _), (rgs, _) = run_both(s, t, None, backend, divergence="jsd",
                                           temperature=2.0)
    assert_close(out, ref, torch.bfloat16, "loss")
    assert_close(gs, rgs, torch.bfloat16, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_in_batch(backend):
    device = skip_unless_available(backend)
    s, t, labels = make_inputs((4, 10, 64), torch.float32, device, seed=14)
    for n in (17, torch.tensor(23, device=device)):
        out, ref, (gs, _), (rgs, _) = run_both(s, t, labels, backend, num_items_in_batch=n,
                                               hard_label_weight=1.0)
        assert_close(out, ref, torch.float32, "loss")
        assert_close(gs, rgs, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    device = skip_unless_available(backend)
    s, t, labels = make_inputs((16, 999), torch.bfloat16, device, seed=15)
    res = []
    for _ in range(2):
        x = s.clone().requires_grad_()
        out = fastkd.kd_loss(x, t, labels, divergence="jsd", hard_label_weight=0.5,
                             backend=backend)
        out.backward()
        res.append((out, x.grad))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def test_jsd_endpoints_are_the_kls():
    s, t, labels = make_inputs((5, 40), torch.float64, "cpu", seed=16)
    for beta, div in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        a = fastkd.kd_loss(s, t, labels, divergence="jsd", beta=beta)
        b = fastkd.kd_loss(s, t, labels, divergence=div)
        assert torch.allclose(a, b, rtol=1e-12)
    mid = fastkd.kd_loss(s, t, labels, divergence="jsd", beta=0.5)
    assert mid < math.log(2) * 1.0 + 1e-9  # JSD is bounded by log 2 (T=1, scaled by T^2 = 1)


@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda"])  # the ones with float64 math
@pytest.mark.parametrize("divergence", DIVS)
def test_gradcheck_float64(backend, divergence):
    skip_unless_available(backend)
    device = "cuda" if backend == "cuda" else "cpu"  # torch and cpp on the CPU, as before
    s, t, labels = make_inputs((3, 2, 11), torch.float64, device, seed=17)
    s.requires_grad_()
    t.requires_grad_()

    def f(a, b):
        return fastkd.kd_loss(a, b, labels, divergence=divergence, temperature=1.7, beta=0.4,
                              skew=0.25, hard_label_weight=0.3, softcap=6.0, reduction="none",
                              backend=backend)

    assert torch.autograd.gradcheck(f, (s, t), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    device = skip_unless_available(backend)
    s, t, labels = make_inputs((3, 4, 50), torch.float32, device, seed=18)
    crit = fastkd.KDLoss(divergence="jsd", beta=0.5, temperature=2.0, hard_label_weight=0.1,
                         backend=backend)
    a = crit(s, t, labels)
    b = fastkd.kd_loss(s, t, labels, divergence="jsd", beta=0.5, temperature=2.0,
                       hard_label_weight=0.1, backend=backend)
    assert torch.equal(a, b)
    assert "jsd" in repr(crit)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "cuda"])
def test_torch_compile_fullgraph(backend):
    """A module using KDLoss compiles with fullgraph=True and gives the eager numbers."""
    device = skip_unless_available(backend)
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("torch.compile cannot trace interpreted triton kernels on CPU tensors")
    torch._dynamo.reset()

    class Distill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, 64)
            self.crit = fastkd.KDLoss(divergence="jsd", temperature=2.0, hard_label_weight=0.5,
                                      backend=backend)

        def forward(self, h, teacher, labels):
            return self.crit(self.head(h), teacher, labels)

    torch.manual_seed(0)
    m = Distill().to(device)
    h = torch.randn(4, 5, 16, device=device)
    teacher = torch.randn(4, 5, 64, device=device)
    labels = torch.randint(0, 64, (4, 5), device=device)
    labels[0, 0] = -100
    eager = m(h, teacher, labels)
    eager.backward()
    g_eager = m.head.weight.grad.clone()
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out = compiled(h, teacher, labels)
    out.backward()
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    assert torch.allclose(m.head.weight.grad, g_eager, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- errors
def _bad_calls():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    lab = torch.zeros(4, dtype=torch.long)
    return [
        ("student_logits", TypeError, lambda: fastkd.kd_loss(s.long(), t)),
        ("teacher_logits", TypeError, lambda: fastkd.kd_loss(s, [1.0])),
        ("leading shape", ValueError, lambda: fastkd.kd_loss(s, torch.randn(3, 10))),
        ("vocab_size", ValueError, lambda: fastkd.kd_loss(s, torch.randn(4, 12))),
        ("vocab_size", ValueError, lambda: fastkd.kd_loss(s, torch.randn(4, 12), vocab_size=11)),
        ("labels", ValueError, lambda: fastkd.kd_loss(s, t, torch.zeros(5, dtype=torch.long))),
        ("labels", TypeError, lambda: fastkd.kd_loss(s, t, torch.zeros(4))),
        ("labels", ValueError, lambda: fastkd.kd_loss(s, t, lab + 10, hard_label_weight=1.0)),
        ("divergence", ValueError, lambda: fastkd.kd_loss(s, t, divergence="kl")),
        ("beta", ValueError, lambda: fastkd.kd_loss(s, t, divergence="jsd", beta=1.5)),
        ("skew", ValueError, lambda: fastkd.kd_loss(s, t, skew=-0.1)),
        ("temperature", ValueError, lambda: fastkd.kd_loss(s, t, temperature=0.0)),
        ("temperature", ValueError, lambda: fastkd.kd_loss(s, t, temperature=-2)),
        ("mean", ValueError, lambda: fastkd.kd_loss(s, t, reduction="mean")),
        ("reduction", ValueError, lambda: fastkd.kd_loss(s, t, reduction="avg")),
        ("softcap", ValueError, lambda: fastkd.kd_loss(s, t, softcap=0.0)),
        ("hard_label_weight", ValueError, lambda: fastkd.kd_loss(s, t, hard_label_weight=1.0)),
        ("num_items_in_batch", ValueError,
         lambda: fastkd.kd_loss(s, t, reduction="sum", num_items_in_batch=3)),
        ("backend", ValueError, lambda: fastkd.kd_loss(s, t, backend="numpy")),
        ("divergence", ValueError, lambda: fastkd.KDLoss(divergence="kld")),
    ]


@pytest.mark.parametrize("needle,exc,call", _bad_calls(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_is_a_clear_error(needle, exc, call):
    with pytest.raises(exc, match=needle):
        call()


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="cuda runs on CUDA tensors"):
        fastkd.kd_loss(s, t, backend="cuda")
    monkeypatch.setenv("FASTKD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FASTKD_BACKEND"):
        fastkd.kd_loss(s, t)


def test_available_backends_reports_reasons():
    avail = fastkd.available_backends("cpu")
    assert set(avail) == {"torch", "cpp", "triton", "cuda"}
    assert avail["torch"] is None
    assert isinstance(avail["cuda"], str) and "CUDA" in avail["cuda"]


def test_triton_version_gate(monkeypatch):
    """A Triton too old for a family's kernel, or an interpreter that cannot run with the
    installed numpy, makes the triton backend unavailable with a reason naming the versions,
    and a forced backend="triton" raises it instead of computing a wrong loss."""
    from fastkd import _backend as B

    pytest.importorskip("triton")
    assert B._release("3.5.1+git0a1b") == (3, 5) and B._release("3.10.0") == (3, 10)
    assert B._release("4") == (4, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def versions(triton, numpy):
        monkeypatch.setattr(B, "_versions", lambda: (triton, numpy))

    versions("3.1.0", "2.2.6")  # 3.0 and 3.1 gave wrong losses for every family
    assert "triton >= 3.2" in B.reason("triton", "kd", "cuda")
    versions("3.4.0", "2.2.6")  # the angle kernel's float64 tl.dot needs 3.5
    assert B.reason("triton", "kd", "cuda") is None
    assert B.reason("triton", "kd", "cpu") is None
    why = B.reason("triton", "rkd_angle", "cuda")
    assert "triton 3.4.0" in why and "triton >= 3.5" in why and "float64" in why
    versions("3.6.0", "2.4.6")  # compiled kernels are fine; the interpreter is not
    assert B.reason("triton", "rkd_angle", "cuda") is None
    why = B.reason("triton", "kd", "cpu")
    assert "interpreter" in why and "numpy 2.4.6" in why and "triton >= 3.7" in why
    versions("3.6.0", "2.3.5")
    assert B.reason("triton", "kd", "cpu") is None
    versions("3.7.0", "2.4.6")
    assert B.reason("triton", "kd", "cpu") is None
    versions("3.1.0", "2.2.6")
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run kd here: triton 3\.1\.0"):
        fastkd.kd_loss(torch.randn(2, 8), torch.randn(2, 8), backend="triton")
