"""The Triton ``kd`` kernel against the float64 reference.

On a GPU it runs on CUDA tensors; without one, in the Triton interpreter on CPU tensors (small
shapes: the interpreter runs numpy op by op).
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton decides interpret mode when the kernels are defined, i.e. at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import require_triton  # noqa: E402

require_triton("kd")

from fastkd.reference import divergences as ref  # noqa: E402
from fastkd.triton import divergences as tri  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
OP = torch.ops.fastkd_triton.kd_fwd.default
DIVS = sorted(ref.DIVERGENCES.items(), key=lambda kv: kv[1])
DIV_IDS = [name for name, _ in DIVS]
CODES = [code for _, code in DIVS]
IGNORE = -100

# The interpreter evaluates both sides of every tl.where; the untaken side may hold inf/NaN.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

# Worst-case relative error of storing a float32 gradient: half an ulp. The interpreter (not
# the GPU) truncates float32 -> bfloat16 instead of rounding to nearest: a whole ulp there.
ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** (-8 if HAS_CUDA else -7),
       torch.float16: 2.0 ** -11, torch.float64: 2.0 ** -24}  # float64: float32 math


def make_inputs(B, R, V, s_dtype=torch.float32, t_dtype=None, labels="partial", scale=3.0,
                seed=0, pad=False):
    """student, teacher [B, R, V] (row-strided views of [B, R+1, V+3] when pad), labels."""
    g = torch.Generator().manual_seed(seed)
    t_dtype = t_dtype or s_dtype
    shape = (B, R + 1, V + 3) if pad else (B, R, V)
    s = (torch.randn(shape, generator=g) * scale).to(s_dtype)
    t = (torch.randn(shape, generator=g) * scale).to(t_dtype)
    if pad:
        s, t = s[:, :-1, :V], t[:, :-1, :V]
    lab = None
    if labels != "none":
        lab = torch.randint(0, V, (B, R), generator=g)
        if labels == "partial":
            lab.view(-1)[::3] = IGNORE
        elif labels == "all":
            lab.fill_(IGNORE)
    return s.to(DEVICE), t.to(DEVICE), None if lab is None else lab.to(DEVICE)


def run_triton(s, t, lab, code, *, grads=(True, True), T=2.0, beta=0.3, skew=0.2, soft_weight=1.0,
               hard_weight=0.5, scale_temperature=True, softcap=0.0, gs=None, gt=None):
    B, R, _ = s.shape
    loss = torch.full((B, R), float("nan"), device=s.device)
    if gs is None and grads[0]:
        gs = torch.full_like(s, float("nan"))
    if gt is None and grads[1]:
        gt = torch.full_like(t, float("nan"))
    tri.kd_fwd(s, t, lab, loss, gs, gt, code, T, beta, skew, IGNORE, soft_weight, hard_weight,
               scale_temperature, softcap)
    return loss, gs, gt


def run_reference(s, t, lab, code, *, T=2.0, beta=0.3, skew=0.2, soft_weight=1.0, hard_weight=0.5,
                  scale_temperature=True, softcap=0.0, dtype=torch.float64):
    """The reference in float64 (or ``dtype``) arithmetic on the same (already rounded) inputs."""
    s64, t64 = s.to(dtype).cpu(), t.to(dtype).cpu()
    lab = None if lab is None else lab.cpu()
    loss = torch.empty(s.shape[:2], dtype=torch.float64)
    gs, gt = torch.empty_like(s64), torch.empty_like(t64)
    ref.kd_fwd(s64, t64, lab, loss, gs, gt, code, T, beta, skew, IGNORE, soft_weight, hard_weight,
               scale_temperature, softcap)
    return loss, gs, gt


def assert_close(loss, gs, gt, want, *, loss_rtol=1e-5, grad_atol=1e-5):
    """Loss ~1e-5 relative; gradients within their storage rounding plus fp32 noise."""
    rl, rgs, rgt = want
    torch.testing.assert_close(loss.double().cpu(), rl, rtol=loss_rtol,
                               atol=1e-6 * (1 + rl.abs().max().item()))
    for got, r in ((gs, rgs), (gt, rgt)):
        if got is None:
            continue
        atol = grad_atol * r.abs().max().item() + 1e-6
        rtol = ULP[got.dtype] + 1e-5
        torch.testing.assert_close(got.double().cpu(), r, rtol=rtol, atol=atol)


DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
]
DTYPE_IDS = ["fp32", "bf16", "fp16", "bf16-fp32"]


@pytest.mark.parametrize("softcap", [0.0, 30.0], ids=["nocap", "cap30"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
def test_divergence_dtype_grid(code, dtypes, softcap):
    s, t, lab = make_inputs(2, 3, 401, *dtypes, scale=8.0 if softcap else 3.0)
    kw = dict(softcap=softcap, T=1.5)
    assert_close(*run_triton(s, t, lab, code, **kw), run_reference(s, t, lab, code, **kw))


@pytest.mark.parametrize("scale_temperature", [True, False])
@pytest.mark.parametrize("labels,hard_weight", [("none", 0.0), ("partial", 0.0), ("partial", 0.5),
                                                ("all", 0.0), ("all", 0.5)])
@pytest.mark.parametrize("code", [0, 2, 4], ids=["forward_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("T", [1.0, 3.0])  # T = 1 is its own kernel variant (hard loss reuses q)
def test_labels_hard_scale(code, labels, hard_weight, scale_temperature, T):
    s, t, lab = make_inputs(2, 3, 257, labels=labels, seed=1)
    kw = dict(hard_weight=hard_weight, scale_temperature=scale_temperature, soft_weight=0.7, T=T)
    got = run_triton(s, t, lab, code, **kw)
    assert_close(*got, run_reference(s, t, lab, code, **kw))
    if labels == "all":
        assert (got[0] == 0).all() and (got[1] == 0).all() and (got[2] == 0).all()


@pytest.mark.parametrize("shape", [(1, 5, 1271), (2, 3, 401), (2, 2, 1), (1, 2, 1030)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
def test_odd_shapes(code, shape):
    s, t, lab = make_inputs(*shape, seed=2)
    assert_close(*run_triton(s, t, lab, code), run_reference(s, t, lab, code))


@pytest.mark.parametrize("grads", [(True, False), (False, True), (False, False)],
                         ids=["student", "teacher", "loss-only"])
@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
def test_grad_subsets(code, grads):
    """The kernel variants without one or both gradient buffers."""
    s, t, lab = make_inputs(1, 3, 200, seed=9)
    loss, gs, gt = run_triton(s, t, lab, code, grads=grads, softcap=15.0)
    assert_close(loss, gs, gt, run_reference(s, t, lab, code, softcap=15.0))


@pytest.mark.parametrize("code,beta,skew", [(2, 0.01, 0.1), (2, 0.99, 0.1), (3, 0.5, 0.0),
                                            (3, 0.5, 1.0), (4, 0.5, 0.0), (4, 0.5, 1.0)])
def test_mixture_weight_edges(code, beta, skew):
    """Mixture weights at or near 0 and 1 (a zero weight is a -inf log weight in the kernel)."""
    s, t, lab = make_inputs(1, 3, 150, seed=10)
    kw = dict(beta=beta, skew=skew)
    assert_close(*run_triton(s, t, lab, code, **kw), run_reference(s, t, lab, code, **kw))


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_hard_only_is_cross_entropy(T):
    """soft_weight 0: the loss is torch's cross-entropy at temperature 1, whatever T is."""
    s, t, lab = make_inputs(2, 3, 300, seed=12)
    loss, gs, _ = run_triton(s, t, lab, 1, T=T, soft_weight=0.0, hard_weight=1.0,
                             grads=(True, False))
    x = s.double().reshape(-1, 300).requires_grad_()
    ce = torch.nn.functional.cross_entropy(x, lab.reshape(-1), ignore_index=IGNORE,
                                           reduction="none")
    ce.sum().backward()
    torch.testing.assert_close(loss.double(), ce.detach().reshape(2, 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs.double(), x.grad.reshape(s.shape), rtol=1e-5, atol=1e-7)


def test_small_block_many_chunks(monkeypatch):
    """V not a multiple of the block, many chunks (the online rescaling across chunks)."""
    monkeypatch.setattr(tri, "MAX_BLOCK_INTERPRET", 64)
    monkeypatch.setattr(tri, "MAX_BLOCK_GPU", 64)
    for code in CODES:
        s, t, lab = make_inputs(1, 3, 1001, seed=3, scale=5.0)
        kw = dict(softcap=20.0)
        assert_close(*run_triton(s, t, lab, code, **kw), run_reference(s, t, lab, code, **kw))


@pytest.mark.parametrize("code", [0, 3, 5], ids=["forward_kl", "skew_forward_kl", "tvd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_and_inplace(code, dtype):
    B, R, V = 2, 3, 301
    s, t, lab = make_inputs(B, R, V, dtype, pad=True, seed=4)
    assert s.stride() == (((R + 1) * (V + 3)), V + 3, 1)
    want = run_reference(s, t, lab, code)
    # gradients into row-strided views of bigger buffers; the padding must stay untouched
    gs_buf = torch.full((B, R + 2, V + 5), float("nan"), dtype=dtype, device=DEVICE)
    gt_buf = torch.full((R, B, V + 7), float("nan"), dtype=dtype, device=DEVICE)
    gs = gs_buf[:, 1:-1, 2:2 + V]
    gt = gt_buf.transpose(0, 1)[:, :, :V]  # dims 0 and 1 swapped in memory
    loss, _, _ = run_triton(s, t, lab, code, gs=gs, gt=gt)
    assert_close(loss, gs, gt, want)
    assert gs_buf[:, 0].isnan().all() and gs_buf[:, -1].isnan().all()
    assert gs_buf[..., :2].isnan().all() and gs_buf[..., 2 + V:].isnan().all()
    assert gt_buf[..., V:].isnan().all()
    # inplace: the gradient overwrites the (strided) student logits themselves
    s_inplace = torch.empty((B, R + 1, V + 3), dtype=dtype, device=DEVICE)[:, :-1, :V]
    s_inplace.copy_(s)
    loss2, _, gt2 = run_triton(s_inplace, t, lab, code, gs=s_inplace)
    assert torch.equal(loss2, loss) and torch.equal(gt2, gt)
    assert torch.equal(s_inplace, gs)


@pytest.mark.parametrize("T", [0.5, 10.0])
@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
def test_extreme_logits(code, T):
    """1e4 logits and -inf teacher entries: finite where the reference is, and close to it.

    Where an entry's probability underflows decides whether it counts (0 * log 0 = 0); the
    kernel decides that in float32, so its inf/finite pattern is the float32 reference's.
    """
    B, R, V = 2, 3, 130
    s, t, lab = make_inputs(B, R, V, seed=5, labels="partial", scale=1.0)
    s = s * 1e4
    t = t * 1e4
    s[0, 0, 7], t[0, 0, 7] = 1e4, 1e4
    t[:, :, ::5] = float("-inf")  # p = 0 there (0 * log 0 = 0)
    t[1, 2, :] = float("-inf")
    t[1, 2, 3] = 0.0  # a one-hot teacher
    for softcap in (0.0, 30.0):
        kw = dict(T=T, softcap=softcap)
        loss, gs, gt = run_triton(s, t, lab, code, **kw)
        want64 = run_reference(s, t, lab, code, **kw)
        want32 = run_reference(s, t, lab, code, dtype=torch.float32, **kw)
        for got, want, w32 in zip((loss, gs, gt), want64, want32):
            got = got.double().cpu()
            fin = want.isfinite() & w32.isfinite()
            assert got[fin].isfinite().all(), (softcap, got, want)
            # fp32 carries ~1e-7 of |logit|/T: absolute, not relative, error at these magnitudes
            mag = 1e4 / T if softcap == 0 else softcap / T
            atol = 1e-6 * mag * (T * T) * (1 + want[fin].abs().max().item())
            torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=atol)
            assert not got[w32.isinf()].isfinite().any()  # e.g. reverse_kl where p = 0 < q


@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
def test_ignored_rows_with_nonfinite_logits(code):
    s, t, lab = make_inputs(2, 3, 77, seed=6, labels="partial")
    ign = lab == IGNORE
    s[ign] = float("nan")
    t[ign] = float("inf")
    s[0, 1, 3] = float("inf")  # also a lone inf (row 1 is valid: only its own outputs go bad)
    loss, gs, gt = run_triton(s, t, lab, code, softcap=10.0 if code % 2 else 0.0)
    assert (loss[ign] == 0).all() and (gs[ign] == 0).all() and (gt[ign] == 0).all()
    # rows other than the poisoned ones are untouched by it
    ok = ~ign
    ok[0, 1] = False
    assert loss[ok].isfinite().all() and gs[ok].isfinite().all() and gt[ok].isfinite().all()


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
def test_nan_logit_makes_its_row_nan(monkeypatch, code, side):
    """A NaN in a counted row: that row's loss and both gradients NaN, whichever chunk and lane it
    is in (tl.maximum's default drops NaN: a NaN as a lane's first entry would vanish as -inf), and
    with every gradient subset (forward_kl without a teacher gradient sums D in the last pass);
    other rows bitwise as without it; ignored rows still 0."""
    monkeypatch.setattr(tri, "MAX_BLOCK_INTERPRET", 64)  # 5 chunks of 64
    monkeypatch.setattr(tri, "MAX_BLOCK_GPU", 64)
    s, t, _ = make_inputs(1, 5, 300, seed=8)
    lab = torch.tensor([[4, 9, IGNORE, 2, 299]], device=DEVICE)
    ns, nt = s.clone(), t.clone()
    x = ns if side == "student" else nt
    x[0, 1, 3] = float("nan")  # first chunk: the lane's first entry
    x[0, 3, 250] = float("nan")  # last chunk, after a finite max
    x[0, 2, 7] = float("nan")  # ignored row
    bad, good = [1, 3], [0, 4]
    # forward_kl: each gradient subset (its passes differ); the others: both gradients
    for grads in ((True, True), (True, False), (False, True))[:3 if code == 0 else 1]:
        kw = dict(grads=grads, softcap=20.0 if code % 2 else 0.0)
        got = run_triton(ns, nt, lab, code, **kw)
        want = run_triton(s, t, lab, code, **kw)
        assert got[0][0, bad].isnan().all() and got[0][0, 2] == 0
        assert torch.equal(got[0][0, good], want[0][0, good])
        for g, w in zip(got[1:], want[1:]):
            if g is not None:
                assert g[0, bad].isnan().all() and (g[0, 2] == 0).all(), grads
                assert torch.equal(g[0, good], w[0, good]), grads


@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
def test_deterministic(code):
    s, t, lab = make_inputs(2, 3, 700, torch.bfloat16, seed=7)
    a = run_triton(s, t, lab, code, softcap=30.0)
    b = run_triton(s, t, lab, code, softcap=30.0)
    for x, y in zip(a, b):
        assert torch.equal(x.view(torch.int16 if x.element_size() == 2 else torch.int32),
                           y.view(torch.int16 if y.element_size() == 2 else torch.int32))


@pytest.mark.parametrize("case", ["fkl-all", "jsd-student-only", "tvd-no-grads"])
def test_opcheck(case):
    B, R, V = 2, 2, 33
    s, t, lab = make_inputs(B, R, V, seed=8)
    loss = torch.empty(B, R, device=DEVICE)
    gs, gt = torch.empty_like(s), torch.empty_like(t)
    if case == "fkl-all":
        args = (s, t, lab, loss, gs, gt, 0, 2.0, 0.5, 0.1, IGNORE, 1.0, 0.5, True, 30.0)
    elif case == "jsd-student-only":
        args = (s, t, lab, loss, gs, None, 2, 1.0, 0.5, 0.1, IGNORE, 1.0, 0.0, False, 0.0)
    else:
        args = (s, t, None, loss, None, None, 5, 1.0, 0.5, 0.1, IGNORE, 1.0, 0.0, True, 0.0)
    torch.library.opcheck(OP, args)


def test_bad_input():
    s, t, lab = make_inputs(1, 2, 16)
    loss = torch.empty(1, 2, device=DEVICE)
    with pytest.raises(ValueError, match="labels"):
        tri.kd_fwd(s, t, None, loss, None, None, 0, 1.0, 0.5, 0.1, IGNORE, 1.0, 0.5, True, 0.0)
    with pytest.raises(ValueError, match="teacher"):
        tri.kd_fwd(s, t[:, :, :8], lab, loss, None, None, 0, 1.0, 0.5, 0.1, IGNORE, 1.0, 0.0,
                   True, 0.0)
    with pytest.raises(ValueError, match="contiguous last dim"):
        tri.kd_fwd(s.transpose(1, 2), t.transpose(1, 2), None, torch.empty(1, 16, device=DEVICE),
                   None, None, 0, 1.0, 0.5, 0.1, IGNORE, 1.0, 0.0, True, 0.0)


def test_float64_inputs_computed_in_float32():
    """float64 in (what fastkd.functional passes for gradcheck): a float64 loss, float32 math."""
    s, t, lab = make_inputs(1, 3, 100, torch.float64, seed=11)
    loss = torch.empty(1, 3, dtype=torch.float64, device=DEVICE)
    gs = torch.empty_like(s)
    tri.kd_fwd(s, t, lab, loss, gs, None, 2, 2.0, 0.3, 0.1, IGNORE, 1.0, 0.5, True, 0.0)
    assert_close(loss, gs, None, run_reference(s, t, lab, 2, beta=0.3, skew=0.1, T=2.0))
