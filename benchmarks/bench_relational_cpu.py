"""CPU benchmark of the relational losses:
``python -m fastkd.bench --loss relational --device cpu``.

    python benchmarks/bench_relational_cpu.py            # the default preset's shapes
    python benchmarks/bench_relational_cpu.py --quick    # small shapes, a smoke run

Kept as a short name for that command (fastkd/bench holds the cases and the measuring); any
``python -m fastkd.bench`` flag works here. Without --json or --quick the results go to
``benchmarks/results/relational-cpu-<date>.json``.
"""
import os
import sys

from fastkd.bench.__main__ import script

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.exit(script("relational", "relational", os.path.join(here, "results")))
