"""pytest-benchmark suite of the relational family: RKD distance and angle, similarity-preserving.

The cases and implementations of ``python -m fastkd.bench --loss relational`` (fastkd/bench/suite.py
says how they are timed and which environment variables pick the shapes):

    python -m pytest benchmarks/test_relational.py --benchmark-only [-k rkd_angle]
"""
import pytest

from fastkd.bench.suite import IMPLS, case_id, family_cases, time_case

CASES = family_cases("relational")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_relational(benchmark, case, impl):
    time_case(benchmark, case, impl)
