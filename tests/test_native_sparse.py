"""torch.ops.fastkd.sparse_kd_fwd (the C++ CPU kernel) against the float64 reference, op by op.

Oracle: fastkd.reference.sparse.sparse_kd_fwd in float64 on the *same* (already rounded) inputs,
with the error bound of test_native.py: at most twice the error of the same reference run in
float32, plus ~1e-5 relative, plus one rounding of a low-precision output. Inputs with float64
take the kernel's float64 path, which must match the reference to ~1e-10.
"""
import itertools

import pytest
import torch

import fastkd
from fastkd import _native
from fastkd.reference.divergences import DIVERGENCES
from fastkd.reference.sparse import TAILS
from fastkd.reference.sparse import sparse_kd_fwd as ref_sparse_kd_fwd

if not _native.load():
    pytest.skip(f"native extension unavailable: {_native.reason()}", allow_module_level=True)
if not _native.has_op("sparse_kd_fwd"):
    pytest.skip("the native extension has no sparse_kd_fwd op", allow_module_level=True)

from _kd_op_cases import _check, make_labels  # noqa: E402

op = torch.ops.fastkd.sparse_kd_fwd
IGNORE = -100
DIVS = list(DIVERGENCES.items())
F64 = torch.float64


def _cfg(**kw):
    cfg = dict(divergence=0, temperature=2.0, beta=0.3, skew=0.2, tail=0, ignore_index=IGNORE, soft_weight=0.9,
               hard_weight=0.0, scale_temperature=True)
    cfg.update(kw)
    return cfg


def _args(cfg):
    return [cfg[k] for k in ("divergence", "temperature", "beta", "skew", "tail", "ignore_index", "soft_weight",
                             "hard_weight", "scale_temperature")]


def _wide(s, v):
    return F64 in (s.dtype, v.dtype)


def run_native(s, idx, v, labels, cfg, grad=True, gs=None):
    """Calls the op with NaN-filled output buffers (so every entry must be written)."""
    loss = torch.full(s.shape[:2], float("nan"), dtype=F64 if _wide(s, v) else torch.float32)
    if grad and gs is None:
        gs = torch.full_like(s, float("nan"), memory_format=torch.contiguous_format)
    op(s, idx, v, labels, loss, gs if grad else None, *_args(cfg))
    return loss, (gs if grad else None)


def run_ref(s, idx, v, labels, cfg, dtype=F64):
    s, v = s.to(dtype), v.to(dtype)
    loss = torch.empty(s.shape[:2], dtype=dtype)
    gs = torch.empty(s.shape, dtype=dtype)
    ref_sparse_kd_fwd(s, idx, v, labels, loss, gs, *_args(cfg))
    return loss, gs


def compare(s, idx, v, labels, cfg, what="", gs=None, run=None):
    """The op (``run``: the CPU kernel by default) against the float64 and float32 references."""
    loss, g = (run or run_native)(s, idx, v, labels, cfg, gs=gs)
    l64, g64 = run_ref(s, idx, v, labels, cfg)
    try:
        if _wide(s, v):  # the float64 path: float64 math throughout, one rounding to g's dtype
            torch.testing.assert_close(loss, l64, rtol=1e-10, atol=1e-12, equal_nan=True)
            eps = 1e-10 if g.dtype == F64 else torch.finfo(g.dtype).eps
            torch.testing.assert_close(g.double(), g64, rtol=eps, atol=1e-12, equal_nan=True)
        else:
            l32, g32 = run_ref(s, idx, v, labels, cfg, torch.float32)
            _check(loss, l64, l32, "loss")
            _check(g, g64, g32, "grad_student")
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None
    return loss, g


def make(B, R, V, K, tail, s_dtype=torch.float32, v_dtype=torch.float32, seed=0, T=2.0, scale=3.0):
    """Student logits, the teacher's top-k indices (distinct, sorted by value) and its values: logits
    for renormalize, log-probabilities at T scaled by 0.99 for bucket (so that rounding them can
    never push their mass over 1, which would empty the tail bucket)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, R, V, generator=g) * scale
    t = 0.6 * z + torch.randn(B, R, V, generator=g) * scale
    idx = t.topk(K, dim=-1).indices.contiguous()
    if tail == TAILS["renormalize"]:
        vals = t.gather(-1, idx)
    else:
        vals = torch.log_softmax(t / T, -1).gather(-1, idx) + torch.log(torch.tensor(0.99))
    return z.to(s_dtype), idx, vals.to(v_dtype).contiguous()


def strided(x):
    """x as a row-strided view with transposed leading dims (stride(0) < stride(1))."""
    B, R, V = x.shape
    base = torch.full((R + 1, B, V + 3), float("nan"), dtype=x.dtype)
    view = base[1:, :, 2:V + 2].transpose(0, 1)
    view.copy_(x)
    assert not view.is_contiguous() and view.stride(-1) == 1
    return view


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
          (torch.float32, torch.bfloat16), (F64, F64), (torch.float32, F64), (F64, torch.bfloat16)]
LABELS = [("none", 0.0), ("partial", 0.0), ("partial", 0.5), ("all", 0.5)]


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
@pytest.mark.parametrize("tail", list(TAILS.items()), ids=lambda t: t[0])
def test_matches_reference(tail, div, dtypes):
    """Every label mode x hard weight x k (1, small, V-3, V) x strided student."""
    B, R, V = 2, 3, 301
    ks = [1, 6, V - 3, V]
    for (labels_kind, hw), k, stride in itertools.product(LABELS, ks, [False, True]):
        s, idx, v = make(B, R, V, k, tail[1], *dtypes, seed=div[1] + k)
        labels = make_labels(B, R, V, labels_kind, seed=k)
        cfg = _cfg(divergence=div[1], tail=tail[1], hard_weight=hw)
        gs = strided(torch.full_like(s, float("nan"))) if stride else None
        loss, g = compare(strided(s) if stride else s, idx, v, labels, cfg, f"{labels_kind} hw={hw} k={k} "
                          f"strided={stride}", gs=gs)
        if labels_kind == "all":
            assert bool((loss == 0).all()) and bool((g == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_many_blocks(div, dtype):
    """V over several 1024-entry blocks, with a maximum that rises block after block (the sums
    are rescaled), leading blocks at -inf, temperature 1 (the hard label shares the soft
    softmax) and 0.7, no T**2 scaling."""
    B, R, V = 2, 2, 3000
    for tail, T, (labels_kind, hw) in itertools.product(TAILS.values(), [1.0, 0.7], [("partial", 0.5), ("none", 0.0)]):
        s, idx, v = make(B, R, V, 40, tail, dtype, dtype, seed=div[1], T=T)
        s = (s.double() + torch.linspace(0, 30, V, dtype=F64)).to(dtype)  # a new maximum in every block
        s[0, 1, :1500] = float("-inf")                                    # blocks of -inf, then finite
        idx[0, 1] = torch.randperm(1500, generator=torch.Generator().manual_seed(2))[:40] + 1500
        labels = make_labels(B, R, V, labels_kind)
        if labels is not None:
            labels[0, 1] = 2999
        cfg = _cfg(divergence=div[1], tail=tail, temperature=T, hard_weight=hw, scale_temperature=False)
        compare(s, idx, v, labels, cfg, f"tail={tail} T={T} {labels_kind}")


@pytest.mark.parametrize("div", [d for d in DIVS if d[0] in ("forward_kl", "jsd", "skew_reverse_kl")],
                         ids=lambda d: d[0])
def test_skew_edges_and_dominant_entry(div):
    """skew 0 and 1, and a teacher entry holding nearly all of the student's mass (q_i -> 1, where
    the gradient h_i - q_i H and the bucket tail 1 - sum q cancel)."""
    B, R, V, k = 2, 3, 257, 8
    for tail in TAILS.values():
        s, idx, v = make(B, R, V, k, tail, seed=3)
        s.view(-1, V)[torch.arange(B * R), idx.view(-1, k)[:, 0]] = 40.0
        for skew in (0.0, 1.0, 0.5):
            compare(s, idx, v, None, _cfg(divergence=div[1], tail=tail, skew=skew), f"tail={tail} skew={skew}")


def near_complete(V=2100, k=30, T=2.0, seed=41):
    """Bucket rows (one batch, six rows) whose k entries hold all but ~1e-8 of the mass on one side,
    the other or both (float32 tails round to 0): student logits at T, indices, float64 teacher
    log-probabilities at T; then the same with k = V (indices: a permutation of the vocabulary)."""
    R = 6
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, R, V, generator=g)
    t = torch.randn(1, R, V, generator=g)
    perm = torch.rand(1, R, V, generator=g).argsort(-1)
    idx = perm[..., :k].contiguous()
    off = torch.tensor([(20.0, 19.0), (19.0, 20.0), (25.0, 10.0), (10.0, 25.0), (30.0, 30.0), (13.0, 13.0)])
    s.scatter_add_(-1, idx, off[:, 0].view(1, R, 1).expand(1, R, k))
    t.scatter_add_(-1, idx, off[:, 1].view(1, R, 1).expand(1, R, k))
    lp = torch.log_softmax(t.double(), -1)
    return [(s * T, idx, lp.gather(-1, idx)), (s * T, perm.contiguous(), lp.gather(-1, perm))]


NEAR_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (F64, F64)]


@pytest.mark.parametrize("dtypes", NEAR_DTYPES, ids=["f32", "bf16-f32", "f64"])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_bucket_near_complete_mass(div, dtypes):
    """Bucket rows whose k entries hold all but ~1e-8 of the mass (near_complete), and k = V: finite,
    and the reference's floored tails (the float64 path to ~1e-10). Two 1024-entry blocks and a bit."""
    cfg = _cfg(divergence=div[1], tail=TAILS["bucket"], temperature=2.0, hard_weight=0.0)
    for (s, idx, vals), what in zip(near_complete(), ["near-complete", "k = V"]):
        loss, g = compare(s.to(dtypes[0]), idx, vals.to(dtypes[1]), None, cfg, what)
        assert bool(loss.isfinite().all()) and bool(g.isfinite().all()), what


def test_ignored_rows_never_read():
    B, R, V, k = 2, 4, 129, 7
    for tail, div in itertools.product(TAILS.values(), DIVERGENCES.values()):
        s, idx, v = make(B, R, V, k, tail, seed=17)
        labels = make_labels(B, R, V, "partial")
        ign = labels == IGNORE
        s[ign] = float("nan")
        v[ign] = float("nan")
        idx[ign] = -7  # out of range: never dereferenced either
        loss, g = run_native(s, idx, v, labels, _cfg(divergence=div, tail=tail, hard_weight=0.5))
        assert bool((loss[ign] == 0).all()) and bool((g[ign] == 0).all())
        assert bool(loss.isfinite().all()) and bool(g.isfinite().all())


@pytest.mark.parametrize("hard", [0.0, 0.5], ids=["soft", "hard"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (F64, torch.float32)], ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_nan_makes_its_row_nan(dtypes, hard):
    """A NaN in a counted row's teacher values or in the student logits it reads: that row's loss and
    whole gradient NaN, for both tails and every divergence, across blocks (a first block of -inf
    only: its dense part is NaN too), with and without a gradient; other rows bitwise as without it;
    ignored rows 0. renormalize with a divergence other than forward_kl and no hard label reads the
    student only at the k indices: a NaN elsewhere changes nothing there (the contract)."""
    check_nan_rows(dtypes, hard)


def check_nan_rows(dtypes, hard, run=run_native, V=2100):
    """test_nan_makes_its_row_nan with the op run by ``run`` (test_native_sparse_cuda reuses it)."""
    B, R, k = 2, 4, 7
    labels = torch.tensor([[3, IGNORE, 7, 0], [5, 9, 1, 2]])
    for tail, div in itertools.product(TAILS.values(), DIVERGENCES.values()):
        s, idx, v = make(B, R, V, k, tail, *dtypes, seed=43)
        ns, nv = s.clone(), v.clone()
        ns[0, 0, idx[0, 0, 3]] = float("nan")  # at a teacher entry
        ns[0, 1, idx[0, 1, 0]] = float("nan")  # ignored row
        nv[0, 1, 1] = float("nan")
        ns[0, 2, :1024] = float("-inf")
        ns[0, 2, idx[0, 2, 0]] = float("nan")
        nv[0, 3, 2] = float("nan")
        out = next(j for j in range(2048, V) if j not in idx[1, 0].tolist())
        ns[1, 0, out] = float("nan")  # outside the teacher's entries, last block
        nv[1, 1, 1::2] = float("-inf")
        nv[1, 1, 0] = float("nan")
        whole = tail == TAILS["bucket"] or div == DIVERGENCES["forward_kl"] or hard != 0.0
        bad = torch.zeros(B, R, dtype=torch.bool)
        bad[0, 0] = bad[0, 2] = bad[0, 3] = bad[1, 1] = True
        bad[1, 0] = whole
        good = ~bad
        good[0, 1] = False
        cfg = _cfg(divergence=div, tail=tail, hard_weight=hard)
        for grad in (True, False):
            got = run(ns, idx, nv, labels, cfg, grad)
            want = run(s, idx, v, labels, cfg, grad)
            what = (tail, div, grad)
            assert bool(got[0][bad].isnan().all()) and got[0][0, 1] == 0, what
            assert torch.equal(got[0][good], want[0][good]), what
            if grad:
                assert bool(got[1][bad].isnan().all()) and bool((got[1][0, 1] == 0).all()), what
                assert torch.equal(got[1][good], want[1][good]), what


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, F64], ids=str)
def test_deterministic(dtype):
    B, R, V, k = 4, 16, 2100, 33
    for tail, div in [(0, 0), (0, 2), (1, 1), (1, 5)]:
        s, idx, v = make(B, R, V, k, tail, dtype, torch.float32, seed=29)
        labels = make_labels(B, R, V, "partial")
        cfg = _cfg(divergence=div, tail=tail, hard_weight=0.5)
        a = run_native(s, idx, v, labels, cfg)
        b = run_native(s, idx, v, labels, cfg)
        loss_only, _ = run_native(s, idx, v, labels, cfg, grad=False)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            c = run_native(s, idx, v, labels, cfg)
        finally:
            torch.set_num_threads(threads)
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y) and torch.equal(x, z)
        assert torch.equal(loss_only, a[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streaming_stores(dtype):
    """Gradients of 32 MB and more are written with non-temporal stores: same bits as small calls."""
    B, R, V = 1, 260, 32771 if dtype == torch.float32 else 65543  # odd V: rows start at every alignment
    s, idx, v = make(B, R, V, 50, 1, dtype, dtype, seed=37)
    labels = make_labels(B, R, V, "partial")
    cfg = _cfg(divergence=0, tail=1, hard_weight=0.5)
    loss, g = run_native(s, idx, v, labels, cfg)
    assert g.numel() * g.element_size() >= 32 << 20
    for i in range(0, R, 37):
        part = slice(i, i + 37)
        l2, g2 = run_native(s[:, part], idx[:, part], v[:, part], labels[:, part], cfg)
        assert torch.equal(l2, loss[:, part]) and torch.equal(g2, g[:, part])


@pytest.mark.parametrize("values_dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("div", list(DIVERGENCES), ids=str)
@pytest.mark.parametrize("tail", list(TAILS), ids=str)
def test_gradcheck_float64(tail, div, values_dtype):
    z, idx, v = make(3, 2, 11, 4, TAILS[tail], F64, values_dtype, seed=5, scale=1.5)
    labels = torch.tensor([[3, IGNORE], [0, 10], [IGNORE, 7]])

    def f(x):
        return fastkd.sparse_kd_loss(x, idx, v, labels, divergence=div, tail=tail, temperature=1.7, beta=0.4,
                                     skew=0.25, hard_label_weight=0.3, reduction="none", backend="cpp")

    assert torch.autograd.gradcheck(f, (z.requires_grad_(),), eps=1e-6, atol=1e-7)


def _opcheck_args(labels, grad, dtype=torch.float32, tail=0, div=0, hard=0.0):
    s, idx, v = make(2, 3, 37, 5, tail, dtype, dtype, seed=31)
    y = make_labels(2, 3, 37, "partial") if labels else None
    loss = torch.empty(2, 3, dtype=F64 if dtype == F64 else torch.float32)
    gs = torch.empty_like(s) if grad else None
    return (s, idx, v, y, loss, gs, *_args(_cfg(divergence=div, tail=tail, hard_weight=hard)))


@pytest.mark.parametrize("labels,grad,dtype,tail,div,hard", [
    (False, True, torch.float32, 0, 0, 0.0), (True, True, torch.bfloat16, 1, 2, 0.5),
    (True, False, torch.float32, 0, 5, 0.0), (True, True, F64, 1, 3, 0.5)])
def test_opcheck(labels, grad, dtype, tail, div, hard):
    torch.library.opcheck(op, _opcheck_args(labels, grad, dtype, tail, div, hard))


def test_fake_kernel_traces():
    args = _opcheck_args(True, True, tail=1, hard=0.5)

    def f(s, idx, v, y, loss, gs):
        op(s, idx, v, y, loss, gs, *args[6:])
        return loss.sum() + gs.sum()

    clone = lambda: [a.clone() if isinstance(a, torch.Tensor) else a for a in args[:6]]  # noqa: E731
    eager = f(*clone())
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*clone())
    assert torch.equal(eager, compiled)


def test_errors():
    s, idx, v = make(2, 3, 11, 4, 0)
    loss = torch.empty(2, 3)
    a = _args(_cfg())
    bad = idx.clone()
    bad[1, 2, 3] = 11
    with pytest.raises(RuntimeError, match="index 11 at row 5 is out of range"):
        op(s, bad, v, None, loss, None, *a)
    with pytest.raises(RuntimeError, match="label 11 at row"):
        op(s, idx, v, torch.full((2, 3), 11), loss, None, *_args(_cfg(hard_weight=0.5)))
    with pytest.raises(RuntimeError, match="needs labels"):
        op(s, idx, v, None, loss, None, *_args(_cfg(hard_weight=0.5)))
    with pytest.raises(RuntimeError, match="float64 exactly when"):
        op(s, idx, v.double(), None, loss, None, *a)
    with pytest.raises(RuntimeError, match="float64 exactly when"):
        op(s, idx, v, None, loss.double(), None, *a)
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16 or float64"):
        op(s.to(torch.int32), idx, v, None, loss, None, *a)
    with pytest.raises(RuntimeError, match="indices must be a contiguous int64"):
        op(s, idx.int(), v, None, loss, None, *a)
    with pytest.raises(RuntimeError, match="indices must be a contiguous int64"):
        op(s, idx.transpose(0, 1).contiguous().transpose(0, 1), v, None, loss, None, *a)
    with pytest.raises(RuntimeError, match="shaped like indices"):
        op(s, idx, v[..., :2], None, loss, None, *a)
    with pytest.raises(RuntimeError, match="between 1 and V"):
        op(s[..., :3], idx, v, None, loss, None, *a)
    with pytest.raises(RuntimeError, match="last dim"):
        op(s.transpose(1, 2).contiguous().transpose(1, 2), idx, v, None, loss, None, *a)
    with pytest.raises(RuntimeError, match="tail code"):
        op(s, idx, v, None, loss, None, *_args(_cfg(tail=2)))
    with pytest.raises(RuntimeError, match="beta"):
        op(s, idx, v, None, loss, None, *_args(_cfg(divergence=2, beta=0.0)))
    with pytest.raises(RuntimeError, match="student's dtype"):
        op(s, idx, v, None, loss, torch.empty_like(s, dtype=torch.bfloat16), *a)
    with pytest.raises(RuntimeError, match="must not overlap"):
        op(s, idx, v, None, loss, s, *a)
