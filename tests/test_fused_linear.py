"""fused_linear_kd_loss equals kd_loss on materialized logits (float64 oracle)."""
import itertools

import pytest
import torch

import fastkd
from conftest import HAS_CUDA, skip_unless_available
from test_divergences import DIVS, assert_close, oracle

BACKENDS = ["torch", "cpp", "triton"]


def make_linear(lead, Hs, Ht, V, dtype, device, label_mode="partial", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype).to(device)  # noqa: E731
    hs, ws = r(*lead, Hs), r(V, Hs, sc=Hs ** -0.5 * 2)
    ht, wt = r(*lead, Ht), r(V, Ht, sc=Ht ** -0.5 * 3)
    bs = r(V) if bias else None
    bt = r(V) if bias else None
    labels = None
    if label_mode != "none":
        labels = torch.randint(0, V, lead, generator=g)
        if label_mode == "partial":
            labels[torch.rand(lead, generator=g) < 0.3] = -100
        else:
            labels[...] = -100
        labels = labels.to(device)
    return hs, ws, bs, ht, wt, bt, labels


def run_both(hs, ws, bs, ht, wt, bt, labels, backend, chunk_size=None, fp32_grad_accumulation=True,
             **kw):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (hs, ws, bs)]
    out = fastkd.fused_linear_kd_loss(leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2],
                                      teacher_bias=bt, chunk_size=chunk_size, backend=backend,
                                      fp32_grad_accumulation=fp32_grad_accumulation, **kw)
    d = [x.detach().double().requires_grad_() if x is not None else None for x in (hs, ws, bs)]
    zs = d[0] @ d[1].T + (d[2] if d[2] is not None else 0)
    zt = ht.double() @ wt.double().T + (bt.double() if bt is not None else 0)
    ref = oracle(zs, zt, labels, **kw)
    gout = (torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
            + 0.5).to(hs.device)
    (out.double() * gout).sum().backward()
    (ref * gout).sum().backward()
    grads = [x.grad if x is not None else None for x in leaves]
    ref_grads = [x.grad if x is not None else None for x in d]
    return out, ref, grads, ref_grads


def check(out, ref, grads, ref_grads, dtype):
    assert_close(out, ref, dtype, "loss", factor=None if dtype == torch.float32 else 8)
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        if rg is None:
            assert g is None
            continue
        # a matmul's rounding in low precision: a few ulps of the largest entry per K-sum
        assert_close(g, rg, dtype, f"grad {name}", factor=None if dtype == torch.float32 else 16)


GRID = list(itertools.product(DIVS, ["batchmean", "sum", "none"], [torch.float32, torch.bfloat16]))


def _params():
    out = []
    for b in BACKENDS:
        for i, (div, red, dt) in enumerate(GRID):
            if b == "triton" and not HAS_CUDA and i % 4:
                continue  # interpreter: a covering stride; the whole grid on a GPU
            out.append(pytest.param(b, div, red, dt, id=f"{b}-{div}-{red}-{str(dt)[6:]}"))
    return out


@pytest.mark.parametrize("backend,divergence,reduction,dtype", _params())
def test_fused_linear_matches_oracle(backend, divergence, reduction, dtype):
    device = skip_unless_available(backend)
    data = make_linear((37,), 24, 40, 211, dtype, device)
    out, ref, g, rg = run_both(*data, backend, chunk_size=8, divergence=divergence,
                               reduction=reduction, temperature=2.0, hard_label_weight=0.3,
                               beta=0.4, skew=0.2)
    check(out, ref, g, rg, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("label_mode", ["none", "partial", "all_ignored"])
def test_fused_linear_chunks_and_labels(backend, chunk, label_mode):
    """Chunks that do not divide N, N smaller than a chunk, all rows ignored, [B, T, H]."""
    device = skip_unless_available(backend)
    data = make_linear((3, 9), 16, 12, 97, torch.float32, device, label_mode, seed=chunk or 0)
    hw = 0.0 if label_mode == "none" else 0.5
    out, ref, g, rg = run_both(*data, backend, chunk_size=chunk, divergence="jsd",
                               hard_label_weight=hw, softcap=10.0, reduction="none")
    assert out.shape == (3, 9)
    check(out, ref, g, rg, torch.float32)
    if label_mode == "all_ignored":
        assert all((x == 0).all() for x in g if x is not None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_no_bias_vocab_size_and_num_items(backend):
    device = skip_unless_available(backend)
    hs, ws, _, ht, wt, _, labels = make_linear((20,), 8, 8, 64, torch.float32, device, bias=False)
    wt_pad = torch.cat([wt, torch.randn(16, 8, device=device)])  # a teacher padded past V
    out, ref, g, rg = run_both(hs, ws, None, ht, wt_pad[:64], None, labels, backend,
                               chunk_size=6, divergence="reverse_kl", num_items_in_batch=31)
    check(out, ref, g, rg, torch.float32)
    a = fastkd.fused_linear_kd_loss(hs, ws, ht, wt_pad, labels, vocab_size=64, backend=backend)
    b = fastkd.fused_linear_kd_loss(hs, ws, ht, wt_pad[:64], labels, backend=backend)
    assert torch.allclose(a, b, rtol=1e-6)


def test_fused_linear_only_the_student_gets_gradients():
    hs, ws, bs, ht, wt, bt, labels = make_linear((10,), 8, 6, 30, torch.float32, "cpu")
    for x in (hs, ws, bs, ht, wt, bt):
        x.requires_grad_()
    fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt).backward()
    assert all(x.grad is not None for x in (hs, ws, bs))
    assert all(x.grad is None for x in (ht, wt, bt))


def test_fused_linear_module_and_errors():
    hs, ws, bs, ht, wt, bt, labels = make_linear((2, 5), 8, 6, 30, torch.float32, "cpu")
    crit = fastkd.FusedLinearKDLoss(divergence="tvd", chunk_size=3)
    a = crit(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt)
    b = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt,
                                    divergence="tvd", chunk_size=3)
    assert torch.equal(a, b)
    cases = [
        ("student_hidden's last dim", lambda: fastkd.fused_linear_kd_loss(hs[..., :7], ws, ht, wt)),
        ("student_weight must be", lambda: fastkd.fused_linear_kd_loss(hs, ws[None], ht, wt)),
        ("teacher_bias", lambda: fastkd.fused_linear_kd_loss(hs, ws, ht, wt, teacher_bias=bt[:5])),
        ("vocab_size", lambda: fastkd.fused_linear_kd_loss(hs, ws, ht, wt[:20])),
        ("leading shape", lambda: fastkd.fused_linear_kd_loss(hs, ws, ht[:1], wt)),
        ("chunk_size", lambda: fastkd.fused_linear_kd_loss(hs, ws, ht, wt, chunk_size=0)),
        ("labels", lambda: fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels[:1])),
        ("divergence", lambda: fastkd.FusedLinearKDLoss(divergence="nope")),
    ]
    for needle, call in cases:
        with pytest.raises(ValueError, match=needle):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_mixed_student_teacher_dtypes(backend):
    """A float32 student with a float64 teacher (kd_loss accepts the mix): float64 math, the
    same as kd_loss on the materialized logits (the cpp kernel used to get a float32 loss
    buffer and raise). Within one model, hidden, weight and bias must share a dtype."""
    device = skip_unless_available(backend)
    hs, ws, bs, _, _, _, labels = make_linear((3, 4), 8, 6, 29, torch.float32, device)
    _, _, _, ht, wt, bt, _ = make_linear((3, 4), 8, 6, 29, torch.float64, device, seed=1)
    kw = dict(divergence="jsd", beta=0.3, temperature=1.5, hard_label_weight=0.2)
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    out = fastkd.fused_linear_kd_loss(leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2],
                                      teacher_bias=bt, chunk_size=5, backend=backend, **kw)
    out.backward()
    ref_leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    zs = ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]
    ref = fastkd.kd_loss(zs, ht @ wt.T + bt, labels, backend=backend, **kw)
    ref.backward()
    torch.testing.assert_close(out.double(), ref.double(), rtol=1e-5, atol=1e-7)
    for g, rg in zip(leaves, ref_leaves):
        torch.testing.assert_close(g.grad, rg.grad, rtol=1e-4, atol=1e-6)
    bf = hs.to(torch.bfloat16)
    for needle, call in [
        ("student_weight", lambda: fastkd.fused_linear_kd_loss(bf, ws, ht, wt)),
        ("student_bias", lambda: fastkd.fused_linear_kd_loss(hs, ws, ht, wt, student_bias=bs.double())),
        ("teacher_weight", lambda: fastkd.fused_linear_kd_loss(hs, ws, ht, wt.float())),
    ]:
        with pytest.raises(TypeError, match=needle):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_weight_grad_in_the_weights_dtype(backend):
    """fp32_grad_accumulation=False sums the weight and bias gradients in their own dtype: the
    same as float32 accumulation for float32 weights (bitwise), within the low-precision bound
    of the float64 oracle for bfloat16 over many chunks."""
    device = skip_unless_available(backend)
    kw = dict(divergence="forward_kl", temperature=2.0, hard_label_weight=0.3)
    data32 = make_linear((37,), 24, 40, 211, torch.float32, device)
    a = run_both(*data32, backend, chunk_size=4, **kw)
    b = run_both(*data32, backend, chunk_size=4, fp32_grad_accumulation=False, **kw)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    data16 = make_linear((37,), 24, 40, 211, torch.bfloat16, device)
    out, ref, g, rg = run_both(*data16, backend, chunk_size=4, fp32_grad_accumulation=False, **kw)
    assert g[1].dtype == torch.bfloat16 and g[2].dtype == torch.bfloat16
    check(out, ref, g, rg, torch.bfloat16)
    with pytest.raises(TypeError, match="fp32_grad_accumulation"):
        fastkd.fused_linear_kd_loss(*data32[:2], *data32[3:5], fp32_grad_accumulation=1)
    with pytest.raises(TypeError, match="fp32_grad_accumulation"):
        fastkd.FusedLinearKDLoss(fp32_grad_accumulation="yes")
