"""Child process of ``fastkd.bench`` (isolate="case" / "impl"): runs one case in a fresh process.

Reads a spec from stdin: {"case": {...}, "device", "select", "min_time", "max_reps"}; reports
every implementation's start and result as a line on stdout (``harness.child_main``).
"""
import json
import sys

from .harness import child_main


def main() -> int:
    child_main(json.load(sys.stdin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
