"""``python -m fastkd.bench``: fastkd's kernels side by side with the code they replace.

For every case (one loss's problem at one shape and dtype) each available fastkd backend is
measured against eager PyTorch written the usual way, ``torch.compile`` of that same function,
and Liger-Kernel where it is installed and has the loss: median time, speed-up, GB/s or TFLOP/s
from explicit byte and FLOP counts, and peak memory. ``run`` returns the report that
``format_table`` prints, ``write_json`` saves and ``plot.plot`` draws.

Case families live in their own modules (``divergences`` for kd_loss, ``sparse``,
``fused_linear``, ``attention``, ``relational``; ``families`` lists them); ``harness`` measures.
"""
from .case import BASELINES, DTYPES, BenchCase, Impl
from .divergences import DIVERGENCES, Case, cases, implementations
from .families import FAMILIES, LOSSES, preset_cases
from .harness import format_table, run, write_json

__all__ = ["BASELINES", "DIVERGENCES", "DTYPES", "FAMILIES", "LOSSES", "BenchCase", "Case", "Impl",
           "cases", "implementations", "preset_cases", "format_table", "run", "write_json",
           "PRESETS", "preset"]

# Run settings per preset and device type (the shapes are each family's, in its module): seconds
# of timing per implementation, process isolation (CPU memory), bytes of the copy that measures
# the bandwidth roofline, the size factors ``--plot`` sweeps the batch dimension over, and
# skip_reference: leave out fastkd's pure-PyTorch reference backend when a native one runs (on
# CPU at these shapes it takes seconds per call and is no one's choice; --backend adds it).
PRESETS = {
    "tiny": {  # the test suite's: seconds in all
        "cpu": dict(min_time=0.02, isolate="none", roofline_bytes=8 * 2**20, sweep=(0.5, 1.0)),
        "cuda": dict(min_time=0.02, isolate="none", roofline_bytes=64 * 2**20, sweep=(0.5, 1.0)),
    },
    "quick": {  # a smoke test of every family: under a minute on 2 CPU cores, compile included
        "cpu": dict(min_time=0.05, isolate="none", roofline_bytes=64 * 2**20, sweep=(0.5, 1.0),
                    skip_reference=True),
        "cuda": dict(min_time=0.1, isolate="none", roofline_bytes=256 * 2**20, sweep=(0.5, 1.0)),
    },
    "default": {  # the CPU targets; 10-15 minutes on 2 cores
        "cpu": dict(min_time=2.0, isolate="case", roofline_bytes=256 * 2**20,
                    sweep=(0.25, 0.5, 1.0), skip_reference=True),
        "cuda": dict(min_time=0.2, isolate="none", roofline_bytes=2**30, sweep=(0.25, 0.5, 1.0)),
    },
    "full": {  # GPU-sized: Llama-3's vocabulary, 16k-row embedding batches
        "cpu": dict(min_time=2.0, isolate="case", roofline_bytes=256 * 2**20,
                    sweep=(0.25, 0.5, 1.0), skip_reference=True),
        "cuda": dict(min_time=0.5, isolate="none", roofline_bytes=2**30, sweep=(0.25, 0.5, 1.0)),
    },
}


def preset(name: str, device_type: str) -> dict:
    """A copy of the preset's run settings for ``device_type`` ("cpu" or "cuda")."""
    return dict(PRESETS[name]["cuda" if device_type == "cuda" else "cpu"])
