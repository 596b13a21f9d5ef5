"""``--plot FILE.png``: time and peak memory against problem size, one row of panels per case.

The CLI runs the selected cases at the preset's size sweep (the batch dimension scaled by each of
the preset's factors); every case series (loss, variant, dtype, the other dimensions) gets a row
with two panels, median time and peak memory against that dimension, a line per implementation.
matplotlib comes with the optional ``bench`` extra.
"""
from __future__ import annotations

from typing import Dict, List

MISSING = ("--plot needs matplotlib, which is not installed; install it with "
           "pip install 'fastkd[bench]' (or pip install matplotlib)")


def require() -> None:
    """Raise RuntimeError with an install hint when matplotlib is missing (before any run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise RuntimeError(MISSING) from e


def plot(report: dict, path: str) -> List[str]:
    """Draw ``report`` into ``path`` (PNG); returns the series drawn, in order."""
    require()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    series: Dict[str, List[dict]] = {}
    for r in report["results"]:
        if r.get("error") is None:
            series.setdefault(r["series"], []).append(r)
    if not series:
        raise ValueError("nothing to plot: every implementation failed")
    m = report["meta"]
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 2.8 * len(series)), squeeze=False)
    for (name, rows), (ax_t, ax_m) in zip(series.items(), axes):
        for impl in dict.fromkeys(r["display"] for r in rows):
            pts = sorted((r["size"], r["median_s"] * 1e3, r["peak_bytes"]) for r in rows
                         if r["display"] == impl)
            xs = [p[0] for p in pts]
            ax_t.plot(xs, [p[1] for p in pts], marker="o", label=impl)
            mem = [(x, p[2] / 2**20) for x, p in zip(xs, pts) if p[2] is not None]
            if mem:
                ax_m.plot([x for x, _ in mem], [y for _, y in mem], marker="o", label=impl)
        size_name = rows[0]["size_name"]
        ax_t.set(title=name, xlabel=size_name, ylabel="median ms", xscale="log", yscale="log")
        ax_m.set(title=name, xlabel=size_name, ylabel="peak MiB", xscale="log")
        ax_m.set_ylim(bottom=0)
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize="small")
    fig.suptitle(f"fastkd.bench, forward+backward: {m['device_type']} ({m['device_name']}), "
                 f"torch {m['torch']}, {m['date']}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return list(series)
