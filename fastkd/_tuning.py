"""Measured choice between the two GPU backends (triton, cuda), per op family and shape class.

Where a family has both a Triton and a CUDA kernel, neither wins everywhere (row length, dtype
and GPU move the balance), so the automatic choice (``backend=None``) on CUDA tensors asks this
module, which answers from the first of:

1. choices measured in this process;
2. the user's tuning cache, ``$FASTKD_TUNING_CACHE`` (a JSON file; default
   ``$XDG_CACHE_HOME/fastkd/backend_tuning.json``, i.e. ``~/.cache/...``);
3. the tables shipped with fastkd, ``fastkd/tuning/*.json``, measured by
   ``benchmarks/gpu_report.py`` on the GPUs named in them;
4. a measurement now (unless ``FASTKD_AUTOTUNE=0``): forward + backward of each backend on
   synthetic inputs of the class's representative shape (never the caller's tensors), a few
   milliseconds once per class and process, then saved to the cache of 2. Never while
   torch.compile traces or a CUDA graph is being captured: those calls take the static order
   (``_backend._AUTO_ORDER``) without recording anything.

A shape class is (device name, fastkd version, family, dtype, size bucket), where the size is the
dimension that decides how a kernel lays out its work (``SIZE_OF``) and the bucket is the next
power of two. Choices are per class, so one process always runs a class on one backend
(results stay bitwise reproducible within a process and, once cached, across processes).
``fastkd.autotune_backends()`` measures every class up front.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import threading
import time
from typing import Dict, Iterable, Optional, Sequence

import torch

GPU_BACKENDS = ("triton", "cuda")
# family -> the size that defines its shape class (what the kernels' work layout depends on)
SIZE_OF = {"kd": "row length (vocabulary)", "sparse_kd": "row length (vocabulary)",
           "attention_map": "sequence length L", "rkd_distance": "batch N"}
DTYPES = ("bfloat16", "float16", "float32")
# the buckets autotune_backends() measures when not told
DEFAULT_SIZES = {"kd": (4096, 32768, 131072, 262144), "sparse_kd": (4096, 32768, 131072, 262144),
                 "attention_map": (128, 512, 2048), "rkd_distance": (1024, 4096, 16384)}
_SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "tuning")

_lock = threading.Lock()
_measured: Dict[str, Dict[str, dict]] = {}   # device key -> class key -> entry (this process)
_failed: set = set()                          # (device key, class key) whose measurement failed
_files: Dict[str, Dict[str, Dict[str, dict]]] = {}


def bucket(size: int) -> int:
    """The shape class of a size: the next power of two (at least 64)."""
    b = 64
    while b < size:
        b *= 2
    return b


def class_key(family: str, dtype: str, size: int) -> str:
    return f"{family}|{dtype}|{bucket(size)}"


def device_key(device_index: int) -> str:
    from . import __version__

    return f"{torch.cuda.get_device_name(device_index)}|fastkd {__version__}"


def cache_path() -> str:
    path = os.environ.get("FASTKD_TUNING_CACHE")
    if path:
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastkd", "backend_tuning.json")


def _read(path: str) -> Dict[str, Dict[str, dict]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _shipped() -> Dict[str, Dict[str, dict]]:
    if "shipped" not in _files:
        table: Dict[str, Dict[str, dict]] = {}
        for path in sorted(glob.glob(os.path.join(_SHIPPED_DIR, "*.json"))):
            for dev, classes in _read(path).items():
                table.setdefault(dev, {}).update(classes)
        _files["shipped"] = table
    return _files["shipped"]


def _cached() -> Dict[str, Dict[str, dict]]:
    path = cache_path()
    if _files.get("cache_path") != path:
        _files["cache_path"] = path
        _files["cache"] = _read(path)
    return _files["cache"]


def _save(dev: str, key: str, entry: dict) -> None:
    """Adds one measured class to the cache file (best effort: a read-only home only loses it)."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        data = _read(path)
        data.setdefault(dev, {})[key] = entry
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        _files["cache"] = data
    except OSError:
        pass


def lookup(dev: str, key: str, candidates: Sequence[str]) -> Optional[str]:
    """The recorded choice for a class, from this process, the cache or the shipped tables."""
    for table in (_measured, _cached(), _shipped()):
        entry = table.get(dev, {}).get(key)
        if entry and entry.get("backend") in candidates:
            return entry["backend"]
    return None


def _may_measure() -> bool:
    if os.environ.get("FASTKD_AUTOTUNE", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    # no GPU: nothing can be capturing (the tests measure CPU backends this way)
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def pick(family: str, device_index: int, dtype: torch.dtype, size: int,
         candidates: Sequence[str]) -> Optional[str]:
    """The faster of ``candidates`` for this class, measuring it if it is new; None when no
    choice is recorded and none may be measured now (the caller keeps its static order)."""
    name = str(dtype).replace("torch.", "")
    if family not in SIZE_OF or name not in DTYPES or len(candidates) < 2:
        return None
    dev, key = device_key(device_index), class_key(family, name, size)
    found = lookup(dev, key, candidates)
    if found is not None or not _may_measure():
        return found
    with _lock:
        found = lookup(dev, key, candidates)
        if found is not None or (dev, key) in _failed:
            return found
        try:
            times = measure(family, torch.device("cuda", device_index), name, bucket(size),
                            candidates)
        except Exception:  # noqa: BLE001 - e.g. out of memory: keep the static order
            _failed.add((dev, key))
            return None
        entry = {"backend": min(times, key=times.get), "ms": times}
        _measured.setdefault(dev, {})[key] = entry
        _save(dev, key, entry)
        return entry["backend"]


# ----------------------------------------------------------------------------- measuring
def representative_case(family: str, dtype: str, size: int, elements: int = 64 << 20):
    """A benchmark case (fastkd.bench) of the class: enough rows to fill a GPU (about
    ``elements`` logits / map entries, at least 64 rows)."""
    if family == "kd":
        from .bench.divergences import Case

        return Case("forward_kl", dtype, n=max(64, min(8192, elements // size)), v=size)
    if family == "sparse_kd":
        from .bench.sparse import SparseCase

        return SparseCase(dtype, n=max(64, min(8192, elements // size)), v=size,
                          k=min(64, size))
    if family == "attention_map":
        from .bench.attention import MapCase

        heads = max(1, min(16, elements // (4 * size * size)))
        return MapCase("kl", dtype, b=max(1, elements // (4 * heads * size * size)), heads=heads,
                       l=size)
    if family == "rkd_distance":
        from .bench.relational import RelationalCase

        return RelationalCase("rkd_distance", dtype, n=size, d=256)
    raise ValueError(f"family {family!r} has no measured backend choice (one of {sorted(SIZE_OF)})")


def _median_seconds(step, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(family: str, device, dtype: str, size: int, candidates: Iterable[str],
            warmup: int = 2, reps: int = 7, elements: int = 64 << 20) -> Dict[str, float]:
    """Median milliseconds of forward + backward per backend on the class's representative case
    (also on CPU, e.g. cpp vs torch, which is how it is tested without a GPU)."""
    device = torch.device(device)
    case = representative_case(family, dtype, size, elements)
    # CUDA events record on the current device's stream: make the measured device current
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with torch.enable_grad(), on_device:
        args, leaves = case.make_inputs(device, 0)
        impls = {i.name: i for i in case.implementations(device, selected=list(candidates))
                 if i.kind == "fastkd"}
        missing = [c for c in candidates if c not in impls]
        if missing:
            raise RuntimeError(f"backends {missing} cannot run {family} on {device}")
        out = {}
        for name, impl in impls.items():
            def step(fn=impl.fn):
                for x in leaves:
                    x.grad = None
                fn(*args).backward()

            for _ in range(warmup):
                step()
            out[name] = round(_median_seconds(step, device, reps) * 1e3, 6)
    return out


def autotune_backends(device=None, families: Optional[Sequence[str]] = None,
                      dtypes: Sequence[str] = DTYPES,
                      sizes: Optional[Dict[str, Sequence[int]]] = None,
                      save: bool = True) -> Dict[str, dict]:
    """Measure triton against cuda on every shape class asked for (all families that have both,
    ``DEFAULT_SIZES``), record the faster per class, and return ``{class: {"backend", "ms"}}``.

    device: a CUDA device (default: the current one). With ``save`` the choices also go to the
    tuning cache, so later processes start from them.
    """
    from . import _backend

    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device (the choice is between GPU backends), got {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    dev = device_key(index)
    results: Dict[str, dict] = {}
    for family in families or sorted(SIZE_OF):
        if family not in SIZE_OF:
            raise ValueError(f"families: {family!r} has no measured choice; one of {sorted(SIZE_OF)}")
        cands = [b for b in GPU_BACKENDS if _backend.reason(b, family, "cuda") is None]
        if len(cands) < 2:
            continue
        for name in dtypes:
            if name not in DTYPES:
                raise ValueError(f"dtypes: {name!r} is not one of {DTYPES}")
            for size in (sizes or {}).get(family, DEFAULT_SIZES[family]):
                key = class_key(family, name, size)
                times = measure(family, device, name, bucket(size), cands)
                entry = {"backend": min(times, key=times.get), "ms": times}
                with _lock:
                    _measured.setdefault(dev, {})[key] = entry
                if save:
                    _save(dev, key, entry)
                results[key] = entry
    return results
