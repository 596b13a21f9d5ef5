"""pytest-benchmark suite: kd_loss forward+backward, fastkd backends vs eager PyTorch.

The same cases and implementations as ``python -m fastkd.bench`` (fastkd/bench/divergences.py),
timed by pytest-benchmark instead (no peak memory here; the bench command has it). Slow, so it
runs only when asked for:

    python -m pytest benchmarks/ --benchmark-only [-k "jsd and bfloat16"]

FASTKD_BENCH_SHAPE=NxV changes the shape (default 1024x32000).
"""
import os

import pytest
import torch

from fastkd.bench.divergences import DIVERGENCES, Case, implementations, make_inputs

SHAPE = tuple(int(x) for x in os.environ.get("FASTKD_BENCH_SHAPE", "1024x32000").split("x"))
DTYPES = ["float32", "bfloat16"]
IMPLS = ["cpp", "torch", "triton", "cuda", "eager", "compile"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _only_when_benchmarking(request):
    if not request.config.getoption("benchmark_only", default=False):
        pytest.skip("benchmarks run with: python -m pytest benchmarks/ --benchmark-only")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss(benchmark, divergence, dtype, impl):
    case = Case(divergence, dtype, *SHAPE)
    found = implementations(case, DEVICE, [impl])  # asks fastkd which backends run here
    if not found:
        pytest.skip(f"{impl} does not run on {DEVICE} here")
    fn = found[0].fn
    s, t = make_inputs(case, DEVICE)

    def step():
        s.grad = None
        fn(s, t).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    step()  # torch.compile compiles here, the native extension loads here
    rounds = 20 if DEVICE == "cuda" else 3
    benchmark.group = f"{divergence} {dtype} {SHAPE[0]}x{SHAPE[1]}"
    benchmark.extra_info.update(case.to_dict(), bytes=case.bytes, device=DEVICE)
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gb_per_s"] = case.bytes / median / 1e9
