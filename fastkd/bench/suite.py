"""The pytest-benchmark suites' side of ``fastkd.bench`` (benchmarks/test_*.py, one per family).

Each suite parametrizes over the preset cases of its family and the implementation names, and
times the bench's own step (student gradients cleared, forward, backward) under
pytest-benchmark. ``FASTKD_BENCH_PRESET`` picks the shapes (tiny, quick, default, full; default:
default), ``FASTKD_BENCH_SHAPE=NxV`` kd_loss's shape. No peak memory there; the bench command
has it.
"""
from __future__ import annotations

import os

import torch

from .case import BASELINES, BenchCase
from .families import FAMILIES
from .harness import make_step

PRESET = os.environ.get("FASTKD_BENCH_PRESET", "default")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["cpp", "torch", "triton", "cuda"] + list(BASELINES)


def family_cases(family: str):
    """The preset's cases of one family (FASTKD_BENCH_SHAPE replaces kd_loss's shapes)."""
    module = FAMILIES[family][0]
    if family == "kd" and os.environ.get("FASTKD_BENCH_SHAPE"):
        n, v = (int(x) for x in os.environ["FASTKD_BENCH_SHAPE"].lower().split("x"))
        return module.preset_cases(PRESET, DEVICE, shapes=[(n, v)])
    return module.preset_cases(PRESET, DEVICE)


def case_id(case: BenchCase) -> str:
    return f"{case.name}-{case.dtype}-{case.shape}"


def time_case(benchmark, case: BenchCase, impl_name: str) -> None:
    """Time one implementation of one case with pytest-benchmark's ``benchmark`` fixture."""
    import pytest

    found = case.implementations(DEVICE, [impl_name])  # asks fastkd which backends run here
    if not found:
        pytest.skip(f"{impl_name} does not run {case.loss} on {DEVICE} here")
    args, leaves = case.make_inputs(DEVICE)
    step = make_step(found[0], args, leaves, DEVICE)
    for _ in range(found[0].warmup):  # torch.compile compiles, the native extension loads
        step()
    benchmark.group = case.label
    benchmark.extra_info.update(case.to_dict(), bytes=case.bytes, flops=case.flops, device=DEVICE)
    benchmark.pedantic(step, rounds=20 if DEVICE == "cuda" else 3, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    median = benchmark.stats.stats.median
    if case.bytes:
        benchmark.extra_info["gb_per_s"] = case.bytes / median / 1e9
    if case.flops:
        benchmark.extra_info["tflop_per_s"] = case.flops / median / 1e12
