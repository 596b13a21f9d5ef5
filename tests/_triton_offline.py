"""Compile fastkd's Triton kernels for a GPU that is not there (sm_90, Hopper), launching nothing.

The interpreter (TRITON_INTERPRET=1) runs the kernels' arithmetic on the CPU, but it skips
everything the real compiler checks: loop-carried types and shapes, tl.dot's shape rules, the
launch-time guard that a global constexpr has not changed, register pressure. Triton's NVIDIA
backend itself (MLIR, LLVM, the ptxas it ships) runs on any x86-64 machine, so this module:

* makes Triton's active driver report an sm_90 device (no CUDA needed),
* runs fastkd's own launchers on FakeTensors that claim device ``cuda`` (shapes and strides,
  no memory), so each launcher picks exactly the block sizes and warps it picks on a GPU,
* turns each ``kernel[grid](...)`` into ``warmup`` (compile, no launch) with small real CPU
  tensors of the same dtypes standing in for the fake ones (Triton reads their dtype and the
  16-byte alignment of their address, as a GPU tensor's),
* and returns every compiled kernel with its registers and stack bytes (spills and call frames),
  read from the cubin by the cuobjdump that Triton ships.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
from dataclasses import dataclass
from typing import List, Optional

import torch

ARCH = 90


@dataclass
class Compiled:
    kernel: str             # the @triton.jit function's name
    constants: dict         # its constexpr arguments
    num_warps: int
    registers: Optional[int]     # per thread
    stack_bytes: Optional[int]   # per thread: register spills and call frames
    shared_bytes: int


def available() -> Optional[str]:
    """None when offline compilation can run here, else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception as e:  # noqa: BLE001
        return f"triton is not importable: {e!r}"
    if "nvidia" not in backends:
        return "this triton has no NVIDIA backend"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 replaces the compiler with the interpreter in this process"
    return None


def _cuobjdump() -> Optional[str]:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def _resources(cubin: bytes, workdir: str):
    """(registers, stack bytes) of the one kernel in a cubin, or (None, None)."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    path = os.path.join(workdir, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


class _Sm90Driver:
    """Just what JITFunction.run asks of the active driver before it launches."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", ARCH, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cuda", 0)


@contextlib.contextmanager
def compile_only(workdir: str):
    """Within: Triton launches compile for sm_90 and return; yields the list of Compiled."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
    from triton.runtime import jit
    from triton.runtime.driver import driver

    done: List[Compiled] = []
    original = jit.JITFunction.run

    def stand_in(a):
        if isinstance(a, FakeTensor):
            with unset_fake_temporarily():
                return torch.empty(16, dtype=a.dtype)  # 16-byte aligned, as a GPU allocation
        return a

    def run(self, *args, grid, warmup, **kwargs):
        args = [stand_in(a) for a in args]
        kwargs = {k: stand_in(v) for k, v in kwargs.items()}
        with unset_fake_temporarily():
            k = original(self, *args, grid=grid, warmup=True, **kwargs)
        regs, stack = _resources(k.asm["cubin"], workdir)
        consts = {name: v for name, v in kwargs.items() if name.isupper()}
        done.append(Compiled(self.fn.__name__, consts, k.metadata.num_warps, regs, stack, k.metadata.shared))
        return None

    tensor_copy = torch.Tensor.copy_

    def copy_(self, src, non_blocking=False):
        # a CPU-only torch cannot run copy_ on fake CUDA tensors; nothing is stored anyway
        if isinstance(self, FakeTensor):
            torch.broadcast_shapes(self.shape, getattr(src, "shape", ()))
            return self
        return tensor_copy(self, src, non_blocking)

    # the launchers' device guard (fastkd.triton.on_tensor_device): a CPU-only torch has no
    # CUDA device to make current, and the stand-in driver has a single one anyway
    cuda_device = torch.cuda.device

    previous = getattr(driver, "_active", None)
    driver.set_active(_Sm90Driver())
    jit.JITFunction.run = run
    torch.Tensor.copy_ = copy_
    torch.cuda.device = lambda device: contextlib.nullcontext()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield done
    finally:
        torch.cuda.device = cuda_device
        torch.Tensor.copy_ = tensor_copy
        jit.JITFunction.run = original
        driver._active = previous  # None: Triton looks for a real driver again when next asked


def cuda_empty(*shape, dtype=torch.float32):
    """A fake CUDA tensor (no memory; no shape: 0-d): use inside ``compile_only``."""
    return torch.empty(shape, dtype=dtype, device="cuda")


# ----------------------------------------------------------------------------------------------
# every launcher at the configurations a GPU run takes: `python tests/_triton_offline.py FAMILY`
# prints one JSON line per configuration (the kernels it compiled, or the error it raised)
# ----------------------------------------------------------------------------------------------
def _kd_configs():
    from fastkd.triton.divergences import kd_fwd_triton

    f32, bf16, f16, i64 = torch.float32, torch.bfloat16, torch.float16, torch.int64
    for V, dt in ((128256, bf16), (1271, f32), (401, f16), (1271, torch.float64)):
        for div in range(6):
            for rich in (True, False):  # labels, hard loss, softcap, T != 1, teacher gradient; or none
                if dt == torch.float64 and not rich:
                    continue

                def call(V=V, dt=dt, div=div, rich=rich):
                    s, t = cuda_empty(2, 3, V, dtype=dt), cuda_empty(2, 3, V, dtype=dt)
                    loss = cuda_empty(2, 3, dtype=torch.float64 if dt == torch.float64 else f32)
                    kd_fwd_triton(s, t, cuda_empty(2, 3, dtype=i64) if rich else None, loss, torch.empty_like(s),
                                  torch.empty_like(t) if rich else None, div, 2.0 if rich else 1.0, 0.3, 0.2, -100,
                                  0.8, 0.4 if rich else 0.0, True, 30.0 if rich else 0.0)
                yield f"kd V={V} {dt} div={div} {'rich' if rich else 'plain'}", call


def _sparse_configs():
    from fastkd.triton import sparse as S
    from fastkd.triton.sparse import sparse_kd_fwd_triton

    S._SM_COUNT.setdefault(0, 132)  # an H100's, instead of asking the CUDA runtime (there is none)
    for V, K, dt in ((128256, 64, torch.bfloat16), (1271, 20, torch.float32), (401, 7, torch.float16)):
        for div in range(6):
            for tail in (0, 1):
                for rich in (True, False):
                    def call(V=V, K=K, dt=dt, div=div, tail=tail, rich=rich):
                        s = cuda_empty(2, 3, V, dtype=dt)
                        idx, val = cuda_empty(2, 3, K, dtype=torch.int64), cuda_empty(2, 3, K, dtype=torch.float32)
                        sparse_kd_fwd_triton(s, idx, val, cuda_empty(2, 3, dtype=torch.int64) if rich else None,
                                             cuda_empty(2, 3), torch.empty_like(s) if rich else None, div,
                                             2.0 if rich else 1.0, 0.3, 0.2, tail, -100, 0.8, 0.4 if rich else 0.0,
                                             True)
                    yield f"sparse V={V} K={K} {dt} div={div} tail={tail} {'rich' if rich else 'plain'}", call


def _attention_configs():
    from fastkd.triton import attention as A

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((4, 64, 1024), (3, 24, 49)):
            def transfer(dt=dt, shape=shape):
                B, C, N = shape
                A.attention_transfer_fwd_triton(cuda_empty(B, C, N, dtype=dt), cuda_empty(B, 2 * C, N, dtype=dt),
                                                cuda_empty(B), cuda_empty(B, C, N, dtype=dt), 2.0)
            yield f"attention_transfer {shape} {dt}", transfer
        for L in (2048, 197, 16):
            for kind in (0, 1):
                for scores in (True, False):
                    for masked in (True, False):
                        def amap(dt=dt, L=L, kind=kind, scores=scores, masked=masked):
                            s, t = cuda_empty(2, 3, L, L, dtype=dt), cuda_empty(2, 3, L, L, dtype=dt)
                            mask = cuda_empty(2, L, dtype=torch.bool) if masked else None
                            A.attention_map_fwd_triton(s, t, mask, cuda_empty(2, 3, L), torch.empty_like(s), kind,
                                                       scores, scores)
                        yield f"attention_map L={L} kind={kind} scores={scores} mask={masked} {dt}", amap
        for L, Ds, Dt, heads in ((4096, 768, 768, 12), (37, 48, 64, 4)):
            for masked in (True, False):
                def relation(dt=dt, L=L, Ds=Ds, Dt=Dt, heads=heads, masked=masked):
                    sm, sn = cuda_empty(2, L, Ds, dtype=dt), cuda_empty(2, L, Ds, dtype=dt)
                    tm, tn = cuda_empty(2, L, Dt, dtype=dt), cuda_empty(2, L, Dt, dtype=dt)
                    mask = cuda_empty(2, L, dtype=torch.bool) if masked else None
                    lse_s, lse_t = cuda_empty(2, heads, L), cuda_empty(2, heads, L)
                    A.attention_relation_fwd_triton(sm, sn, tm, tn, mask, heads, 0.125, 0.125,
                                                    cuda_empty(2, heads, L), lse_s, lse_t)
                    A.attention_relation_bwd_triton(sm, sn, tm, tn, mask, heads, 0.125, 0.125, lse_s, lse_t,
                                                    cuda_empty(2), torch.empty_like(sm), torch.empty_like(sn))
                yield f"attention_relation L={L} Ds={Ds} Dt={Dt} A={heads} mask={masked} {dt}", relation
                if dt == torch.float32 and L == 4096 and masked:  # the opt-in tensor-core score tiles
                    yield (f"attention_relation L={L} Ds={Ds} Dt={Dt} A={heads} mask={masked} {dt} tf32x3",
                           functools.partial(_with_env, "FASTKD_TRITON_FP32_DOT", "tf32x3", relation))


def _relational_configs():
    from fastkd.triton import relational as R

    for dt in (torch.float32, torch.bfloat16, torch.float64):
        for N, Ds, Dt in ((16384, 512, 512), (257, 33, 65), (3, 1, 2)):
            for grad in (True, False):
                def dist(dt=dt, N=N, Ds=Ds, Dt=Dt, grad=grad):
                    s = cuda_empty(N, Ds, dtype=dt)
                    R.rkd_distance_triton(s, cuda_empty(N, Dt, dtype=dt), cuda_empty(dtype=_loss_dtype(dt)),
                                          torch.empty_like(s) if grad else None, 1e-12, 1.0)

                def sp(dt=dt, N=N, Ds=Ds, Dt=Dt, grad=grad):
                    s = cuda_empty(N, Ds, dtype=dt)
                    R.similarity_preserving_triton(s, cuda_empty(N, Dt, dtype=dt), cuda_empty(dtype=_loss_dtype(dt)),
                                                   torch.empty_like(s) if grad else None)

                def angle(dt=dt, N=min(N, 1024), Ds=Ds, Dt=Dt, grad=grad):
                    s = cuda_empty(N, Ds, dtype=dt)
                    R.rkd_angle_triton(s, cuda_empty(N, Dt, dtype=dt), cuda_empty(dtype=_loss_dtype(dt)),
                                       torch.empty_like(s) if grad else None, 1.0)
                for name, fn in (("rkd_distance", dist), ("similarity_preserving", sp), ("rkd_angle", angle)):
                    yield f"{name} N={N} Ds={Ds} Dt={Dt} {dt} grad={grad}", fn
                    if dt == torch.float32 and N == 16384:  # the opt-in tensor-core Gram tiles
                        yield (f"{name} N={N} Ds={Ds} Dt={Dt} {dt} grad={grad} tf32x3",
                               functools.partial(_with_env, "FASTKD_TRITON_FP32_DOT", "tf32x3", fn))


def _with_env(name, value, fn):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        fn()
    finally:
        if old is None:
            os.environ.pop(name)
        else:
            os.environ[name] = old


def _loss_dtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


FAMILIES = {"kd": _kd_configs, "sparse": _sparse_configs, "attention": _attention_configs,
            "relational": _relational_configs}


def main(family: str) -> int:
    import json
    import tempfile

    why = available()
    if why:
        print(json.dumps({"unavailable": why}), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as work, compile_only(work) as done:
        for label, call in FAMILIES[family]():
            before = len(done)
            error = tail = None
            try:
                call()
            except RuntimeError as e:
                # a CPU-only torch cannot run some ops (indexing, copies) on fake CUDA tensors: after
                # the launches, that is the launcher's torch code, not a kernel (the tests run it)
                if "not linked with support for cuda devices" in str(e) and len(done) > before:
                    tail = f"{type(e).__name__}: {e}"
                else:
                    error = f"{type(e).__name__}: {e}"[:2000]
            except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
                error = f"{type(e).__name__}: {e}"[:2000]
            kernels = [{**c.__dict__, "constants": {k: str(v) for k, v in c.constants.items()}}
                       for c in done[before:]]
            print(json.dumps({"config": label, "error": error, "unchecked_tail": tail, "kernels": kernels}),
                  flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1]))
