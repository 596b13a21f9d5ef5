"""Command line: ``python -m fastkd.bench [--quick | --full] [filters] [--json FILE]``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from . import BASELINES, DIVERGENCES, format_table, preset, run, write_json
from .divergences import cases as make_cases, fastkd_backends

_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                  "float16": "float16", "fp16": "float16", "half": "float16"}
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
            raise SystemExit(f"fastkd.bench: unknown {what} {raw!r}; choose from {', '.join(allowed)}")
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
        description="kd_loss forward+backward: fastkd backends vs eager PyTorch vs torch.compile "
                    "(vs Liger-Kernel when installed). Default: N=4096, V=32000, float32 and "
                    "bfloat16 (on CPU forward_kl, jsd and reverse_kl; all divergences on GPU).")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes, a smoke test (< 1 min on CPU)")
    size.add_argument("--full", action="store_true", help="GPU-sized shapes: N=8192, V=128256, bfloat16")
    size.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' preset
    p.add_argument("--divergence", help="NAME[,NAME] or 'all' (" + ", ".join(DIVERGENCES) + ")")
    p.add_argument("--backend", help="keep only these implementations: " + ", ".join(_IMPLS))
    p.add_argument("--dtype", help="float32, bfloat16, float16 (comma-separated)")
    p.add_argument("--shape", help="NxV[,NxV] instead of the preset's shapes")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--min-time", type=float, help="seconds of timing per implementation")
    p.add_argument("--isolate", choices=("none", "case", "impl"),
                   help="run each case / implementation in a fresh process (CPU peak memory); "
                        "default: case for the default and full presets, none for --quick")
    p.add_argument("--json", metavar="FILE", help="write every raw number and the device metadata here")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastkd.bench: --device cuda but torch sees no CUDA device")
    name = "quick" if args.quick else "full" if args.full else "tiny" if args.tiny else "default"
    cfg = preset(name, device)
    if args.divergence is not None and args.divergence.strip().lower() == "all":
        divergences = list(DIVERGENCES)
    else:
        divergences = _names(args.divergence, DIVERGENCES, "divergence") or list(cfg["divergences"])
    dtypes = _names(args.dtype, ("float32", "bfloat16", "float16"), "dtype", _DTYPE_ALIASES) or cfg["dtypes"]
    shapes = _shapes(args.shape) if args.shape else cfg["shapes"]
    select = _names(args.backend, _IMPLS, "backend")
    min_time = args.min_time if args.min_time is not None else cfg["min_time"]
    isolate = args.isolate or cfg["isolate"]

    note = None
    if select is None and cfg.get("skip_reference"):
        natives = [b for b in fastkd_backends(device) if b != "torch"]
        if natives:
            select = natives + list(BASELINES)
            note = ("fastkd[torch], the pure-PyTorch reference backend, is left out of this "
                    "preset (seconds per call here); --backend " + ",".join(natives)
                    + ",torch,eager,compile adds it")
    todo = make_cases(divergences, dtypes, shapes)
    print(f"fastkd.bench: {len(todo)} cases on {device} (preset {name}, isolate={isolate}); "
          f"progress below, table on stdout at the end", file=sys.stderr, flush=True)
    settings = {"preset": name, "divergences": divergences, "dtypes": dtypes,
                "shapes": [list(s) for s in shapes], "backends": select, "note": note}
    report = run(todo, device, select, min_time=min_time, isolate=isolate,
                 roofline_bytes=cfg["roofline_bytes"], settings=settings)
    print(format_table(report), end="", flush=True)
    if args.json:
        write_json(report, args.json)
        print(f"fastkd.bench: wrote {args.json}", file=sys.stderr)
    bad = [r for r in report["results"] if r.get("error") or r.get("check") == "MISMATCH"]
    if bad:
        for r in bad:
            print(f"fastkd.bench: {r['divergence']} {r['dtype']} {r['display']}: "
                  f"{r.get('error') or 'result differs from eager'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
