"""Command line: ``python -m fastkd.bench [--quick | --full] [filters] [--json F] [--plot F.png]``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from . import BASELINES, DIVERGENCES, format_table, preset, run, write_json
from .families import FAMILIES, LOSSES, preset_cases, resolve

_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
                  "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}
_IMPLS = ("torch", "cpp", "triton", "cuda") + BASELINES


def _names(text: Optional[str], allowed, what: str, aliases=None) -> Optional[List[str]]:
    if text is None:
        return None
    out = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if aliases:
            name = aliases.get(name, name)
        if name not in allowed:
            raise SystemExit(f"fastkd.bench: unknown {what} {raw!r}; choose from "
                             f"{', '.join(allowed)}")
        out.append(name)
    return out


def _shapes(text: str):
    shapes = []
    for part in text.split(","):
        try:
            n, v = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"fastkd.bench: --shape wants NxV[,NxV], got {part!r}")
        shapes.append((n, v))
    return shapes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastkd.bench",
        description="Forward+backward of every fastkd loss family (" + ", ".join(FAMILIES)
                    + "): fastkd backends vs eager PyTorch vs torch.compile of the same eager "
                    "code (vs Liger-Kernel when installed and it has the loss). Default: the "
                    "CPU target shapes (kd N=4096, V=32000; fused linear N=2048, H_s=512, "
                    "H_t=1024, V=32000; relational N=2048, D=512, angle N=256; attention maps "
                    "L=512, relations L=1024).")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="small shapes of every family, a smoke test (< 1 min on 2 CPU cores)")
    size.add_argument("--full", action="store_true",
                      help="GPU-sized shapes: kd/sparse N=8192, V=128256 bf16; fused linear "
                           "N=8192, H_s=2048, H_t=4096, V=128256 bf16; rkd N=16384, angle N=1024; "
                           "attention relations B=8, L=4096, D=768 bf16")
    size.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' preset
    p.add_argument("--loss", metavar="NAME[,NAME]",
                   help="families (" + ", ".join(FAMILIES) + ", or lm = sparse_kd + "
                        "fused_linear) or losses (" + ", ".join(LOSSES) + "; the _loss suffix "
                        "may be left out); default: all")
    p.add_argument("--backend", help="keep only these implementations: " + ", ".join(_IMPLS))
    p.add_argument("--divergence", help="kd_loss only: NAME[,NAME] or 'all' ("
                   + ", ".join(DIVERGENCES) + ")")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (comma-separated), for every family")
    p.add_argument("--shape", help="kd_loss only: NxV[,NxV] instead of the preset's shapes")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--min-time", type=float, help="seconds of timing per implementation")
    p.add_argument("--isolate", choices=("none", "case", "impl"),
                   help="run each case / implementation in a fresh process (CPU peak memory); "
                        "default: case for the default and full presets, none for --quick")
    p.add_argument("--json", metavar="FILE",
                   help="write every raw number and the device metadata here")
    p.add_argument("--plot", metavar="FILE.png",
                   help="run each case at the preset's sizes (its batch dimension scaled) and "
                        "draw time and peak memory against size (needs matplotlib)")
    p.add_argument("--list", action="store_true", help="list the cases that would run, and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines on stderr")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastkd.bench: --device cuda but torch sees no CUDA device")
    if args.plot:
        from .plot import require

        try:
            require()  # before minutes of measuring, not after
        except RuntimeError as e:
            raise SystemExit(f"fastkd.bench: {e}")
    name = "quick" if args.quick else "full" if args.full else "tiny" if args.tiny else "default"
    cfg = preset(name, device)
    try:
        losses = resolve(args.loss.split(",")) if args.loss else None
    except ValueError as e:
        raise SystemExit(f"fastkd.bench: {e}")
    if args.divergence is not None and args.divergence.strip().lower() == "all":
        divergences = list(DIVERGENCES)
    else:
        divergences = _names(args.divergence, DIVERGENCES, "divergence")
    dtypes = _names(args.dtype, ("float32", "bfloat16", "float16"), "dtype", _DTYPE_ALIASES)
    shapes = _shapes(args.shape) if args.shape else None
    select = _names(args.backend, _IMPLS, "backend")
    min_time = args.min_time if args.min_time is not None else cfg["min_time"]
    isolate = args.isolate or cfg["isolate"]

    todo = preset_cases(name, device, losses, dtypes, divergences, shapes)
    if args.plot:  # the size sweep: every case at each of the preset's factors
        todo = list(dict.fromkeys(c.scaled(f) for c in todo for f in cfg["sweep"]))
    if not todo:
        raise SystemExit("fastkd.bench: no case matches these filters")
    if args.list:
        for case in todo:
            print(case.label)
        return 0

    skip_reference = select is None and bool(cfg.get("skip_reference"))
    note = ("fastkd[torch], the pure-PyTorch reference backend, is left out of this preset where "
            "a native fastkd backend runs (it is slow here); --backend with torch listed adds it"
            if skip_reference else None)
    print(f"fastkd.bench: {len(todo)} cases on {device} (preset {name}, isolate={isolate}); "
          f"table on stdout at the end", file=sys.stderr, flush=True)
    settings = {"preset": name, "losses": losses, "divergences": divergences, "dtypes": dtypes,
                "kd_shapes": [list(s) for s in shapes] if shapes else None,
                "sweep": list(cfg["sweep"]) if args.plot else None, "backends": select,
                "note": note}
    report = run(todo, device, select, min_time=min_time, isolate=isolate,
                 roofline_bytes=cfg["roofline_bytes"], settings=settings,
                 progress=not args.no_progress, skip_reference=skip_reference,
                 # after each case: a run stopped by a time limit keeps what it measured
                 checkpoint=(lambda partial: write_json(partial, args.json)) if args.json else None)
    print(format_table(report), end="", flush=True)
    if args.json:
        write_json(report, args.json)
        print(f"fastkd.bench: wrote {args.json}", file=sys.stderr)
    if args.plot:
        from .plot import plot

        plot(report, args.plot)
        print(f"fastkd.bench: wrote {args.plot}", file=sys.stderr)
    bad = [r for r in report["results"] if r.get("error") or r.get("check") == "MISMATCH"]
    if bad:
        for r in bad:
            print(f"fastkd.bench: {r['label']} {r['display']}: "
                  f"{r.get('error') or 'result differs from eager'}", file=sys.stderr)
        return 1
    return 0


def script(loss: str, tag: str, results_dir: str, argv: Optional[List[str]] = None) -> int:
    """What benchmarks/bench_<tag>_cpu.py run: ``--loss LOSS --device cpu`` plus their flags and,
    unless --json or --quick is given, ``--json RESULTS_DIR/<tag>-cpu-<date>.json``."""
    import datetime
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    extra = ["--loss", loss] + ([] if "--device" in args else ["--device", "cpu"])
    if "--json" not in args and "--quick" not in args:
        name = f"{tag}-cpu-{datetime.date.today().isoformat()}.json"
        extra += ["--json", os.path.relpath(os.path.join(results_dir, name))]
    return main(extra + args)


if __name__ == "__main__":
    sys.exit(main())
