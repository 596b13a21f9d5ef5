"""CPU benchmark of the attention losses: fastkd's cpp kernels vs eager PyTorch vs torch.compile.

    python benchmarks/bench_attention_cpu.py            # the shapes below
    python benchmarks/bench_attention_cpu.py --quick    # smaller shapes, a smoke run

Each case times one training step of the loss, forward + backward with respect to the student
(the teacher is a constant), written the way users write it:

* attention transfer: Zagoruyko and Komodakis' ``at`` / ``at_loss`` (pow, mean, F.normalize);
* attention maps, kl on scores: HF-style additive mask, log_softmax / softmax / F.kl_div, the sum
  over keys averaged over valid query rows; mse on scores: TinyBERT's code (entries <= -100 set
  to 0, F.mse_loss);
* attention relations: MiniLMv2 (view heads, X X^T / sqrt(d), log_softmax, softmax, F.kl_div
  summed and divided by B * A * L), for the q-q, k-k and v-v relations;
* ``torch.compile`` of the same eager function (inductor, default mode);
* fastkd with ``backend="cpp"``.

Times are ``torch.utils.benchmark`` medians (blocked_autorange). Memory is measured in a fresh
child process per (case, implementation): inputs are created, one warm-up step runs (for
torch.compile: the compilation), freed memory is handed back to the OS (glibc's mmap threshold is
pinned at 128 KiB and malloc_trim runs), the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``), one step runs, and the peak (VmHWM) minus the RSS just before is
reported: the step's own working memory, inputs excluded. Results go to
``benchmarks/results/attention-cpu-<date>.json``.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------- eager references
def at(x):  # Zagoruyko and Komodakis (github.com/szagoruyko/attention-transfer)
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def eager_at(s, t):
    return (at(s) - at(t)).pow(2).mean()


def eager_map_kl(s, t, mask):  # scores of [B, H, L, L] with the usual additive mask
    ext = (1.0 - mask[:, None, None, :].to(s.dtype)) * -10000.0
    kl = F.kl_div(F.log_softmax(s + ext, -1), F.softmax(t + ext, -1), reduction="none").sum(-1)
    rows = mask[:, None, :].to(s.dtype)
    return (kl * rows).sum() / (s.shape[1] * rows.sum())


def eager_map_mse(s, t, mask):  # TinyBERT (github.com/huawei-noah/Pretrained-Language-Model)
    s = torch.where(s <= -1e2, torch.zeros_like(s), s)
    t = torch.where(t <= -1e2, torch.zeros_like(t), t)
    return F.mse_loss(s, t)


def minilm_relation(x, y, heads):  # MiniLMv2: [B, L, D] -> [B, A, L, L] relation scores
    B, L, D = x.shape
    d = D // heads
    xh = x.view(B, L, heads, d).transpose(1, 2)
    yh = y.view(B, L, heads, d).transpose(1, 2)
    return xh @ yh.transpose(-1, -2) / math.sqrt(d)


def eager_relation(st, tt, heads):
    B, L = st[0].shape[:2]
    total = 0.0
    for xs, xt in zip(st, tt):
        s = minilm_relation(xs, xs, heads)
        with torch.no_grad():
            t = minilm_relation(xt, xt, heads)
        kl = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="sum")
        total = total + kl / (B * heads * L)
    return total / len(st)


# ----------------------------------------------------------------------------- cases
# name -> (kind, shape parameters)
CASES = {
    "transfer B=32 Cs=256 Ct=512 32x32": ("transfer", dict(B=32, Cs=256, Ct=512, H=32, W=32)),
    "map kl scores B=4 H=12 L=512 mask": ("map_kl", dict(B=4, H=12, L=512)),
    "map mse scores B=4 H=12 L=512": ("map_mse", dict(B=4, H=12, L=512)),
    "relation B=2 L=1024 Ds=384 Dt=768 A=12": ("relation", dict(B=2, L=1024, Ds=384, Dt=768, A=12)),
}
QUICK = {
    "transfer B=8 Cs=64 Ct=128 16x16": ("transfer", dict(B=8, Cs=64, Ct=128, H=16, W=16)),
    "map kl scores B=2 H=4 L=128 mask": ("map_kl", dict(B=2, H=4, L=128)),
    "map mse scores B=2 H=4 L=128": ("map_mse", dict(B=2, H=4, L=128)),
    "relation B=1 L=256 Ds=128 Dt=256 A=4": ("relation", dict(B=1, L=256, Ds=128, Dt=256, A=4)),
}
ALL_CASES = {**CASES, **QUICK}


def make_inputs(kind, p, seed=0):
    """(student tensors, constant arguments): the student gets the gradient."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    if kind == "transfer":
        return [rnd(p["B"], p["Cs"], p["H"], p["W"])], [rnd(p["B"], p["Ct"], p["H"], p["W"])]
    if kind in ("map_kl", "map_mse"):
        B, H, L = p["B"], p["H"], p["L"]
        lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
        mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
        ext = (1.0 - mask[:, None, None, :].float()) * -10000.0
        s, t = rnd(B, H, L, L, scale=2.0), rnd(B, H, L, L, scale=2.0)
        if kind == "map_mse":  # TinyBERT compares scores that carry the additive mask
            s, t = s + ext, t + ext
        return [s], [t, mask]
    B, L = p["B"], p["L"]
    st = [rnd(B, L, p["Ds"]) for _ in range(3)]
    tt = [rnd(B, L, p["Dt"]) for _ in range(3)]
    return st, tt


def implementations(kind, p):
    import fastkd

    if kind == "transfer":
        eager = eager_at
        ours = lambda s, t: fastkd.attention_transfer_loss(s, t, backend="cpp")  # noqa: E731
    elif kind == "map_kl":
        eager = eager_map_kl
        ours = lambda s, t, m: fastkd.attention_map_loss(  # noqa: E731
            s, t, kind="kl", inputs="scores", attention_mask=m, backend="cpp")
    elif kind == "map_mse":
        eager = eager_map_mse
        ours = lambda s, t, m: fastkd.attention_map_loss(  # noqa: E731
            s, t, kind="mse", inputs="scores", backend="cpp")
    else:
        A = p["A"]

        def eager(q, k, v, tq, tk, tv):
            return eager_relation((q, k, v), (tq, tk, tv), A)

        def ours(q, k, v, tq, tk, tv):
            return fastkd.attention_relation_loss((q, k, v), (tq, tk, tv), num_relation_heads=A,
                                                  backend="cpp")
    return {"eager": ("eager", eager), "torch.compile": ("compile", eager), "fastkd cpp": ("fastkd", ours)}


def resolve(impl):
    kind, fn = impl
    return torch.compile(fn) if kind == "compile" else fn


def step(fn, students, consts):
    xs = [x.detach().requires_grad_() for x in students]
    fn(*xs, *consts).backward()
    return [x.grad for x in xs]


# ----------------------------------------------------------------------------- memory (child)
def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def child_memory(case, impl_name):
    kind, p = ALL_CASES[case]
    impl = implementations(kind, p)[impl_name]
    if impl[0] == "fastkd":
        from fastkd import _native

        assert _native.load(), _native.reason()
    fn = resolve(impl)
    students, consts = make_inputs(kind, p)
    step(fn, students, consts)  # warm-up (compilation for torch.compile)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step(fn, students, consts)
    print(json.dumps({"peak_bytes": _status("VmHWM") - base}))


def measure_memory(case, impl_name):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, impl_name],
                       capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        return None, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"], None


# ----------------------------------------------------------------------------- timing
def measure_time(fn, students, consts, min_run_time):
    from torch.utils import benchmark

    step(fn, students, consts)  # warm-up / compile
    timer = benchmark.Timer(stmt="step(fn, s, c)", globals=dict(step=step, fn=fn, s=students, c=consts))
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median, len(m.times)


def max_rel_diff(fn_a, fn_b, students, consts):
    """Largest gradient difference between two implementations, relative to the largest entry."""
    ga, gb = step(fn_a, students, consts), step(fn_b, students, consts)
    return max(((a - b).abs().max() / a.abs().max().clamp(min=1e-30)).item() for a, b in zip(ga, gb))


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds per timing")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory children")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
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
    for case, (kind, p) in cases.items():
        if args.only and args.only not in case:
            continue
        students, consts = make_inputs(kind, p)
        impls = implementations(kind, p)
        agree = max_rel_diff(impls["eager"][1], impls["fastkd cpp"][1], students, consts)
        rows = []
        for name, impl in impls.items():
            if args.no_compile and name == "torch.compile":
                continue
            fn = resolve(impl)
            try:
                sec, runs = measure_time(fn, students, consts, args.min_run_time)
                err = None
            except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of memory)
                sec, runs, err = None, 0, f"{type(e).__name__}: {e}"[:200]
            mem, merr = (None, "skipped") if args.no_memory else measure_memory(case, name)
            rows.append(dict(impl=name, median_s=sec, runs=runs, peak_bytes=mem,
                             error=err or (merr if mem is None else None)))
            print(f"  {case:40s} {name:14s} {'' if sec is None else f'{sec * 1e3:9.1f} ms'}"
                  f"  {'' if mem is None else f'{mem / 2**20:8.1f} MiB'}", flush=True)
        results["cases"].append(dict(case=case, kind=kind, shape=p, grad_rel_diff_vs_eager=agree,
                                     rows=rows))
    results["machine"]["load_average_end"] = os.getloadavg()
    print_table(results)
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"attention-cpu-{datetime.date.today().isoformat()}"
                                 f"{'-quick' if args.quick else ''}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {os.path.relpath(path, ROOT)}")


def print_table(results):
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, "
          f"load {m['load_average'][0]:.1f} -> {m['load_average_end'][0]:.1f}")
    print(f"{'case':40s} {'implementation':14s} {'median':>10s} {'vs fastkd':>10s} {'peak mem':>11s} "
          f"{'vs fastkd':>10s}")
    for c in results["cases"]:
        ours = next(r for r in c["rows"] if r["impl"] == "fastkd cpp")
        for r in c["rows"]:
            t = "" if r["median_s"] is None else f"{r['median_s'] * 1e3:8.1f}ms"
            tr = "" if r["median_s"] is None or not ours["median_s"] else \
                f"{r['median_s'] / ours['median_s']:9.2f}x"
            mm = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:8.1f}MiB"
            mr = "" if r["peak_bytes"] is None or not ours["peak_bytes"] else \
                f"{r['peak_bytes'] / ours['peak_bytes']:9.1f}x"
            print(f"{c['case']:40s} {r['impl']:14s} {t:>10s} {tr:>10s} {mm:>11s} {mr:>10s}"
                  + (f"  ({r['error']})" if r["error"] and r["error"] != "skipped" else ""))
        print(f"{'':40s} (max gradient difference fastkd vs eager, relative: "
              f"{c['grad_rel_diff_vs_eager']:.1e})")


if __name__ == "__main__":
    main()
