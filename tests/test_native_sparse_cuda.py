"""torch.ops.fastkd.sparse_kd_fwd on CUDA tensors (csrc/cuda/sparse.cu), against the float64 reference.

Runs where CUDA is present and the native extension holds the CUDA kernel; skips cleanly elsewhere
(with "cuda" in FASTKD_REQUIRE_BACKENDS the skip becomes a failure). Oracle and error bound are
those of test_native_sparse.py (the CPU kernel's op-level tests), on the same rounded inputs.

The kernel lays a row out like the kd kernel (see the top of sparse.cu): V of a few hundred or
thousand: one CTA per row, the row in shared memory; V = 128256 in 16-bit: a cluster of CTAs per
row (sm_90); V ~ 1M in float32: no split fits shared memory and pass 2 re-reads global memory.
"""
import itertools

import pytest
import torch

from conftest import require_cuda_kernel

require_cuda_kernel("sparse_kd")

from _kd_op_cases import _check, make_labels, outputs_under_env  # noqa: E402
from test_native_sparse import compare as native_compare  # noqa: E402
from test_native_sparse import DIVS, DTYPES, F64, IGNORE, LABELS, TAILS, _args, _cfg, _wide, make, run_ref  # noqa: E402
from test_native_sparse import NEAR_DTYPES, near_complete  # noqa: E402
from test_native_sparse import check_nan_rows  # noqa: E402

op = torch.ops.fastkd.sparse_kd_fwd
DEV = "cuda"


def run_cuda(s, idx, v, labels, cfg, grad=True, gs=None):
    """The op on CUDA copies of the inputs, with NaN-filled output buffers; results on the CPU."""
    s_d, idx_d, v_d = s.to(DEV), idx.to(DEV), v.to(DEV)
    lab_d = None if labels is None else labels.to(DEV)
    loss = torch.full(s.shape[:2], float("nan"), dtype=F64 if _wide(s, v) else torch.float32, device=DEV)
    if grad and gs is None:
        gs = torch.full_like(s_d, float("nan"), memory_format=torch.contiguous_format)
    op(s_d, idx_d, v_d, lab_d, loss, gs if grad else None, *_args(cfg))
    return loss.cpu(), (gs.cpu() if grad else None)


def _bucket_rtol(s, idx, cfg):
    """Per-row rtol for the bucket tail in float32: the kernel (like the Triton one and the float32
    reference) takes the student's tail mass as q_t = 1 - sum_i q_i, which turns float32 rounding of
    the sum (~eps absolute) into a relative error ~eps / q_t of q_t, log q_t and h_t / q_t. The
    float32 reference makes the same kind of error but rounds elsewhere, so twice its (lucky) error
    does not bound the kernel's where q_t is small (k close to V); allow 16 eps / q_t more there,
    down to the tail floor (2^-20) below which the tail reads as the floor."""
    lq = torch.log_softmax(s.double() / cfg["temperature"], -1).gather(-1, idx)
    q_t = (1.0 - lq.exp().sum(-1)).clamp_min(2.0**-20)
    return 1e-5 + 16 * 2.0**-24 / q_t


def compare(s, idx, v, labels, cfg, what=""):
    if cfg["tail"] != TAILS["bucket"] or _wide(s, v):
        return native_compare(s, idx, v, labels, cfg, what, run=run_cuda)
    loss, g = run_cuda(s, idx, v, labels, cfg)
    l64, g64 = run_ref(s, idx, v, labels, cfg)
    l32, g32 = run_ref(s, idx, v, labels, cfg, torch.float32)
    rtol = _bucket_rtol(s, idx, cfg)
    try:
        _check(loss, l64, l32, "loss", rtol=rtol)
        _check(g, g64, g32, "grad_student", rtol=rtol.unsqueeze(-1))
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None
    return loss, g


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
@pytest.mark.parametrize("tail", list(TAILS.items()), ids=lambda t: t[0])
def test_matches_reference(tail, div, dtypes):
    """Every label mode x hard weight x k (1, small, V-3, V), row-strided student."""
    B, R, V = 2, 3, 301
    ks = [1, 6, V - 3, V]
    for (labels_kind, hw), k in itertools.product(LABELS, ks):
        s, idx, v = make(B, R, V, k, tail[1], *dtypes, seed=div[1] + k)
        labels = make_labels(B, R, V, labels_kind, seed=k)
        cfg = _cfg(divergence=div[1], tail=tail[1], hard_weight=hw)
        loss, g = compare(s, idx, v, labels, cfg, f"{labels_kind} hw={hw} k={k}")
        if labels_kind == "all":
            assert bool((loss == 0).all()) and bool((g == 0).all())
    # a time-shifted (row-strided) student, read in place; a strided gradient buffer
    s, idx, v = make(B, R + 1, V, 9, tail[1], *dtypes, seed=7)
    labels = make_labels(B, R, V, "partial")
    cfg = _cfg(divergence=div[1], tail=tail[1], hard_weight=0.5, temperature=1.0)
    s_d = s.to(DEV)[:, 1:]
    loss = torch.empty(B, R, dtype=F64 if _wide(s, v) else torch.float32, device=DEV)
    gbase = torch.full((B, R + 2, V), float("nan"), dtype=s.dtype, device=DEV)
    gs = gbase[:, 2:]
    op(s_d, idx[:, 1:].contiguous().to(DEV), v[:, 1:].contiguous().to(DEV), labels.to(DEV), loss, gs, *_args(cfg))
    l_ref, g_ref = run_cuda(s[:, 1:].contiguous(), idx[:, 1:].contiguous(), v[:, 1:].contiguous(), labels, cfg)
    assert torch.equal(loss.cpu(), l_ref) and torch.equal(gs.cpu(), g_ref)
    assert bool(gbase[:, :2].isnan().all())


@pytest.mark.parametrize("dtypes", NEAR_DTYPES, ids=["f32", "bf16-f32", "f64"])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_bucket_near_complete_mass(div, dtypes):
    """Bucket rows whose k entries hold all but ~1e-8 of the mass on one side, the other or both, and
    k = V (test_native_sparse.near_complete): finite, and the reference's floored tails."""
    cfg = _cfg(divergence=div[1], tail=TAILS["bucket"], temperature=2.0, hard_weight=0.0)
    for (s, idx, vals), what in zip(near_complete(), ["near-complete", "k = V"]):
        loss, g = compare(s.to(dtypes[0]), idx, vals.to(dtypes[1]), None, cfg, what)
        assert bool(loss.isfinite().all()) and bool(g.isfinite().all()), what


@pytest.mark.parametrize("V,dtype", [(128256, torch.bfloat16), (128256, torch.float32), (1_000_003, torch.float32),
                                     (50_000, torch.float64)],
                         ids=["128256-bf16", "128256-fp32", "1000003-fp32", "50000-fp64"])
@pytest.mark.parametrize("tail", list(TAILS.items()), ids=lambda t: t[0])
@pytest.mark.parametrize("div", [d for d in DIVS if d[0] in ("forward_kl", "reverse_kl", "jsd")], ids=lambda d: d[0])
def test_large_rows(div, tail, V, dtype):
    """Rows split over a cluster (slices in shared memory) and rows re-read from global memory."""
    s, idx, v = make(2, 2, V, 64, tail[1], dtype, torch.float32 if dtype != F64 else F64, seed=19)
    labels = torch.tensor([[123457 % V, IGNORE], [V - 1, 0]])
    for hw in (0.0, 0.5):
        compare(s, idx, v, labels, _cfg(divergence=div[1], tail=tail[1], hard_weight=hw, temperature=2.0),
                f"hw={hw}")


@pytest.mark.parametrize("V,dtypes", [(2100, (torch.float32, torch.float32)),
                                      (2100, (F64, torch.float32)),
                                      (128256, (torch.bfloat16, torch.float32))],
                         ids=["one-cta-f32", "one-cta-f64", "cluster-bf16"])
@pytest.mark.parametrize("hard", [0.0, 0.5], ids=["soft", "hard"])
def test_nan_makes_its_row_nan(hard, V, dtypes):
    """test_native_sparse's NaN case on CUDA: a NaN the row reads (student or teacher value) makes
    its loss and gradient NaN (the tail floors keep it, the renormalized divergences' dense part is
    NaN-filled), one CTA per row or a cluster; other rows bitwise as without it; ignored rows 0."""
    check_nan_rows(dtypes, hard, run=run_cuda, V=V)


def test_index_or_label_out_of_range_is_nan_not_a_sync():
    """The CPU kernel raises; raising here would need a device sync, so such a row is NaN."""
    s, idx, v = make(1, 3, 50, 4, 0, seed=2)
    idx[0, 1, 2] = 50
    labels = torch.tensor([[3, 4, 77]])
    for div, hw in ((0, 0.5), (1, 0.5), (2, 0.0)):
        loss, g = run_cuda(s, idx, v, labels if hw else None, _cfg(divergence=div, hard_weight=hw))
        assert loss[0, 0].isfinite() and loss[0, 1].isnan(), (div, hw)
        assert bool(g[0, 0].isfinite().all())
        if hw:
            assert loss[0, 2].isnan() and bool(g[0, 2].isnan().all())


@pytest.mark.parametrize("V", [3001, 128256])
@pytest.mark.parametrize("tail", list(TAILS.values()))
def test_deterministic(tail, V):
    s, idx, v = make(4, 3, V, 64, tail, torch.bfloat16, torch.bfloat16, seed=29)
    labels = make_labels(4, 3, V, "partial")
    for div in range(6):
        cfg = _cfg(divergence=div, tail=tail, temperature=2.0, hard_weight=0.5)
        a = run_cuda(s, idx, v, labels, cfg)
        b = run_cuda(s, idx, v, labels, cfg)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_agrees_with_cpu_kernel(div):
    s, idx, v = make(3, 5, 5003, 32, 1, torch.bfloat16, torch.float32, seed=31, T=1.3)
    labels = make_labels(3, 5, 5003, "partial")
    cfg = _cfg(divergence=div[1], tail=1, temperature=1.3, hard_weight=0.25)
    got = run_cuda(s, idx, v, labels, cfg)
    loss = torch.empty(3, 5)
    gs = torch.empty_like(s)
    op(s, idx, v, labels, loss, gs, *_args(cfg))
    torch.testing.assert_close(got[0], loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1].float(), gs.float(), rtol=2**-7, atol=1e-5 * gs.float().abs().max().item())


def test_errors():
    s, idx, v = (x.to(DEV) for x in make(2, 3, 11, 2, 0))
    loss = torch.empty(2, 3, device=DEV)
    with pytest.raises(RuntimeError, match="one device"):
        op(s, idx.cpu(), v, None, loss, None, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="labels"):
        op(s, idx, v, torch.zeros(2, 3, dtype=torch.long), loss, None, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="must not overlap"):
        op(s, idx, v, None, loss, s, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="contiguous int64"):
        op(s, idx.int(), v, None, loss, None, *_args(_cfg()))


def test_sparse_kd_loss_end_to_end():
    import fastkd

    s, idx, v = make(4, 6, 999, 16, 1, torch.bfloat16, torch.float32, seed=3)
    labels = make_labels(4, 6, 999, "partial")
    outs = []
    for backend in ("cuda", "torch"):
        x = s.to(DEV).requires_grad_()
        out = fastkd.sparse_kd_loss(x, idx.to(DEV), v.to(DEV), labels.to(DEV), tail="bucket", divergence="jsd",
                                    hard_label_weight=0.5, temperature=2.0, backend=backend)
        out.backward()
        outs.append((out.float(), x.grad.float()))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(ga, gb, rtol=2e-2, atol=1e-3 * gb.abs().max().item())


def test_one_cta_per_row_layouts_agree():
    """FASTKD_CUDA_SPARSE_MAX_SPLIT=1 gives every row one CTA, as on sm_80: V = 128256 in bf16 then
    no longer fits shared memory (pass 2 re-reads global memory) and V = 20000 does (one CTA,
    cached). Same numbers as the default layout, up to summation order."""
    code = (
        "import torch, fastkd._native as n; n.load()\n"
        "op = torch.ops.fastkd.sparse_kd_fwd\n"
        "g = torch.Generator().manual_seed(3)\n"
        "out = []\n"
        "for V in (20000, 128256):\n"
        "    s = (torch.randn(2, 3, V, generator=g) * 3).bfloat16().cuda()\n"
        "    idx = torch.randn(2, 3, V, generator=g).topk(64, -1).indices.cuda()\n"
        "    y = torch.tensor([[1, -100, V - 1], [0, 5, 7]]).cuda()\n"
        "    for div, tail in [(d, t) for d in range(6) for t in (0, 1)]:\n"
        "        v = torch.log_softmax(torch.randn(2, 3, 64, generator=g), -1).cuda() - 0.5 * tail\n"
        "        loss = torch.empty(2, 3, device='cuda'); gs = torch.empty_like(s)\n"
        "        op(s, idx, v, y, loss, gs, div, 2.0, 0.3, 0.1, tail, -100, 1.0, 0.5, True)\n"
        "        out.append((loss.cpu(), gs.float().cpu()))\n"
        "torch.save(out, __import__('sys').argv[1])\n")
    results = outputs_under_env(code, "FASTKD_CUDA_SPARSE_MAX_SPLIT")
    for (l1, g1), (l2, g2) in zip(*results):
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g1, g2, rtol=2**-7, atol=1e-6 + 1e-5 * g2.abs().max().item())
