"""pytest-benchmark suite of the fused_linear family: fused_linear_kd_loss (LM heads).

The cases and implementations of ``python -m fastkd.bench --loss fused_linear``
(fastkd/bench/suite.py says how they are timed and which environment variables pick the shapes):

    python -m pytest benchmarks/test_fused_linear_kd_loss.py --benchmark-only [-k eager]
"""
import pytest

from fastkd.bench.suite import IMPLS, case_id, family_cases, time_case

CASES = family_cases("fused_linear")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_linear_kd_loss(benchmark, case, impl):
    time_case(benchmark, case, impl)
