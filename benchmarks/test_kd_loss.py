"""pytest-benchmark suite of the kd family: kd_loss.

The cases and implementations of ``python -m fastkd.bench --loss kd`` (fastkd/bench/suite.py
says how they are timed and which environment variables pick the shapes):

    python -m pytest benchmarks/test_kd_loss.py --benchmark-only [-k "jsd and bfloat16"]
"""
import pytest

from fastkd.bench.suite import IMPLS, case_id, family_cases, time_case

CASES = family_cases("kd")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kd_loss(benchmark, case, impl):
    time_case(benchmark, case, impl)
