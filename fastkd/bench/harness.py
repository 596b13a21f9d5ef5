"""Measuring: time, peak memory, correctness check, the table and the JSON.

Timing. CPU: medians of ``timeit`` blocks (each block at least ~10 ms, at least 3 blocks and
``min_time`` seconds per implementation) after warm-up calls, at torch's thread count. CUDA:
``triton.testing.do_bench`` medians (it clears L2 before every call), with inputs also rotated
over enough copies to exceed L2 twice.

Peak memory. CPU: the rise of the process's resident set during one forward+backward, i.e. the
peak RSS (VmHWM, reset through /proc/self/clear_refs just before the call) minus the RSS right
before it, after ``gc`` and ``malloc_trim`` returned freed memory to the OS and with the previous
gradient dropped, plus the idle buffers fastkd's CPU cache held just before (fastkd's memory: the
call reuses them; the cache is emptied after each implementation). It counts the student gradient
(every implementation produces one) and every temporary. Each case runs in a fresh child
process by default (``isolate="case"``); ``"impl"`` gives every (case, implementation) its own
process. CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.

Every implementation's loss and gradient norm are compared with eager's, so a fast wrong answer
shows as ``MISMATCH`` rather than as a speed-up.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from typing import Dict, List, Optional

import torch

from .divergences import TEMPERATURE, Case, Impl, implementations, make_inputs

# ----------------------------------------------------------------------------- CPU memory
_libc = None


def _malloc_trim() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Set the peak RSS (VmHWM) to the current RSS; Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _fastkd_cached_bytes() -> int:
    """Idle buffers fastkd's CPU cache keeps for reuse: resident before a call, so absent from
    its RSS growth, yet memory fastkd holds for that call."""
    import fastkd

    return fastkd.cpu_cache_info()["idle_bytes"]


class CpuMemory:
    """Peak RSS growth over a block of code, in bytes (None where the OS cannot say), plus the
    idle buffers fastkd's CPU cache held at the start (the code may reuse them)."""

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        self.cached = _fastkd_cached_bytes()
        self.base = _status_kib("VmRSS")
        self.ok = self.base is not None and _reset_peak_rss()

    def stop(self) -> Optional[int]:
        peak = _status_kib("VmHWM")
        if not self.ok or peak is None:
            return None
        return max(peak - self.base, 0) * 1024 + self.cached


class CudaMemory:
    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base


# ----------------------------------------------------------------------------- timing
def _l2_bytes(device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def _time_cpu(step, first_s: float, min_time: float, max_reps: int, min_reps: int = 3,
              max_time: float = 6.0):
    """Per-call seconds of timeit blocks; the first sample is ``first_s`` when it was a block of 1.

    At least ``min_reps`` blocks and ``min_time`` seconds, except that an implementation taking
    seconds per call stops at two samples once ``max_time`` is spent (eager jsd on CPU).
    """
    number = max(1, int(0.01 / max(first_s, 1e-9)))
    timer = timeit.Timer(step)
    times = [first_s] if number == 1 else []

    def enough():
        spent = sum(times) * number
        if len(times) >= max_reps:
            return True
        if len(times) >= 2 and spent >= max_time:
            return True
        return len(times) >= min_reps and spent >= min_time

    while not enough():
        times.append(timer.timeit(number) / number)
    return times, number


def _time_cuda(step, min_time: float):
    import triton.testing

    ms = triton.testing.do_bench(step, warmup=25, rep=max(int(min_time * 1000), 20),
                                 return_mode="all")
    return [m / 1000.0 for m in ms], 1


def measure(impl: Impl, case: Case, device, min_time: float = 1.0, max_reps: int = 50,
            inputs=None) -> dict:
    """Time and peak memory of ``impl`` on ``case``: forward + backward into the student."""
    dev = torch.device(device)
    sets = inputs if inputs is not None else [make_inputs(case, dev)]
    s0, t0 = sets[0]
    cursor = [0]

    def step_on(s, t):
        s.grad = None
        loss = impl.fn(s, t)
        loss.backward()
        return loss

    def step():
        return step_on(s0, t0)

    def step_rotating():  # CUDA: a different input set each call, so nothing stays in L2
        cursor[0] = (cursor[0] + 1) % len(sets)
        s, t = sets[cursor[0]]
        step_on(s, t)

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    # warm-up; the first call also gives the value checked against eager
    t_start = time.perf_counter()
    loss = step()
    sync()
    first_call_s = time.perf_counter() - t_start
    loss_value = float(loss.detach().float())
    grad_norm = float(torch.linalg.vector_norm(s0.grad, dtype=torch.float32))
    del loss
    for _ in range(impl.warmup - 1):
        step()
    sync()
    s0.grad = None

    # peak memory of one call (on CPU the same call is the first timing sample)
    mem = CpuMemory() if dev.type == "cpu" else CudaMemory(dev)
    mem.start()
    t_start = time.perf_counter()
    step()
    sync()
    one_call_s = time.perf_counter() - t_start
    peak = mem.stop()
    s0.grad = None

    if dev.type == "cuda":
        times, number = _time_cuda(step_rotating, min_time)
        for s, _ in sets:
            s.grad = None
    else:
        times, number = _time_cpu(step, one_call_s, min_time, max_reps)
        s0.grad = None
    median = statistics.median(times)
    return {
        "impl": impl.name, "display": impl.display, "kind": impl.kind,
        "median_s": median, "times_s": times, "number": number, "reps": len(times),
        "first_call_s": first_call_s, "bytes": case.bytes, "gb_per_s": case.bytes / median / 1e9,
        "peak_bytes": peak, "loss": loss_value, "grad_norm": grad_norm, "error": None,
    }


def rotation_sets(case: Case, device) -> list:
    """Enough input copies to exceed L2 twice (CUDA), capped at 16; one set on CPU."""
    dev = torch.device(device)
    k = 1
    if dev.type == "cuda":
        per_set = 2 * case.n * case.v * torch.empty((), dtype=case.torch_dtype).element_size()
        k = min(16, max(1, math.ceil(2 * _l2_bytes(dev) / per_set)))
    return [make_inputs(case, dev, seed=i) for i in range(k)]


# ----------------------------------------------------------------------------- one case
def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_case(case: Case, device, select=None, min_time: float = 1.0, max_reps: int = 50,
             prefix: str = "", progress: bool = True) -> List[dict]:
    """Every selected implementation of ``case``, measured in this process, one after another."""
    dev = torch.device(device)
    torch._dynamo.reset()  # a fresh torch.compile cache per case
    impls = implementations(case, dev, select)
    sets = rotation_sets(case, dev) if impls else []
    out = []
    for impl in impls:
        try:
            r = measure(impl, case, dev, min_time, max_reps, inputs=sets)
            if progress:
                peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f} MiB"
                _progress(f"{prefix}{case.label:<32} {impl.display:<15} {r['median_s'] * 1e3:10.2f} ms"
                          f"  x{r['reps']:<3} peak {peak}")
        except Exception as e:  # an implementation that fails is reported, not fatal
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            r = {"impl": impl.name, "display": impl.display, "kind": impl.kind,
                 "error": f"{type(e).__name__}: {msg}"}
            if progress:
                _progress(f"{prefix}{case.label:<32} {impl.display:<15} ERROR {r['error']}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        for s, _ in sets:
            s.grad = None
        if dev.type == "cpu":  # the next implementation's memory must not include fastkd's cache
            import fastkd

            fastkd.empty_cache()
        out.append({**case.to_dict(), **r})
    del sets
    gc.collect()
    return out


def _run_case_child(case: Case, device, select, min_time, max_reps, prefix) -> List[dict]:
    """``run_case`` in a fresh Python process, so that its peak memory is its own."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    fd, out_path = tempfile.mkstemp(prefix="fastkd-bench-", suffix=".json")
    os.close(fd)
    spec = {"case": case.to_dict(), "device": str(device), "select": select, "min_time": min_time,
            "max_reps": max_reps, "prefix": prefix, "out": out_path}
    try:
        proc = subprocess.run([sys.executable, "-m", "fastkd.bench._worker"], input=json.dumps(spec),
                              text=True, env=env, stdout=subprocess.DEVNULL)
        if proc.returncode == 0:
            with open(out_path) as f:
                return json.load(f)
        why = f"worker process exited with code {proc.returncode}"
    finally:
        os.unlink(out_path)
    _progress(f"{prefix}{case.label}: {why}")
    names = select or [i.name for i in implementations(case, device)]
    return [{**case.to_dict(), "impl": n, "display": n, "kind": "?", "error": why} for n in names]


# ----------------------------------------------------------------------------- roofline
def copy_bandwidth(device, nbytes: int = 256 * 2**20) -> float:
    """Measured bytes/s of a large tensor copy (read + write): the memory roofline here."""
    dev = torch.device(device)
    src = torch.ones(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    if dev.type == "cuda":
        times, _ = _time_cuda(lambda: dst.copy_(src), 0.2)
    else:
        dst.copy_(src)
        t0 = time.perf_counter()
        dst.copy_(src)
        times, _ = _time_cpu(lambda: dst.copy_(src), time.perf_counter() - t0, 0.3, 50, min_reps=5)
    return 2 * nbytes / statistics.median(times)


# ----------------------------------------------------------------------------- metadata
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg() -> Optional[List[float]]:
    """1/5/15-minute load averages: other work on the machine shows here and in the times."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def metadata(device) -> dict:
    import fastkd

    dev = torch.device(device)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "fastkd": fastkd.__version__,
        "git_commit": _git_commit(),
        "backends": fastkd.available_backends(dev),
        "loadavg_start": _loadavg(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        meta.update(cuda=torch.version.cuda, gpu_memory_bytes=props.total_memory,
                    l2_cache_bytes=_l2_bytes(dev))
    return meta


# ----------------------------------------------------------------------------- run
def _tolerance(dtype: str) -> float:
    return 1e-3 if dtype == "float32" else 2e-2


def _derive(results: List[dict]) -> None:
    """Speed-ups and memory ratios against eager and torch.compile of the same case, and checks."""
    def key(r):
        return (r["family"], r["divergence"], r["dtype"], r["n"], r["v"])

    ref = {}
    for r in results:
        if r.get("error") is None and r["impl"] in ("eager", "compile"):
            ref[(key(r), r["impl"])] = r
    for r in results:
        eager, comp = ref.get((key(r), "eager")), ref.get((key(r), "compile"))
        ok = r.get("error") is None
        r["speedup_vs_eager"] = eager["median_s"] / r["median_s"] if ok and eager else None
        r["speedup_vs_compile"] = comp["median_s"] / r["median_s"] if ok and comp else None
        r["mem_ratio_vs_eager"] = (r["peak_bytes"] / eager["peak_bytes"]
                                   if ok and eager and eager["peak_bytes"] and r["peak_bytes"] is not None
                                   else None)
        if not ok:
            r["check"] = "error"
        elif r["impl"] == "eager":
            r["check"] = "ref"
        elif eager is None:
            r["check"] = "-"
        else:
            tol = _tolerance(r["dtype"])
            dl = abs(r["loss"] - eager["loss"]) / max(abs(eager["loss"]), 1e-6)
            dg = abs(r["grad_norm"] - eager["grad_norm"]) / max(abs(eager["grad_norm"]), 1e-12)
            r["loss_rel_diff"], r["grad_norm_rel_diff"] = dl, dg
            r["check"] = "ok" if (dl <= tol and dg <= tol) else "MISMATCH"


def run(cases: List[Case], device=None, select: Optional[List[str]] = None,
        min_time: float = 1.0, max_reps: int = 50, isolate: str = "none",
        progress: bool = True, roofline_bytes: Optional[int] = 256 * 2**20,
        settings: Optional[dict] = None) -> dict:
    """Measure every case; returns the report (``meta``, ``settings``, ``results``).

    isolate: ``"none"`` runs everything here; ``"case"`` runs each case in a fresh child process,
    ``"impl"`` each (case, implementation). Only CPU memory needs it; CUDA always runs here.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isolate not in ("none", "case", "impl"):
        raise ValueError(f"isolate must be none, case or impl, got {isolate!r}")
    if dev.type == "cuda":
        isolate = "none"
    meta = metadata(dev)
    if roofline_bytes:
        meta["copy_gb_per_s"] = copy_bandwidth(dev, roofline_bytes) / 1e9
    results: List[dict] = []
    started = time.perf_counter()
    for i, case in enumerate(cases):
        prefix = f"[{i + 1}/{len(cases)}] "
        if isolate == "none":
            results += run_case(case, dev, select, min_time, max_reps, prefix, progress)
        elif isolate == "case":
            results += _run_case_child(case, dev, select, min_time, max_reps, prefix)
        else:
            for name in select or [im.name for im in implementations(case, dev)]:
                results += _run_case_child(case, dev, [name], min_time, max_reps, prefix)
    _derive(results)
    meta["wall_s"] = time.perf_counter() - started
    meta["loadavg_end"] = _loadavg()
    return {"schema": "fastkd.bench/1", "meta": meta,
            "settings": {**(settings or {}), "isolate": isolate, "min_time_s": min_time,
                         "max_reps": max_reps,
                         "bytes": "3*N*V*itemsize: read student + read teacher + write student grad",
                         "timing": "do_bench median, L2 cleared" if dev.type == "cuda"
                         else "median of timeit blocks",
                         "memory": "max_memory_allocated - allocated before the call"
                         if dev.type == "cuda" else
                         "peak RSS (VmHWM) - RSS before the call, after gc + malloc_trim, "
                         "+ fastkd's idle cached buffers"},
            "results": results}


# ----------------------------------------------------------------------------- output
def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def format_table(report: dict) -> str:
    """The plain aligned table, preceded by the device and settings it was measured with."""
    m = report["meta"]
    head = [
        f"fastkd.bench: kd_loss forward+backward (student grad), batchmean, T={TEMPERATURE:g}",
        f"device: {m['device_type']} ({m['device_name']}), {m['torch_threads']} threads; "
        f"torch {m['torch']}, triton {m['triton']}, python {m['python']}; {m['date']}"
        + (f"; commit {m['git_commit'][:12]}" if m.get("git_commit") else ""),
        f"GB/s counts {report['settings']['bytes']}"
        + (f"; copy roofline {m['copy_gb_per_s']:.1f} GB/s" if m.get("copy_gb_per_s") else ""),
        f"peak = {report['settings']['memory']}",
    ]
    load = m.get("loadavg_start")
    if load and m.get("cpu_count") and load[0] > 0.5 * m["cpu_count"]:
        head.append(f"note: load average {load[0]} at the start on {m['cpu_count']} CPUs: other "
                    f"processes were running, so times are noisy")
    if report["settings"].get("note"):
        head.append("note: " + report["settings"]["note"])
    head.append("")
    cols = ["divergence", "dtype", "shape", "impl", "median ms", "runs", "x eager", "x compile", "GB/s",
            "%copy", "peak MiB", "mem/eager", "check"]
    rows = []
    copy = m.get("copy_gb_per_s")
    for r in report["results"]:
        shape = f"{r['n']}x{r['v']}"
        if r.get("error"):
            rows.append([r["divergence"], r["dtype"], shape, r["display"], "error", "", "", "", "",
                         "", "", "", r["error"][:60]])
            continue
        rows.append([
            r["divergence"], r["dtype"], shape, r["display"],
            f"{r['median_s'] * 1e3:.2f}",
            f"{r['reps']}" if r["number"] == 1 else f"{r['reps']}x{r['number']}",
            _fmt(r["speedup_vs_eager"], ".2f"), _fmt(r["speedup_vs_compile"], ".2f"),
            f"{r['gb_per_s']:.2f}",
            _fmt(r["gb_per_s"] / copy * 100 if copy else None, ".0f"),
            _fmt(None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20, ",.0f", "n/a"),
            _fmt(r["mem_ratio_vs_eager"], ".2f"),
            r["check"],
        ])
    right = set(range(4, 12))
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
              for i, c in enumerate(cols)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    body = [line(cols)]
    prev = None
    for r, row in zip(report["results"], rows):
        group = (r["divergence"], r["dtype"], r["n"], r["v"])
        if prev is not None and group != prev:
            body.append("")
        body.append(line(row))
        prev = group
    return "\n".join(head + body + [""] + summary(report)) + "\n"


def summary(report: dict) -> List[str]:
    """One line per case: the fastest fastkd backend against eager and torch.compile."""
    best: Dict[tuple, dict] = {}
    for r in report["results"]:
        if r["kind"] != "fastkd" or r.get("error"):
            continue
        k = (r["divergence"], r["dtype"], r["n"], r["v"])
        if k not in best or r["median_s"] < best[k]["median_s"]:
            best[k] = r
    lines = []
    for (div, dt, n, v), r in best.items():
        parts = []
        if r["speedup_vs_eager"] is not None:
            parts.append(f"{r['speedup_vs_eager']:.2f}x the speed of eager")
        if r["speedup_vs_compile"] is not None:
            parts.append(f"{r['speedup_vs_compile']:.2f}x the speed of torch.compile")
        if r["mem_ratio_vs_eager"] is not None:
            parts.append(f"{r['mem_ratio_vs_eager']:.2f}x eager's peak memory")
        if parts:
            lines.append(f"{div} {dt} {n}x{v}: {r['display']} runs at " + ", ".join(parts))
    return lines


def write_json(report: dict, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
