"""One command that measures fastkd on a GPU machine and writes a report: `--out DIR`.

    python benchmarks/gpu_report.py --out DIR              # every stage, within --budget-s
    python benchmarks/gpu_report.py --out DIR --stages bench
    python benchmarks/gpu_report.py --dry-run              # the plan; needs no GPU
    python benchmarks/gpu_report.py --summarize DIR1 DIR2 --out DIR   # merge runs; needs no GPU

Stages, in order (each in a subprocess with its own timeout, killed with its process group when
it runs over, so one hang cannot eat the budget; all output goes to DIR/logs/ and DIR/raw.log):

  env        versions: python, torch (+CUDA), triton, nvcc, ninja, driver, GPU name and memory
  build      compiles the native extension (CPU + CUDA kernels) through fastkd._native, timed,
             and checks that torch.ops.fastkd.kd_fwd has a CUDA kernel
  roofline   measured copy bandwidth (1 read + 1 write), the same for a + b -> c (2 reads + 1 write,
             the kd kernel's traffic), and the bf16 GEMM rate at 8192^3
  kd-target  issue 8's target: kd_fwd at N=8192, V=128256 bf16, cuda vs triton, in effective TB/s
             (one read of each input, one write of the gradient) and as a fraction of the rooflines,
             after a correctness check of those rows against the reference
  tests-cuda the cuda backend's own test files, then the cuda cases (-k cuda) of the family suites
  bench      python -m fastkd.bench --full in three parts, each to its own JSON, written after every
             case: first one kd divergence and every other family's target shape (bench-targets.*),
             then the relational losses and attention relations on triton with
             FASTKD_TRITON_FP32_DOT=tf32x3 (bench-tf32x3.*, rows labelled triton[tf32x3]), then
             kd's other five divergences (bench-kd-rest.*)
  tests      the rest of the pytest suite with FASTKD_REQUIRE_BACKENDS=torch,cpp,triton,cuda, so a
             backend that fails to build fails its tests instead of skipping them
  tune       fastkd.autotune_backends(): triton vs cuda per family (kd, sparse_kd, attention_map,
             rkd_distance), dtype and size class; writes DIR/tuning.json in the format of
             fastkd/tuning/*.json (commit it there to ship the choices for this GPU)

Test stages run pytest-xdist with several workers on the one GPU and pytest-timeout per test where
those plugins are installed (both are in the test extras), else one process per file.

The budget (--budget-s, default 560 s) bounds the whole invocation: a stage gets at most the
time left, and stages that no longer fit are recorded as skipped with the command that runs them.
Every invocation writes DIR/summary.md and DIR/summary.json from the stage results in DIR
(DIR/stages/*.json), ready to be copied to benchmarks/results/<device>-<date>.{txt,json}.

On a GPU machine borrowed for 15 minutes in all (its start, a minute or two, included), at most
10 per command, that hands back only a few files of a command's output folder: one command that
does everything in order of worth, its working folder elsewhere and three files delivered into
the returned folder after every stage; then, on the machine still warm (it goes back after a
short idle time: send the second command at once), one short command for what the first left
(its summary says which):
    python benchmarks/gpu_report.py --out /tmp/r1 --deliver RETURNED --budget-s 560   # ~10 min
    python benchmarks/gpu_report.py --out /tmp/r2 --deliver RETURNED --stages env,tests,tune --budget-s 150
then, at your desk: unpack each fastkd-gpu-report.tar.gz and --summarize <the unpacked report
folders> --out <folder>.

Compiling the extension there costs minutes of that time (attention.cu alone is three minutes of
one core). Build it beforehand on any machine with nvcc and the GPU machine's Python and torch
(3.12, 2.11.0+cu130):
    python benchmarks/gpu_report.py --prebuild          # fastkd/_C.so for sm_90, + _C.so.digest
and carry fastkd/_C.so and fastkd/_C.so.digest with the tree. A run uses the .so only while
fastkd/csrc still has the digest it was built from; otherwise it renames it _C.so.stale and the
build stage compiles the sources as usual (the build stage's "prebuilt" field says which).

Liger-Kernel is pure Python but not installed on a machine without network: download its wheel
beforehand (`pip download liger-kernel --no-deps -d benchmarks/wheels`, a git-ignored folder that
must travel with the tree) and pass `--wheels benchmarks/wheels`; the wheels are installed into a
temporary folder on PYTHONPATH for this invocation only, so the benchmarks include Liger.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "fastkd.gpu_report/1"
STAGES = ("env", "build", "roofline", "kd-target", "tests-cuda", "bench", "tests", "tune")
# the most a stage may take (it gets less when the budget has less left)
STAGE_CAP_S = {"env": 60, "build": 360, "roofline": 90, "kd-target": 180, "tests-cuda": 240, "bench": 240,
               "tests": 540, "tune": 240}
# bench parts, in order of worth: each issue target's shape once, then kd's other divergences
# (name, flags[, environment]); a part run with an environment labels its rows impl[name]
BENCH_PARTS = (("targets", ["--full", "--divergence", "forward_kl"]),
               # the relational and attention-relation Gram tiles on tensor cores (opt-in)
               ("tf32x3", ["--full", "--loss", "relational,attention_relation", "--backend", "triton"],
                {"FASTKD_TRITON_FP32_DOT": "tf32x3"}),
               ("kd-rest", ["--full", "--loss", "kd", "--divergence",
                            "reverse_kl,jsd,skew_forward_kl,skew_reverse_kl,tvd"]))
XDIST_WORKERS = 8      # pytest-xdist processes sharing the one GPU in a test stage
TEST_TIMEOUT_S = 240   # pytest-timeout, per test: one hung test cannot take the stage
# (test_cuda_compile.py is left to the tests stage: the build stage compiles the same sources)
CUDA_TEST_FILES = ("tests/test_native_cuda.py", "tests/test_native_sparse_cuda.py")
# the family suites whose backend-parametrized cases include cuda: tests-cuda runs those cases
# (-k cuda) right after the cuda backend's own files, before the whole suite
CUDA_FAMILY_FILES = ("tests/test_divergences.py", "tests/test_sparse.py", "tests/test_attention.py",
                     "tests/test_relational.py")
# the rest of the suite, most relevant first; files not listed run after these, by name
TEST_PRIORITY = ("test_divergences.py", "test_triton.py", "test_native.py", "test_sparse.py",
                 "test_triton_sparse.py", "test_native_sparse.py", "test_fused_linear.py",
                 "test_attention.py", "test_relational.py", "test_buffers.py", "test_distributed.py",
                 "test_bench.py", "test_examples.py", "test_readme.py")
# the test files that hold each CUDA kernel's tests (its own file, and the family suite whose
# cuda cases tests-cuda runs): a family whose files all pass there can join _backend.CUDA_VERIFIED
CUDA_FAMILY_TESTS = {"kd": ("tests/test_native_cuda.py", "tests/test_divergences.py"),
                     "sparse_kd": ("tests/test_native_sparse_cuda.py", "tests/test_sparse.py"),
                     "attention_map": ("tests/test_attention.py",),
                     "rkd_distance": ("tests/test_relational.py",)}
RESERVE_S = 15  # kept back for writing the summary
KD_N, KD_V = 8192, 128256


# ----------------------------------------------------------------------------------------------
# child stages: run as `gpu_report.py --child NAME --result FILE` in a subprocess
# ----------------------------------------------------------------------------------------------
def _bench_ms(fn, warmup_ms=100, rep_ms=400) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench (flushes L2 between runs), else CUDA events."""
    import torch

    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except ImportError:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]


def _run_text(cmd, timeout=60):
    """The command's output, or None when it cannot run or fails."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout or r.stderr).strip() if r.returncode == 0 else None


def child_env() -> dict:
    import platform

    import torch

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    for mod in ("triton", "numpy", "ninja", "liger_kernel", "fastkd"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except ImportError:
            out[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu_name=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_sms=p.multi_processor_count,
                   gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    out["nvidia_smi"] = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                   "clocks.max.mem,power.limit", "--format=csv,noheader"])
    from torch.utils import cpp_extension as ce

    nvcc = os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else shutil.which("nvcc")
    out["cuda_home"] = ce.CUDA_HOME
    nvcc_version = _run_text([nvcc, "--version"]) if nvcc else None
    out["nvcc"] = nvcc_version.splitlines()[-1] if nvcc_version else None
    out["ninja_bin"] = _run_text(["ninja", "--version"])
    out["git_commit"] = _run_text(["git", "-C", ROOT, "rev-parse", "HEAD"])
    status = _run_text(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
    out["git_dirty"] = None if status is None else bool(status)
    return out


PREBUILT = os.path.join(ROOT, "fastkd", "_C.so")  # setup.py's in-place build (no ABI suffix)


def csrc_digest() -> str:
    """sha1 of every native source (fastkd/csrc: names and contents): what a prebuilt extension
    was compiled from."""
    import hashlib

    h = hashlib.sha1()
    base = os.path.join(ROOT, "fastkd", "csrc")
    for path in sorted(glob.glob(os.path.join(base, "**", "*"), recursive=True)):
        if os.path.isfile(path) and path.endswith((".cpp", ".h", ".cu", ".cuh")):
            h.update(os.path.relpath(path, base).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


def prebuild(arch: str) -> int:
    """Build fastkd/_C.so in place for the GPU machine, on any machine with nvcc and the same
    Python and CUDA build of torch (the GPU machine's: Python 3.12, torch 2.11.0+cu130), so the
    borrowed minutes are not spent compiling (3 minutes of one core for attention.cu alone).
    The CPU kernels are built for x86-64-v3 (AVX2), not -march=native, since the GPU machine's CPU
    is another. Writes fastkd/_C.so.digest; a run whose sources differ sets the .so aside."""
    import torch
    from torch.utils import cpp_extension as ce

    if not torch.version.cuda:
        print(f"--prebuild needs a CUDA build of torch (this one is {torch.__version__})", file=sys.stderr)
        return 2
    # the toolkit folder, with bin/nvcc and lib64/libcudart.so (the link needs both): nvcc on PATH
    # may be a link or a wrapper script outside it, so try the usual places too
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), ce.CUDA_HOME,
             nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    cuda_home = next((h for h in homes if h and os.path.exists(os.path.join(h, "bin", "nvcc"))
                      and os.path.exists(os.path.join(h, "lib64", "libcudart.so"))), None)
    if cuda_home is None:
        print("--prebuild: no CUDA toolkit with bin/nvcc and lib64/libcudart.so found (set CUDA_HOME)",
              file=sys.stderr)
        return 2
    env = dict(os.environ, FASTKD_BUILD_EXT="1", FASTKD_MARCH=os.environ.get("FASTKD_MARCH", "x86-64-v3"),
               TORCH_CUDA_ARCH_LIST=arch, CUDA_HOME=cuda_home)
    for stale in (PREBUILT, PREBUILT + ".digest"):
        if os.path.exists(stale):
            os.remove(stale)
    digest = csrc_digest()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env)
    if r.returncode != 0 or not os.path.exists(PREBUILT):
        print(f"--prebuild: the build failed (rc {r.returncode})", file=sys.stderr)
        return 1
    if shutil.which("strip"):
        subprocess.run(["strip", "--strip-debug", PREBUILT], check=False)
    with open(PREBUILT + ".digest", "w") as f:
        f.write(digest + "\n")
    size = os.path.getsize(PREBUILT) / 2**20
    print(f"built {os.path.relpath(PREBUILT, ROOT)} ({size:.1f} MiB, {time.perf_counter() - t0:.0f} s) for "
          f"sm_{arch.replace('.', '')}, torch {torch.__version__}, Python {sys.version.split()[0]}; carry "
          f"fastkd/_C.so and fastkd/_C.so.digest to the GPU machine")
    return 0


def check_prebuilt() -> str:
    """'' without a prebuilt extension; 'used' when fastkd/_C.so was built from these sources;
    otherwise it is renamed to _C.so.stale (so that the stages compile the sources) and the
    reason returned."""
    if not os.path.exists(PREBUILT):
        return ""
    try:
        with open(PREBUILT + ".digest") as f:
            recorded = f.read().strip()
    except OSError:
        recorded = ""
    if recorded == csrc_digest():
        return "used"
    os.replace(PREBUILT, PREBUILT + ".stale")
    return ("set aside: " + ("built from other sources" if recorded else "no .digest beside it")
            + "; compiling fastkd/csrc instead")


def child_build() -> dict:
    import torch

    t0 = time.perf_counter()
    from fastkd import _native

    ok = _native.load()
    took = time.perf_counter() - t0
    out = {"ok": ok, "seconds": round(took, 1), "how": _native._state.get("how"), "reason": _native.reason(),
           "cuda_reason": _native.cuda_reason() if ok else None,
           "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
           "prebuilt": os.environ.get("FASTKD_REPORT_PREBUILT", "")}
    out["kd_fwd_cuda_kernel"] = bool(ok) and torch._C._dispatch_has_kernel_for_dispatch_key("fastkd::kd_fwd", "CUDA")
    from fastkd import _backend

    out["backends_kd_cuda"] = _backend.available_backends("cuda", "kd")
    out["chosen"] = {fam: _backend.choose(fam, torch.device("cuda")) for fam in _backend.FAMILIES}
    return out


def child_roofline() -> dict:
    import torch

    out = {}
    n = 1 << 30  # 1 GiB buffers: far past any L2
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = _bench_ms(lambda: b.copy_(a))
    out["copy"] = {"bytes": 2 * n, "ms": ms, "gb_per_s": 2 * n / ms / 1e6}
    a = b = None
    m = n // 2  # bf16 elements of 1 GiB
    x = torch.randn(m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn_like(x)
    z = torch.empty_like(x)
    ms = _bench_ms(lambda: torch.add(x, y, out=z))
    out["add"] = {"bytes": 3 * 2 * m, "ms": ms, "gb_per_s": 3 * 2 * m / ms / 1e6,
                  "note": "2 reads + 1 write: the traffic pattern of kd_fwd with a student gradient"}
    x = y = z = None
    torch.cuda.empty_cache()
    k = 8192
    p = torch.randn(k, k, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(k, k, dtype=torch.bfloat16, device="cuda")
    ms = _bench_ms(lambda: p @ q)
    out["gemm_bf16"] = {"shape": [k, k, k], "ms": ms, "tflop_per_s": 2 * k**3 / ms / 1e9}
    return out


def child_kd_target() -> dict:
    import torch

    from fastkd import _native
    from fastkd.reference.divergences import DIVERGENCES
    from fastkd.reference.divergences import kd_fwd as ref_kd_fwd

    _native.load()
    impls = {}
    if torch._C._dispatch_has_kernel_for_dispatch_key("fastkd::kd_fwd", "CUDA"):
        impls["cuda"] = torch.ops.fastkd.kd_fwd
    try:
        import fastkd.triton.divergences  # noqa: F401  (registers torch.ops.fastkd_triton.kd_fwd)

        impls["triton"] = torch.ops.fastkd_triton.kd_fwd
    except Exception as e:  # noqa: BLE001
        print(f"triton kd unavailable: {e!r}")
    torch.manual_seed(0)
    N, V = KD_N, KD_V
    s = (torch.randn(1, N, V, device="cuda") * 3).to(torch.bfloat16)
    t = (0.6 * s.float() + torch.randn(1, N, V, device="cuda") * 3).to(torch.bfloat16)
    labels = torch.randint(0, V, (1, N), device="cuda")
    labels[:, ::7] = -100
    loss = torch.empty(1, N, device="cuda")
    gs = torch.empty_like(s)
    gt = torch.empty_like(t)
    # (name, divergence, temperature, hard_weight, labels?, teacher grad?)
    cases = [("forward_kl", "forward_kl", 1.0, 0.0, False, False),
             ("forward_kl T=2 hard=0.5 labels", "forward_kl", 2.0, 0.5, True, False),
             ("reverse_kl", "reverse_kl", 1.0, 0.0, False, False),
             ("jsd", "jsd", 1.0, 0.0, False, False),
             ("tvd", "tvd", 1.0, 0.0, False, False),
             ("forward_kl + teacher grad", "forward_kl", 1.0, 0.0, False, True)]
    out = {"shape": [N, V], "dtype": "bfloat16", "results": [], "check": {}}
    for name, div, T, hw, with_labels, tgrad in cases:
        args = lambda: (s, t, labels if with_labels else None, loss, gs, gt if tgrad else None,  # noqa: E731
                        DIVERGENCES[div], T, 0.5, 0.1, -100, 1.0, hw, True, 0.0)
        nbytes = N * V * 2 * (2 + 1 + (1 if tgrad else 0))  # read s, t; write gs (and gt)
        for impl, fn in impls.items():
            try:
                fn(*args())  # warm up / compile
                torch.cuda.synchronize()
                if name == "forward_kl T=2 hard=0.5 labels":  # correctness of a few rows
                    rows = [0, 1, 7, N // 2 + 3, N - 1]
                    rl = torch.empty(1, len(rows), dtype=torch.float64, device="cuda")
                    rg = torch.empty(1, len(rows), V, dtype=torch.float64, device="cuda")
                    ref_kd_fwd(s[:, rows].double(), t[:, rows].double(), labels[:, rows], rl, rg, None,
                               DIVERGENCES[div], T, 0.5, 0.1, -100, 1.0, hw, True, 0.0)
                    out["check"][impl] = {
                        "rows": rows,
                        "loss_max_abs_err": (loss[:, rows].double() - rl).abs().max().item(),
                        "loss_max_abs": rl.abs().max().item(),
                        "grad_max_abs_err": (gs[:, rows].double() - rg).abs().max().item(),
                        "grad_max_abs": rg.abs().max().item()}
                ms = _bench_ms(lambda: fn(*args()))
                out["results"].append({"case": name, "impl": impl, "ms": ms, "bytes": nbytes,
                                       "tb_per_s": nbytes / ms / 1e9})
            except Exception as e:  # noqa: BLE001 - record and go on
                out["results"].append({"case": name, "impl": impl, "error": f"{type(e).__name__}: {e}"[:500]})
            print(json.dumps(out["results"][-1]), flush=True)
    return out


def child_tune() -> dict:
    """Triton vs cuda for every class fastkd measures; the table in the shipped format."""
    import torch

    import fastkd
    from fastkd import _tuning

    t0 = time.perf_counter()
    results = fastkd.autotune_backends(save=False)
    dev = _tuning.device_key(torch.cuda.current_device())
    table = {dev: results}
    out_dir = os.environ.get("FASTKD_REPORT_OUT")
    if out_dir:
        with open(os.path.join(out_dir, "tuning.json"), "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
    return {"device_key": dev, "seconds": round(time.perf_counter() - t0, 1), "classes": results,
            "note": "empty when a family lacks either GPU backend here"}


CHILDREN = {"env": child_env, "build": child_build, "roofline": child_roofline, "kd-target": child_kd_target,
            "tune": child_tune}


# ----------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, out: str, budget_s: float):
        self.out = out
        self.deadline = time.monotonic() + budget_s
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)
        os.makedirs(os.path.join(out, "stages"), exist_ok=True)
        self.raw = open(os.path.join(out, "raw.log"), "a", encoding="utf-8")

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def log(self, msg: str) -> None:
        line = f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.raw.write(line + "\n")
        self.raw.flush()

    def run(self, label: str, cmd: list, timeout: float, env: dict | None = None, stdout_path: str | None = None):
        """Runs cmd in its own process group with output to logs/<label>.log (or stdout_path);
        returns (rc or None on timeout, seconds, log path)."""
        log_path = stdout_path or os.path.join(self.out, "logs", f"{label}.log")
        full_env = dict(os.environ, **(env or {}))
        # this checkout's fastkd, whether or not it is pip-installed
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        self.log(f"$ {' '.join(cmd)}  (timeout {timeout:.0f}s"
                 + (f"; env {' '.join(f'{k}={v}' for k, v in (env or {}).items())}" if env else "") + ")")
        t0 = time.monotonic()
        with open(log_path, "w", encoding="utf-8") as f:
            p = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                rc = None
                for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                    try:
                        os.killpg(p.pid, sig)  # the stage's own process group, nothing else
                    except ProcessLookupError:
                        break
                    try:
                        p.wait(timeout=grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        took = time.monotonic() - t0
        with open(log_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        self.raw.write(f"----- {label}: {'timed out' if rc is None else f'rc={rc}'} after {took:.1f}s "
                       f"({os.path.relpath(log_path, self.out)}) -----\n{text}\n----- end {label} -----\n")
        self.raw.flush()
        self.log(f"{label}: {'TIMED OUT' if rc is None else f'rc={rc}'} in {took:.1f}s")
        return rc, took, log_path

    def save(self, stage: str, result: dict) -> None:
        with open(os.path.join(self.out, "stages", f"{stage}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)


def _arch_list() -> str | None:
    """TORCH_CUDA_ARCH_LIST for this machine's GPU (compile for it alone, not for every arch)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    try:
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        return f"{major}.{minor}"
    except Exception:  # noqa: BLE001
        return None


_STATUS = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped", "XFAIL": "xfailed",
           "XPASS": "xpassed"}
# `-v` result lines: plain pytest "ID STATUS [ 10%]", pytest-xdist "[gw3] [ 10%] STATUS ID"
_LINE = re.compile(r"^(?:(?P<id>\S+::\S+) (?P<st>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
                   r"|\[gw\d+\] \[\s*\d+%\] (?P<st2>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (?P<id2>\S+::\S+))", re.M)


def _pytest_counts(text: str, junit: str | None) -> dict:
    """passed/failed/errors/skipped from the junit xml when written, else from `-v` lines
    (which survive a timeout), plus the failing test ids and the same counts per test file."""
    outcomes = []  # (test id, key)
    if junit and os.path.exists(junit):
        import xml.etree.ElementTree as ET

        root = ET.parse(junit).getroot()
        for case in root.iter("testcase"):
            tags = {c.tag for c in case}
            path = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
            cid = f"{path}::{case.get('name')}"
            key = ("failed" if "failure" in tags else "errors" if "error" in tags
                   else "skipped" if "skipped" in tags else "passed")
            outcomes.append((cid, key))
        source = "junit"
    else:
        for m in _LINE.finditer(text):
            outcomes.append((m.group("id") or m.group("id2"), _STATUS[m.group("st") or m.group("st2")]))
        source = "verbose lines (no junit xml: the run was cut short)"
    keys = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")
    counts = dict.fromkeys(keys, 0)
    by_file, failed = {}, []
    for cid, key in outcomes:
        counts[key] += 1
        f = by_file.setdefault(cid.split("::")[0], dict.fromkeys(keys, 0))
        f[key] += 1
        if key in ("failed", "errors"):
            failed.append(cid)
    counts.update(source=source, failed_ids=failed[:50], by_file=by_file)
    return counts


def _plugin_args() -> list:
    """pytest-xdist workers and a per-test timeout, where those plugins are installed."""
    args = []
    workers = min(XDIST_WORKERS, os.cpu_count() or 1)
    if importlib.util.find_spec("xdist") and workers > 1:
        args += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout"):
        args += [f"--timeout={TEST_TIMEOUT_S}"]
    return args


def _pytest(runner: Runner, label: str, files: list, timeout: float, select: str | None = None,
            plugins: list | None = None) -> dict:
    junit = os.path.join(runner.out, "junit", f"{label}.xml")
    os.makedirs(os.path.dirname(junit), exist_ok=True)
    if os.path.exists(junit):
        os.remove(junit)
    # xunit1: each testcase names its file, so counts can be given per file
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE", "--tb=short",
           f"--junitxml={junit}", "-o", "junit_family=xunit1", *(_plugin_args() if plugins is None else plugins),
           *(["-k", select] if select else []), *files]
    env = {"FASTKD_REQUIRE_BACKENDS": "torch,cpp,triton,cuda", "PYTHONUNBUFFERED": "1"}
    rc, took, log = runner.run(label, cmd, timeout, env)
    with open(log, encoding="utf-8", errors="replace") as f:
        text = f.read()
    res = _pytest_counts(text, junit if rc is not None else None)
    res.update(files=files, rc=rc, seconds=round(took, 1), timed_out=rc is None, log=os.path.relpath(log, runner.out))
    return res


def _test_files(exclude=CUDA_TEST_FILES) -> list:
    found = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    found = [p for p in found if p not in exclude]
    order = {name: i for i, name in enumerate(TEST_PRIORITY)}
    return sorted(found, key=lambda p: (order.get(os.path.basename(p), len(order)), p))


def stage_child(runner: Runner, stage: str, timeout: float) -> dict:
    result_path = os.path.join(runner.out, "stages", f"{stage}.child.json")
    env = {"PYTHONUNBUFFERED": "1"}
    if stage == "build":
        arch = _arch_list()
        if arch:
            env["TORCH_CUDA_ARCH_LIST"] = arch
        env["MAX_JOBS"] = str(os.cpu_count() or 4)
    rc, took, log = runner.run(stage, [sys.executable, os.path.abspath(__file__), "--child", stage,
                                       "--result", result_path], timeout, env)
    res = {"rc": rc, "seconds": round(took, 1), "timed_out": rc is None, "log": os.path.relpath(log, runner.out)}
    if os.path.exists(result_path):
        with open(result_path) as f:
            res["result"] = json.load(f)
        os.remove(result_path)
    elif rc is not None:
        with open(log, encoding="utf-8", errors="replace") as f:
            res["error_tail"] = f.read()[-2000:]
    return res


def stage_bench(runner: Runner, timeout: float) -> dict:
    """The bench parts in order, each within what is left of ``timeout``; every part's JSON holds
    the cases it finished even when it is cut short."""
    deadline = time.monotonic() + timeout
    parts = []
    for name, flags, *env in BENCH_PARTS:
        env = env[0] if env else {}
        left = min(deadline - time.monotonic(), runner.left())
        cmd = [sys.executable, "-m", "fastkd.bench", *flags, "--json", f"bench-{name}.json", "--no-progress"]
        if left < 20:
            parts.append({"part": name, "command": " ".join(cmd[1:]), "skipped": "no time left"})
            continue
        js, txt = (os.path.join(runner.out, f"bench-{name}.{ext}") for ext in ("json", "txt"))
        cmd[-2] = js
        rc, took, _ = runner.run(f"bench-{name}", cmd, left, {"PYTHONUNBUFFERED": "1", **env}, stdout_path=txt)
        complete = None
        if os.path.exists(js):
            with open(js) as f:
                complete = json.load(f).get("meta", {}).get("complete")
        parts.append({"part": name, "env": env, "rc": rc, "seconds": round(took, 1), "timed_out": rc is None,
                      "command": " ".join(cmd[1:]).replace(js, f"DIR/bench-{name}.json"),
                      "json": os.path.basename(js) if os.path.exists(js) else None, "complete": complete,
                      "table": os.path.basename(txt)})
    return {"parts": parts, "timed_out": any(p.get("timed_out") or p.get("skipped") for p in parts)}


def stage_tests(runner: Runner, files: list, label: str, timeout: float) -> dict:
    if "-n" in _plugin_args():  # pytest-xdist: one run over every file, the workers share it out
        r = _pytest(runner, label, files, timeout)
        by_file = r.pop("by_file")
        results = {f: {**by_file.get(f, dict(passed=0, failed=0, errors=0, skipped=0)),
                       "failed_ids": [i for i in r["failed_ids"] if i.startswith(f + "::")],
                       "timed_out": False, "seconds": None} for f in files if f in by_file}
        not_run = [f for f in files if f not in by_file] if r["timed_out"] else []
        run_info = {k: r[k] for k in ("rc", "seconds", "timed_out", "log", "source")}
    else:  # one process per file, each with a share of what is left
        results, not_run, run_info = {}, [], None
        for i, f in enumerate(files):
            left = runner.left()
            # an equal share of what is left for each file still to run, at least 60 s
            share = max(60.0, left / (len(files) - i))
            if left < 30:
                not_run = files[i:]
                break
            results[f] = _pytest(runner, f"{label}-{os.path.basename(f)[:-3]}", [f], min(share, left))
            results[f].pop("by_file")
    total = {k: sum(r.get(k, 0) for r in results.values()) for k in ("passed", "failed", "errors", "skipped")}
    return {"files": results, "total": total, "not_run": not_run, "run": run_info,
            "timed_out": [f for f, r in results.items() if r["timed_out"]] + (["(the xdist run)"] if (
                run_info or {}).get("timed_out") else []),
            "rerun": f"python benchmarks/gpu_report.py --out DIR --stages {label} --test-files "
                     + ",".join(not_run) if not_run else None}


def _install_wheels(runner: "Runner", folder: str) -> None:
    """pip-installs every wheel in ``folder`` (no deps, no index) into a temporary folder that
    the stages see on PYTHONPATH; the machine's environment is left as it was."""
    import tempfile

    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        runner.log(f"--wheels {folder}: no wheels there; going on without them")
        return
    target = tempfile.mkdtemp(prefix="fastkd-report-wheels-")
    rc, took, _ = runner.run("wheels", [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                                        "--target", target, *wheels], 120)
    if rc == 0:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (target, os.environ.get("PYTHONPATH")) if p)
        runner.log(f"wheels installed for this run: {', '.join(os.path.basename(w) for w in wheels)}")
    else:
        runner.log(f"wheels: pip failed (rc={rc}); going on without them")


def plan(stages: list, budget: float, test_files: list | None) -> list:
    """[(stage, description, cap seconds)] in run order."""
    desc = {
        "env": "versions: python, torch, CUDA, triton, nvcc, ninja, driver, GPU",
        "build": "fastkd._native.load(): compile csrc/ (CPU + CUDA for this GPU's arch), timed",
        "roofline": "copy and a+b->c bandwidth (1 GiB), bf16 GEMM 8192^3",
        "kd-target": f"kd_fwd N={KD_N} V={KD_V} bf16: cuda vs triton, TB/s, checked vs reference",
        "tests-cuda": "pytest " + " ".join(CUDA_TEST_FILES) + "; pytest -k cuda " + " ".join(CUDA_FAMILY_FILES),
        "tune": "fastkd.autotune_backends(): triton vs cuda per family/dtype/size -> DIR/tuning.json",
        "bench": "; ".join("".join(f"{k}={v} " for k, v in (env[0] if env else {}).items())
                           + f"python -m fastkd.bench {' '.join(flags)} --json DIR/bench-{name}.json"
                           for name, flags, *env in BENCH_PARTS),
        "tests": ("pytest " + " ".join(_plugin_args()) + " (one run): " if "-n" in _plugin_args()
                  else "pytest, one process per file: ") + " ".join(os.path.basename(f) for f in
                                                                    (test_files or _test_files())),
    }
    return [(s, desc[s], min(STAGE_CAP_S[s], budget)) for s in STAGES if s in stages]


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    name = re.sub(r"^nvidia\s+", "", (name or "gpu").lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def load_stages(dirs: list) -> dict:
    """Stage results from one or more output folders; a later folder's stage wins."""
    stages = {}
    for d in dirs:
        for p in sorted(glob.glob(os.path.join(d, "stages", "*.json"))):
            name = os.path.basename(p)[:-5]
            if name not in STAGES:
                continue
            with open(p) as f:
                res = json.load(f)
            res["from"] = os.path.abspath(d)
            if name == "tests" and "tests" in stages:  # merge per-file results of split runs
                stages["tests"]["files"].update(res.get("files", {}))
                continue
            stages[name] = res
    if "tests" in stages:
        t = stages["tests"]
        t["total"] = {k: sum(r.get(k, 0) for r in t["files"].values()) for k in ("passed", "failed", "errors", "skipped")}
    return stages


def _bench_rows(stages: dict) -> list:
    """The result rows of the bench stage's JSONs, [] when it did not run or wrote none. Rows of
    a part run with an environment have impl "<impl>[<part>]" (e.g. triton[tf32x3])."""
    be = stages.get("bench") or {}
    rows = []
    for part in be.get("parts", []):
        path = os.path.join(be.get("from", ""), part.get("json") or "")
        if part.get("json") and os.path.exists(path):
            with open(path) as f:
                found = json.load(f).get("results", [])
            if part.get("env"):
                found = [dict(r, impl=f"{r['impl']}[{part['part']}]") for r in found]
            rows += found
    return rows


def target_rows(rows: list) -> list:
    """Issue 8's targets against the bench rows: [(target, measured, met: True/False/None)].

    Each target names its case (family fields as in fastkd.bench) and what it asks; the best
    fastkd backend of the case is the one compared. None = not measured (or no baseline).
    """
    def pick(**want):
        return [r for r in rows if r.get("error") is None and all(r.get(k) == v for k, v in want.items())]

    def best(cands):
        ours = [r for r in cands if r["impl"].split("[")[0] in ("triton", "cuda", "cpp", "torch")]
        return min(ours, key=lambda r: r["median_s"]) if ours else None

    def baseline(cands, impl):
        found = [r for r in cands if r["impl"] == impl]
        return found[0] if found else None

    out = []
    for div in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"):
        c = pick(family="kd", case=div, n=8192, v=128256, dtype="bfloat16")
        b = best(c)
        tb = b["gb_per_s"] / 1e3 if b and b.get("gb_per_s") else None
        out.append((f"kd {div} N=8192 V=128256 bf16: >= 2.4 TB/s",
                    f"{tb:.2f} TB/s ({b['impl']})" if tb else "not measured", None if tb is None else tb >= 2.4))
        for impl, need, name in (("liger", 10.0, "Liger"), ("compile", 3.0, "torch.compile")):
            base = baseline(c, impl)
            x = base["median_s"] / b["median_s"] if b and base else None
            out.append((f"kd {div}: >= {need:g}x {name}", f"{x:.2f}x" if x else "no baseline row",
                        None if x is None else x >= need))
    for acc, label in ((True, ""), (False, " (fp32_grad_accumulation=False)")):
        c = pick(family="fused_linear", case="forward_kl" if acc else "forward_kl/lean-acc", n=8192,
                 hs=2048, ht=4096, v=128256, dtype="bfloat16")
        b = best(c)
        ms = b["median_s"] * 1e3 if b else None
        gb = b["peak_bytes"] / 1e9 if b and b.get("peak_bytes") is not None else None
        out.append((f"fused_linear forward_kl N=8192 Hs=2048 Ht=4096 V=128256 bf16{label}: < 40 ms",
                    f"{ms:.1f} ms ({b['impl']})" if ms else "not measured", None if ms is None else ms < 40))
        out.append((f"fused_linear{label}: < 1 GB extra memory", f"{gb:.2f} GB" if gb is not None else "not measured",
                    None if gb is None else gb < 1.0))
    c = pick(family="sparse_kd", n=8192, v=128256, k=64, dtype="bfloat16")
    b = best(c)
    tb = b["gb_per_s"] / 1e3 if b and b.get("gb_per_s") else None
    out.append(("sparse_kd N=8192 V=128256 k=64 bf16: >= 2.4 TB/s",
                f"{tb:.2f} TB/s ({b['impl']})" if tb else "not measured", None if tb is None else tb >= 2.4))
    # issue 4's H100 target: faster than eager with at least 10x less peak memory (or eager OOM)
    c = pick(family="attention", loss="attention_relation_loss", b=8, l=4096, ds=768, a=12, dtype="bfloat16")
    b, base = best(c), baseline(c, "eager")
    oom = any("memory" in (r.get("error") or "").lower() for r in rows if r.get("loss") == "attention_relation_loss"
              and r.get("l") == 4096 and r["impl"] == "eager")
    name = "attention_relation B=8 L=4096 D=768 A=12 bf16: faster than eager, <= 1/10 of its peak memory"
    if b and base:
        x = base["median_s"] / b["median_s"]
        mem = (b["peak_bytes"] / base["peak_bytes"] if b.get("peak_bytes") is not None and base.get("peak_bytes")
               else None)
        out.append((name, f"{x:.2f}x faster, {mem:.3f} of eager's memory ({b['impl']})" if mem is not None
                    else f"{x:.2f}x faster ({b['impl']})", x > 1 and mem is not None and mem <= 0.1))
    else:
        out.append((name, "eager out of memory; fastkd ran" if oom and b else "not measured",
                    True if oom and b else None))
    for which, n in (("rkd_distance", 16384), ("rkd_angle", 1024)):  # issue 5's GPU targets
        name = f"{which} N={n}: eager out of memory or >= 5x slower"
        errs = [r for r in rows if r.get("family") == "relational" and r.get("which") == which
                and r.get("n") == n and r["impl"] == "eager"]
        c = pick(family="relational", which=which, n=n)
        b, base = best(c), baseline(c, "eager")
        if b and base:
            x = base["median_s"] / b["median_s"]
            out.append((name, f"{x:.2f}x faster ({b['impl']})", x >= 5))
        else:
            oom = any("memory" in (r.get("error") or "").lower() for r in errs)
            out.append((name, "eager out of memory; fastkd ran" if oom and b else "not measured",
                        True if oom and b else None))
    return out


def cuda_verified(stages: dict) -> dict:
    """{family: None when every test of its CUDA kernel passed in tests-cuda, else why not}."""
    runs = list(((stages.get("tests-cuda") or {}).get("files") or {}).values())
    out = {}
    for family, files in CUDA_FAMILY_TESTS.items():
        why = None
        for f in files:
            counts = [r["by_file"][f] for r in runs if f in (r.get("by_file") or {})]
            if not counts:
                why = f"{f}: no result"
            elif any(c["failed"] or c["errors"] for c in counts):
                why = f"{f}: {sum(c['failed'] + c['errors'] for c in counts)} failing"
            elif not any(c["passed"] for c in counts):
                why = f"{f}: nothing passed"
            if why:
                break
        if why is None and any(r.get("timed_out") for r in runs):
            why = "tests-cuda was cut short"
        out[family] = why
    return out


def summarize(stages: dict) -> tuple:
    """(summary dict, markdown text) from stage results."""
    env = (stages.get("env") or {}).get("result") or {}
    date = _dt.date.today().isoformat()
    slug = _slug(env.get("gpu_name", "gpu"))
    summary = {"schema": SCHEMA, "date": date, "device": env.get("gpu_name"),
               "suggested_names": [f"benchmarks/results/{slug}-{date}.json", f"benchmarks/results/{slug}-{date}.txt"],
               "stages": stages}
    md = [f"# fastkd GPU report: {env.get('gpu_name', '(device unknown: env stage missing)')}, {date}", ""]
    if env:
        md += ["| | |", "|---|---|"]
        for k in ("gpu_name", "gpu_capability", "gpu_sms", "gpu_memory_gib", "nvidia_smi", "torch", "torch_cuda",
                  "triton", "nvcc", "ninja", "python", "liger_kernel", "git_commit", "git_dirty"):
            md.append(f"| {k} | {env.get(k)} |")
        md.append("")
    b = (stages.get("build") or {})
    if b:
        r = b.get("result") or {}
        md += ["## Build", f"- loaded: {r.get('ok')} ({r.get('how')}), {r.get('seconds')} s "
               f"(arch list {r.get('torch_cuda_arch_list')}); CUDA kd_fwd kernel registered: {r.get('kd_fwd_cuda_kernel')}",
               f"- reason: {r.get('reason') or '-'}; cuda: {r.get('cuda_reason') or '-'}",
               f"- backend chosen on CUDA tensors: {r.get('chosen')}", ""]
        if not r:
            md += [f"- stage failed: rc={b.get('rc')} timed_out={b.get('timed_out')}; see {b.get('log')}", ""]
    roof = ((stages.get("roofline") or {}).get("result")) or {}
    if roof:
        md += ["## Roofline (measured)",
               f"- copy (1 read + 1 write, 1 GiB): {roof['copy']['gb_per_s']:.0f} GB/s",
               f"- a + b -> c bf16 (2 reads + 1 write, kd_fwd's traffic): {roof['add']['gb_per_s']:.0f} GB/s",
               f"- bf16 GEMM 8192^3: {roof['gemm_bf16']['tflop_per_s']:.0f} TFLOP/s", ""]
    kd = ((stages.get("kd-target") or {}).get("result")) or {}
    if kd:
        copy = roof.get("copy", {}).get("gb_per_s")
        add = roof.get("add", {}).get("gb_per_s")
        md += [f"## kd_fwd at the issue-8 target: N={kd['shape'][0]}, V={kd['shape'][1]}, {kd['dtype']} "
               "(target: cuda >= 2.4 TB/s on H100)", "",
               "bytes = one read of student and teacher + one write of each gradient", "",
               "| case | impl | ms | TB/s | of copy | of a+b->c |", "|---|---|---|---|---|---|"]
        for r in kd.get("results", []):
            if "error" in r:
                md.append(f"| {r['case']} | {r['impl']} | error: {r['error'][:120]} | | | |")
                continue
            tb = r["tb_per_s"]
            fc = f"{tb * 1e3 / copy:.0%}" if copy else "-"
            fa = f"{tb * 1e3 / add:.0%}" if add else "-"
            md.append(f"| {r['case']} | {r['impl']} | {r['ms']:.3f} | {tb:.2f} | {fc} | {fa} |")
        for impl, c in (kd.get("check") or {}).items():
            md.append(f"\ncheck vs float64 reference ({impl}, rows {c['rows']}): loss max abs err "
                      f"{c['loss_max_abs_err']:.3g} (max |loss| {c['loss_max_abs']:.3g}), grad max abs err "
                      f"{c['grad_max_abs_err']:.3g} (max |grad| {c['grad_max_abs']:.3g})")
        md.append("")
    for name in ("tests-cuda", "tests"):
        st = stages.get(name)
        if not st:
            continue
        md += [f"## {name}", "", "| file | passed | failed | errors | skipped | s | note |", "|---|---|---|---|---|---|---|"]
        for f, r in st.get("files", {}).items():
            note = "TIMED OUT" if r.get("timed_out") else ""
            md.append(f"| {f} | {r.get('passed')} | {r.get('failed')} | {r.get('errors')} | {r.get('skipped')} | "
                      f"{r.get('seconds')} | {note} |")
        tot = st.get("total", {})
        md.append(f"| **total** | {tot.get('passed')} | {tot.get('failed')} | {tot.get('errors')} | {tot.get('skipped')} | | |")
        fails = [i for r in st.get("files", {}).values() for i in r.get("failed_ids", [])]
        if fails:
            md += ["", "failing: " + ", ".join(fails[:30])]
        run = st.get("run") or {}
        if run:
            md += ["", f"one pytest-xdist run: rc={run.get('rc')}, {run.get('seconds')} s"
                   + (" (TIMED OUT: counts from the lines it printed)" if run.get("timed_out") else "")]
        if st.get("not_run"):
            md += ["", f"not run (budget): {', '.join(st['not_run'])}; rerun: `{st.get('rerun')}`"]
        md.append("")
    if stages.get("tests-cuda"):
        verdict = cuda_verified(stages)
        ok = sorted(f for f, why in verdict.items() if why is None)
        md += ["## CUDA kernels verified here", "",
               f"every test passed: {', '.join(ok) or 'none'} (add to `_backend.CUDA_VERIFIED`: "
               f"`frozenset({{{', '.join(repr(f) for f in ok)}}})`)" if ok else "every test passed: none"]
        md += [f"- {f}: not verified ({why})" for f, why in sorted(verdict.items()) if why] + [""]
        summary["cuda_verified"] = ok
    tune = stages.get("tune")
    if tune:
        res = tune.get("result") or {}
        md += ["## tune: triton vs cuda per shape class (`fastkd.autotune_backends()`)", ""]
        if not res:
            md += [f"- stage failed: rc={tune.get('rc')} timed_out={tune.get('timed_out')}; see {tune.get('log')}", ""]
        else:
            md += [f"device key `{res.get('device_key')}`, {res.get('seconds')} s; "
                   "to ship: copy DIR/tuning.json to fastkd/tuning/<gpu>.json", "",
                   "| class (family, dtype, size bucket) | chosen | ms per backend |", "|---|---|---|"]
            for key, entry in sorted((res.get("classes") or {}).items()):
                ms = ", ".join(f"{b} {t:.3f}" for b, t in sorted(entry.get("ms", {}).items()))
                md.append(f"| {key} | {entry.get('backend')} | {ms} |")
            md.append("")
    targets = target_rows(_bench_rows(stages))
    if any(met is not None for _, _, met in targets):
        md += ["## Issue 8's targets (from the bench JSON; the fastest fastkd backend of each case)", "",
               "| target | measured | met |", "|---|---|---|"]
        md += [f"| {t} | {m} | {'yes' if met else 'NO' if met is not None else '-'} |" for t, m, met in targets]
        md.append("")
        summary["targets"] = [{"target": t, "measured": m, "met": met} for t, m, met in targets]
    be = stages.get("bench")
    for part in (be or {}).get("parts", []):
        md += [f"## Benchmarks ({part.get('part')}): `python -m {part.get('command', 'fastkd.bench --full')}`"]
        if part.get("skipped"):
            md += [f"not run: {part['skipped']}", ""]
            continue
        md += [f"rc={part.get('rc')}, {part.get('seconds')} s" + (" (TIMED OUT)" if part.get("timed_out") else "")
               + f"; raw numbers: {part.get('json')}"
               + (" (cut short: the cases it finished)" if part.get("complete") is False else "")
               + f"; table: {part.get('table')}", ""]
        table = os.path.join(be.get("from", ""), part.get("table") or "")
        if part.get("table") and os.path.exists(table):
            with open(table, encoding="utf-8", errors="replace") as f:
                md += ["```", f.read().rstrip()[-20000:], "```", ""]
    missing = [s for s in STAGES if s not in stages]
    if missing:
        md += ["## Not run", *[f"- {s}: `python benchmarks/gpu_report.py --out DIR --stages {s}`" for s in missing], ""]
    md += ["## Files", "copy to: " + " and ".join(summary["suggested_names"]) + " (summary.json, summary.md)", ""]
    return summary, "\n".join(md)


PACK = "fastkd-gpu-report.tar.gz"


def deliver(out: str, dest: str) -> None:
    """Three files in ``dest``: summary.md, summary.json and PACK, the whole ``out`` folder (raw
    log, per-stage logs and results, junit, bench JSON), each written whole or not at all. A borrowed GPU
    machine may hand back only a few files, so this runs after every stage: a run killed at its
    time limit still returns all it finished. Unpack PACK and --summarize the folder."""
    import tarfile

    os.makedirs(dest, exist_ok=True)
    for name in ("summary.md", "summary.json"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copyfile(os.path.join(out, name), os.path.join(dest, name + ".tmp"))
            os.replace(os.path.join(dest, name + ".tmp"), os.path.join(dest, name))
    tmp = os.path.join(dest, PACK + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname="report")
    os.replace(tmp, os.path.join(dest, PACK))


def write_summary(out: str, dirs: list) -> str:
    stages = load_stages(dirs)
    summary, md = summarize(stages)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md + "\n")
    return md


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
    ap.add_argument("--out", help="output folder (created); required unless --dry-run")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--budget-s", type=float, default=560.0, help="seconds for this whole invocation (default 560)")
    ap.add_argument("--test-files", help="tests stage: comma-separated files instead of the whole suite")
    ap.add_argument("--dry-run", action="store_true", help="print the stages that would run, and exit")
    ap.add_argument("--summarize", nargs="+", metavar="DIR", help="merge these output folders into --out; no GPU")
    ap.add_argument("--wheels", metavar="DIR", help="install these wheels (e.g. liger-kernel) for this run only")
    ap.add_argument("--deliver", metavar="DIR", help=f"after each stage, put summary.md, summary.json and {PACK} "
                    "(all of --out) here, for machines that hand back only a few files")
    ap.add_argument("--prebuild", nargs="?", const="9.0", metavar="ARCH",
                    help="build fastkd/_C.so here for a GPU of this compute capability (default 9.0) and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        sys.path.insert(0, ROOT)
        res = CHILDREN[args.child]()
        with open(args.result, "w") as f:
            json.dump(res, f, indent=1, default=str)
        return 0

    if args.prebuild:
        return prebuild(args.prebuild)

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {','.join(STAGES)}")
    test_files = [f.strip() for f in args.test_files.split(",")] if args.test_files else None

    if args.dry_run:
        print(f"gpu_report.py plan (budget {args.budget_s:.0f} s; a stage gets at most its cap and the time left):")
        for name, desc, cap in plan(stages, args.budget_s, test_files):
            print(f"  {name:<11} cap {cap:>4.0f}s  {desc}")
        print(f"output: {args.out or 'DIR'}/summary.md, summary.json, raw.log, logs/, stages/, bench-*.json/txt")
        return 0

    if not args.out:
        ap.error("--out is required")
    if args.summarize:
        os.makedirs(args.out, exist_ok=True)
        print(write_summary(args.out, args.summarize))
        return 0

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_report.py needs a CUDA GPU: torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). "
              f"Use --dry-run to see the plan, or --summarize to merge reports.", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)

    runner = Runner(args.out, args.budget_s)
    os.environ["FASTKD_REPORT_OUT"] = os.path.abspath(args.out)
    prebuilt = check_prebuilt()
    os.environ["FASTKD_REPORT_PREBUILT"] = prebuilt
    if prebuilt:
        runner.log(f"prebuilt fastkd/_C.so: {prebuilt}")
    if args.wheels:
        _install_wheels(runner, args.wheels)
    runner.log(f"gpu_report: stages {','.join(stages)}, budget {args.budget_s:.0f}s, out {os.path.abspath(args.out)}")
    for name, _, cap in plan(stages, args.budget_s, test_files):
        left = runner.left()
        if left < 20:
            runner.log(f"{name}: skipped (no budget left); run it with --stages {name}")
            continue
        timeout = min(cap, left)
        if name in CHILDREN:
            res = stage_child(runner, name, timeout)
        elif name == "tests-cuda":
            r = _pytest(runner, "tests-cuda", list(CUDA_TEST_FILES), timeout * 0.6)
            r2 = _pytest(runner, "tests-cuda-families", list(CUDA_FAMILY_FILES), max(20.0, min(
                timeout * 0.4, runner.left())), select="cuda")
            res = {"files": {" ".join(CUDA_TEST_FILES): r, "-k cuda " + " ".join(CUDA_FAMILY_FILES): r2},
                   "total": {k: r.get(k, 0) + r2.get(k, 0) for k in ("passed", "failed", "errors", "skipped")}}
        elif name == "bench":
            res = stage_bench(runner, timeout)
        else:
            res = stage_tests(runner, test_files or _test_files(), "tests", timeout)
        runner.save(name, res)
        if args.deliver:
            write_summary(args.out, [args.out])
            deliver(args.out, args.deliver)
    md = write_summary(args.out, [args.out])
    runner.log(f"summary: {os.path.join(args.out, 'summary.md')}")
    if args.deliver:
        deliver(args.out, args.deliver)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
