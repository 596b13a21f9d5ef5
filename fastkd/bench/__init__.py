"""``python -m fastkd.bench``: fastkd's kernels side by side with the code they replace.

For every case (a loss family's problem at one shape and dtype) each available fastkd backend is
measured against eager PyTorch written the usual way, ``torch.compile`` of that same function,
and Liger-Kernel where it is installed and has the loss: median time, speed-up, effective GB/s
and peak memory. ``run`` returns the report that ``format_table`` prints and ``write_json`` saves.

Case families live in their own modules (``divergences`` for ``kd_loss``); ``harness`` measures.
"""
from .divergences import BASELINES, DIVERGENCES, DTYPES, Case, cases, implementations
from .harness import format_table, run, write_json

__all__ = ["BASELINES", "DIVERGENCES", "DTYPES", "Case", "cases", "implementations",
           "format_table", "run", "write_json", "PRESETS", "preset"]

# Per preset and device type: shapes (N, V), dtypes, divergences, seconds per implementation,
# process isolation (CPU memory), bytes of the copy that measures the bandwidth roofline, and
# skip_reference: leave out fastkd's pure-PyTorch reference backend when a native one runs (on
# CPU at these shapes it takes seconds per call and is no one's choice; --backend adds it).
_CPU_DEFAULT_DIVS = ("forward_kl", "jsd", "reverse_kl")
PRESETS = {
    "tiny": {  # the test suite's: seconds in all
        "cpu": dict(shapes=[(8, 128)], dtypes=["float32"], divergences=DIVERGENCES,
                    min_time=0.02, isolate="none", roofline_bytes=8 * 2**20),
        "cuda": dict(shapes=[(64, 1024)], dtypes=["float32"], divergences=DIVERGENCES,
                     min_time=0.02, isolate="none", roofline_bytes=64 * 2**20),
    },
    "quick": {  # a smoke test: well under a minute on 2 CPU cores, compile included
        "cpu": dict(shapes=[(256, 4096)], dtypes=["float32"], divergences=DIVERGENCES,
                    min_time=0.1, isolate="none", roofline_bytes=64 * 2**20),
        "cuda": dict(shapes=[(2048, 32000)], dtypes=["bfloat16"], divergences=DIVERGENCES,
                     min_time=0.1, isolate="none", roofline_bytes=256 * 2**20),
    },
    "default": {  # the CPU target shape; 3-6 minutes on 2 cores (eager jsd takes ~6 s a call)
        "cpu": dict(shapes=[(4096, 32000)], dtypes=["float32", "bfloat16"],
                    divergences=_CPU_DEFAULT_DIVS, min_time=2.0, isolate="case",
                    roofline_bytes=256 * 2**20, skip_reference=True),
        "cuda": dict(shapes=[(4096, 32000)], dtypes=["float32", "bfloat16"],
                     divergences=DIVERGENCES, min_time=0.2, isolate="none",
                     roofline_bytes=2**30),
    },
    "full": {  # LLM-sized: Llama-3 vocabulary
        "cpu": dict(shapes=[(8192, 128256)], dtypes=["bfloat16"], divergences=DIVERGENCES,
                    min_time=2.0, isolate="case", roofline_bytes=256 * 2**20, skip_reference=True),
        "cuda": dict(shapes=[(8192, 128256)], dtypes=["bfloat16"], divergences=DIVERGENCES,
                     min_time=0.5, isolate="none", roofline_bytes=2**30),
    },
}


def preset(name: str, device_type: str) -> dict:
    """A copy of the preset's settings for ``device_type`` ("cpu" or "cuda")."""
    table = PRESETS[name]
    return dict(table["cuda" if device_type == "cuda" else "cpu"])
