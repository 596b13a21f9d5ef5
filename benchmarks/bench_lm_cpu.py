"""CPU benchmark of the large-vocabulary LM losses: fused linear KD and the sparse top-k teacher.

    python benchmarks/bench_lm_cpu.py           # the issue's shapes
    python benchmarks/bench_lm_cpu.py --quick   # small shapes, a smoke run

fused_linear_kd_loss at N=2048, H_s=512, H_t=1024, V=32000 float32 (targets: peak memory at most
1/4 of eager, time no worse than eager), against eager PyTorch that materializes both logits
(``hs @ Ws.T``, ``ht @ Wt.T``, log_softmax, F.kl_div) and torch.compile of it.
sparse_kd_loss at N=4096, V=32000, k=64, float32 and bfloat16, against eager
(log_softmax over V, gather, renormalized teacher softmax over k).

One forward+backward per timed call; medians of repeated calls after a warm-up. Peak memory:
each (case, implementation) runs in a fresh child process, the step's peak RSS minus the RSS
before it (fastkd.bench's meter), inputs and weights excluded, gradients included.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import fastkd
from fastkd.bench.harness import CpuMemory, metadata

T = 2.0


def fused_inputs(N, Hs, Ht, V, dtype):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(N, Hs, generator=g).to(dtype).requires_grad_()
    ws = (torch.randn(V, Hs, generator=g) * Hs ** -0.5).to(dtype).requires_grad_()
    ht = torch.randn(N, Ht, generator=g).to(dtype)
    wt = (torch.randn(V, Ht, generator=g) * Ht ** -0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    return (hs, ws, ht, wt, labels), (hs, ws)


def eager_fused(hs, ws, ht, wt, labels):
    zs, zt = hs @ ws.T, ht @ wt.T
    return F.kl_div(F.log_softmax(zs.float() / T, -1), F.log_softmax(zt.float() / T, -1),
                    log_target=True, reduction="batchmean") * T * T


def fastkd_fused(backend):
    def f(hs, ws, ht, wt, labels):
        return fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, temperature=T,
                                           backend=backend)
    return f


def sparse_inputs(N, V, K, dtype):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(N, V, generator=g) * 3).to(dtype).requires_grad_()
    teacher = torch.randn(N, V, generator=g) * 3
    vals, idx = teacher.topk(K, dim=-1)
    return (z, idx, vals.to(dtype)), (z,)


def eager_sparse(z, idx, vals):
    lq = F.log_softmax(z.float() / T, -1).gather(-1, idx)
    lp = F.log_softmax(vals.float() / T, -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean() * T * T


def fastkd_sparse(backend):
    def f(z, idx, vals):
        return fastkd.sparse_kd_loss(z, idx, vals, temperature=T, backend=backend)
    return f


def cases(quick):
    if quick:
        return [("fused_linear", "float32", (256, 64, 128, 4000)),
                ("sparse", "float32", (512, 4000, 64))]
    return [("fused_linear", "float32", (2048, 512, 1024, 32000)),
            ("sparse", "float32", (4096, 32000, 64)),
            ("sparse", "bfloat16", (4096, 32000, 64))]


IMPLS = {
    "fused_linear": {"fastkd[cpp]": lambda: fastkd_fused("cpp"),
                     "fastkd[torch]": lambda: fastkd_fused("torch"),
                     "eager": lambda: eager_fused,
                     "torch.compile": lambda: torch.compile(eager_fused)},
    "sparse": {"fastkd[cpp]": lambda: fastkd_sparse("cpp"),
               "fastkd[torch]": lambda: fastkd_sparse("torch"),
               "eager": lambda: eager_sparse,
               "torch.compile": lambda: torch.compile(eager_sparse)},
}


def measure(family, dtype, shape, impl, reps):
    """One (case, implementation) in this process: median seconds, peak bytes, loss."""
    dt = getattr(torch, dtype)
    args, leaves = (fused_inputs(*shape, dt) if family == "fused_linear"
                    else sparse_inputs(*shape, dt))
    fn = IMPLS[family][impl]()

    def step():
        for x in leaves:
            x.grad = None
        loss = fn(*args)
        loss.backward()
        return loss

    step()
    if impl == "torch.compile":
        step()
    for x in leaves:  # the warm-up's gradients must not be freed inside the measured step
        x.grad = None
    mem = CpuMemory()
    mem.start()
    loss = step()
    peak = mem.stop()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "runs": reps, "peak_bytes": peak,
            "loss": float(loss)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.child:
        family, dtype, shape, impl = a.child
        print(json.dumps(measure(family, dtype, tuple(json.loads(shape)), impl, a.reps)))
        return 0
    rows = []
    for family, dtype, shape in cases(a.quick):
        for impl in IMPLS[family]:
            if impl.startswith("fastkd["):
                kernel_family = "kd" if family == "fused_linear" else "sparse_kd"
                why = fastkd.available_backends("cpu", kernel_family)[impl[7:-1]]
                if why is not None:
                    print(f"[bench] skip {impl} for {family}: {why}", file=sys.stderr)
                    continue
            print(f"[bench] {family} {dtype} {shape} {impl}", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--reps", str(a.reps), "--child",
                                  family, dtype, json.dumps(shape), impl],
                                 capture_output=True, text=True, check=True)
            rows.append({"family": family, "dtype": dtype, "shape": shape, "impl": impl,
                         **json.loads(out.stdout.strip().splitlines()[-1])})
    print(f"{'family':13s} {'dtype':9s} {'shape':26s} {'impl':14s} {'median ms':>10s} "
          f"{'x eager':>8s} {'peak MiB':>9s} {'mem/eager':>9s} {'loss':>10s}")
    for r in rows:
        e = next(x for x in rows if x["family"] == r["family"] and x["dtype"] == r["dtype"]
                 and x["shape"] == r["shape"] and x["impl"] == "eager")
        mib = r["peak_bytes"] / 2**20 if r["peak_bytes"] is not None else float("nan")
        ratio = (r["peak_bytes"] / e["peak_bytes"]) if r["peak_bytes"] and e["peak_bytes"] else float("nan")
        print(f"{r['family']:13s} {r['dtype']:9s} {str(r['shape']):26s} {r['impl']:14s} "
              f"{1e3 * r['median_s']:10.1f} {e['median_s'] / r['median_s']:8.2f} {mib:9.0f} "
              f"{ratio:9.2f} {r['loss']:10.5f}")
    if not a.quick:
        path = a.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                      f"lm-cpu-{datetime.date.today().isoformat()}.json")
        with open(path, "w") as f:
            json.dump({"meta": metadata("cpu"), "rows": rows}, f, indent=1)
        print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
