"""The benchmark suites are slow: they run only when asked for, with --benchmark-only."""
import pytest


@pytest.fixture(autouse=True)
def _only_when_benchmarking(request):
    if not request.config.getoption("benchmark_only", default=False):
        pytest.skip("benchmarks run with: python -m pytest benchmarks/ --benchmark-only")
