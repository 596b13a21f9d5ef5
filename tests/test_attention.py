"""Attention distillation losses end to end, every backend against an independent float64 oracle.

The oracle below is written from the issue's formulas (Zagoruyko and Komodakis' ``at_loss``,
TinyBERT / MiniLM attention maps, MiniLMv2 relations) with plain torch ops in float64 and autograd
for gradients; it shares no code with fastkd (not even the reference backend). Shapes are small
and odd (L = 13, 37; head dims that are no power of two) so that the triton interpreter stays fast.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from conftest import HAS_CUDA, skip_unless_available

BACKENDS = ["torch", "cpp", "triton"]
MAP_BACKENDS = BACKENDS + ["cuda"]  # attention maps have a CUDA kernel (csrc/cuda/attention.cu)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 1.2e-7, torch.bfloat16: 7.8e-3, torch.float16: 9.8e-4, torch.float64: 2.2e-16}
MASKS = ["none", "right", "left", "empty"]  # padding modes; "empty": one sequence fully padded


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: OpenMP barriers on a loaded 2-core machine cost more than the work.
    (test_cpp_thread_count_agrees runs the cpp kernels with several threads.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- oracle
def oracle_at(s, t, p=2.0, reduction="mean"):
    """Zagoruyko and Komodakis: at(x) = F.normalize(x.pow(p).mean(1).view(B, -1))."""
    def at(x):
        return F.normalize(x.abs().pow(p).mean(1).reshape(x.shape[0], -1), dim=1)

    d = (at(s) - at(t)).pow(2)
    return {"mean": d.mean(), "sum": d.sum(), "none": d.mean(1)}[reduction]


def _safe_keys(mask, B, L, device):
    """[B, L] key mask for the math; a fully padded sequence gets all keys (its rows are dropped
    afterwards) so that no softmax sees only -inf (a NaN would leak into autograd)."""
    if mask is None:
        return torch.ones(B, L, dtype=torch.bool, device=device)
    m = mask.bool()
    return torch.where(m.any(1, keepdim=True), m, torch.ones_like(m))


def oracle_map(s, t, kind="kl", inputs="probs", mask=None, head_map=None, reduction="batchmean"):
    B, H, L, _ = s.shape
    if mask is not None:  # entries of padded rows and keys may hold anything: feed the math 0.5
        pad = ~(mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :])
        s, t = s.masked_fill(pad, 0.5), t.masked_fill(pad, 0.5)
    keys = _safe_keys(mask, B, L, s.device)[:, None, None, :]
    rows = (torch.ones(B, L, dtype=torch.bool) if mask is None else mask.bool())[:, None, :]
    t_inputs = inputs
    if head_map is not None:
        groups = [[g] if isinstance(g, int) else list(g) for g in head_map]
        if kind == "kl" and inputs == "scores" and any(len(g) > 1 for g in groups):
            # averaging groups of attention distributions: the teacher becomes probabilities
            t = torch.softmax(t.masked_fill(~keys, -math.inf), -1)
            t_inputs = "probs"
        t = torch.stack([t[:, g].mean(1) for g in groups], 1)
    zero = torch.zeros((), dtype=s.dtype)
    if kind == "kl":
        def logp(x, scores):
            if scores:
                return torch.log_softmax(x.masked_fill(~keys, -math.inf), -1)
            return torch.log(torch.where(keys, x, torch.ones_like(x)))

        lt, ls = logp(t, t_inputs == "scores"), logp(s, inputs == "scores")
        p = torch.where(keys, lt.exp(), zero)
        term = torch.where(p > 0, p * (torch.where(p > 0, lt, zero) - torch.where(p > 0, ls, zero)),
                           zero)
        row = term.sum(-1)
    else:
        if inputs == "scores":
            s = torch.where(s > -100, s, zero)
            t = torch.where(t > -100, t, zero)
        d = torch.where(keys & rows.unsqueeze(-1), s - t, zero)
        row = (d * d).sum(-1)
    row = torch.where(rows, row, zero)
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    n = rows[:, 0].sum(1).double()
    count = H * ((n * n).sum() if kind == "mse" else n.sum())
    return row.sum() / count.clamp(min=1)


def oracle_relation(st, tt, A, relations=(("q", "q"), ("k", "k"), ("v", "v")), mask=None):
    def rel(x, y):
        B, L, D = x.shape
        d = D // A
        xh = x.reshape(B, L, A, d).transpose(1, 2)
        yh = y.reshape(B, L, A, d).transpose(1, 2)
        return xh @ yh.transpose(-1, -2) / math.sqrt(d)

    B, L = next(iter(st.values())).shape[:2]
    keys = _safe_keys(mask, B, L, "cpu")[:, None, None, :]
    rows = torch.ones(B, L, dtype=torch.bool) if mask is None else mask.bool()
    # padded tokens' states may hold anything: feed the math zeros
    st = {k: v.masked_fill(~rows[:, :, None], 0.0) for k, v in st.items()}
    tt = {k: v.masked_fill(~rows[:, :, None], 0.0) for k, v in tt.items()}
    n = rows.sum(1).double()
    total = 0.0
    for m, k in relations:
        ls = torch.log_softmax(rel(st[m], st[k]).masked_fill(~keys, -math.inf), -1)
        lt = torch.log_softmax(rel(tt[m], tt[k]).masked_fill(~keys, -math.inf), -1)
        p = lt.exp()
        zero = torch.zeros((), dtype=ls.dtype)
        kl = torch.where(p > 0, p * (torch.where(p > 0, lt, zero) - torch.where(p > 0, ls, zero)),
                         zero).sum(-1)
        per_sample = torch.where(rows[:, None, :], kl, zero).sum((1, 2))
        valid = n > 0
        per_sample = torch.where(valid, per_sample / (A * n.clamp(min=1)), zero)
        total = total + per_sample.sum() / valid.sum().clamp(min=1)
    return total / len(relations)


# ----------------------------------------------------------------------------- helpers
def make_mask(B, L, mode, seed=0):
    if mode == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(L // 2, L, (B,), generator=g)
    lengths[0] = L
    pos = torch.arange(L)
    mask = pos[None, :] < lengths[:, None] if mode in ("right", "empty") else \
        pos[None, :] >= (L - lengths)[:, None]
    if mode == "empty":
        mask[-1] = False
    return mask.to(torch.long)


def poison_padding(x, mask, dims):
    """x with NaN wherever a padded token is involved: kernels must never read those entries.
    dims: "map" ([B, H, L, L]: padded query rows and keys) or "states" ([B, L, D])."""
    if mask is None:
        return x
    m = mask.bool().to(x.device)
    pad = ~(m[:, None, :, None] & m[:, None, None, :]) if dims == "map" else ~m[:, :, None]
    return x.masked_fill(pad, float("nan"))


def _max_err(a, e):
    return (a.double().cpu() - e.double().cpu()).abs().max().item() if e.numel() else 0.0


def assert_close(actual, expected, dtype, what, factor=None, baseline=None):
    """Error within a few roundings of dtype relative to the largest magnitude, or within twice
    the torch backend's own error in the same dtype (flash-attention's rule) when given."""
    if factor is None:
        factor = 64.0 if dtype == torch.float32 else 4.0
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    a, e = actual.double().cpu(), expected.double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(torch.isfinite(a), torch.isfinite(e)), f"{what}: finiteness differs"
    fin = torch.isfinite(e)
    a, e = a[fin], e[fin]
    mag = e.abs().max().item() if e.numel() else 0.0
    tol = factor * EPS[dtype] * max(mag, 1e-3) + 1e-6
    if baseline is not None:
        tol = max(tol, 2.0 * _max_err(baseline.double().cpu()[fin], e))
    err = _max_err(a, e)
    assert err <= tol, f"{what}: max error {err:.3e} > tol {tol:.3e} (max |expected| {mag:.3e})"


def run(fn, inputs, backend, gout):
    """fastkd loss and student gradients for ``backend``: inputs are leaf copies."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs, backend)
    (out.double() * gout).sum().backward()
    return out, [x.grad for x in xs]


def check(fn, oracle, inputs, backend, dtype, what="", factor=None, seed=1):
    """Compare loss and gradients of ``fn(*inputs, backend)`` with the float64 oracle."""
    ref_in = [x.detach().double().cpu().requires_grad_() for x in inputs]
    ref = oracle(*ref_in)
    g = torch.Generator().manual_seed(seed)
    gout = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5  # grad_output != 1
    (ref * gout).sum().backward()
    device = inputs[0].device
    out, grads = run(fn, inputs, backend, gout.to(device))
    base_out, base_grads = (None, [None] * len(grads)) if backend == "torch" else \
        run(fn, inputs, "torch", gout.to(device))
    assert_close(out, ref.detach(), dtype, f"{what} loss", factor, base_out)
    for i, (gr, r, b) in enumerate(zip(grads, ref_in, base_grads)):
        assert_close(gr, r.grad, dtype, f"{what} grad[{i}]", factor, b)
    return out, grads


def _rand(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _probs(shape, dtype, device, seed, scale=2.0):
    return torch.softmax(_rand(shape, torch.float64, "cpu", seed, scale), -1).to(dtype).to(device)


# ----------------------------------------------------------------------------- attention transfer
def _at_params():
    out = []
    for b in BACKENDS:
        for dt in DTYPES:
            for red in ("mean", "sum", "none"):
                out.append(pytest.param(b, dt, red, id=f"{b}-{str(dt)[6:]}-{red}"))
    return out


@pytest.mark.parametrize("backend,dtype,reduction", _at_params())
def test_transfer_matches_oracle(backend, dtype, reduction):
    device = skip_unless_available(backend, "attention_transfer")
    s = _rand((3, 6, 7, 9), dtype, device, 0)   # channels differ, N = 63 (odd)
    t = _rand((3, 11, 7, 9), dtype, device, 1)
    check(lambda a, b_: fastkd.attention_transfer_loss(a, t, reduction=reduction, backend=b_),
          lambda a: oracle_at(a, t.double().cpu(), 2.0, reduction), [s], backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1.0, 1.5, 3.0])
def test_transfer_other_p(backend, p):
    device = skip_unless_available(backend, "attention_transfer")
    s, t = _rand((2, 5, 4, 6), torch.float32, device, 2), _rand((2, 3, 4, 6), torch.float32, device, 3)
    check(lambda a, b_: fastkd.attention_transfer_loss(a, t, p=p, backend=b_),
          lambda a: oracle_at(a, t.double().cpu(), p), [s], backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transfer_list_of_pairs_is_summed(backend):
    device = skip_unless_available(backend, "attention_transfer")
    s1, t1 = _rand((2, 4, 8, 8), torch.float32, device, 4), _rand((2, 6, 8, 8), torch.float32, device, 5)
    s2, t2 = _rand((2, 7, 3, 5), torch.float32, device, 6), _rand((2, 2, 3, 5), torch.float32, device, 7)
    check(lambda a, b, be: fastkd.attention_transfer_loss([a, b], [t1, t2], backend=be),
          lambda a, b: oracle_at(a, t1.double()) + oracle_at(b, t2.double()), [s1, s2], backend,
          torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transfer_large_map_and_zero_features(backend):
    """More positions than one block (N = 40 * 41), and an all-zero sample (norm below eps)."""
    device = skip_unless_available(backend, "attention_transfer")
    s, t = _rand((2, 3, 40, 41), torch.float32, device, 8), _rand((2, 2, 40, 41), torch.float32, device, 9)
    s[1] = 0
    out, (g,) = check(lambda a, b_: fastkd.attention_transfer_loss(a, t, backend=b_),
                      lambda a: oracle_at(a, t.double().cpu()), [s], backend, torch.float32)
    assert (g[1] == 0).all()


# ----------------------------------------------------------------------------- attention maps
def _map_params():
    out = []
    i = 0
    for b in MAP_BACKENDS:
        for kind in ("kl", "mse"):
            for inputs in ("probs", "scores"):
                for mask in MASKS:
                    for dt in DTYPES:
                        i += 1
                        # every dtype meets every (kind, inputs, mask) on some backend, and every
                        # backend runs every (kind, inputs, mask) in float32
                        if dt != torch.float32 and i % 3:
                            continue
                        out.append(pytest.param(b, kind, inputs, mask, dt,
                                                id=f"{b}-{kind}-{inputs}-{mask}-{str(dt)[6:]}"))
    return out


def _maps(kind, inputs, shape, dtype, device, seed):
    if inputs == "probs":
        return _probs(shape, dtype, device, seed), _probs(shape, dtype, device, seed + 1)
    return _rand(shape, dtype, device, seed, 2.0), _rand(shape, dtype, device, seed + 1, 2.0)


@pytest.mark.parametrize("backend,kind,inputs,mask_mode,dtype", _map_params())
def test_map_matches_oracle(backend, kind, inputs, mask_mode, dtype):
    device = skip_unless_available(backend, "attention_map")
    B, H, L = 3, 2, 13
    s, t = _maps(kind, inputs, (B, H, L, L), dtype, device, 10)
    mask = make_mask(B, L, mask_mode, seed=11)
    s, t = poison_padding(s, mask, "map"), poison_padding(t, mask, "map")
    dmask = None if mask is None else mask.to(device)
    out, (g,) = check(
        lambda a, be: fastkd.attention_map_loss(a, t, kind=kind, inputs=inputs, attention_mask=dmask,
                                                backend=be),
        lambda a: oracle_map(a, t.double().cpu(), kind, inputs, mask), [s], backend, dtype)
    if mask is not None:  # padded rows and keys get exactly zero gradient, never NaN
        m = mask.bool().to(device)
        assert torch.isfinite(g).all()
        assert (g[~m[:, None, :, None].expand_as(g)] == 0).all()
        assert (g[~m[:, None, None, :].expand_as(g)] == 0).all()


@pytest.mark.parametrize("backend", MAP_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("kind,inputs", [("kl", "scores"), ("mse", "probs")])
def test_map_reductions(backend, reduction, kind, inputs):
    device = skip_unless_available(backend, "attention_map")
    s, t = _maps(kind, inputs, (2, 3, 37, 37), torch.float32, device, 12)
    mask = make_mask(2, 37, "left", seed=13)
    dmask = mask.to(device)
    check(lambda a, be: fastkd.attention_map_loss(a, t, kind=kind, inputs=inputs, attention_mask=dmask,
                                                  reduction=reduction, backend=be),
          lambda a: oracle_map(a, t.double().cpu(), kind, inputs, mask, reduction=reduction),
          [s], backend, torch.float32)


@pytest.mark.parametrize("backend", MAP_BACKENDS)
@pytest.mark.parametrize("kind,inputs", [("kl", "scores"), ("kl", "probs"), ("mse", "scores")])
@pytest.mark.parametrize("head_map", [[3, 0], [[0, 1], [2, 3, 4]], [4, [1, 3]]])
def test_map_head_map(backend, kind, inputs, head_map):
    """Student with 2 heads, teacher with 5: one teacher head each, or group averages."""
    device = skip_unless_available(backend, "attention_map")
    s, _ = _maps(kind, inputs, (2, 2, 13, 13), torch.float32, device, 14)
    _, t = _maps(kind, inputs, (2, 5, 13, 13), torch.float32, device, 15)
    mask = make_mask(2, 13, "right", seed=16)
    dmask = mask.to(device)
    check(lambda a, be: fastkd.attention_map_loss(a, t, kind=kind, inputs=inputs, attention_mask=dmask,
                                                  head_map=head_map, backend=be),
          lambda a: oracle_map(a, t.double().cpu(), kind, inputs, mask, head_map=head_map),
          [s], backend, torch.float32)


@pytest.mark.parametrize("kind,inputs", [("kl", "scores"), ("kl", "probs"), ("mse", "scores")])
def test_map_triton_rows_in_several_chunks(monkeypatch, kind, inputs):
    """Rows longer than one key chunk: the online log-sum-exp across chunks."""
    device = skip_unless_available("triton", "attention_map")
    import fastkd.triton.attention as ta

    monkeypatch.setattr(ta, "MAX_BLOCK_INTERPRET", 16)
    monkeypatch.setattr(ta, "MAX_BLOCK_GPU", 16)
    s, t = _maps(kind, inputs, (2, 2, 37, 37), torch.float32, device, 22)
    mask = make_mask(2, 37, "left", seed=23)
    check(lambda a, be: fastkd.attention_map_loss(a, t, kind=kind, inputs=inputs,
                                                  attention_mask=mask.to(device), backend=be),
          lambda a: oracle_map(a, t.double().cpu(), kind, inputs, mask), [s], "triton", torch.float32)


@pytest.mark.parametrize("backend", MAP_BACKENDS)
def test_map_tinybert_additive_mask(backend):
    """Scores carrying HF's additive mask (finfo.min, -10000, -inf) compare as 0 in mse (TinyBERT)
    and drop out of the softmax in kl, with or without attention_mask."""
    device = skip_unless_available(backend, "attention_map")
    B, H, L = 2, 2, 13
    mask = make_mask(B, L, "right", seed=17)
    add = torch.where(mask.bool(), 0.0, -10000.0)[:, None, None, :]
    s = (_rand((B, H, L, L), torch.float64, "cpu", 18, 2.0) + add).float().to(device)
    t = (_rand((B, H, L, L), torch.float64, "cpu", 19, 2.0) + add).float()
    t[..., -1] = torch.where(mask[:, -1].bool()[:, None, None], t[..., -1], float("-inf"))
    t = t.to(device)
    for kind in ("mse", "kl"):
        for m in (None, mask):
            check(lambda a, be: fastkd.attention_map_loss(
                      a, t, kind=kind, inputs="scores",
                      attention_mask=None if m is None else m.to(device), backend=be),
                  lambda a: oracle_map(a, t.double().cpu(), kind, "scores", m), [s], backend,
                  torch.float32, what=f"{kind} mask={m is not None}")


@pytest.mark.parametrize("backend", MAP_BACKENDS)
def test_map_strided_input(backend):
    """Maps read through strides (a head slice of a bigger tensor) without a copy."""
    device = skip_unless_available(backend, "attention_map")
    big_s = _rand((2, 4, 13, 16), torch.float32, device, 20)
    big_t = _rand((2, 4, 13, 16), torch.float32, device, 21)
    t = big_t[:, 1:3, :, :13]
    assert not t.is_contiguous()
    check(lambda a, be: fastkd.attention_map_loss(a[:, ::2, :, :13], t, inputs="scores", backend=be),
          lambda a: oracle_map(a[:, ::2, :, :13], t.double().cpu(), "kl", "scores"), [big_s], backend,
          torch.float32)


# csrc/cuda/attention.cu lays a query row out by L and dtype: sub-warp groups (L <= 64, <= 128),
# a warp with 1, 2 or 4 octets per lane (<= 256, <= 512, <= 1024; 2 for mixed dtypes and float64),
# one CTA per row beyond. FASTKD_CUDA_MAP_CTA_THREADS=n forces the CTA layout with n threads: with
# 32 threads a row of 1100 spans several tiles, which the second pass re-reads from memory.
_F32, _BF16, _F16, _F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


@pytest.mark.parametrize("L,cta", [(40, None), (100, None), (200, None), (300, None), (520, None),
                                   (1500, None), (37, "64"), (1100, "32")],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtypes", [(_F32, _F32), (_BF16, _BF16), (_F16, _F16), (_BF16, _F32),
                                    (_F64, _F64)],
                         ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_map_cuda_layouts(monkeypatch, L, cta, dtypes):
    device = skip_unless_available("cuda", "attention_map")
    if cta is not None:
        monkeypatch.setenv("FASTKD_CUDA_MAP_CTA_THREADS", cta)
    ds, dt = dtypes
    B, H = 2, 1
    mask = make_mask(B, L, "left", seed=40)
    for kind, inputs in (("kl", "scores"), ("kl", "probs"), ("mse", "scores"), ("mse", "probs")):
        if (kind, inputs, ds) == ("kl", "probs", _F16) and L > 128:
            continue  # -p/s of long rows' tiny fp16 probabilities overflows fp16 in every backend
        s, _ = _maps(kind, inputs, (B, H, L, L), ds, device, 41)
        _, t = _maps(kind, inputs, (B, H, L, L), dt, device, 42)
        s, t = poison_padding(s, mask, "map"), poison_padding(t, mask, "map")
        check(lambda a, be: fastkd.attention_map_loss(a, t, kind=kind, inputs=inputs,
                                                      attention_mask=mask.to(device), backend=be),
              lambda a: oracle_map(a, t.double().cpu(), kind, inputs, mask), [s], "cuda", ds,
              what=f"{kind}-{inputs}")


def test_map_cuda_deterministic_and_inplace(monkeypatch):
    """Bitwise the same twice; grad_student may be student itself (every entry is read by the
    thread that writes its gradient, before it writes it)."""
    device = skip_unless_available("cuda", "attention_map")
    op = torch.ops.fastkd.attention_map_fwd
    for L, dtype, cta in ((37, torch.bfloat16, None), (600, torch.float32, None),
                          (1500, torch.float16, None), (1100, torch.float32, "32")):
        if cta is not None:
            monkeypatch.setenv("FASTKD_CUDA_MAP_CTA_THREADS", cta)
        s, t = _rand((2, 3, L, L), dtype, device, 43, 2.0), _rand((2, 3, L, L), dtype, device, 44, 2.0)
        mask = make_mask(2, L, "right", seed=45).bool().to(device)
        for kind, sc, tc in ((0, True, True), (0, True, False), (1, True, True), (1, False, False)):
            tt = torch.softmax(t.float(), -1).to(dtype) if not tc else t
            res = []
            for _ in range(2):
                loss = torch.empty(2, 3, L, dtype=torch.float32, device=device)
                g = torch.empty_like(s)
                op(s, tt, mask, loss, g, kind, sc, tc)
                res.append((loss, g))
            assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
            x = s.clone()
            loss = torch.empty(2, 3, L, dtype=torch.float32, device=device)
            op(x, tt, mask, loss, x, kind, sc, tc)
            assert torch.equal(loss, res[0][0]) and torch.equal(x, res[0][1]), (L, kind, sc, tc)
        monkeypatch.delenv("FASTKD_CUDA_MAP_CTA_THREADS", raising=False)


def test_map_cuda_gradcheck_float64():
    device = skip_unless_available("cuda", "attention_map")
    mask = make_mask(2, 5, "left", 3).to(device)
    for kind, inputs in (("kl", "scores"), ("kl", "probs"), ("mse", "scores"), ("mse", "probs")):
        a, b = _maps(kind, inputs, (2, 2, 5, 5), torch.float64, device, 4)
        a.requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: fastkd.attention_map_loss(x, b, kind=kind, inputs=inputs, attention_mask=mask,
                                                reduction="none", backend="cuda"), (a,))


@pytest.mark.parametrize("grad", [True, False])
def test_map_cuda_opcheck(grad):
    device = skip_unless_available("cuda", "attention_map")
    a, b = _rand((2, 2, 7, 7), torch.float32, device, 3), _rand((2, 2, 7, 7), torch.float32, device, 4)
    mask = make_mask(2, 7, "right", 5).bool().to(device)
    torch.library.opcheck(torch.ops.fastkd.attention_map_fwd,
                          (a, b, mask, torch.empty(2, 2, 7, device=device),
                           torch.empty_like(a) if grad else None, 0, True, False))


def test_map_cuda_argument_errors():
    """The CPU kernel's checks, naming the argument."""
    device = skip_unless_available("cuda", "attention_map")
    op = torch.ops.fastkd.attention_map_fwd
    s, t = _rand((2, 2, 7, 7), torch.float32, device, 3), _rand((2, 2, 7, 7), torch.float32, device, 4)
    loss = torch.empty(2, 2, 7, device=device)
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    cases = [
        ((s, t[..., :6], None, loss, None, 0, True, True), "teacher"),
        ((s, t, None, loss, None, 2, True, True), "kind"),
        ((s, t, None, loss.double(), None, 0, True, True), "loss"),
        ((s, t, None, loss[..., :6], None, 0, True, True), "loss"),
        ((s, t, mask[:, :6], loss, None, 0, True, True), "mask"),
        ((s, t, mask.long(), loss, None, 0, True, True), "mask"),
        ((s, t, None, loss, torch.empty(2, 2, 7, 6, device=device), 0, True, True), "grad_student"),
        ((s, t.transpose(-1, -2), None, loss, None, 0, True, True), "teacher"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            op(*args)
    with pytest.raises(TypeError, match="student"):
        op(s.int(), t, None, loss, None, 0, True, True)


# ----------------------------------------------------------------------------- attention relations
def _states(B, L, D, dtype, device, seed, scale=1.0):
    return {k: _rand((B, L, D), dtype, device, seed + i, scale) for i, k in enumerate("qkv")}


def _relation_params():
    out = []
    i = 0
    for b in BACKENDS:
        for mask in MASKS:
            for dt in DTYPES:
                for L in (13, 37):
                    i += 1
                    if dt != torch.float32 and i % 2:
                        continue
                    out.append(pytest.param(b, mask, dt, L, id=f"{b}-{mask}-{str(dt)[6:]}-L{L}"))
    return out


@pytest.mark.parametrize("backend,mask_mode,dtype,L", _relation_params())
def test_relation_matches_oracle(backend, mask_mode, dtype, L):
    """Student width 24 (head dim 12 with A=2), teacher width 40 (head dim 20): neither a power
    of two nor equal."""
    device = skip_unless_available(backend, "attention_relation")
    B, A = 3, 2
    mask = make_mask(B, L, mask_mode, seed=31)
    st = {k: poison_padding(v, mask, "states") for k, v in _states(B, L, 24, dtype, device, 30, 2.0).items()}
    tt = {k: poison_padding(v, mask, "states") for k, v in _states(B, L, 40, dtype, device, 40, 2.0).items()}
    dmask = None if mask is None else mask.to(device)
    tref = {k: v.double().cpu() for k, v in tt.items()}
    check(lambda q, k, v, be: fastkd.attention_relation_loss(
              {"q": q, "k": k, "v": v}, tt, num_relation_heads=A, attention_mask=dmask, backend=be),
          lambda q, k, v: oracle_relation({"q": q, "k": k, "v": v}, tref, A, mask=mask),
          [st["q"], st["k"], st["v"]], backend, dtype)


def test_relation_tf32x3_opt_in(monkeypatch):
    """FASTKD_TRITON_FP32_DOT=tf32x3: fp32 score tiles from three TF32 tensor-core products, close
    to fp32 (tolerance 16x the default: ~1e-6 per product instead of 6e-8). The interpreter
    computes every precision alike, so on CPU this checks the plumbing; a GPU checks the
    accuracy. A bad value is an error that names the variable."""
    device = skip_unless_available("triton", "attention_relation")
    monkeypatch.setenv("FASTKD_TRITON_FP32_DOT", "tf32x3")
    B, A, L = 2, 2, 37
    st = _states(B, L, 24, torch.float32, device, 30, 2.0)
    tt = _states(B, L, 40, torch.float32, device, 40, 2.0)
    tref = {k: v.double().cpu() for k, v in tt.items()}
    check(lambda q, k, v, be: fastkd.attention_relation_loss(
              {"q": q, "k": k, "v": v}, tt, num_relation_heads=A, backend=be),
          lambda q, k, v: oracle_relation({"q": q, "k": k, "v": v}, tref, A),
          [st["q"], st["k"], st["v"]], "triton", torch.float32, factor=1024.0)
    monkeypatch.setenv("FASTKD_TRITON_FP32_DOT", "tf32")
    with pytest.raises(ValueError, match="FASTKD_TRITON_FP32_DOT"):
        fastkd.attention_relation_loss(st, tt, num_relation_heads=A, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_relation_cross_relations_and_tuples(backend):
    """(q, k) and (v, v) relations from (q, k, v) tuples, 3 heads, longer than one block."""
    device = skip_unless_available(backend, "attention_relation")
    B, L, A = 2, 77, 3
    st = _states(B, L, 18, torch.float32, device, 50, 1.5)
    tt = _states(B, L, 30, torch.float32, device, 60, 1.5)
    rels = (("q", "k"), ("v", "v"))
    mask = make_mask(B, L, "left", seed=51)
    tref = {k: v.double().cpu() for k, v in tt.items()}
    check(lambda q, k, v, be: fastkd.attention_relation_loss(
              (q, k, v), (tt["q"], tt["k"], tt["v"]), num_relation_heads=A, relations=rels,
              attention_mask=mask.to(device), backend=be),
          lambda q, k, v: oracle_relation({"q": q, "k": k, "v": v}, tref, A, rels, mask),
          [st["q"], st["k"], st["v"]], backend, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_relation_dtypes_per_relation(backend):
    """Relations of different dtypes in one call (q, k float32; v float64): each relation runs
    in its own precision. The cpp op used to get float64 buffers for the float32 relations
    (one accumulation dtype for the whole call) and raised inside the kernel."""
    device = skip_unless_available(backend, "attention_relation")
    g = torch.Generator().manual_seed(4)
    r = lambda dt, w=8: torch.randn(2, 5, w, generator=g, dtype=torch.float64).to(dt).to(device)  # noqa: E731
    st = {"q": r(torch.float32), "k": r(torch.float32), "v": r(torch.float64)}
    tt = {"q": r(torch.float32, 12), "k": r(torch.float32, 12), "v": r(torch.float64, 12)}
    leaves = {k: v.clone().requires_grad_() for k, v in st.items()}
    out = fastkd.attention_relation_loss(leaves, tt, num_relation_heads=2, backend=backend)
    out.backward()
    ref_leaves = {k: v.double().requires_grad_() for k, v in st.items()}
    ref = fastkd.attention_relation_loss(ref_leaves, {k: v.double() for k, v in tt.items()},
                                         num_relation_heads=2, backend="torch")
    ref.backward()
    assert out.dtype == torch.float64  # the float64 relation's sum
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    for k in st:
        assert leaves[k].grad.dtype == st[k].dtype
        torch.testing.assert_close(leaves[k].grad.double(), ref_leaves[k].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relation_long_left_padded(backend):
    """L = 300: several query blocks in every backend, the first ones fully padded."""
    device = skip_unless_available(backend, "attention_relation")
    B, L, A = 2, 300, 2
    st = _states(B, L, 8, torch.float32, device, 200)
    tt = _states(B, L, 12, torch.float32, device, 210)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :170] = 0
    tref = {k: v.double().cpu() for k, v in tt.items()}
    rels = (("k", "k"),)
    check(lambda k, be: fastkd.attention_relation_loss(
              {"k": k}, tt, num_relation_heads=A, relations=rels, attention_mask=mask.to(device),
              backend=be),
          lambda k: oracle_relation({"k": k}, tref, A, rels, mask), [st["k"]], backend,
          torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relation_peaked_scores(backend):
    """Scores of magnitude ~100 (near one-hot rows, exp underflow): finite and accurate."""
    device = skip_unless_available(backend, "attention_relation")
    B, L, A = 2, 37, 2
    st = _states(B, L, 24, torch.float32, device, 220, 5.0)
    tt = _states(B, L, 40, torch.float32, device, 230, 5.0)
    tref = {k: v.double().cpu() for k, v in tt.items()}
    out, grads = check(lambda q, k, v, be: fastkd.attention_relation_loss(
                           {"q": q, "k": k, "v": v}, tt, num_relation_heads=A, backend=be),
                       lambda q, k, v: oracle_relation({"q": q, "k": k, "v": v}, tref, A),
                       [st["q"], st["k"], st["v"]], backend, torch.float32, factor=256)
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relation_fused_qkv_strided(backend):
    """q, k, v as slices of one fused projection [B, L, 3D] are read in place."""
    device = skip_unless_available(backend, "attention_relation")
    B, L, D, A = 2, 13, 16, 4
    qkv_t = _rand((B, L, 3 * 24), torch.float32, device, 70)
    tt = dict(zip("qkv", qkv_t.split(24, -1)))
    assert not tt["q"].is_contiguous()
    tref = {k: v.double().cpu() for k, v in tt.items()}

    def fn(qkv, be):
        return fastkd.attention_relation_loss(dict(zip("qkv", qkv.split(D, -1))), tt,
                                              num_relation_heads=A, backend=be)

    def ref(qkv):
        return oracle_relation(dict(zip("qkv", qkv.split(D, -1))), tref, A)

    check(fn, ref, [_rand((B, L, 3 * D), torch.float32, device, 71)], backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relation_fully_padded_batch_is_zero(backend):
    device = skip_unless_available(backend, "attention_relation")
    st = _states(2, 13, 8, torch.float32, device, 80)
    for v in st.values():
        v.requires_grad_()
    tt = _states(2, 13, 8, torch.float32, device, 90)
    mask = torch.zeros(2, 13, dtype=torch.long, device=device)
    out = fastkd.attention_relation_loss(st, tt, num_relation_heads=2, attention_mask=mask,
                                         backend=backend)
    out.backward()
    assert out.item() == 0.0
    assert all((v.grad == 0).all() for v in st.values())


# ----------------------------------------------------------------------------- all families
@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    device = skip_unless_available(backend, "attention_map")
    s, t = _rand((2, 3, 5, 5), torch.float32, device, 1), _rand((2, 4, 5, 5), torch.float32, device, 2)
    s.requires_grad_(), t.requires_grad_()
    fastkd.attention_transfer_loss(s, t, backend=backend).backward()
    assert t.grad is None and s.grad is not None
    a, b = _rand((2, 2, 7, 7), torch.float32, device, 3), _rand((2, 2, 7, 7), torch.float32, device, 4)
    a.requires_grad_(), b.requires_grad_()
    fastkd.attention_map_loss(a, b, inputs="scores", backend=backend).backward()
    assert b.grad is None and a.grad is not None
    st = {k: v.requires_grad_() for k, v in _states(2, 7, 8, torch.float32, device, 5).items()}
    tt = {k: v.requires_grad_() for k, v in _states(2, 7, 8, torch.float32, device, 6).items()}
    fastkd.attention_relation_loss(st, tt, num_relation_heads=2, backend=backend).backward()
    assert all(v.grad is None for v in tt.values()) and all(v.grad is not None for v in st.values())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_deterministic(backend):
    device = skip_unless_available(backend, "attention_relation")
    st = _states(2, 37, 24, torch.bfloat16, device, 100)
    tt = _states(2, 37, 40, torch.bfloat16, device, 110)
    s = _rand((2, 3, 37, 37), torch.float32, device, 120)
    t = _rand((2, 3, 37, 37), torch.float32, device, 121)
    mask = make_mask(2, 37, "left", 3).to(device)
    res = []
    for _ in range(2):
        xs = {k: v.clone().requires_grad_() for k, v in st.items()}
        a = s.clone().requires_grad_()
        out = fastkd.attention_relation_loss(xs, tt, num_relation_heads=2, attention_mask=mask,
                                             backend=backend)
        out2 = fastkd.attention_map_loss(a, t, inputs="scores", attention_mask=mask, backend=backend)
        (out + out2).backward()
        res.append([out, out2, a.grad] + [x.grad for x in xs.values()])
    assert all(torch.equal(x, y) for x, y in zip(*res))


def test_cpp_thread_count_agrees():
    """The cpp kernels split work over threads without changing the result."""
    skip_unless_available("cpp", "attention_relation")
    st = _states(3, 37, 24, torch.float32, "cpu", 130)
    tt = _states(3, 37, 40, torch.float32, "cpu", 140)
    s, t = _rand((4, 3, 9, 300), torch.float32, "cpu", 150), _rand((4, 5, 9, 300), torch.float32, "cpu", 151)
    a, b = _rand((3, 2, 37, 37), torch.float32, "cpu", 152), _rand((3, 2, 37, 37), torch.float32, "cpu", 153)
    res = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        xs = {k: v.clone().requires_grad_() for k, v in st.items()}
        x, y = s.clone().requires_grad_(), a.clone().requires_grad_()
        out = (fastkd.attention_relation_loss(xs, tt, num_relation_heads=2, backend="cpp")
               + fastkd.attention_transfer_loss(x, t, backend="cpp")
               + fastkd.attention_map_loss(y, b, inputs="scores", backend="cpp"))
        out.backward()
        res.append([out, x.grad, y.grad] + [v.grad for v in xs.values()])
    torch.set_num_threads(1)
    for u, v in zip(*res):
        assert torch.allclose(u, v, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend):
    skip_unless_available(backend, "attention_relation")
    s = _rand((2, 3, 3, 4), torch.float64, "cpu", 1).requires_grad_()
    t = _rand((2, 5, 3, 4), torch.float64, "cpu", 2)
    for p in (2.0, 1.5):
        assert torch.autograd.gradcheck(
            lambda a: fastkd.attention_transfer_loss(a, t, p=p, reduction="none", backend=backend), (s,))
    mask = make_mask(2, 5, "left", 3)
    for kind, inputs in (("kl", "scores"), ("kl", "probs"), ("mse", "scores"), ("mse", "probs")):
        a, b = _maps(kind, inputs, (2, 2, 5, 5), torch.float64, "cpu", 4)
        a.requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: fastkd.attention_map_loss(x, b, kind=kind, inputs=inputs, attention_mask=mask,
                                                reduction="none", backend=backend), (a,))
    st = {k: v.requires_grad_() for k, v in _states(2, 5, 6, torch.float64, "cpu", 5).items()}
    tt = _states(2, 5, 4, torch.float64, "cpu", 6)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fastkd.attention_relation_loss(
            {"q": q, "k": k, "v": v}, tt, num_relation_heads=2, relations=(("q", "k"), ("v", "v")),
            attention_mask=mask, backend=backend), (st["q"], st["k"], st["v"]))


def _op(backend, name):
    fastkd._backend.op(name.rsplit("_", 1)[0] if name.endswith("_bwd") else name.replace("_fwd", ""),
                       backend)
    return getattr(torch.ops.fastkd_triton if backend == "triton" else torch.ops.fastkd, name)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("grad", [True, False])
def test_opcheck(backend, grad):
    device = skip_unless_available(backend, "attention_relation")
    f32 = dict(dtype=torch.float32, device=device)
    s, t = _rand((2, 3, 20), torch.float32, device, 1), _rand((2, 4, 20), torch.float32, device, 2)
    torch.library.opcheck(_op(backend, "attention_transfer_fwd"),
                          (s, t, torch.empty(2, **f32), torch.empty_like(s) if grad else None, 2.0))
    a, b = _rand((2, 2, 7, 7), torch.float32, device, 3), _rand((2, 2, 7, 7), torch.float32, device, 4)
    mask = make_mask(2, 7, "right", 5).bool().to(device)
    torch.library.opcheck(_op(backend, "attention_map_fwd"),
                          (a, b, mask, torch.empty(2, 2, 7, **f32), torch.empty_like(a) if grad else None,
                           0, True, False))
    xm, xn = _rand((2, 7, 8), torch.float32, device, 6), _rand((2, 7, 8), torch.float32, device, 7)
    ym, yn = _rand((2, 7, 12), torch.float32, device, 8), _rand((2, 7, 12), torch.float32, device, 9)
    lse_s, lse_t = torch.empty(2, 2, 7, **f32), torch.empty(2, 2, 7, **f32)
    torch.library.opcheck(_op(backend, "attention_relation_fwd"),
                          (xm, xn, ym, yn, mask, 2, 0.5, 0.4, torch.empty(2, 2, 7, **f32), lse_s, lse_t))
    lse_s, lse_t = torch.rand(2, 2, 7, **f32) + 2, torch.rand(2, 2, 7, **f32) + 2
    torch.library.opcheck(_op(backend, "attention_relation_bwd"),
                          (xm, xn, ym, yn, mask, 2, 0.5, 0.4, lse_s, lse_t, torch.rand(2, **f32),
                           torch.empty_like(xm) if grad else None, torch.empty_like(xn)))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_torch_compile_fullgraph(backend):
    device = skip_unless_available(backend, "attention_relation")
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("torch.compile cannot trace interpreted triton kernels on CPU tensors")
    torch._dynamo.reset()

    class Distill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 24)
            self.rel = fastkd.AttentionRelationLoss(num_relation_heads=2, backend=backend)
            self.maps = fastkd.AttentionMapLoss(inputs="scores", backend=backend)
            self.at = fastkd.AttentionTransferLoss(backend=backend)

        def forward(self, h, tq, mask, feats, tfeats):
            q, k, v = self.proj(h).split(8, -1)
            s_attn = (q @ k.transpose(-1, -2)).unsqueeze(1)
            t_attn = (tq @ tq.transpose(-1, -2)).unsqueeze(1)
            return (self.rel((q, k, v), (tq, tq, tq), mask) + self.maps(s_attn, t_attn, mask)
                    + self.at(feats * self.proj.weight[0, 0], tfeats))

    torch.manual_seed(0)
    m = Distill().to(device)
    args = (torch.randn(2, 9, 8, device=device), torch.randn(2, 9, 12, device=device),
            make_mask(2, 9, "left", 1).to(device), torch.randn(2, 3, 4, 5, device=device),
            torch.randn(2, 2, 4, 5, device=device))
    eager = m(*args)
    eager.backward()
    g_eager = m.proj.weight.grad.clone()
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out = compiled(*args)
    out.backward()
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    assert torch.allclose(m.proj.weight.grad, g_eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_match_functions(backend):
    device = skip_unless_available(backend, "attention_map")
    s, t = _rand((2, 3, 5, 5), torch.float32, device, 1), _rand((2, 4, 5, 5), torch.float32, device, 2)
    crit = fastkd.AttentionTransferLoss(p=2, backend=backend)
    assert torch.equal(crit([s], [t]), fastkd.attention_transfer_loss(s, t, backend=backend))
    a, b = _probs((2, 4, 7, 7), torch.float32, device, 3), _probs((2, 8, 7, 7), torch.float32, device, 4)
    hm = [[0, 1], [2, 3], [4, 5], [6, 7]]
    crit = fastkd.AttentionMapLoss(kind="kl", head_map=hm, backend=backend)
    assert torch.equal(crit(a, b), fastkd.attention_map_loss(a, b, head_map=hm, backend=backend))
    st, tt = _states(2, 7, 8, torch.float32, device, 5), _states(2, 7, 12, torch.float32, device, 6)
    crit = fastkd.AttentionRelationLoss(num_relation_heads=4, relations=[["q", "k"]], backend=backend)
    assert torch.equal(crit(st, tt), fastkd.attention_relation_loss(
        st, tt, num_relation_heads=4, relations=(("q", "k"),), backend=backend))
    assert "num_relation_heads=4" in repr(crit)


_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastkd.triton.attention as A

def build(fn, types, consts, num_warps=4):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})

for dt in ("bf16", "fp32"):
    p = lambda *names, t=dt: {n: "*" + t for n in names}
    types = {**p("xm_ptr", "xn_ptr", "ym_ptr", "yn_ptr", "g_ptr"), "mask_ptr": "*u8",
             **p("loss_ptr", "lse_s_ptr", "lse_t_ptr", "w_ptr", t="fp32"), "scale_s": "fp32",
             "scale_t": "fp32"}
    consts = dict(HAS_MASK=True, LOWP_S=dt != "fp32", LOWP_T=dt != "fp32", PREC="ieee", BM=64,
                  BN=64, BDS=64, BDT=32)
    for fn in (A._relation_fwd_kernel, A._relation_bwd_m_kernel, A._relation_bwd_n_kernel):
        build(fn, types, consts)
    types = {**p("s_ptr", "t_ptr", "gs_ptr"), "mask_ptr": "*u8", "loss_ptr": "*fp32"}
    for kind, ss in ((0, True), (0, False), (1, True)):
        build(A._map_kernel, types, dict(KIND=kind, S_SCORES=ss, T_SCORES=True, HAS_MASK=True,
                                         HAS_GS=True, ROWS=4, BLOCK=512), num_warps=8)
    build(A._at_sums_kernel, {**p("s_ptr", "t_ptr"), **p("as_ptr", "at_ptr", t="fp32"), "p": "fp32"},
          dict(P_MODE=0, BLOCK=1024))
    build(A._at_grad_kernel, {**p("s_ptr", "gs_ptr"), "c_ptr": "*fp32", "p": "fp32", "inv_C": "fp32"},
          dict(P_MODE=2, BLOCK=1024))
build(A._at_norm_kernel, {"as_ptr": "*fp32", "at_ptr": "*fp32", "loss_ptr": "*fp32", "eps": "fp32"},
      dict(HAS_GS=True, BLOCK=1024))
print("ok")
"""


def test_triton_kernels_compile_for_sm90():
    """The GPU code path (16-bit tl.dot, register tiles) compiles through ptxas for an H100 even
    on a machine without one: interpreter runs cannot catch GPU-only compile errors."""
    from conftest import require_triton

    require_triton("attention_relation", "cuda")
    import os
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ----------------------------------------------------------------------------- errors
def _bad_calls():
    f, g = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    m, n = torch.rand(2, 2, 5, 5), torch.rand(2, 2, 5, 5)
    st = {k: torch.randn(2, 5, 8) for k in "qkv"}
    tt = {k: torch.randn(2, 5, 12) for k in "qkv"}
    at, am, ar = fastkd.attention_transfer_loss, fastkd.attention_map_loss, fastkd.attention_relation_loss
    return [
        ("spatial size", ValueError, lambda: at(f, torch.randn(2, 5, 4, 5))),
        ("batch size", ValueError, lambda: at(f, torch.randn(3, 5, 4, 4))),
        ("student_features", ValueError, lambda: at(torch.randn(2, 3), g)),
        ("student_features", TypeError, lambda: at(f.long(), g)),
        ("teacher_features", TypeError, lambda: at(f, [g])),
        ("same length", ValueError, lambda: at([f, f], [g])),
        (r"student_features\[1\]", ValueError, lambda: at([f, f], [g, torch.randn(2, 5, 3, 3)])),
        ("p must", ValueError, lambda: at(f, g, p=0.5)),
        ("reduction", ValueError, lambda: at(f, g, reduction="batchmean")),
        ("student_attn", ValueError, lambda: am(torch.rand(2, 5, 5), n)),
        ("student_attn", ValueError, lambda: am(torch.rand(2, 2, 5, 4), n)),
        ("teacher_attn", TypeError, lambda: am(m, n.numpy())),
        ("length L", ValueError, lambda: am(m, torch.rand(2, 2, 6, 6))),
        ("head_map", ValueError, lambda: am(m, torch.rand(2, 3, 5, 5))),
        ("head_map", ValueError, lambda: am(m, torch.rand(2, 3, 5, 5), head_map=[0, 3])),
        ("head_map", ValueError, lambda: am(m, torch.rand(2, 3, 5, 5), head_map=[0])),
        ("head_map", ValueError, lambda: am(m, torch.rand(2, 3, 5, 5), head_map=[0, []])),
        ("kind", ValueError, lambda: am(m, n, kind="js")),
        ("inputs", ValueError, lambda: am(m, n, inputs="logits")),
        ("mean", ValueError, lambda: am(m, n, reduction="mean")),
        ("attention_mask", ValueError, lambda: am(m, n, attention_mask=torch.ones(2, 4, dtype=torch.long))),
        ("attention_mask", TypeError, lambda: am(m, n, attention_mask=torch.ones(2, 5))),
        ("attention_mask", ValueError,
         lambda: am(m, n, attention_mask=torch.ones(2, 1, 1, 5, dtype=torch.long))),
        ("num_relation_heads", ValueError, lambda: ar(st, tt, num_relation_heads=3)),
        ("num_relation_heads", ValueError, lambda: ar(st, tt, num_relation_heads=0)),
        ("at least 1", ValueError, lambda: ar({k: v[..., :0] for k, v in st.items()},
                                              {k: v[..., :0] for k, v in tt.items()}, num_relation_heads=1)),
        ("relations", ValueError, lambda: ar(st, tt, num_relation_heads=2, relations=[("q", "x")])),
        ("relations", ValueError, lambda: ar(st, tt, num_relation_heads=2, relations=[])),
        ("student_states", ValueError, lambda: ar({"q": st["q"]}, tt, num_relation_heads=2)),
        ("student_states", TypeError, lambda: ar(st["q"], tt, num_relation_heads=2)),
        (r"teacher_states\['k'\]", ValueError,
         lambda: ar(st, {**tt, "k": torch.randn(2, 6, 12)}, num_relation_heads=2)),
        (r"student_states\['v'\]", ValueError,
         lambda: ar({**st, "v": torch.randn(2, 5, 4)}, tt, num_relation_heads=2, relations=[("q", "v")])),
        ("attention_mask", ValueError, lambda: ar(st, tt, num_relation_heads=2,
                                                  attention_mask=torch.ones(3, 5, dtype=torch.bool))),
        ("backend", ValueError, lambda: am(m, n, backend="numpy")),
        ("num_relation_heads", ValueError, lambda: fastkd.AttentionRelationLoss(num_relation_heads=-1)),
        ("kind", ValueError, lambda: fastkd.AttentionMapLoss(kind="l2")),
        ("p must", ValueError, lambda: fastkd.AttentionTransferLoss(p=float("inf"))),
    ]


@pytest.mark.parametrize("needle,exc,call", _bad_calls(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_is_a_clear_error(needle, exc, call):
    with pytest.raises(exc, match=needle):
        call()
