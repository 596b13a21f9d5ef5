"""CPU benchmark of the relational losses: fastkd's cpp kernels vs eager PyTorch vs torch.compile.

    python benchmarks/bench_relational_cpu.py            # the issue's target shapes
    python benchmarks/bench_relational_cpu.py --quick    # smaller shapes, a smoke run

Each case times one training step of the loss, forward + backward with respect to the student
(the teacher is a constant), as users write it:

* eager, Park et al.'s code for RKD (their ``pdist``: Gram identity, clamp, sqrt, zeroed
  diagonal, ``d[d > 0].mean()``; angles from the N x N x D difference tensor, F.normalize and
  bmm), a ``torch.cdist`` variant of the distance, and Tung and Mori's code for SP;
* ``torch.compile`` of the same eager function (inductor, default mode);
* fastkd with ``backend="cpp"``.

Times are ``torch.utils.benchmark`` medians, the implementations timed in turns (interleaved,
so that load drifting over minutes biases none of them). Memory is measured in a fresh child
process per (case, implementation): inputs are created, one warm-up step runs (for
torch.compile: the compilation), freed memory is handed back to the OS (glibc's mmap
threshold is pinned at 128 KiB and malloc_trim runs), the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``), one step runs, and the peak (VmHWM) minus the RSS just before is
reported. Results go to ``benchmarks/results/relational-cpu-<date>.json``.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------- eager references
def park_pdist(e, squared=False, eps=1e-12):  # Park et al., RKD (github.com/lenscloth/RKD)
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def eager_distance_park(student, teacher):
    with torch.no_grad():
        t_d = park_pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = park_pdist(student)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d)


def eager_distance_cdist(student, teacher):
    with torch.no_grad():
        t_d = torch.cdist(teacher, teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = torch.cdist(student, student)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d)


def eager_angle_park(student, teacher):
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle)


def eager_sp(f_s, f_t):  # Tung and Mori, as in github.com/HobbitLong/RepDistiller
    bsz = f_s.shape[0]
    G_s = F.normalize(torch.mm(f_s, f_s.t()))
    G_t = F.normalize(torch.mm(f_t, f_t.t()))
    G_diff = G_t - G_s
    return (G_diff * G_diff).view(-1, 1).sum(0) / (bsz * bsz)


def _fastkd(name):
    import fastkd

    fn = {"distance": fastkd.rkd_distance_loss, "angle": fastkd.rkd_angle_loss,
          "sp": fastkd.similarity_preserving_loss}[name]
    return lambda s, t: fn(s, t, backend="cpp")


EAGER = {"distance": {"eager (Park pdist)": eager_distance_park, "eager (cdist)": eager_distance_cdist},
         "angle": {"eager (Park)": eager_angle_park}, "sp": {"eager (Tung & Mori)": eager_sp}}


def implementations(case: str):
    impls = dict(EAGER[case])
    first = next(iter(EAGER[case].values()))
    impls["torch.compile"] = ("compile", first)
    impls["fastkd cpp"] = ("fastkd", case)
    return impls


def resolve(impl):
    if callable(impl):
        return impl
    kind, arg = impl
    if kind == "compile":
        return torch.compile(arg)
    return _fastkd(arg)


CASES = {  # name -> (loss, N, D): the targets, then a narrower embedding
    "distance N=2048 D=512": ("distance", 2048, 512),
    "sp N=2048 D=512": ("sp", 2048, 512),
    "angle N=256 D=512": ("angle", 256, 512),
    "distance N=2048 D=128": ("distance", 2048, 128),
    "sp N=2048 D=128": ("sp", 2048, 128),
}
QUICK = {"distance N=512 D=128": ("distance", 512, 128), "sp N=512 D=128": ("sp", 512, 128),
         "angle N=64 D=128": ("angle", 64, 128)}


def make_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def step(fn, s, t):
    x = s.detach().requires_grad_()
    fn(x, t).sum().backward()
    return x.grad


# ----------------------------------------------------------------------------- memory (child)
def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def child_memory(case, impl_name):
    loss, n, d = ALL_CASES[case]
    impl = implementations(loss)[impl_name]
    if impl == ("fastkd", loss):
        from fastkd import _native

        assert _native.load(), _native.reason()
    fn = resolve(impl)
    s, t = make_inputs(n, d)
    step(fn, s, t)  # warm-up (compilation for torch.compile)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step(fn, s, t)
    print(json.dumps({"peak_bytes": _status("VmHWM") - base}))


def measure_memory(case, impl_name):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, impl_name,
                        "--threads", str(torch.get_num_threads())],
                       capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        return None, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"], None


# ----------------------------------------------------------------------------- timing
def measure_times(fns, s, t, min_run_time):
    """{name: (median seconds, measurements)}: torch.utils.benchmark Timers, interleaved.

    The implementations take turns, round after round (at least 5 rounds, about min_run_time
    seconds of each), so that load from other processes drifting over minutes biases none of
    them; each measurement averages enough steps to last ~0.2 s.
    """
    import statistics

    from torch.utils import benchmark

    timers, number, est = {}, {}, {}
    for name, fn in fns.items():
        step(fn, s, t)  # warm-up / compile
        timers[name] = benchmark.Timer(stmt="step(fn, s, t)", globals=dict(step=step, fn=fn, s=s, t=t))
        est[name] = timers[name].timeit(1).median
        number[name] = max(1, int(0.2 / max(est[name], 1e-6)))
    per_round = max(est[n] * number[n] for n in fns)
    rounds = max(5, int(min_run_time / per_round))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name in fns:
            times[name].append(timers[name].timeit(number[name]).median)
    return {name: (statistics.median(v), len(v)) for name, v in times.items()}


def feature_hint_share(min_run_time):
    """FitNets: the share of MSE in a Linear + MSE training step (why no fused kernel on CPU)."""
    from torch.utils import benchmark

    n, cs, ct = 8192, 512, 1024
    proj = torch.nn.Linear(cs, ct)
    s, t = torch.randn(n, cs, requires_grad=True), torch.randn(n, ct)

    def lin():
        proj(s).sum().backward()

    def lin_mse():
        F.mse_loss(proj(s), t).backward()

    res = {}
    for name, f in (("linear", lin), ("linear+mse", lin_mse)):
        f()
        res[name] = benchmark.Timer("f()", globals=dict(f=f)).blocked_autorange(
            min_run_time=min_run_time).median
    return dict(shape=[n, cs, ct], **res, mse_share=1.0 - res["linear"] / res["linear+mse"])


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                load_average=os.getloadavg())


ALL_CASES = {**CASES, **QUICK}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--min-run-time", type=float, default=3.0, help="seconds per timing")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory children")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_memory(*args.child)
    load = os.getloadavg()[0]
    if load > 2.5:
        print(f"warning: load average {load:.1f} > 2.5; timings will be noisy", file=sys.stderr)
    from fastkd import _native

    if not _native.load():
        sys.exit(f"the cpp backend is unavailable: {_native.reason()}")
    results = dict(machine=machine(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                   cases=[])
    cases = QUICK if args.quick else CASES
    for case, (loss, n, d) in cases.items():
        s, t = make_inputs(n, d)
        fns, errors = {}, {}
        for name, impl in implementations(loss).items():
            if args.no_compile and name == "torch.compile":
                continue
            try:
                fns[name] = resolve(impl)
                step(fns[name], s, t)
            except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of memory)
                fns.pop(name, None)
                errors[name] = f"{type(e).__name__}: {e}"[:200]
        times = measure_times(fns, s, t, args.min_run_time)
        rows = []
        for name in implementations(loss):
            if args.no_compile and name == "torch.compile":
                continue
            sec, runs = times.get(name, (None, 0))
            mem, merr = (None, "skipped") if args.no_memory else measure_memory(case, name)
            rows.append(dict(impl=name, median_s=sec, runs=runs, peak_bytes=mem,
                             error=errors.get(name) or (merr if mem is None else None)))
            print(f"  {case:24s} {name:20s} {'' if sec is None else f'{sec * 1e3:9.1f} ms'}"
                  f"  {'' if mem is None else f'{mem / 2**20:8.1f} MiB'}", flush=True)
        results["cases"].append(dict(case=case, loss=loss, N=n, D=d, rows=rows))
    results["feature_hint"] = feature_hint_share(args.min_run_time)
    results["machine"]["load_average_end"] = os.getloadavg()
    print_table(results)
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    tag = ("-quick" if args.quick else "") + (f"-{args.threads}thread" if args.threads else "")
    path = os.path.join(out_dir, f"relational-cpu-{datetime.date.today().isoformat()}{tag}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {os.path.relpath(path, ROOT)}")


def print_table(results):
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, "
          f"load {m['load_average'][0]:.1f} -> {m['load_average_end'][0]:.1f}")
    print(f"{'case':24s} {'implementation':20s} {'median':>10s} {'vs fastkd':>10s} {'peak mem':>10s} "
          f"{'vs fastkd':>10s}")
    for c in results["cases"]:
        ours = next(r for r in c["rows"] if r["impl"] == "fastkd cpp")
        for r in c["rows"]:
            t = "" if r["median_s"] is None else f"{r['median_s'] * 1e3:8.1f}ms"
            tr = "" if r["median_s"] is None or not ours["median_s"] else f"{r['median_s'] / ours['median_s']:9.2f}x"
            mm = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:7.1f}MiB"
            mr = "" if r["peak_bytes"] is None or not ours["peak_bytes"] else \
                f"{r['peak_bytes'] / ours['peak_bytes']:9.1f}x"
            print(f"{c['case']:24s} {r['impl']:20s} {t:>10s} {tr:>10s} {mm:>10s} {mr:>10s}"
                  + (f"  ({r['error']})" if r["error"] and r["error"] != "skipped" else ""))
    h = results["feature_hint"]
    print(f"FitNets Linear+MSE {h['shape']}: linear {h['linear'] * 1e3:.1f} ms, linear+mse "
          f"{h['linear+mse'] * 1e3:.1f} ms (MSE {100 * h['mse_share']:.0f}% of the step)")


if __name__ == "__main__":
    main()
