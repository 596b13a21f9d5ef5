"""torch.ops.fastkd.kd_fwd on CUDA tensors (csrc/cuda/divergences.cu): the CUDA-only cases.

Runs where CUDA is present and the native extension holds the CUDA kernel; skips cleanly
elsewhere (with "cuda" in FASTKD_REQUIRE_BACKENDS the skip becomes a failure). The op-level
cases shared with the CPU kernel (reference grid, odd shapes, strides, extreme logits...) run on
CUDA from test_native.py, with the oracle and error bound of _kd_op_cases.py.

The kernel lays a row out in one of three ways (see the top of divergences.cu), chosen by the
row's bytes and the device; the shapes here and there reach each of them:
  * V of a few hundred / thousand: one CTA per row, the row in shared memory;
  * V = 128256 or 256000 (16-bit): a cluster of CTAs per row (sm_90), slices in shared memory;
  * V ~ 1M in float32: no split fits shared memory, every pass re-reads global memory.
"""
import functools
import itertools

import pytest
import torch

from conftest import require_cuda_kernel

require_cuda_kernel("kd")

import _kd_op_cases as cases  # noqa: E402
from fastkd import _backend  # noqa: E402
from _kd_op_cases import DIVS, IGNORE, _args, _cfg, compare, outputs_under_env  # noqa: E402
from _kd_op_cases import run_op as run_cuda  # noqa: E402

op = torch.ops.fastkd.kd_fwd
DEV = "cuda"
make = functools.partial(cases.make, device=DEV)
make_labels = functools.partial(cases.make_labels, device=DEV)


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


def test_errors():
    """The CUDA kernel's own errors; those of both kernels are in test_native.py's test_errors_common."""
    s, t = make(2, 3, 11)
    loss = torch.empty(2, 3, device=DEV)
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


@pytest.mark.parametrize("V,dtype", [(128256, torch.bfloat16), (1_000_003, torch.float32)],
                         ids=["128256-bf16-cluster", "1000003-fp32-global"])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d[0])
def test_nan_logit_in_one_slice_makes_the_row_nan(div, V, dtype):
    """A NaN in one CTA's slice of a split row reaches every CTA of the row through the cluster
    reduction: the whole row's loss and gradients are NaN; other rows as without it."""
    s, t = make(1, 4, V, dtype, seed=43)
    labels = torch.tensor([[5, IGNORE, V - 1, 0]], device=DEV)
    ns, nt = s.clone(), t.clone()
    ns[0, 0, V - 3] = float("nan")  # last slice
    nt[0, 1, V // 2] = float("nan")  # ignored row
    nt[0, 2, V // 3] = float("nan")
    cfg = _cfg(divergence=div[1], temperature=2.0, hard_weight=0.5)
    for grads in ((True, False), (True, True)):
        got = run_cuda(ns, nt, labels, cfg, *grads)
        want = run_cuda(s, t, labels, cfg, *grads)
        assert bool(got[0][0, [0, 2]].isnan().all()) and got[0][0, 1] == 0
        assert torch.equal(got[0][0, 3], want[0][0, 3])
        for g, w in zip(got[1:], want[1:]):
            if g is not None:
                assert bool(g[0, [0, 2]].isnan().all()) and bool((g[0, 1] == 0).all())
                assert torch.equal(g[0, 3], w[0, 3])


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
    results = outputs_under_env(code, "FASTKD_CUDA_KD_MAX_SPLIT")
    for (l1, gs1, gt1), (l2, gs2, gt2) in zip(*results):
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
        for a, b in ((gs1, gs2), (gt1, gt2)):
            torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6 + 1e-5 * b.abs().max().item())
