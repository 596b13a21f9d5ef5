"""pytest-benchmark suite of the attention family: attention transfer, maps and relations.

The cases and implementations of ``python -m fastkd.bench --loss attention`` (fastkd/bench/suite.py
says how they are timed and which environment variables pick the shapes):

    python -m pytest benchmarks/test_attention.py --benchmark-only [-k "map_kl"]
"""
import pytest

from fastkd.bench.suite import IMPLS, case_id, family_cases, time_case

CASES = family_cases("attention")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention(benchmark, case, impl):
    time_case(benchmark, case, impl)
