"""torch.ops.fastkd.kd_fwd (the C++ CPU kernel, and the CUDA kernel where there is one) against
the float64 reference, op by op.

The oracle and its error bound are in _kd_op_cases.py. Tests taking ``device`` run on each of
DEVICES ("cuda" skips cleanly without a GPU or without the CUDA kernel); the CUDA-only cases
(cluster-sized rows, its layouts, its errors) are in test_native_cuda.py.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch

from fastkd import _native

if not _native.load():
    pytest.skip(f"native extension unavailable: {_native.reason()}", allow_module_level=True)

from _kd_op_cases import (DEVICES, DIVERGENCES, DIVS, DTYPES, F64_DTYPES, IGNORE, _args, _cfg,  # noqa: E402
                          _check, compare, dtype_id, make, make_labels, on_device, opcheck_args, run_ref)
from _kd_op_cases import run_op as run_native  # noqa: E402

op = torch.ops.fastkd.kd_fwd


# float64 inputs here too (the float64 path, to ~1e-10); test_float64_* below cover it further on the CPU
GRID_DTYPES = DTYPES + F64_DTYPES[:2]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("scale_temperature", [True, False])
@pytest.mark.parametrize("labels_kind,hard_weight", [("none", 0.0), ("partial", 0.0), ("partial", 0.5),
                                                     ("all", 0.0), ("all", 0.5)])
@pytest.mark.parametrize("dtypes", GRID_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, div, softcap, dtypes, labels_kind, hard_weight, scale_temperature, temperature):
    dev = on_device(device)
    B, R, V = 3, 7, 401
    s, t = make(B, R, V, *dtypes, seed=div[1], scale=12.0 if softcap else 3.0, device=dev)
    labels = make_labels(B, R, V, labels_kind, device=dev)
    cfg = _cfg(divergence=div[1], softcap=softcap, hard_weight=hard_weight, scale_temperature=scale_temperature,
               temperature=temperature, soft_weight=0.8)
    loss, gs, gt = compare(s, t, labels, cfg)
    if labels_kind == "all":
        assert bool((loss == 0).all()) and bool((gs == 0).all()) and bool((gt == 0).all())


@pytest.mark.parametrize("grads", [(True, False), (False, True), (False, False)], ids=["gs", "gt", "none"])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_subsets(device, div, grads):
    dev = on_device(device)
    s, t = make(2, 5, 1271, seed=3, device=dev)
    labels = make_labels(2, 5, 1271, "partial", device=dev)
    compare(s, t, labels, _cfg(divergence=div[1], temperature=2.0, hard_weight=0.3), *grads)


@pytest.mark.parametrize("shape", [(1, 41, 1271), (3, 7, 401), (2, 3, 1), (4, 1, 333), (1, 1, 17), (2, 2, 1024),
                                   (1, 3, 2049), (3, 2, 4099)])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
@pytest.mark.parametrize("device", DEVICES)
def test_odd_shapes(device, div, shape):
    dev = on_device(device)
    s, t = make(*shape, seed=5, device=dev)
    labels = make_labels(*shape, "partial", device=dev)
    compare(s, t, labels, _cfg(divergence=div[1], temperature=1.5, hard_weight=0.5))


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_vocab_one(div):
    s, t = make(2, 3, 1, seed=1)
    labels = torch.zeros(2, 3, dtype=torch.long)
    loss, gs, gt = compare(s, t, labels, _cfg(divergence=div[1], hard_weight=0.5))
    assert bool((loss == 0).all()) and bool((gs == 0).all()) and bool((gt == 0).all())


# on CUDA also a cluster-sized row (V = 128256), whose slices start at every alignment
@pytest.mark.parametrize("device,B,R,V", [("cpu", 3, 6, 403), ("cuda", 3, 4, 401), ("cuda", 3, 4, 128256)])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_and_inplace(div, dtype, device, B, R, V):
    dev = on_device(device)
    g = torch.Generator().manual_seed(7)
    sbase = (torch.randn(B, R + 1, V + 3, generator=g) * 3).to(dtype).to(dev)
    s = sbase[:, :-1, :V]                                                             # row-strided view
    t = (torch.randn(R, B, V, generator=g) * 3).to(dtype).to(dev).transpose(0, 1)     # stride(0) < stride(1)
    assert not s.is_contiguous() and not t.is_contiguous()
    labels = make_labels(B, R, V, "partial", device=dev)
    cfg = _cfg(divergence=div[1], temperature=2.0, hard_weight=0.5, softcap=20.0)
    # strided grad buffers
    gs = torch.full((B, R + 2, V + 5), float("nan"), dtype=dtype, device=dev)[:, 1:-1, 2:V + 2]
    gt = torch.full((R, B, V), float("nan"), dtype=dtype, device=dev).transpose(0, 1)
    loss, gs, gt = run_native(s, t, labels, cfg, gs=gs, gt=gt)
    l64, gs64, gt64 = run_ref(s, t, labels, cfg)
    l32, gs32, gt32 = run_ref(s, t, labels, cfg, torch.float32)
    _check(loss, l64, l32, "loss")
    _check(gs, gs64, gs32, "grad_student")
    _check(gt, gt64, gt32, "grad_teacher")
    # inplace: the gradients overwrite the (strided) logits themselves; same bits as out of place
    s2, t2 = s.clone(), t.clone()
    s_in, t_in = sbase.clone()[:, :-1, :V], t.transpose(0, 1).clone().transpose(0, 1)
    loss2, _, _ = run_native(s_in, t_in, labels, cfg, gs=s_in, gt=t_in)
    assert torch.equal(loss2, loss) and torch.equal(s_in, gs) and torch.equal(t_in, gt)
    assert torch.equal(s, s2) and torch.equal(t, t2)


@pytest.mark.parametrize("temperature", [0.5, 10.0])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(device, div, softcap, temperature):
    dev = on_device(device)
    B, R, V = 2, 4, 777
    s, t = make(B, R, V, seed=11, scale=1e4, device=dev)
    cfg = _cfg(divergence=div[1], temperature=temperature, softcap=softcap, hard_weight=0.5)
    labels = make_labels(B, R, V, "partial", device=dev)
    loss, gs, gt = compare(s, t, labels, cfg)
    assert bool(loss.isfinite().all()) and bool(gs.isfinite().all()) and bool(gt.isfinite().all())


@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("div", [d for d in DIVS if d[0] != "reverse_kl"], ids=lambda d: d[0])
@pytest.mark.parametrize("device", DEVICES)
def test_teacher_neg_inf(device, div, softcap):
    """Teacher entries at -inf (masked vocabulary): 0 * log 0 = 0, everything stays finite."""
    dev = on_device(device)
    B, R, V = 2, 3, 301
    s, t = make(B, R, V, seed=13, device=dev)
    t[..., ::3] = float("-inf")
    t[0, 0, :-1] = float("-inf")  # a row where the teacher is one-hot
    t[0, 0, -1] = 5.0
    labels = make_labels(B, R, V, "none", device=dev)
    loss, gs, gt = compare(s, t, labels, _cfg(divergence=div[1], temperature=2.0, softcap=softcap))
    assert bool(loss.isfinite().all()) and bool(gs.isfinite().all()) and bool(gt.isfinite().all())
    if softcap == 0.0 and device == "cpu":  # exact zeros: asserted of the CPU kernel only, so far
        assert bool((gt[..., :-1:3] == 0).all())


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
@pytest.mark.parametrize("device", DEVICES)
def test_ignored_rows_never_read(device, div):
    dev = on_device(device)
    B, R, V = 2, 4, 129
    s, t = make(B, R, V, seed=17, device=dev)
    labels = make_labels(B, R, V, "partial", device=dev)
    ign = labels == IGNORE
    s[ign] = float("nan")
    t[ign] = float("inf")
    loss, gs, gt = run_native(s, t, labels, _cfg(divergence=div[1], hard_weight=0.5))
    assert bool((loss[ign] == 0).all()) and bool((gs[ign] == 0).all()) and bool((gt[ign] == 0).all())
    assert bool(loss.isfinite().all()) and bool(gs.isfinite().all()) and bool(gt.isfinite().all())


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                                    (torch.float64, torch.float32)], ids=dtype_id)
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
@pytest.mark.parametrize("device", DEVICES)
def test_nan_logit_makes_its_row_nan(device, div, dtypes):
    """A NaN in a counted row's student or teacher: that row's loss and gradients NaN, with every
    gradient subset (the passes differ) and the options on; the other rows bitwise as without it;
    ignored rows (holding NaN) still 0."""
    dev = on_device(device)
    s, t = make(2, 4, 203, *dtypes, seed=41, device=dev)
    labels = torch.tensor([[3, IGNORE, 7, 0], [202, 5, 9, 1]], device=dev)
    ns, nt = s.clone(), t.clone()
    ns[0, 0, 5] = ns[0, 1, 6] = float("nan")  # a counted row and an ignored one
    nt[1, 1, 200] = float("nan")
    nt[1, 2, ::2] = float("-inf")
    nt[1, 2, 11] = float("nan")
    ns[1, 0, 202] = float("nan")  # at the label
    bad = torch.zeros(2, 4, dtype=torch.bool, device=dev)
    bad[0, 0] = bad[1, 1] = bad[1, 2] = bad[1, 0] = True
    good = ~bad
    good[0, 1] = False
    cfg = _cfg(divergence=div[1], temperature=1.5, hard_weight=0.5, softcap=30.0 if div[1] % 2 else 0.0)
    for grads in ((True, True), (True, False), (False, True)):
        got = run_native(ns, nt, labels, cfg, *grads)
        want = run_native(s, t, labels, cfg, *grads)
        assert bool(got[0][bad].isnan().all()) and got[0][0, 1] == 0, grads
        assert torch.equal(got[0][good], want[0][good]), grads
        for g, w in zip(got[1:], want[1:]):
            if g is not None:
                assert bool(g[bad].isnan().all()) and bool((g[0, 1] == 0).all()), grads
                assert torch.equal(g[good], w[good]), grads


@pytest.mark.parametrize("div", [d for d in DIVS if d[0] in ("forward_kl", "jsd", "reverse_kl")],
                         ids=lambda d: d[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_vocab_row(div, dtype):
    s, t = make(1, 1, 256000, dtype, dtype, seed=19, scale=2.0)
    compare(s, t, torch.tensor([[123457]]), _cfg(divergence=div[1], temperature=2.0, hard_weight=0.5))


@pytest.mark.parametrize("skew", [0.0, 1.0])
@pytest.mark.parametrize("div", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("device", DEVICES)
def test_skew_edges(device, div, skew):
    s, t = make(2, 3, 211, seed=23, device=on_device(device))
    compare(s, t, None, _cfg(divergence=DIVERGENCES[div], skew=skew))


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_deterministic(div):
    s, t = make(8, 16, 3001, torch.bfloat16, torch.float32, seed=29)
    labels = make_labels(8, 16, 3001, "partial")
    cfg = _cfg(divergence=div[1], temperature=2.0, hard_weight=0.5, softcap=30.0)
    a = run_native(s, t, labels, cfg)
    b = run_native(s, t, labels, cfg)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = run_native(s, t, labels, cfg)
    finally:
        torch.set_num_threads(threads)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streaming_stores(dtype):
    """Gradients of 32 MB and more are written with non-temporal stores: same bits as small calls."""
    B, R, V = 1, 272, 32771  # odd V: rows start at every alignment
    s, t = make(B, R, V, dtype, dtype, seed=37)
    labels = make_labels(B, R, V, "partial")
    cfg = _cfg(divergence=0, temperature=2.0, hard_weight=0.5)
    loss, gs, gt = run_native(s, t, labels, cfg)
    assert (gs.numel() + gt.numel()) * gs.element_size() >= 32 << 20
    for i in range(0, R, 17):
        part = slice(i, i + 17)
        l2, gs2, gt2 = run_native(s[:, part], t[:, part], labels[:, part], cfg)
        assert torch.equal(l2, loss[:, part]) and torch.equal(gs2, gs[:, part]) and torch.equal(gt2, gt[:, part])


@pytest.mark.parametrize("dtypes", F64_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_float64_matches_reference(div, dtypes):
    """An input in float64 (either side, any mix): float64 math and a float64 loss, matching the
    float64 reference to ~1e-10 (gradients: up to one rounding to their buffer's dtype)."""
    B, R, V = 2, 3, 203
    for softcap, (labels_kind, hw), T in itertools.product([0.0, 20.0], [("none", 0.0), ("partial", 0.5), ("all", 0.5)],
                                                           [1.0, 1.7]):
        s, t = make(B, R, V, *dtypes, seed=div[1], scale=8.0 if softcap else 3.0)
        labels = make_labels(B, R, V, labels_kind)
        cfg = _cfg(divergence=div[1], softcap=softcap, hard_weight=hw, temperature=T, soft_weight=0.8)
        loss = torch.full((B, R), float("nan"), dtype=torch.float64)
        gs, gt = torch.full_like(s, float("nan")), torch.full_like(t, float("nan"))
        op(s, t, labels, loss, gs, gt, *_args(cfg))
        l64, gs64, gt64 = run_ref(s, t, labels, cfg)
        what = f"softcap={softcap} {labels_kind} hw={hw} T={T}"
        torch.testing.assert_close(loss, l64, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: loss: {m}")
        for name, got, want in (("grad_student", gs, gs64), ("grad_teacher", gt, gt64)):
            eps = 1e-10 if got.dtype == torch.float64 else torch.finfo(got.dtype).eps
            torch.testing.assert_close(got.double(), want, rtol=eps, atol=1e-12,
                                       msg=lambda m: f"{what}: {name}: {m}")
        if labels_kind == "all":
            assert bool((loss == 0).all()) and bool((gs == 0).all()) and bool((gt == 0).all())


def test_float64_strided_inplace_deterministic():
    B, R, V = 3, 5, 1100
    g = torch.Generator().manual_seed(41)
    sbase = torch.randn(B, R + 1, V + 3, generator=g, dtype=torch.float64) * 3
    s = sbase[:, :-1, :V]
    t = (torch.randn(R, B, V, generator=g) * 3).to(torch.bfloat16).transpose(0, 1)
    labels = make_labels(B, R, V, "partial")
    cfg = _cfg(divergence=2, temperature=2.0, hard_weight=0.5, softcap=20.0)
    loss, gs, gt = run_native(s, t, labels, cfg, gs=torch.full_like(s, float("nan")))
    l64, gs64, gt64 = run_ref(s, t, labels, cfg)
    torch.testing.assert_close(loss, l64, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs, gs64, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gt.double(), gt64, rtol=torch.finfo(torch.bfloat16).eps, atol=1e-12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        s_in = sbase.clone()[:, :-1, :V]  # inplace: the gradient overwrites the strided logits
        loss1, _, gt1 = run_native(s_in, t, labels, cfg, gs=s_in)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(loss1, loss) and torch.equal(s_in, gs) and torch.equal(gt1, gt)


@pytest.mark.parametrize("labels,grad_s,grad_t,div,hard", [
    (False, True, False, 0, 0.0), (True, True, True, 2, 0.5), (True, False, False, 5, 0.0),
    (False, False, True, 1, 0.0)])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, labels, grad_s, grad_t, div, hard):
    torch.library.opcheck(op, opcheck_args(labels, grad_s, grad_t, div, hard, device=on_device(device)))


def test_opcheck_float64():
    args = list(opcheck_args(True, True, True, 3, 0.5))
    args[0], args[3], args[4] = args[0].double(), args[3].double(), args[4].double()  # student, loss, grad_s
    torch.library.opcheck(op, args)


def test_fake_kernel_traces():
    args = opcheck_args(True, True, True, 0, 0.5)

    def f(s, t, y, loss, gs, gt):
        op(s, t, y, loss, gs, gt, *args[6:])
        return loss.sum()

    eager = f(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args[:6]])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*[a.clone() if isinstance(a, torch.Tensor)
                                                                      else a for a in args[:6]])
    assert torch.equal(eager, compiled)


def test_loader_api():
    assert _native.load() and _native.reason() == "" and _native.has_op("kd_fwd")
    assert not _native.has_op("no_such_op")
    code = ("import warnings, fastkd._native as n\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ok = n.load()\n"
            "print(ok, len([x for x in w if 'fastkd' in str(x.message)]), n.reason())\n")
    env = dict(os.environ, FASTKD_NO_NATIVE="1")  # disabled on purpose: no warning, a reason
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False 0 ") and "FASTKD_NO_NATIVE" in out.stdout, out.stdout + out.stderr


def test_cuda_sources_need_a_known_gpu(monkeypatch, tmp_path):
    """A CUDA build of torch on a machine without a GPU (what pip installs by default), with
    nvcc present: torch's build cannot tell the architecture and failed, CPU kernels and all.
    The CUDA sources are now left out unless a GPU is visible or TORCH_CUDA_ARCH_LIST is set."""
    from torch.utils import cpp_extension as ce

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(ce, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert "no CUDA GPU is visible" in _native._cuda_skip_reason(ce, ["k.cu"])
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _native._cuda_skip_reason(ce, ["k.cu"]) == ""


def test_failed_cuda_build_keeps_the_cpu_kernels():
    """When the CUDA half of the build fails, the extension is built again without it (a
    warning, and cuda_reason() says why) instead of losing the CPU kernels too."""
    code = ("import sys, warnings, torch, fastkd._native as n\n"
            "sys.modules['fastkd._C'] = None\n"  # the JIT path, even beside an ahead-of-time build
            "from torch.utils import cpp_extension as ce\n"
            "n._cuda_skip_reason = lambda ce, cu: ''\n"
            "real = ce.load\n"
            "def load(**kw):\n"
            "    if kw.get('extra_cuda_cflags') is not None:\n"
            "        raise RuntimeError('nvcc: error: unsupported toolkit')\n"
            "    return real(**kw)\n"
            "ce.load = load\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ok = n.load()\n"
            "print(ok, n.has_op('kd_fwd'), '|', n.cuda_reason(), '|', "
            "len([x for x in w if 'CPU kernels alone' in str(x.message)]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True True |"), out.stdout + out.stderr
    assert "the CUDA sources failed to compile: nvcc: error: unsupported toolkit" in out.stdout
    assert out.stdout.strip().endswith("| 1"), out.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_errors_common(device):
    dev = on_device(device)
    s, t = make(2, 3, 11, device=dev)
    loss = torch.empty(2, 3, device=dev)
    with pytest.raises(RuntimeError, match="dtype"):
        op(s, t, None, loss, torch.empty_like(s, dtype=torch.bfloat16), None, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="needs labels"):
        op(s, t, None, loss, None, None, *_args(_cfg(hard_weight=0.5)))
    with pytest.raises(RuntimeError, match="same shape"):
        op(s, t[:, :2], None, loss, None, None, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="last dim"):
        op(s.transpose(1, 2), t.transpose(1, 2), None, torch.empty(2, 11, device=dev), None, None, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="beta"):
        op(s, t, None, loss, None, None, *_args(_cfg(divergence=2, beta=1.0)))
    with pytest.raises(RuntimeError, match="float64 exactly when an input is float64"):
        op(s.double(), t, None, loss, None, None, *_args(_cfg()))


def test_errors():
    """The CPU kernel's own errors; those of both kernels are in test_errors_common."""
    s, t = make(2, 3, 11)
    loss = torch.empty(2, 3)
    bad = torch.tensor([[0, 1, 11], [0, 0, 0]])
    with pytest.raises(RuntimeError, match="out of range"):
        op(s, t, bad, loss, None, None, *_args(_cfg(hard_weight=0.5)))
    with pytest.raises(RuntimeError, match="float64 exactly when an input is float64"):
        op(s, t, None, loss.double(), None, None, *_args(_cfg()))
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16 or float64"):
        op(s, t.to(torch.int32), None, loss, None, None, *_args(_cfg()))
    storage = torch.randn(2 * 3 * 11 + 1)
    with pytest.raises(RuntimeError, match="overlaps"):  # shifted by one entry: rows would race
        op(storage[:-1].view(2, 3, 11), t, None, loss, storage[1:].view(2, 3, 11), None, *_args(_cfg()))
