"""torch.ops.fastkd.kd_fwd on CUDA tensors (csrc/cuda/divergences.cu) against the float64 reference.

Runs where CUDA is present and the native extension holds the CUDA kernel; skips cleanly
elsewhere (with "cuda" in FASTKD_REQUIRE_BACKENDS the skip becomes a failure).

Oracle: fastkd.reference.divergences.kd_fwd in float64 on the same (already rounded) inputs,
on the CPU. The kernel computes in float32 (float64 when an input is float64), so its error is
bounded as in tests/test_native.py: twice the error of the same reference run in float32, plus
~1e-5 relative, plus one rounding of the gradient's dtype.

The kernel lays a row out in one of three ways (see the top of divergences.cu), chosen by the
row's bytes and the device; the shapes here reach each of them:
  * V of a few hundred / thousand: one CTA per row, the row in shared memory;
  * V = 128256 or 256000 (16-bit): a cluster of CTAs per row (sm_90), slices in shared memory;
  * V ~ 1M in float32: no split fits shared memory, every pass re-reads global memory.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA

if not HAS_CUDA:
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from fastkd import _backend  # noqa: E402
from fastkd.reference.divergences import DIVERGENCES  # noqa: E402
from fastkd.reference.divergences import kd_fwd as ref_kd_fwd  # noqa: E402

_why = _backend.reason("cuda", "kd", "cuda")
if _why is not None:
    if "cuda" in os.environ.get("FASTKD_REQUIRE_BACKENDS", "").split(","):
        pytest.fail(f"backend cuda is required here but unavailable: {_why}", pytrace=False)
    pytest.skip(f"backend cuda unavailable: {_why}", allow_module_level=True)

op = torch.ops.fastkd.kd_fwd
DEV = "cuda"
IGNORE = -100
DIVS = list(DIVERGENCES.items())
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}


def _cfg(**kw):
    cfg = dict(divergence=0, temperature=1.0, beta=0.3, skew=0.1, ignore_index=IGNORE, soft_weight=1.0,
               hard_weight=0.0, scale_temperature=True, softcap=0.0)
    cfg.update(kw)
    return cfg


def _args(cfg):
    return [cfg[k] for k in ("divergence", "temperature", "beta", "skew", "ignore_index", "soft_weight",
                             "hard_weight", "scale_temperature", "softcap")]


def make(B, R, V, s_dtype=torch.float32, t_dtype=None, seed=0, scale=3.0):
    """Correlated student / teacher logits (moderate divergences), on the GPU."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, R, V, generator=g) * scale
    t = 0.6 * s + torch.randn(B, R, V, generator=g) * scale
    return s.to(s_dtype).to(DEV), t.to(t_dtype or s_dtype).to(DEV)


def make_labels(B, R, V, kind, seed=0):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, V, (B, R), generator=g)
    if kind == "partial":
        y[torch.rand(B, R, generator=g) < 0.3] = IGNORE
        y.view(-1)[0] = IGNORE
        y.view(-1)[-1] = V - 1
    else:
        y.fill_(IGNORE)
    return y.to(DEV)


def run_cuda(s, t, labels, cfg, grad_s=True, grad_t=True, gs=None, gt=None):
    """Calls the op with NaN-filled output buffers (so every entry must be written)."""
    B, R, _ = s.shape
    wide = torch.float64 in (s.dtype, t.dtype)
    loss = torch.full((B, R), float("nan"), dtype=torch.float64 if wide else torch.float32, device=DEV)
    if grad_s and gs is None:
        gs = torch.full_like(s, float("nan"))
    if grad_t and gt is None:
        gt = torch.full_like(t, float("nan"))
    op(s, t, labels, loss, gs if grad_s else None, gt if grad_t else None, *_args(cfg))
    return loss, (gs if grad_s else None), (gt if grad_t else None)


def run_ref(s, t, labels, cfg, dtype=torch.float64):
    s, t = s.cpu().to(dtype), t.cpu().to(dtype)
    labels = None if labels is None else labels.cpu()
    loss = torch.empty(s.shape[:2], dtype=dtype)
    gs, gt = torch.empty_like(s), torch.empty_like(t)
    ref_kd_fwd(s, t, labels, loss, gs, gt, *_args(cfg))
    return loss, gs, gt


def _check(got, r64, r32, name, rtol=1e-5):
    """|got - r64| <= 2 max|r32 - r64| + rtol (|r64| + 1e-2 max|r64|) + one rounding of got's dtype."""
    g = got.double().cpu()
    err = (g - r64).abs()
    scale = r64.abs().nan_to_num(0, 0, 0)
    err32 = (r32.double() - r64).abs().nan_to_num(0, 0, 0).max()
    bound = 2 * err32 + rtol * (scale + 1e-2 * scale.max() + 1e-6)
    if got.dtype in (torch.bfloat16, torch.float16):
        tiny = torch.finfo(got.dtype).smallest_normal * EPS[got.dtype]  # the subnormal spacing
        bound = bound + EPS[got.dtype] * scale * 1.01 + tiny
    both_nan = g.isnan() & r64.isnan()
    same_inf = g.isinf() & r64.isinf() & (g.sign() == r64.sign())
    ok = (err <= bound) | both_nan | same_inf
    if not bool(ok.all()):
        i = int((~ok).flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int((~ok).sum())} / {ok.numel()} entries off; first at flat index {i}: "
            f"got {g.flatten()[i].item()!r}, ref64 {r64.flatten()[i].item()!r}, "
            f"ref32 {r32.flatten()[i].item()!r}, bound {bound.flatten()[i].item():.3g}")


def compare(s, t, labels, cfg, grad_s=True, grad_t=True, rtol=1e-5):
    loss, gs, gt = run_cuda(s, t, labels, cfg, grad_s, grad_t)
    if torch.float64 in (s.dtype, t.dtype):  # float64 math: the reference to ~1e-10
        l64, gs64, gt64 = run_ref(s, t, labels, cfg)
        torch.testing.assert_close(loss.cpu(), l64, rtol=1e-10, atol=1e-12)
        for got, want in ((gs, gs64), (gt, gt64)):
            if got is not None:
                eps = 1e-10 if got.dtype == torch.float64 else torch.finfo(got.dtype).eps
                torch.testing.assert_close(got.cpu().double(), want, rtol=eps, atol=1e-12)
        return loss, gs, gt
    l64, gs64, gt64 = run_ref(s, t, labels, cfg)
    l32, gs32, gt32 = run_ref(s, t, labels, cfg, torch.float32)
    _check(loss, l64, l32, "loss", rtol)
    if grad_s:
        _check(gs, gs64, gs32, "grad_student", rtol)
    if grad_t:
        _check(gt, gt64, gt32, "grad_teacher", rtol)
    return loss, gs, gt


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float64, torch.float64),
          (torch.float64, torch.bfloat16)]
DTYPE_IDS = [f"{str(a)[6:]}-{str(b)[6:]}" for a, b in DTYPES]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("labels_kind,hard_weight", [("none", 0.0), ("partial", 0.0), ("partial", 0.5),
                                                     ("all", 0.5)])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_matches_reference(div, softcap, dtypes, labels_kind, hard_weight, temperature):
    B, R, V = 3, 7, 401
    s, t = make(B, R, V, *dtypes, seed=div[1], scale=12.0 if softcap else 3.0)
    labels = make_labels(B, R, V, labels_kind)
    cfg = _cfg(divergence=div[1], softcap=softcap, hard_weight=hard_weight, temperature=temperature,
               soft_weight=0.8, scale_temperature=temperature != 0.7)
    loss, gs, gt = compare(s, t, labels, cfg)
    if labels_kind == "all":
        assert bool((loss == 0).all()) and bool((gs == 0).all()) and bool((gt == 0).all())


@pytest.mark.parametrize("grads", [(True, False), (False, True), (False, False)], ids=["gs", "gt", "none"])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_gradient_subsets(div, grads):
    s, t = make(2, 5, 1271, seed=3)
    labels = make_labels(2, 5, 1271, "partial")
    compare(s, t, labels, _cfg(divergence=div[1], temperature=2.0, hard_weight=0.3), *grads)


@pytest.mark.parametrize("shape", [(1, 41, 1271), (2, 3, 1), (4, 1, 333), (1, 1, 17), (2, 2, 1024), (1, 3, 2049),
                                   (3, 2, 4099)])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_odd_shapes(div, shape):
    s, t = make(*shape, seed=5)
    labels = make_labels(*shape, "partial")
    compare(s, t, labels, _cfg(divergence=div[1], temperature=1.5, hard_weight=0.5))


@pytest.mark.parametrize("V,dtype", [(128256, torch.bfloat16), (256000, torch.bfloat16), (128256, torch.float32),
                                     (1_000_003, torch.float32), (300_001, torch.float64)],
                         ids=["128256-bf16", "256000-bf16", "128256-fp32", "1000003-fp32", "300001-fp64"])
@pytest.mark.parametrize("div", [d for d in DIVS if d[0] in ("forward_kl", "reverse_kl", "jsd")],
                         ids=lambda d: d[0])
def test_large_rows(div, V, dtype):
    """Rows split over a cluster (slices in shared memory) and rows re-read from global memory."""
    s, t = make(2, 2, V, dtype, seed=19, scale=2.0)
    labels = torch.tensor([[123457 % V, IGNORE], [V - 1, 0]], device=DEV)
    for grads in ((True, False), (True, True)):  # forward_kl: two passes, then three
        compare(s, t, labels, _cfg(divergence=div[1], temperature=2.0, hard_weight=0.5), *grads)


@pytest.mark.parametrize("V", [401, 128256])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_and_inplace(div, dtype, V):
    B, R = 3, 4
    g = torch.Generator().manual_seed(7)
    sbase = (torch.randn(B, R + 1, V + 3, generator=g) * 3).to(dtype).to(DEV)
    s = sbase[:, :-1, :V]  # row-strided view; rows start at every alignment
    t = (torch.randn(R, B, V, generator=g) * 3).to(dtype).to(DEV).transpose(0, 1)  # stride(0) < stride(1)
    assert not s.is_contiguous() and not t.is_contiguous()
    labels = make_labels(B, R, V, "partial")
    cfg = _cfg(divergence=div[1], temperature=2.0, hard_weight=0.5, softcap=20.0)
    gs = torch.full((B, R + 2, V + 5), float("nan"), dtype=dtype, device=DEV)[:, 1:-1, 2:V + 2]
    gt = torch.full((R, B, V), float("nan"), dtype=dtype, device=DEV).transpose(0, 1)
    loss, gs, gt = run_cuda(s, t, labels, cfg, gs=gs, gt=gt)
    l64, gs64, gt64 = run_ref(s, t, labels, cfg)
    l32, gs32, gt32 = run_ref(s, t, labels, cfg, torch.float32)
    _check(loss, l64, l32, "loss")
    _check(gs, gs64, gs32, "grad_student")
    _check(gt, gt64, gt32, "grad_teacher")
    # inplace: the gradients overwrite the (strided) logits themselves; same bits as out of place
    s2, t2 = s.clone(), t.clone()
    s_in, t_in = sbase.clone()[:, :-1, :V], t.transpose(0, 1).clone().transpose(0, 1)
    loss2, _, _ = run_cuda(s_in, t_in, labels, cfg, gs=s_in, gt=t_in)
    assert torch.equal(loss2, loss) and torch.equal(s_in, gs) and torch.equal(t_in, gt)
    assert torch.equal(s, s2) and torch.equal(t, t2)


@pytest.mark.parametrize("temperature", [0.5, 10.0])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_extreme_logits(div, softcap, temperature):
    s, t = make(2, 4, 777, seed=11, scale=1e4)
    cfg = _cfg(divergence=div[1], temperature=temperature, softcap=softcap, hard_weight=0.5)
    loss, gs, gt = compare(s, t, make_labels(2, 4, 777, "partial"), cfg)
    assert bool(loss.isfinite().all()) and bool(gs.isfinite().all()) and bool(gt.isfinite().all())


@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("div", [d for d in DIVS if d[0] != "reverse_kl"], ids=lambda d: d[0])
def test_teacher_neg_inf(div, softcap):
    """Teacher entries at -inf (masked vocabulary): 0 * log 0 = 0, everything stays finite."""
    s, t = make(2, 3, 301, seed=13)
    t[..., ::3] = float("-inf")
    t[0, 0, :-1] = float("-inf")  # a row where the teacher is one-hot
    t[0, 0, -1] = 5.0
    loss, gs, gt = compare(s, t, None, _cfg(divergence=div[1], temperature=2.0, softcap=softcap))
    assert bool(loss.isfinite().all()) and bool(gs.isfinite().all()) and bool(gt.isfinite().all())


@pytest.mark.parametrize("skew", [0.0, 1.0])
@pytest.mark.parametrize("div", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_edges(div, skew):
    s, t = make(2, 3, 211, seed=23)
    compare(s, t, None, _cfg(divergence=DIVERGENCES[div], skew=skew))


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_ignored_rows_never_read(div):
    B, R, V = 2, 4, 129
    s, t = make(B, R, V, seed=17)
    labels = make_labels(B, R, V, "partial")
    ign = labels == IGNORE
    s[ign] = float("nan")
    t[ign] = float("inf")
    loss, gs, gt = run_cuda(s, t, labels, _cfg(divergence=div[1], hard_weight=0.5))
    assert bool((loss[ign] == 0).all()) and bool((gs[ign] == 0).all()) and bool((gt[ign] == 0).all())
    assert bool(loss.isfinite().all()) and bool(gs.isfinite().all()) and bool(gt.isfinite().all())


def test_label_out_of_range_is_nan_not_a_sync():
    """The CPU kernel raises; raising here would need a device sync, so such a row is NaN."""
    s, t = make(1, 3, 50, seed=2)
    labels = torch.tensor([[3, 50, IGNORE]], device=DEV)
    loss, gs, _ = run_cuda(s, t, labels, _cfg(hard_weight=0.5), grad_t=False)
    assert loss[0, 0].isfinite() and loss[0, 1].isnan() and loss[0, 2] == 0
    assert bool(gs[0, 0].isfinite().all()) and bool(gs[0, 1].isnan().all()) and bool((gs[0, 2] == 0).all())


@pytest.mark.parametrize("V", [3001, 128256])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_deterministic(div, V):
    s, t = make(4, 3, V, torch.bfloat16, torch.bfloat16, seed=29)
    labels = make_labels(4, 3, V, "partial")
    cfg = _cfg(divergence=div[1], temperature=2.0, hard_weight=0.5, softcap=30.0)
    a = run_cuda(s, t, labels, cfg)
    b = run_cuda(s, t, labels, cfg)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_agrees_with_cpu_kernel(div):
    s, t = make(3, 5, 5003, torch.bfloat16, seed=31)
    labels = make_labels(3, 5, 5003, "partial")
    cfg = _cfg(divergence=div[1], temperature=1.3, hard_weight=0.25)
    got = run_cuda(s, t, labels, cfg)
    cpu = [torch.empty_like(x, device="cpu") for x in got]
    op(s.cpu(), t.cpu(), labels.cpu(), *cpu, *_args(cfg))
    torch.testing.assert_close(got[0].cpu(), cpu[0], rtol=1e-4, atol=1e-5)
    for g, c in zip(got[1:], cpu[1:]):
        torch.testing.assert_close(g.cpu().float(), c.float(), rtol=2**-7, atol=1e-5 * c.float().abs().max().item())


@pytest.mark.parametrize("labels,grad_s,grad_t,div,hard", [
    (False, True, False, 0, 0.0), (True, True, True, 2, 0.5), (True, False, False, 5, 0.0),
    (False, False, True, 1, 0.0)])
def test_opcheck(labels, grad_s, grad_t, div, hard):
    s, t = make(2, 3, 37, seed=31)
    y = make_labels(2, 3, 37, "partial") if labels else None
    loss = torch.empty(2, 3, device=DEV)
    gs = torch.empty_like(s) if grad_s else None
    gt = torch.empty_like(t) if grad_t else None
    torch.library.opcheck(op, (s, t, y, loss, gs, gt, *_args(_cfg(divergence=div, temperature=2.0,
                                                                        hard_weight=hard))))


def test_errors():
    s, t = make(2, 3, 11)
    loss = torch.empty(2, 3, device=DEV)
    with pytest.raises(RuntimeError, match="dtype"):
        op(s, t, None, loss, torch.empty_like(s, dtype=torch.bfloat16), None, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="needs labels"):
        op(s, t, None, loss, None, None, *_args(_cfg(hard_weight=0.5)))
    with pytest.raises(RuntimeError, match="same shape"):
        op(s, t[:, :2], None, loss, None, None, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="last dim"):
        op(s.transpose(1, 2), t.transpose(1, 2), None, torch.empty(2, 11, device=DEV), None, None, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="beta"):
        op(s, t, None, loss, None, None, *_args(_cfg(divergence=2, beta=1.0)))
    with pytest.raises(RuntimeError, match="float64 exactly when an input is float64"):
        op(s.double(), t, None, loss, None, None, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="one device"):
        op(s, t.cpu(), None, loss, None, None, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="labels"):
        op(s, t, torch.zeros(2, 3, dtype=torch.long), loss, None, None, *_args(_cfg()))
    shifted = torch.as_strided(s, s.shape, s.stride(), 1)  # overlaps student, one entry off
    with pytest.raises(RuntimeError, match="overlaps"):
        op(s, t, None, loss, shifted, None, *_args(_cfg()))


def test_backend_choice():
    """cuda runs kd on CUDA tensors; families without a CUDA kernel refuse it. triton stays
    the automatic choice until the CUDA kernels have been timed against it on a GPU."""
    assert _backend.choose("kd", torch.device(DEV), "cuda") == "cuda"
    assert _backend.choose("kd", torch.device(DEV)) == "triton"
    for family in _backend.FAMILIES:
        op_name = _backend.FAMILIES[family][1]
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastkd::{op_name}", "CUDA")
        assert (_backend.reason("cuda", family, "cuda") is None) == has_cuda, family


def test_kd_loss_uses_it_end_to_end():
    import fastkd

    s, t = make(4, 6, 999, torch.bfloat16, seed=3)
    labels = make_labels(4, 6, 999, "partial")
    x = s.clone().requires_grad_()
    out = fastkd.kd_loss(x, t, labels, divergence="jsd", hard_label_weight=0.5, temperature=2.0,
                         backend="cuda")
    out.backward()
    y = s.clone().requires_grad_()
    ref = fastkd.kd_loss(y, t, labels, divergence="jsd", hard_label_weight=0.5, temperature=2.0, backend="torch")
    ref.backward()
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(x.grad.float(), y.grad.float(), rtol=2e-2, atol=1e-3 * y.grad.abs().max().item())


# every divergence x option combination of the grid above, once more on a cluster-sized row
@pytest.mark.parametrize("div,softcap,hard", list(itertools.product([d[1] for d in DIVS], [0.0, 30.0], [0.0, 0.5])))
def test_cluster_rows_all_options(div, softcap, hard):
    s, t = make(1, 3, 128256, torch.bfloat16, seed=div, scale=12.0 if softcap else 3.0)
    labels = torch.tensor([[5, IGNORE, 128255]], device=DEV)
    compare(s, t, labels, _cfg(divergence=div, softcap=softcap, hard_weight=hard, temperature=1.7, soft_weight=0.8))


def test_one_cta_per_row_layouts_agree():
    """FASTKD_CUDA_KD_MAX_SPLIT=1 gives every row one CTA, as on sm_80: V = 128256 in bf16 then no
    longer fits shared memory (every pass re-reads global memory) and V = 20000 does (one CTA,
    cached). Same numbers as the default layout, up to summation order."""
    code = (
        "import torch, fastkd._native as n; n.load()\n"
        "op = torch.ops.fastkd.kd_fwd\n"
        "g = torch.Generator().manual_seed(3)\n"
        "out = []\n"
        "for V in (20000, 128256):\n"
        "    s = (torch.randn(2, 3, V, generator=g) * 3).bfloat16().cuda()\n"
        "    t = (torch.randn(2, 3, V, generator=g) * 3).bfloat16().cuda()\n"
        "    y = torch.tensor([[1, -100, V - 1], [0, 5, 7]]).cuda()\n"
        "    for div in range(6):\n"
        "        loss = torch.empty(2, 3, device='cuda'); gs = torch.empty_like(s); gt = torch.empty_like(t)\n"
        "        op(s, t, y, loss, gs, gt, div, 2.0, 0.3, 0.1, -100, 1.0, 0.5, True, 0.0)\n"
        "        out.append((loss.cpu(), gs.float().cpu(), gt.float().cpu()))\n"
        "torch.save(out, __import__('sys').argv[1])\n")
    results = []
    for cap in ("1", "16"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastkd_split{cap}_{os.getpid()}.pt")
        env = dict(os.environ, FASTKD_CUDA_KD_MAX_SPLIT=cap)
        r = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        results.append(torch.load(path))
        os.remove(path)
    for (l1, gs1, gt1), (l2, gs2, gt2) in zip(*results):
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
        for a, b in ((gs1, gs2), (gt1, gt2)):
            torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6 + 1e-5 * b.abs().max().item())
