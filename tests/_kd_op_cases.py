"""Shared helpers for the op-level tests of torch.ops.fastkd.kd_fwd (CPU and CUDA kernels).

Oracle: fastkd.reference.divergences.kd_fwd run in float64 on the CPU, on the *same* (already
rounded) inputs. A kernel computing in fp32 is bounded by fp32 arithmetic whatever the input
dtype: at most twice the error of the same reference run in float32, plus ~1e-5 relative.
Gradients stored in fp16/bf16 may differ from the rounded float64 result by one rounding.
An input in float64 takes the float64 path, which must match the reference to ~1e-10.
"""
import os
import subprocess
import sys
import tempfile

import torch

from conftest import skip_unless_available
from fastkd.reference.divergences import DIVERGENCES
from fastkd.reference.divergences import kd_fwd as ref_kd_fwd

IGNORE = -100
DIVS = list(DIVERGENCES.items())
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)]
F64_DTYPES = [(torch.float64, torch.float64), (torch.float64, torch.bfloat16), (torch.float32, torch.float64)]
# the devices whose kd_fwd kernel the shared op-level tests run; "cuda" skips cleanly without one
DEVICES = ["cpu", "cuda"]


def dtype_id(d):
    return f"{str(d[0])[6:]}-{str(d[1])[6:]}"


def on_device(device):
    """Skips unless the native kd_fwd kernel for ``device`` can run here; returns the device."""
    return skip_unless_available("cpp" if device == "cpu" else "cuda", "kd")


def _cfg(**kw):
    cfg = dict(divergence=0, temperature=1.0, beta=0.3, skew=0.1, ignore_index=IGNORE, soft_weight=1.0,
               hard_weight=0.0, scale_temperature=True, softcap=0.0)
    cfg.update(kw)
    return cfg


def _args(cfg):
    return [cfg[k] for k in ("divergence", "temperature", "beta", "skew", "ignore_index", "soft_weight",
                             "hard_weight", "scale_temperature", "softcap")]


def make(B, R, V, s_dtype=torch.float32, t_dtype=None, seed=0, scale=3.0, device="cpu"):
    """Correlated student / teacher logits (so divergences are moderate), drawn on the CPU."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, R, V, generator=g) * scale
    t = 0.6 * s + torch.randn(B, R, V, generator=g) * scale
    return s.to(s_dtype).to(device), t.to(t_dtype or s_dtype).to(device)


def make_labels(B, R, V, kind, seed=0, device="cpu"):
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
    return y.to(device)


def run_op(s, t, labels, cfg, grad_s=True, grad_t=True, gs=None, gt=None):
    """Calls the op with NaN-filled output buffers (so every entry must be written)."""
    B, R, _ = s.shape
    wide = torch.float64 in (s.dtype, t.dtype)
    loss = torch.full((B, R), float("nan"), dtype=torch.float64 if wide else torch.float32, device=s.device)
    if grad_s and gs is None:
        gs = torch.full_like(s, float("nan"))
    if grad_t and gt is None:
        gt = torch.full_like(t, float("nan"))
    torch.ops.fastkd.kd_fwd(s, t, labels, loss, gs if grad_s else None, gt if grad_t else None, *_args(cfg))
    return loss, (gs if grad_s else None), (gt if grad_t else None)


def run_ref(s, t, labels, cfg, dtype=torch.float64):
    s, t = s.cpu().to(dtype), t.cpu().to(dtype)
    labels = None if labels is None else labels.cpu()
    loss = torch.empty(s.shape[:2], dtype=dtype)
    gs, gt = torch.empty_like(s), torch.empty_like(t)
    ref_kd_fwd(s, t, labels, loss, gs, gt, *_args(cfg))
    return loss, gs, gt


def _check(got, r64, r32, name, rtol=1e-5):
    """|got - r64| <= 2 max|r32 - r64| + rtol (|r64| + 1e-2 max|r64|) + one rounding of got's dtype.

    The float32 error term is the flash-attention rule (twice what PyTorch itself gets in the
    kernel's working precision), taken over the whole tensor since rounding errors are random."""
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
            f"got {g.flatten()[i].item()!r}, ref64 {r64.flatten()[i].item()!r}, ref32 {r32.flatten()[i].item()!r}, "
            f"bound {bound.flatten()[i].item():.3g}; max err {err.nan_to_num(0, 0, 0).max().item():.3g}")


def check_all(got, s, t, labels, cfg, rtol=1e-5):
    """Checks the op's (loss, grad_student, grad_teacher) against the reference; None grads are skipped."""
    if torch.float64 in (s.dtype, t.dtype):  # float64 math: the reference to ~1e-10
        l64, gs64, gt64 = run_ref(s, t, labels, cfg)
        torch.testing.assert_close(got[0].cpu(), l64, rtol=1e-10, atol=1e-12)
        for g, want in zip(got[1:], (gs64, gt64)):
            if g is not None:
                eps = 1e-10 if g.dtype == torch.float64 else torch.finfo(g.dtype).eps
                torch.testing.assert_close(g.cpu().double(), want, rtol=eps, atol=1e-12)
        return
    refs64, refs32 = run_ref(s, t, labels, cfg), run_ref(s, t, labels, cfg, torch.float32)
    for g, r64, r32, name in zip(got, refs64, refs32, ("loss", "grad_student", "grad_teacher")):
        if g is not None:
            _check(g, r64, r32, name, rtol)


def compare(s, t, labels, cfg, grad_s=True, grad_t=True, rtol=1e-5):
    got = run_op(s, t, labels, cfg, grad_s, grad_t)
    check_all(got, s, t, labels, cfg, rtol)
    return got


def opcheck_args(labels, grad_s, grad_t, div=0, hard=0.0, device="cpu"):
    s, t = make(2, 3, 37, seed=31, device=device)
    y = make_labels(2, 3, 37, "partial", device=device) if labels else None
    loss = torch.empty(2, 3, device=device)
    gs = torch.empty_like(s) if grad_s else None
    gt = torch.empty_like(t) if grad_t else None
    return (s, t, y, loss, gs, gt, *_args(_cfg(divergence=div, temperature=2.0, hard_weight=hard)))



def outputs_under_env(code: str, var: str, values=("1", "16")):
    """Runs ``code`` (a script that torch.saves its outputs to sys.argv[1]) once per value of the
    environment variable ``var`` in a fresh process (a CUDA kernel reads its launch caps once per
    process), and returns the loaded outputs in order."""
    results = []
    for value in values:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "out.pt")
            r = subprocess.run([sys.executable, "-c", code, path], env=dict(os.environ, **{var: value}),
                               capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"{var}={value}: {r.stderr[-3000:]}"
            results.append(torch.load(path))
    return results
