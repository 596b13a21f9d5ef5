"""Gradient buffers for fastkd's autograd Functions, cached on CPU between training steps.

A fresh ``N x V`` CPU buffer is a fresh mmap from glibc, and its first write faults in every page:
at N = 4096, V = 32,000, float32 that costs about twice the kd kernel. ``empty_like`` takes such
buffers (4 MiB and larger, CPU, eager mode, native extension loaded) from a small cache in the C++
extension (``csrc/cpu/buffers.cpp``) instead: when the last tensor using a block dies, the block
goes back to the cache, and the next step's buffer reuses its resident pages. A block is never
handed out while a tensor still references it. Anything else (accelerators, small buffers,
``torch.compile`` tracing, fake or functional tensors under a dispatch mode) gets ``torch.empty``.

The cache holds idle blocks only: at most ``FASTKD_CPU_CACHE_MB`` MiB of them (default: a quarter
of physical memory; ``0`` disables the cache), eight blocks, two of one size; the least recently
freed go first. Idle blocks are memory fastkd keeps between steps, so they count as fastkd's own
(``python -m fastkd.bench`` adds them to fastkd's peak). ``fastkd.empty_cache()`` frees them;
``fastkd.cpu_cache_info()`` reports them.
"""
from __future__ import annotations

import os
import threading

import torch

from . import _native

_MIN_BYTES = 1 << 22  # as kMinBytes in csrc/cpu/buffers.cpp
_lock = threading.Lock()
_state: dict = {}  # "limit": bytes, once applied to the loaded extension


def _default_limit() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def _env_limit() -> int:
    text = os.environ.get("FASTKD_CPU_CACHE_MB", "").strip()
    if not text:
        return _default_limit()
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"FASTKD_CPU_CACHE_MB must be a number of MiB (0 disables), got {text!r}")
    return max(int(mb * 2**20), 0)


def _native_ready() -> bool:
    """The extension is loaded already (never triggers a build: the torch backend needs none)."""
    return _native._state.get("ok") is True and _native._op_exists("cpu_cache_empty")


def configure() -> int:
    """(Re)read ``FASTKD_CPU_CACHE_MB`` and apply it; the limit in bytes, 0 when off."""
    with _lock:
        if not _native_ready():
            _state.pop("limit", None)
            return 0
        limit = _env_limit()
        torch.ops.fastkd.cpu_cache_set_limit(limit)
        _state["limit"] = limit
        return limit


def _enabled() -> bool:
    limit = _state.get("limit")
    if limit is None:
        if not _native_ready():
            return False
        limit = configure()
    return limit > 0


def _cacheable(x: torch.Tensor) -> bool:
    # is_compiling() first: under torch.compile the rest is never traced
    return (not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.numel() * x.element_size() >= _MIN_BYTES
            and torch._C._len_torch_dispatch_stack() == 0
            and not isinstance(x, torch._subclasses.FakeTensor) and _enabled())


def empty_like(x: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """A new contiguous tensor of ``x``'s shape, dtype and device: uninitialized, or zeros."""
    if _cacheable(x):
        buf = torch.ops.fastkd.cpu_cache_empty(list(x.shape), x.dtype)
    else:
        buf = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return buf.zero_() if zero else buf


def empty_cache() -> int:
    """Free the idle CPU gradient buffers fastkd keeps for reuse; returns the bytes freed.

    Buffers still in use are untouched: they go back to the cache (or are freed, past its limit)
    when their tensors die.
    """
    if not _native_ready():
        return 0
    return int(torch.ops.fastkd.cpu_cache_release())


_STAT_KEYS = ("limit_bytes", "idle_bytes", "idle_blocks", "in_use_bytes", "in_use_blocks",
              "hits", "misses")


def cpu_cache_info() -> dict:
    """The CPU buffer cache: ``limit_bytes`` (for idle blocks), ``idle_bytes``/``idle_blocks``
    (kept for reuse: fastkd's memory between steps), ``in_use_bytes``/``in_use_blocks`` (held
    by live tensors), ``hits`` and ``misses`` (allocations served from the cache or not)."""
    if not _native_ready():
        return dict.fromkeys(_STAT_KEYS, 0)
    _enabled()  # apply the configured limit before reporting it
    return dict(zip(_STAT_KEYS, (int(v) for v in torch.ops.fastkd.cpu_cache_stats())))
