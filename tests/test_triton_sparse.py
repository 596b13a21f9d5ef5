"""The Triton ``sparse_kd`` kernel against the float64 reference ``sparse_kd_fwd``.

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

require_triton("sparse_kd")

from fastkd.reference import sparse as ref  # noqa: E402
from fastkd.reference.divergences import DIVERGENCES  # noqa: E402
from fastkd.triton import sparse as tri  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
OP = torch.ops.fastkd_triton.sparse_kd_fwd.default
DIVS = sorted(DIVERGENCES.items(), key=lambda kv: kv[1])
DIV_IDS = [name for name, _ in DIVS]
CODES = [code for _, code in DIVS]
TAILS = [0, 1]
TAIL_IDS = ["renormalize", "bucket"]
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


def make_inputs(B, R, V, K, tail, dtype=torch.float32, v_dtype=None, labels="partial", T=2.0,
                seed=0, pad=False, scale=3.0):
    """student [B, R, V] (a row-strided view of [B, R+1, V+3] when pad), the top-k of a random
    teacher (indices, values: logits for renormalize, log-probs at T for bucket), labels."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, R + 1, V + 3) if pad else (B, R, V)
    s = (torch.randn(shape, generator=g) * scale).to(dtype)
    if pad:
        s = s[:, :-1, :V]
    t = torch.randn(B, R, V, generator=g) * scale
    idx = t.topk(K, dim=-1).indices
    # shuffle each row's entries: the kernel must not rely on the top-k order
    idx = idx.gather(-1, torch.rand(B, R, K, generator=g).argsort(-1))
    vals = t.gather(-1, idx) if tail == 0 else torch.log_softmax(t / T, -1).gather(-1, idx)
    vals = vals.to(v_dtype or dtype)
    lab = None
    if labels != "none":
        lab = torch.randint(0, V, (B, R), generator=g)
        if labels == "partial":
            lab.view(-1)[::3] = IGNORE
        elif labels == "all":
            lab.fill_(IGNORE)
        lab = lab.to(DEVICE)
    return s.to(DEVICE), idx.to(DEVICE), vals.to(DEVICE), lab


def run_triton(s, idx, vals, lab, code, tail, *, grad=True, T=2.0, beta=0.3, skew=0.2,
               soft_weight=0.9, hard_weight=0.5, scale_temperature=True, gs=None):
    B, R, _ = s.shape
    loss = torch.full((B, R), float("nan"), device=s.device)
    if gs is None and grad:
        gs = torch.full_like(s, float("nan"))
    tri.sparse_kd_fwd(s, idx, vals, lab, loss, gs, code, T, beta, skew, tail, IGNORE,
                      soft_weight, hard_weight if lab is not None else 0.0, scale_temperature)
    return loss, gs


def run_reference(s, idx, vals, lab, code, tail, *, T=2.0, beta=0.3, skew=0.2, soft_weight=0.9,
                  hard_weight=0.5, scale_temperature=True, dtype=torch.float64):
    """The reference in float64 (or ``dtype``) arithmetic on the same (already rounded) inputs."""
    s64 = s.to(dtype).cpu()
    lab = None if lab is None else lab.cpu()
    loss = torch.empty(s.shape[:2], dtype=dtype)
    gs = torch.empty_like(s64)
    ref.sparse_kd_fwd(s64, idx.cpu(), vals.to(dtype).cpu(), lab, loss, gs, code, T, beta, skew,
                      tail, IGNORE, soft_weight, hard_weight if lab is not None else 0.0,
                      scale_temperature)
    return loss, gs


def assert_close(loss, gs, want, *, loss_rtol=1e-5, grad_atol=1e-5):
    """Loss ~1e-5 relative; gradients within their storage rounding plus float32 noise."""
    rl, rgs = want
    torch.testing.assert_close(loss.double().cpu(), rl, rtol=loss_rtol,
                               atol=1e-6 * (1 + rl.abs().max().item()))
    if gs is not None:
        atol = grad_atol * rgs.abs().max().item() + 1e-6
        rtol = ULP[gs.dtype] + 1e-5
        torch.testing.assert_close(gs.double().cpu(), rgs, rtol=rtol, atol=atol)


def check(s, idx, vals, lab, code, tail, **kw):
    got = run_triton(s, idx, vals, lab, code, tail, **kw)
    kw.pop("gs", None)
    kw.pop("grad", None)
    assert_close(*got, run_reference(s, idx, vals, lab, code, tail, **kw))
    return got


DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
          (torch.bfloat16, torch.float32)]
DTYPE_IDS = ["fp32", "bf16", "fp16", "bf16-fp32vals"]


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
@pytest.mark.parametrize("tail", TAILS, ids=TAIL_IDS)
def test_tail_divergence_dtype_grid(tail, code, dtypes):
    s, idx, vals, lab = make_inputs(2, 3, 301, 17, tail, *dtypes, T=1.5)
    check(s, idx, vals, lab, code, tail, T=1.5)


@pytest.mark.parametrize("labels,hard_weight", [("none", 0.0), ("partial", 0.0), ("partial", 0.5),
                                                ("all", 0.0), ("all", 0.5)])
@pytest.mark.parametrize("code", [0, 2, 5], ids=["forward_kl", "jsd", "tvd"])
@pytest.mark.parametrize("tail", TAILS, ids=TAIL_IDS)
# T = 1: the hard loss reuses the soft normalizer (its own kernel variant)
@pytest.mark.parametrize("T,scale_temperature", [(1.0, True), (3.0, False)],
                         ids=["T1", "T3-noscale"])
def test_labels_hard_scale(T, scale_temperature, tail, code, labels, hard_weight):
    s, idx, vals, lab = make_inputs(2, 3, 157, 9, tail, labels=labels, T=T, seed=1)
    loss, gs = check(s, idx, vals, lab, code, tail, T=T, hard_weight=hard_weight,
                     scale_temperature=scale_temperature, soft_weight=0.7)
    if labels == "all":
        assert (loss == 0).all() and (gs == 0).all()


@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
@pytest.mark.parametrize("tail", TAILS, ids=TAIL_IDS)
def test_k_extremes(tail, code):
    """k = 1, k close to V and k = V (bucket: both tails are rounding noise there, below the
    tail floor on both sides, so the bucket term is 0 and the loss kd_loss's)."""
    V = 67
    for K in (1, 6, 64, 67):
        s, idx, vals, lab = make_inputs(1, 3, V, K, tail, T=1.5, seed=K)
        check(s, idx, vals, lab, code, tail, T=1.5)


@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
def test_bucket_near_complete_mass(monkeypatch, code):
    """Bucket rows whose k entries hold all but ~1e-8 of the mass on one side, the other or both
    (tails that round to 0 in float32): finite, and the reference's floored tails. Several k
    chunks, so the tail sums run over chunks too."""
    B, R, V, K = 1, 6, 120, 20
    g = torch.Generator().manual_seed(21)
    s = torch.randn(B, R, V, generator=g)
    t = torch.randn(B, R, V, generator=g)
    idx = torch.rand(B, R, V, generator=g).argsort(-1)[..., :K].contiguous()
    off = torch.tensor([(20.0, 19.0), (19.0, 20.0), (25.0, 10.0), (10.0, 25.0), (30.0, 30.0),
                        (13.0, 13.0)])
    s.scatter_add_(-1, idx, off[:, 0].view(1, R, 1).expand(B, R, K))
    t.scatter_add_(-1, idx, off[:, 1].view(1, R, 1).expand(B, R, K))
    T = 1.5
    vals = torch.log_softmax(t.double() * (1.5 / T), -1).gather(-1, idx).float()
    s = s * 1.5
    args = [x.to(DEVICE) for x in (s, idx, vals)]
    for kblock in (32, 8):
        monkeypatch.setattr(tri, "MAX_KBLOCK", kblock)
        loss, gs = check(*args, None, code, 1, T=T)
        assert loss.isfinite().all() and gs.isfinite().all()


@pytest.mark.parametrize("tail", TAILS, ids=TAIL_IDS)
def test_many_chunks_and_rows_per_program(monkeypatch, tail):
    """V and k not multiples of their blocks, several chunks of each (the online rescaling);
    two programs for five rows, so the row loop runs (an ignored row among them)."""
    monkeypatch.setattr(tri, "MAX_BLOCK_INTERPRET", 64)
    monkeypatch.setattr(tri, "MAX_BLOCK_GPU", 64)
    monkeypatch.setattr(tri, "MAX_KBLOCK", 16)
    monkeypatch.setattr(tri, "MAX_PROGRAMS", 2)
    for code in CODES:
        s, idx, vals, lab = make_inputs(1, 5, 501, 40, tail, seed=3, scale=5.0)
        check(s, idx, vals, lab, code, tail, T=1.0 if code % 2 else 2.5)


@pytest.mark.parametrize("code", [0, 3, 5], ids=["forward_kl", "skew_forward_kl", "tvd"])
@pytest.mark.parametrize("tail", TAILS, ids=TAIL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided(dtype, tail, code):
    """Row-strided student (time-shifted logits) and gradient written into a strided view."""
    B, R, V, K = 2, 3, 201, 11
    s, idx, vals, lab = make_inputs(B, R, V, K, tail, dtype, pad=True, seed=4)
    assert s.stride() == ((R + 1) * (V + 3), V + 3, 1)
    buf = torch.full((R + 2, B, V + 7), float("nan"), dtype=dtype, device=DEVICE)
    gs = buf.transpose(0, 1)[:, 1:-1, 2:2 + V]  # dims 0 and 1 swapped in memory, offset
    check(s, idx, vals, lab, code, tail, gs=gs)
    assert buf[0].isnan().all() and buf[-1].isnan().all()
    assert buf[..., :2].isnan().all() and buf[..., 2 + V:].isnan().all()


@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
@pytest.mark.parametrize("tail", TAILS, ids=TAIL_IDS)
def test_ignored_rows_hold_nan(tail, code):
    """Ignored rows whose logits and teacher values are NaN: exact zeros, nothing leaks."""
    s, idx, vals, lab = make_inputs(2, 3, 77, 5, tail, seed=6)
    ign = lab == IGNORE
    s[ign] = float("nan")
    vals[ign] = float("nan")
    loss, gs = run_triton(s, idx, vals, lab, code, tail)
    assert (loss[ign] == 0).all() and (gs[ign] == 0).all()
    assert loss[~ign].isfinite().all() and gs[~ign].isfinite().all()
    assert_close(loss, gs, run_reference(s, idx, vals, lab, code, tail))


@pytest.mark.parametrize("hard_weight", [0.0, 0.5], ids=["soft", "hard"])
@pytest.mark.parametrize("code", CODES, ids=DIV_IDS)
@pytest.mark.parametrize("tail", TAILS, ids=TAIL_IDS)
def test_nan_makes_its_row_nan(monkeypatch, tail, code, hard_weight):
    """A NaN in a counted row's teacher values or in the student logits it reads: that row's loss
    and whole gradient NaN, whichever chunk and lane it is in (tl.maximum's default drops NaN: a
    NaN as a lane's first entry would vanish as -inf, and the tail floors would hide a NaN mass);
    other rows bitwise as without it; ignored rows 0. renormalize with a divergence other than
    forward_kl and no hard label reads the student only at the k indices (the contract)."""
    monkeypatch.setattr(tri, "MAX_BLOCK_INTERPRET", 64)  # 5 chunks of 64
    monkeypatch.setattr(tri, "MAX_BLOCK_GPU", 64)
    s, idx, vals, _ = make_inputs(1, 6, 300, 9, tail, labels="none", seed=8)
    lab = torch.tensor([[4, 9, IGNORE, 2, 299, 17]], device=DEVICE)
    ns, nv = s.clone(), vals.clone()
    out = [j for j in range(300) if j not in idx[0, 1].tolist()]
    ns[0, 1, out[0]] = float("nan")  # first chunk, outside the teacher's entries
    ns[0, 2, 7] = float("nan")  # ignored row
    nv[0, 2, 1] = float("nan")
    ns[0, 3, idx[0, 3, 4]] = float("nan")  # at a teacher entry
    nv[0, 4, 0] = float("nan")
    nv[0, 5, 1::2] = float("-inf")
    nv[0, 5, 2] = float("nan")
    whole = tail == 1 or code == 0 or hard_weight != 0.0
    bad, good = [3, 4, 5] + ([1] if whole else []), [0] + ([] if whole else [1])
    for grad in (True, False):
        got = run_triton(ns, idx, nv, lab, code, tail, grad=grad, hard_weight=hard_weight)
        want = run_triton(s, idx, vals, lab, code, tail, grad=grad, hard_weight=hard_weight)
        assert got[0][0, bad].isnan().all() and got[0][0, 2] == 0, grad
        assert torch.equal(got[0][0, good], want[0][0, good]), grad
        if grad:
            assert got[1][0, bad].isnan().all() and (got[1][0, 2] == 0).all()
            assert torch.equal(got[1][0, good], want[1][0, good])


@pytest.mark.parametrize("code", [0, 2], ids=["forward_kl", "jsd"])
@pytest.mark.parametrize("tail", TAILS, ids=TAIL_IDS)
def test_index_out_of_range_is_nan_not_oob(tail, code):
    """validate=False with a bad index: that row's loss is NaN, nothing outside it is touched."""
    B, R, V, K = 1, 3, 60, 5
    s, idx, vals, lab = make_inputs(B, R, V, K, tail, labels="none", seed=13)
    idx[0, 1, 2] = V + 7
    idx[0, 2, 0] = -3
    buf = torch.full((B, R + 1, V + 16), float("nan"), device=DEVICE)
    gs = buf[:, :R, :V]
    loss, _ = run_triton(s, idx, vals, None, code, tail, gs=gs)
    assert loss[0, 1:].isnan().all() and loss[0, 0].isfinite()
    assert gs[0, 0].isfinite().all() and gs[0, 1:].isnan().any(-1).all()
    assert buf[:, R].isnan().all() and buf[..., V:].isnan().all()


@pytest.mark.parametrize("tail", TAILS, ids=TAIL_IDS)
def test_extreme_values(tail):
    """Large logits, -inf teacher entries (p = 0 there: 0 * log 0 = 0), a -inf student logit."""
    s, idx, vals, lab = make_inputs(2, 3, 90, 12, tail, labels="partial", seed=5, scale=1.0)
    s = s * 300.0
    vals[:, :, ::4] = float("-inf")
    if tail == 0:
        vals = vals * 100.0
    for code in CODES:
        for T in (0.5, 4.0):
            loss, gs = run_triton(s, idx, vals, lab, code, tail, T=T)
            want64 = run_reference(s, idx, vals, lab, code, tail, T=T)
            want32 = run_reference(s, idx, vals, lab, code, tail, T=T, dtype=torch.float32)
            for got, want, w32 in zip((loss, gs), want64, want32):
                got = got.double().cpu()
                fin = want.isfinite() & w32.isfinite()
                assert got[fin].isfinite().all(), (code, T)
                # float32 carries ~1e-7 of |logit|/T: absolute error at these magnitudes
                atol = 1e-6 * (300.0 / T) * T * T * (1 + want[fin].abs().max().item())
                torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=atol)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_hard_only_is_cross_entropy(T):
    """soft_weight 0: the loss is torch's cross-entropy at temperature 1, whatever T is."""
    s, idx, vals, lab = make_inputs(2, 3, 300, 7, 1, seed=12)
    loss, gs = run_triton(s, idx, vals, lab, 1, 1, T=T, soft_weight=0.0, hard_weight=1.0)
    x = s.double().reshape(-1, 300).requires_grad_()
    ce = torch.nn.functional.cross_entropy(x, lab.reshape(-1), ignore_index=IGNORE,
                                           reduction="none")
    ce.sum().backward()
    torch.testing.assert_close(loss.double(), ce.detach().reshape(2, 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs.double(), x.grad.reshape(s.shape), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("code", [0, 2], ids=["forward_kl", "jsd"])
@pytest.mark.parametrize("tail", TAILS, ids=TAIL_IDS)
def test_loss_only(tail, code):
    s, idx, vals, lab = make_inputs(1, 3, 200, 9, tail, seed=9)
    check(s, idx, vals, lab, code, tail, grad=False)


@pytest.mark.parametrize("tail", TAILS, ids=TAIL_IDS)
def test_deterministic(monkeypatch, tail):
    """Bitwise the same on a rerun, and whatever the number of programs sharing the rows."""
    s, idx, vals, lab = make_inputs(2, 3, 700, 33, tail, torch.bfloat16, seed=7)
    for code in (0, 4):
        a = run_triton(s, idx, vals, lab, code, tail)
        b = run_triton(s, idx, vals, lab, code, tail)
        with monkeypatch.context() as m:
            m.setattr(tri, "MAX_PROGRAMS", 4)
            c = run_triton(s, idx, vals, lab, code, tail)
        for other in (b, c):
            assert torch.equal(a[0].view(torch.int32), other[0].view(torch.int32))
            assert torch.equal(a[1].view(torch.int16), other[1].view(torch.int16))


@pytest.mark.parametrize("case", ["fkl-renorm-hard", "jsd-bucket-nolabels", "tvd-loss-only"])
def test_opcheck(case):
    B, R, V, K = 2, 2, 33, 4
    tail = 1 if "bucket" in case else 0
    s, idx, vals, lab = make_inputs(B, R, V, K, tail, seed=8)
    loss = torch.empty(B, R, device=DEVICE)
    gs = torch.empty_like(s)
    if case == "fkl-renorm-hard":
        args = (s, idx, vals, lab, loss, gs, 0, 2.0, 0.5, 0.1, 0, IGNORE, 1.0, 0.5, True)
    elif case == "jsd-bucket-nolabels":
        args = (s, idx, vals, None, loss, gs, 2, 1.0, 0.5, 0.1, 1, IGNORE, 1.0, 0.0, False)
    else:
        args = (s, idx, vals, lab, loss, None, 5, 1.5, 0.5, 0.1, 0, IGNORE, 1.0, 0.0, True)
    torch.library.opcheck(OP, args)


def test_float64_inputs_computed_in_float32():
    """float64 in (what fastkd.functional passes for gradcheck): a float64 loss, float32 math."""
    s, idx, vals, lab = make_inputs(1, 3, 100, 8, 1, torch.float64, seed=11)
    loss = torch.empty(1, 3, dtype=torch.float64, device=DEVICE)
    gs = torch.empty_like(s)
    tri.sparse_kd_fwd(s, idx, vals, lab, loss, gs, 2, 2.0, 0.3, 0.2, 1, IGNORE, 0.9, 0.5, True)
    assert_close(loss, gs, run_reference(s, idx, vals, lab, 2, 1))


def test_bad_input():
    s, idx, vals, lab = make_inputs(1, 2, 16, 3, 0)
    loss = torch.empty(1, 2, device=DEVICE)
    args = (0, 1.0, 0.5, 0.1, 0, IGNORE, 1.0)
    with pytest.raises(ValueError, match="labels"):
        tri.sparse_kd_fwd(s, idx, vals, None, loss, None, *args, 0.5, True)
    with pytest.raises(ValueError, match="indices"):
        tri.sparse_kd_fwd(s, idx.int(), vals, lab, loss, None, *args, 0.0, True)
    with pytest.raises(ValueError, match="values"):
        tri.sparse_kd_fwd(s, idx, vals[..., :2], lab, loss, None, *args, 0.0, True)
    with pytest.raises(ValueError, match="contiguous last dim"):
        tri.sparse_kd_fwd(torch.randn(1, 2, 16, device=DEVICE).transpose(1, 2),
                          torch.zeros(1, 16, 1, dtype=torch.int64, device=DEVICE),
                          torch.zeros(1, 16, 1, device=DEVICE), None,
                          torch.empty(1, 16, device=DEVICE), None, *args, 0.0, True)
