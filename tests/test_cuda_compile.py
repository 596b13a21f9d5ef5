"""The CUDA sources compile, without a GPU: nvcc for sm_90 against torch's headers.

The CUDA kernels can only run on a GPU, but a syntax or template error, or a register-spill
regression in the hot kernels, shows up at compile time. Wherever nvcc works (a CUDA toolkit,
with or without a GPU, with a CPU or CUDA build of torch) this compiles every file of
fastkd/csrc/cuda the way torch.utils.cpp_extension would and reads ptxas' report; it skips
cleanly where nvcc or torch's c10/cuda headers are missing. Half a minute (relational.cu) to
three minutes (attention.cu) of one core per file; each file is compiled once per session,
under pytest-xdist too.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile

import filelock  # a dependency of torch
import pytest
import torch
from torch.utils import cpp_extension as ce

CSRC = os.path.join(os.path.dirname(__file__), "..", "fastkd", "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
ARCH = "sm_90"


def _nvcc():
    for cand in (os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else None, shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _torch_includes():
    inc = ce.include_paths()
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "CUDAStream.h")) for d in inc):
        return None
    return inc


@pytest.fixture(scope="module")
def toolchain(request, tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit)")
    inc = _torch_includes()
    if inc is None:
        pytest.skip("torch's c10/cuda headers are not installed")
    with tempfile.TemporaryDirectory() as tmp:
        # A CPU build of torch ships the c10/cuda headers but not the one CMake generates for
        # CUDA builds; supply it (its content in CUDA builds of torch) when it is missing.
        if not any(os.path.exists(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for d in inc):
            shim = os.path.join(tmp, "shim", "c10", "cuda", "impl")
            os.makedirs(shim)
            with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
                f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            inc = inc + [os.path.join(tmp, "shim")]
        probe = os.path.join(tmp, "probe.cu")
        with open(probe, "w") as f:
            f.write("__global__ void k(int* p) { *p = 1; }\n")
        r = subprocess.run([nvcc, "-std=c++20", f"-arch={ARCH}", "-c", probe, "-o", probe + ".o"],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.skip(f"nvcc cannot compile for {ARCH} here: {(r.stderr or r.stdout).strip()[-300:]}")
        # every file's compile test selected (not a -k subset): compile them all at once
        chosen = {item.callspec.params.get("path") for item in request.session.items
                  if item.module is request.module and hasattr(item, "callspec")}
        # Under pytest-xdist the workers share one results folder (the session's base temp
        # folder, common to all of them) and a lock: whichever worker comes first compiles,
        # the others wait for it and read its results, so no file is compiled twice.
        shared = tmp
        if os.environ.get("PYTEST_XDIST_WORKER"):
            shared = str(tmp_path_factory.getbasetemp().parent / "fastkd-nvcc")
            os.makedirs(shared, exist_ok=True)
        yield nvcc, inc, tmp, shared, set(CU_FILES) <= chosen


_compiled: dict = {}


def _result_file(shared, path):
    return os.path.join(shared, os.path.basename(path) + ".json")


def _compile(toolchain, path):
    """(return code, nvcc + ptxas output), once per file and session. When the whole module
    runs, the first call runs nvcc on every file at once (half a minute to three minutes each,
    one core each), so the files compile side by side on the cores there are."""
    if path in _compiled:
        return _compiled[path]
    nvcc, inc, tmp, shared, all_at_once = toolchain
    wanted = CU_FILES if all_at_once else [path]
    with filelock.FileLock(os.path.join(shared, "nvcc.lock")):
        todo = [p for p in wanted if not os.path.exists(_result_file(shared, p))]
        running = {}
        try:
            for p in todo:
                out = os.path.join(tmp, os.path.basename(p) + ".o")
                cmd = [nvcc, "-std=c++20", f"-arch={ARCH}", "-O3", "-c", p, "-o", out, "-Xcompiler", "-fPIC",
                       "-DTORCH_EXTENSION_NAME=fastkd_native", "-DFASTKD_WITH_CUDA", "-Xptxas", "-v",
                       *ce.COMMON_NVCC_FLAGS, *[f"-I{d}" for d in inc]]
                running[p] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                              start_new_session=True)
            for p in todo:
                proc = running[p]
                try:
                    log, _ = proc.communicate(timeout=1800)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    log = proc.communicate()[0] + "\n(nvcc timed out)"
                del running[p]
                with open(_result_file(shared, p) + ".part", "w") as f:
                    json.dump({"rc": proc.returncode, "log": log}, f)
                os.replace(_result_file(shared, p) + ".part", _result_file(shared, p))
        finally:  # interrupted: kill what is still running, nvcc with its cicc / ptxas
            for proc in running.values():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for p in wanted:
        with open(_result_file(shared, p)) as f:
            r = json.load(f)
        _compiled[p] = (r["rc"], r["log"])
    return _compiled[path]


def _kernels(log):
    """[(mangled name, registers, spill store bytes, spill load bytes)] from ptxas -v."""
    pat = re.compile(r"Compiling entry function '(\S+)' for '\S+'\n.*?"
                     r"(\d+) bytes spill stores, (\d+) bytes spill loads\n.*?Used (\d+) registers", re.S)
    return [(m.group(1), int(m.group(4)), int(m.group(2)), int(m.group(3))) for m in pat.finditer(log)]


@pytest.mark.skipif(not CU_FILES, reason="no CUDA sources")
@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_compiles_for_sm90(toolchain, path):
    rc, log = _compile(toolchain, path)
    errors = [ln for ln in log.splitlines() if "error" in ln.lower()]
    assert rc == 0, "nvcc failed:\n" + "\n".join(errors[:20] or log.splitlines()[-40:])
    assert _kernels(log), "ptxas reported no kernels"


@pytest.mark.skipif(not os.path.exists(os.path.join(CSRC, "cuda", "divergences.cu")), reason="no kd CUDA kernel")
def test_kd_kernels_do_not_spill(toolchain):
    """The kd kernels for one input dtype (the hot path) stay within 80 registers (three CTAs of
    256 threads per SM, see divergences.cu) without spilling; 6 divergences x 5 dtype variants."""
    rc, log = _compile(toolchain, os.path.join(CSRC, "cuda", "divergences.cu"))
    assert rc == 0, log[-3000:]
    kernels = [k for k in _kernels(log) if "kd_fwd_kernel" in k[0]]
    assert len(kernels) == 30, [k[0] for k in kernels]
    fixed = [k for k in kernels if "Dyn" not in k[0]]
    assert len(fixed) == 18
    for name, regs, spill_st, spill_ld in fixed:
        assert regs <= 80 and spill_st == 0 and spill_ld == 0, (name, regs, spill_st, spill_ld)


@pytest.mark.skipif(not os.path.exists(os.path.join(CSRC, "cuda", "sparse.cu")), reason="no sparse CUDA kernel")
def test_sparse_kernels_do_not_spill(toolchain):
    """The sparse_kd kernels of the float32/float16/bfloat16 student (the hot path) stay within 80
    registers (three CTAs of 256 threads per SM, see sparse.cu) without spilling; the float64 one
    (gradcheck, debugging) does not spill either."""
    rc, log = _compile(toolchain, os.path.join(CSRC, "cuda", "sparse.cu"))
    assert rc == 0, log[-3000:]
    kernels = [k for k in _kernels(log) if "sparse_kd_fwd_kernel" in k[0]]
    assert len(kernels) == 4, [k[0] for k in kernels]
    for name, regs, spill_st, spill_ld in kernels:
        assert spill_st == 0 and spill_ld == 0, (name, regs, spill_st, spill_ld)
        assert "Dyn" in name or regs <= 80, (name, regs)



@pytest.mark.skipif(not os.path.exists(os.path.join(CSRC, "cuda", "relational.cu")), reason="no relational CUDA kernel")
def test_relational_kernels_do_not_spill(toolchain):
    """The RKD distance kernels do not spill; the tile kernels (64 x 64 Gram tiles, 4 x 4 entries
    per thread) of float32 arithmetic (float32, float16 and bfloat16 inputs) stay within 128
    registers, two CTAs of 256 threads per SM (their launch bounds); float64 ones may use more."""
    rc, log = _compile(toolchain, os.path.join(CSRC, "cuda", "relational.cu"))
    assert rc == 0, log[-3000:]
    kernels = [k for k in _kernels(log) if "rkd_dist_" in k[0]]
    for name, regs, spill_st, spill_ld in kernels:
        assert spill_st == 0 and spill_ld == 0, (name, regs, spill_st, spill_ld)
    tiles = [k for k in kernels if "sums_kernel" in k[0] or "grad_kernel" in k[0]]
    assert len(tiles) == 6, [k[0] for k in tiles]  # passes 1, 2 and the gradient x float, double
    fp32 = [k for k in tiles if re.search(r"(sums|grad)_kernelIf", k[0])]
    assert len(fp32) == 3, [k[0] for k in fp32]
    for name, regs, _, _ in fp32:
        assert regs <= 128, (name, regs)


@pytest.mark.skipif(not os.path.exists(os.path.join(CSRC, "cuda", "attention.cu")), reason="no attention CUDA kernel")
def test_attention_map_kernels_do_not_spill(toolchain):
    """The attention_map kernels hold a row in registers (see attention.cu) without spilling: 28
    variants (dtypes x layouts). The warp / sub-warp layouts of one fixed dtype, the hot path, stay
    within 128 registers (two CTAs of 256 threads per SM); the CTA layouts are capped by their
    launch bounds."""
    rc, log = _compile(toolchain, os.path.join(CSRC, "cuda", "attention.cu"))
    assert rc == 0, log[-3000:]
    kernels = [k for k in _kernels(log) if "attention_map_kernel" in k[0]]
    assert len(kernels) == 28, [k[0] for k in kernels]
    for name, regs, spill_st, spill_ld in kernels:
        assert spill_st == 0 and spill_ld == 0, (name, regs, spill_st, spill_ld)
    # mangled template arguments end in ..., GS, NO: Li0E is the CTA layout (GS = 0)
    group = [k for k in kernels if "Dyn" not in k[0] and "Li0ELi" not in k[0]]
    assert len(group) == 15, [k[0] for k in group]
    for name, regs, _, _ in group:
        assert regs <= 128, (name, regs)
