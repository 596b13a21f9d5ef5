"""Child process of ``fastkd.bench`` (isolate="case" / "impl"): runs one case, writes JSON.

Reads a spec from stdin: {"case": {...}, "device", "select", "min_time", "max_reps", "prefix",
"out"}; writes the list of result rows to spec["out"]. Progress goes to stderr as in-process.
"""
import json
import sys

from .divergences import Case
from .harness import run_case


def main() -> int:
    spec = json.load(sys.stdin)
    rows = run_case(Case(**spec["case"]), spec["device"], spec["select"], spec["min_time"],
                    spec["max_reps"], spec["prefix"])
    with open(spec["out"], "w") as f:
        json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
