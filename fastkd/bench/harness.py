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

The harness knows cases only through the protocol of ``case.BenchCase`` (inputs, implementations,
byte and FLOP counts); the families (``divergences``, ``sparse``, ...) define them. The same
timed step serves ``python -m fastkd.bench`` and the pytest-benchmark suites in benchmarks/.
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
import time
import timeit
from typing import Callable, Dict, List, Optional

import torch

from .case import BenchCase, Impl
from .families import FAMILIES, case_from_dict
from .progress import Progress, describe_row

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


def make_step(impl: Impl, args, leaves, device) -> Callable[[], torch.Tensor]:
    """One timed call: clear the student's gradients, forward, backward (and sync on CUDA)."""
    dev = torch.device(device)

    def step():
        for x in leaves:
            x.grad = None
        loss = impl.fn(*args)
        loss.backward()
        return loss

    if dev.type != "cuda":
        return step

    def step_sync():
        loss = step()
        torch.cuda.synchronize(dev)
        return loss

    return step_sync


def _grad_norm(leaves) -> float:
    total = sum(float(torch.linalg.vector_norm(x.grad, dtype=torch.float32)) ** 2
                for x in leaves if x.grad is not None)
    return math.sqrt(total)


def measure(impl: Impl, case: BenchCase, device, min_time: float = 1.0, max_reps: int = 50,
            inputs=None) -> dict:
    """Time and peak memory of ``impl`` on ``case``: forward + backward into the student."""
    dev = torch.device(device)
    sets = inputs if inputs is not None else [case.make_inputs(dev)]
    args0, leaves0 = sets[0]
    step = make_step(impl, args0, leaves0, dev)
    rotating = [make_step(impl, a, lv, dev) for a, lv in sets]
    cursor = [0]

    def step_rotating():  # CUDA: a different input set each call, so nothing stays in L2
        cursor[0] = (cursor[0] + 1) % len(rotating)
        rotating[cursor[0]]()

    def clear():
        for _, leaves in sets:
            for x in leaves:
                x.grad = None

    # warm-up; the first call also gives the value checked against eager
    t_start = time.perf_counter()
    loss = step()
    first_call_s = time.perf_counter() - t_start
    loss_value = float(loss.detach().float())
    grad_norm = _grad_norm(leaves0)
    del loss
    for _ in range(impl.warmup - 1):
        step()
    clear()

    # peak memory of one call (on CPU the same call is the first timing sample)
    mem = CpuMemory() if dev.type == "cpu" else CudaMemory(dev)
    mem.start()
    t_start = time.perf_counter()
    step()
    one_call_s = time.perf_counter() - t_start
    peak = mem.stop()
    clear()

    if dev.type == "cuda":
        times, number = _time_cuda(step_rotating, min_time)
    else:
        times, number = _time_cpu(step, one_call_s, min_time, max_reps)
    clear()
    median = statistics.median(times)
    return {
        "impl": impl.name, "display": impl.display, "kind": impl.kind,
        "median_s": median, "times_s": times, "number": number, "reps": len(times),
        "first_call_s": first_call_s,
        "gb_per_s": case.bytes / median / 1e9 if case.bytes else None,
        "tflop_per_s": case.flops / median / 1e12 if case.flops else None,
        "peak_bytes": peak, "loss_value": loss_value, "grad_norm": grad_norm, "error": None,
    }


def _nbytes(args) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def rotation_sets(case: BenchCase, device) -> list:
    """Enough input copies to exceed L2 twice (CUDA), capped at 16; one set on CPU."""
    dev = torch.device(device)
    sets = [case.make_inputs(dev, seed=0)]
    if dev.type == "cuda":
        per_set = max(_nbytes(sets[0][0]), 1)
        k = min(16, max(1, math.ceil(2 * _l2_bytes(dev) / per_set)))
        sets += [case.make_inputs(dev, seed=i) for i in range(1, k)]
    return sets


def case_row(case: BenchCase) -> dict:
    """What every result row of ``case`` carries besides its measurements."""
    size_name, size = case.size
    return {**case.to_dict(), "label": case.label, "series": case.series, "bytes": case.bytes,
            "flops": case.flops, "size_name": size_name, "size": size}


# ----------------------------------------------------------------------------- one case
def run_case(case: BenchCase, device, select=None, min_time: float = 1.0, max_reps: int = 50,
             on_event: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Every selected implementation of ``case``, measured in this process, one after another.

    ``on_event`` gets ``{"event": "start", "label", "impl"}`` before and ``{"event": "row",
    "row"}`` after each implementation (progress, and the child process's reports).
    """
    dev = torch.device(device)
    torch._dynamo.reset()  # a fresh torch.compile cache per case
    impls = case.implementations(dev, select)
    sets = rotation_sets(case, dev) if impls else []
    base = case_row(case)
    out = []
    for impl in impls:
        if on_event:
            on_event({"event": "start", "label": case.label, "impl": impl.display})
        try:
            r = measure(impl, case, dev, min_time, max_reps, inputs=sets)
        except Exception as e:  # an implementation that fails is reported, not fatal
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            r = {"impl": impl.name, "display": impl.display, "kind": impl.kind,
                 "error": f"{type(e).__name__}: {msg}"}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        for _, leaves in sets:
            for x in leaves:
                x.grad = None
        _release_cpu_cache(dev)
        row = {**base, **r}
        out.append(row)
        if on_event:
            on_event({"event": "row", "row": row})
    del sets
    gc.collect()
    return out


def _release_cpu_cache(dev) -> None:
    """Free fastkd's idle CPU buffers: the next implementation's memory must not include them."""
    if dev.type == "cpu":
        import fastkd

        fastkd.empty_cache()


_EVENT = "@fastkd.bench.event "  # prefix of the child's report lines on its stdout


def child_main(spec: dict) -> None:
    """The child process's side: run one case, report each event as a line on stdout."""
    def report(event):
        print(_EVENT + json.dumps(event, default=str), flush=True)

    run_case(case_from_dict(spec["case"]), spec["device"], spec["select"], spec["min_time"],
             spec["max_reps"], on_event=report)


def _run_case_child(case: BenchCase, device, select, min_time, max_reps,
                    on_event: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """``run_case`` in a fresh Python process, so that its peak memory is its own."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    spec = {"case": case.to_dict(), "device": str(device), "select": select, "min_time": min_time,
            "max_reps": max_reps}
    rows: List[dict] = []
    proc = subprocess.Popen([sys.executable, "-m", "fastkd.bench._worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    for line in proc.stdout:
        if not line.startswith(_EVENT):
            sys.stderr.write(line)  # whatever else the child printed
            continue
        event = json.loads(line[len(_EVENT):])
        if event["event"] == "row":
            rows.append(event["row"])
        if on_event:
            on_event(event)
    code = proc.wait()
    done = {r["impl"] for r in rows}
    names = [i.name for i in case.implementations(device, select)]
    why = f"worker process exited with code {code} (out of memory?)"
    for name in names:  # what the child did not report: it died first
        if name not in done:
            row = {**case_row(case), "impl": name, "display": name, "kind": "?", "error": why}
            rows.append(row)
            if on_event:
                on_event({"event": "row", "row": row})
    return rows


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


def matmul_rate(device, dtype: str, n: Optional[int] = None) -> float:
    """Measured FLOP/s of an n x n x n matmul in ``dtype``: the compute roofline of the cases
    that count FLOPs (n = 8192 on GPU, 1024 on CPU unless given)."""
    from .case import DTYPES

    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 1024)
    a = torch.randn(n, n, device=dev).to(DTYPES[dtype])
    b = torch.randn(n, n, device=dev).to(DTYPES[dtype])
    out = torch.empty_like(a)
    step = lambda: torch.mm(a, b, out=out)  # noqa: E731
    if dev.type == "cuda":
        times, _ = _time_cuda(step, 0.2)
    else:
        step()
        t0 = time.perf_counter()
        step()
        times, _ = _time_cpu(step, time.perf_counter() - t0, 0.3, 20, min_reps=3)
    return 2 * n ** 3 / statistics.median(times)


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
        # fastkd's own switches (FASTKD_SP_FORM, FASTKD_BACKEND, ...): they change what runs
        "fastkd_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FASTKD_")},
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        meta.update(cuda=torch.version.cuda, gpu_memory_bytes=props.total_memory,
                    l2_cache_bytes=_l2_bytes(dev))
    return meta


# ----------------------------------------------------------------------------- run
MEMORY_CUDA = "max_memory_allocated - allocated before the call"
MEMORY_CPU = ("peak RSS (VmHWM) - RSS before the call, after gc + malloc_trim, "
              "+ fastkd's idle cached buffers")


def _tolerance(dtype: str) -> float:
    return 1e-3 if dtype == "float32" else 2e-2


def _derive(results: List[dict]) -> None:
    """Speed-ups and memory ratios against eager and torch.compile of the same case, and checks."""
    ref = {}
    for r in results:
        if r.get("error") is None and r["impl"] in ("eager", "compile"):
            ref[(r["label"], r["impl"])] = r
    for r in results:
        eager, comp = ref.get((r["label"], "eager")), ref.get((r["label"], "compile"))
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
            dl = abs(r["loss_value"] - eager["loss_value"]) / max(abs(eager["loss_value"]), 1e-6)
            dg = abs(r["grad_norm"] - eager["grad_norm"]) / max(abs(eager["grad_norm"]), 1e-12)
            r["loss_rel_diff"], r["grad_norm_rel_diff"] = dl, dg
            r["check"] = "ok" if (dl <= tol and dg <= tol) else "MISMATCH"


def _counts(cases: List[BenchCase]) -> Dict[str, dict]:
    """Per family, what its GB/s and TFLOP/s count (the case types' formulas), for the report."""
    out: Dict[str, dict] = {}
    for c in cases:
        fam = out.setdefault(c.family, {"title": FAMILIES[c.family][0].TITLE, "bytes": {},
                                         "flops": {}})
        if c.bytes is not None and c.BYTES_FORMULA:
            fam["bytes"][c.loss] = c.BYTES_FORMULA
        if c.flops is not None and c.FLOPS_FORMULA:
            fam["flops"][c.loss] = c.FLOPS_FORMULA
    return out


def _impl_names(case: BenchCase, dev, select, skip_reference: bool) -> List[str]:
    impls = case.implementations(dev, select)
    names = [i.name for i in impls]
    if skip_reference and any(i.kind == "fastkd" and i.name != "torch" for i in impls):
        names = [n for n in names if n != "torch"]
    return names


def run(cases: List[BenchCase], device=None, select: Optional[List[str]] = None,
        min_time: float = 1.0, max_reps: int = 50, isolate: str = "none",
        progress: bool = True, roofline_bytes: Optional[int] = 256 * 2**20,
        settings: Optional[dict] = None, skip_reference: bool = False,
        checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """Measure every case; returns the report (``meta``, ``settings``, ``results``).

    isolate: ``"none"`` runs everything here; ``"case"`` runs each case in a fresh child process,
    ``"impl"`` each (case, implementation). Only CPU memory needs it; CUDA always runs here.
    progress: a bar (or counter lines) on stderr, see ``progress.Progress``.
    skip_reference: leave out fastkd's ``torch`` backend in cases where a native one runs.
    checkpoint: called with the report so far (``meta["complete"]`` False) after each case, so
    that a run cut short by a time limit still leaves every case it finished.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isolate not in ("none", "case", "impl"):
        raise ValueError(f"isolate must be none, case or impl, got {isolate!r}")
    if dev.type == "cuda":
        isolate = "none"
    meta = metadata(dev)
    todo = [(case, _impl_names(case, dev, select, skip_reference)) for case in cases]
    if roofline_bytes:
        meta["copy_gb_per_s"] = copy_bandwidth(dev, roofline_bytes) / 1e9
        # the matmul rate in each dtype that a FLOP-counting case runs in
        flop_dtypes = sorted({c.dtype for c, names in todo if names and c.flops})
        meta["matmul_tflop_per_s"] = {d: matmul_rate(dev, d) / 1e12 for d in flop_dtypes}
    bar = Progress(sum(len(names) for _, names in todo), enabled=progress)

    def on_event(event):
        if event["event"] == "start":
            bar.start(f"{event['label']} {event['impl']}")
        else:
            bar.finish(describe_row(event["row"]))

    results: List[dict] = []
    started = time.perf_counter()
    all_settings = {**(settings or {}), "isolate": isolate, "min_time_s": min_time,
                    "max_reps": max_reps, "counts": _counts([c for c, _ in todo]),
                    "timing": "do_bench median, L2 cleared" if dev.type == "cuda"
                    else "median of timeit blocks",
                    "memory": MEMORY_CUDA if dev.type == "cuda" else MEMORY_CPU}

    def report(complete: bool) -> dict:
        rows = [dict(r) for r in results]
        _derive(rows)
        m = {**meta, "wall_s": time.perf_counter() - started, "complete": complete}
        if complete:
            m["loadavg_end"] = _loadavg()
        return {"schema": "fastkd.bench/2", "meta": m, "settings": all_settings, "results": rows}

    try:
        for case, names in todo:
            if not names:
                continue
            if isolate == "none":
                results += run_case(case, dev, names, min_time, max_reps, on_event)
            elif isolate == "case":
                results += _run_case_child(case, dev, names, min_time, max_reps, on_event)
            else:
                for name in names:
                    results += _run_case_child(case, dev, [name], min_time, max_reps, on_event)
            if checkpoint:
                checkpoint(report(complete=False))
    finally:
        bar.close()
    return report(complete=True)


# ----------------------------------------------------------------------------- output
def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _table(rows: List[dict], copy: Optional[float], mm: Optional[dict] = None) -> List[str]:
    """One family's rows as aligned lines; rate columns only where some case defines them."""
    has_bytes = any(r.get("bytes") for r in rows)
    has_flops = any(r.get("flops") for r in rows)
    cols = ["case", "dtype", "shape", "impl", "median ms", "runs", "x eager", "x compile"]
    cols += ["GB/s", "%copy"] if has_bytes else []
    cols += ["TFLOP/s", "%mm"] if has_flops else []
    cols += ["peak MiB", "mem/eager", "check"]
    cells = []
    for r in rows:
        head = [r["case"], r["dtype"], r["shape"], r["display"]]
        if r.get("error"):
            cells.append(head + ["error"] + [""] * (len(cols) - 6) + [r["error"][:60]])
            continue
        row = head + [f"{r['median_s'] * 1e3:.2f}",
                      f"{r['reps']}" if r["number"] == 1 else f"{r['reps']}x{r['number']}",
                      _fmt(r["speedup_vs_eager"], ".2f"), _fmt(r["speedup_vs_compile"], ".2f")]
        if has_bytes:
            gbs = r.get("gb_per_s")
            row += [_fmt(gbs, ".2f"), _fmt(gbs / copy * 100 if gbs and copy else None, ".0f")]
        if has_flops:
            tf, peak = r.get("tflop_per_s"), (mm or {}).get(r["dtype"])
            row += [_fmt(tf, ".3g"), _fmt(tf / peak * 100 if tf and peak else None, ".0f")]
        row += [_fmt(None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20, ",.0f", "n/a"),
                _fmt(r["mem_ratio_vs_eager"], ".2f"), r["check"]]
        cells.append(row)
    right = set(range(4, len(cols) - 1))
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]

    def line(items):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(items, widths))).rstrip()

    body = [line(cols)]
    prev = None
    for r, row in zip(rows, cells):
        if prev is not None and r["label"] != prev:
            body.append("")
        body.append(line(row))
        prev = r["label"]
    return body


def format_table(report: dict) -> str:
    """The device and settings, then one table per family, then a line per case."""
    m = report["meta"]
    s = report["settings"]
    head = [
        f"fastkd.bench: forward+backward (student gradients), preset {s.get('preset', '-')}",
        f"device: {m['device_type']} ({m['device_name']}), {m['torch_threads']} threads; "
        f"torch {m['torch']}, triton {m['triton']}, python {m['python']}; {m['date']}"
        + (f"; commit {m['git_commit'][:12]}" if m.get("git_commit") else ""),
        f"time = {s['timing']}; peak = {s['memory']}"
        + (f"; copy roofline {m['copy_gb_per_s']:.1f} GB/s (%copy)" if m.get("copy_gb_per_s")
           else ""),
    ]
    if m.get("matmul_tflop_per_s"):
        head.append("matmul roofline (%mm): " + ", ".join(
            f"{d} {t:.3g} TFLOP/s" for d, t in sorted(m["matmul_tflop_per_s"].items())))
    if m.get("fastkd_env"):
        head.append("environment: " + " ".join(f"{k}={v}" for k, v in m["fastkd_env"].items()))
    load = m.get("loadavg_start")
    if load and m.get("cpu_count") and load[0] > 0.5 * m["cpu_count"]:
        head.append(f"note: load average {load[0]} at the start on {m['cpu_count']} CPUs: other "
                    f"processes were running, so times are noisy")
    if s.get("note"):
        head.append("note: " + s["note"])
    out = head
    counts = s.get("counts", {})
    for family in FAMILIES:
        rows = [r for r in report["results"] if r["family"] == family]
        if not rows:
            continue
        c = counts.get(family, {})
        out += ["", f"== {family}: {c.get('title', family)}"]
        out += [f"   GB/s counts {loss}: {text}" for loss, text in c.get("bytes", {}).items()]
        out += [f"   TFLOP/s counts {loss}: {text}" for loss, text in c.get("flops", {}).items()]
        out += _table(rows, m.get("copy_gb_per_s"), m.get("matmul_tflop_per_s"))
    return "\n".join(out + [""] + summary(report)) + "\n"


def summary(report: dict) -> List[str]:
    """One line per case: the fastest fastkd backend against eager and torch.compile."""
    best: Dict[str, dict] = {}
    for r in report["results"]:
        if r["kind"] != "fastkd" or r.get("error"):
            continue
        if r["label"] not in best or r["median_s"] < best[r["label"]]["median_s"]:
            best[r["label"]] = r
    lines = []
    for label, r in best.items():
        parts = []
        if r["speedup_vs_eager"] is not None:
            parts.append(f"{r['speedup_vs_eager']:.2f}x the speed of eager")
        if r["speedup_vs_compile"] is not None:
            parts.append(f"{r['speedup_vs_compile']:.2f}x the speed of torch.compile")
        if r["mem_ratio_vs_eager"] is not None:
            parts.append(f"{r['mem_ratio_vs_eager']:.2f}x eager's peak memory")
        if parts:
            lines.append(f"{label}: {r['display']} runs at " + ", ".join(parts))
    return lines


def write_json(report: dict, path: str) -> None:
    """Writes the report whole or not at all (a temporary file renamed over ``path``): a
    process killed while writing a checkpoint leaves the previous one readable."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
