"""pytest-benchmark suite of the sparse_kd family: sparse_kd_loss (top-k teacher).

The cases and implementations of ``python -m fastkd.bench --loss sparse_kd`` (fastkd/bench/suite.py
says how they are timed and which environment variables pick the shapes):

    python -m pytest benchmarks/test_sparse_kd_loss.py --benchmark-only [-k cpp]
"""
import pytest

from fastkd.bench.suite import IMPLS, case_id, family_cases, time_case

CASES = family_cases("sparse_kd")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sparse_kd_loss(benchmark, case, impl):
    time_case(benchmark, case, impl)
