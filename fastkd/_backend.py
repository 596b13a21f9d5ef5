"""Backend registry: which implementations of a loss family can run on given tensors, and why not.

Each family (``"kd"`` for now) has one forward op per backend with the same signature (see
``fastkd/reference/divergences.py`` for the contract):

    torch   fastkd.reference.<family>.<op>           anywhere
    cpp     torch.ops.fastkd.<op>   (CPU kernel)      CPU tensors, when the native build loads
    cuda    torch.ops.fastkd.<op>   (CUDA kernel)     CUDA tensors, when built with CUDA kernels
    triton  torch.ops.fastkd_triton.<op>              CUDA tensors; CPU tensors under TRITON_INTERPRET=1

``choose`` picks the first available backend in a per-device order unless one is forced by
the ``backend=`` argument or the ``FASTKD_BACKEND`` environment variable; a forced backend that
cannot run raises with the reason. Nothing here touches a GPU at import.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")

# family -> (reference module, op name). The op name is shared by every backend.
FAMILIES: Dict[str, tuple] = {
    "kd": ("fastkd.reference.divergences", "kd_fwd"),
    "sparse_kd": ("fastkd.reference.sparse", "sparse_kd_fwd"),
    "rkd_distance": ("fastkd.reference.relational", "rkd_distance_fwd"),
    "rkd_angle": ("fastkd.reference.relational", "rkd_angle_fwd"),
    "similarity_preserving": ("fastkd.reference.relational", "similarity_preserving_fwd"),
    "attention_transfer": ("fastkd.reference.attention", "attention_transfer_fwd"),
    "attention_map": ("fastkd.reference.attention", "attention_map_fwd"),
    # its backward op, attention_relation_bwd, sits next to it in every backend
    "attention_relation": ("fastkd.reference.attention", "attention_relation_fwd"),
}

# Automatic choice, fastest first. The triton interpreter is for tests only, never automatic.
# On CUDA, where a family has both GPU kernels, the choice per shape class is measured
# (fastkd/_tuning.py); this order is the fallback where no measurement may run (tracing, CUDA
# graph capture, FASTKD_AUTOTUNE=0 without a recorded choice). Triton first there: the Triton
# kernels at least run in CI (interpreted), the CUDA ones have only been compiled so far.
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}
# Families whose CUDA kernel has passed the test suite on a GPU. Only these take part in the
# measured choice: a kernel that has never run could be fast and wrong. (Empty so far: the CUDA
# kernels have only been compiled. benchmarks/gpu_report.py's tests and tune stages say which to add.)
CUDA_VERIFIED: frozenset = frozenset()


# The oldest Triton release each family's kernels pass their tests with (run in Triton's
# interpreter against 3.0 to 3.9): 3.0 and 3.1 gave wrong losses for every family, and Triton
# before 3.5 rejects the float64 tl.dot of the angle kernel's Gram tiles.
TRITON_MIN = (3, 2)
TRITON_MIN_FAMILY = {"rkd_angle": ((3, 5), "its Gram tiles use a float64 tl.dot")}
# Triton's interpreter before 3.7 turns 1-element arrays into Python ints (every loop over a
# runtime bound does), which numpy 2.4 refuses.
INTERPRETER_NUMPY = ((3, 7), (2, 4))


def _release(version: str) -> tuple:
    """(major, minor) of a version string such as '3.6.0' or '3.5.1+git1234'."""
    parts = [int(re.match(r"\d*", piece).group() or 0) for piece in version.split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts)))


def _versions() -> tuple:
    """The installed (triton, numpy) versions as strings (a separate function so tests can fake
    them); numpy "0" when it is missing (compiled Triton kernels do not need it)."""
    import triton

    try:
        import numpy
    except ImportError:
        return triton.__version__, "0"
    return triton.__version__, numpy.__version__


def _triton_reason(family: str, device_type: str) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    module = FAMILIES[family][0].replace("fastkd.reference.", "fastkd.triton.")
    if importlib.util.find_spec(module) is None:
        return f"no triton kernel for {family} yet"
    if device_type not in ("cuda", "cpu"):
        return f"triton does not run on {device_type} tensors"
    interpreted = device_type == "cpu"
    if interpreted and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1 (the interpreter, for tests)"
    triton_version, numpy_version = _versions()
    least, why = TRITON_MIN_FAMILY.get(family, (TRITON_MIN, "the oldest fastkd's Triton kernels pass their tests with"))
    if _release(triton_version) < least:
        return (f"triton {triton_version} is too old for fastkd's {family} kernel: it needs triton >= "
                f"{least[0]}.{least[1]} ({why}); upgrade triton (with a matching torch) or pick another backend")
    fixed, numpy_breaks = INTERPRETER_NUMPY
    if interpreted and _release(triton_version) < fixed and _release(numpy_version) >= numpy_breaks:
        return (f"the interpreter of triton {triton_version} fails with numpy {numpy_version} (it converts "
                f"1-element arrays to ints, which numpy >= {numpy_breaks[0]}.{numpy_breaks[1]} refuses): "
                f"use triton >= {fixed[0]}.{fixed[1]} or numpy < {numpy_breaks[0]}.{numpy_breaks[1]}")
    return None


def _native_reason(family: str, device_type: str) -> Optional[str]:
    from . import _native

    want = {"cpp": "cpu", "cuda": "cuda"}
    if not _native.load():
        return "native extension unavailable: " + _native.reason()
    op = FAMILIES[family][1]
    if not _native.has_op(op):
        return f"the native extension has no {op} op"
    key = "CPU" if device_type == "cpu" else "CUDA"
    if device_type not in want.values() or not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fastkd::{op}", key):
        # the registry is the truth: a family gets `cuda` exactly when csrc/cuda registers its op
        # under the CUDA key (and keeps `triton` otherwise)
        why = _native.cuda_reason() if key == "CUDA" else ""
        return f"no {key} kernel for fastkd::{op} in the native extension" + (f" ({why})" if why else "")
    return None


def lacks_kernel(backend: str, family: str) -> bool:
    """True when ``backend`` works here but has no kernel for ``family`` (as opposed to a backend
    that failed to install or build): the tests skip the first and, where a backend is
    required, fail on the second."""
    if backend == "triton":
        module = FAMILIES[family][0].replace("fastkd.reference.", "fastkd.triton.")
        return importlib.util.find_spec("triton") is not None and importlib.util.find_spec(module) is None
    if backend == "cuda":
        from . import _native

        return (_native.load() and _native.cuda_reason() == "" and _native.has_op(FAMILIES[family][1])
                and not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastkd::{FAMILIES[family][1]}", "CUDA"))
    return False


def check_name(backend) -> None:
    """A ValueError unless ``backend`` is None or one of BACKENDS."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def reason(backend: str, family: str, device_type: str) -> Optional[str]:
    """None when ``backend`` can run ``family`` on ``device_type`` tensors, else why not."""
    if backend is None:
        raise ValueError(f"backend must be one of {BACKENDS}, got None")
    check_name(backend)
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason(family, device_type)
    if backend == "cpp" and device_type != "cpu":
        return f"cpp runs on CPU tensors, these are on {device_type}"
    if backend == "cuda" and device_type != "cuda":
        return f"cuda runs on CUDA tensors, these are on {device_type}"
    return _native_reason(family, device_type)


def available_backends(device="cpu", family: str = "kd") -> Dict[str, Optional[str]]:
    """Map each backend to None if it can run ``family`` on ``device`` here, else the reason.

    >>> fastkd.available_backends("cpu")
    {'torch': None, 'cpp': None, 'triton': 'triton runs on CPU tensors only under ...', 'cuda': '...'}
    """
    device_type = torch.device(device).type
    return {b: reason(b, family, device_type) for b in BACKENDS}


# torch.compile evaluates this once while tracing and keeps the value as a constant: the
# dynamo of torch 2.4 cannot trace os.environ.get (Mapping.get is in its skip list).
@torch.compiler.assume_constant_result
def env(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, for code that torch.compile traces."""
    return os.environ.get(name, default)


def choose(family: str, device: torch.device, backend: Optional[str] = None,
           dtype: Optional[torch.dtype] = None, size: Optional[int] = None) -> str:
    """The backend to run ``family`` with on ``device``: forced, from the environment, or auto.

    ``dtype`` and ``size`` (the family's class size, see ``fastkd._tuning.SIZE_OF``) let the
    automatic choice on CUDA take whichever of triton and cuda measured faster for that class.
    """
    forced = backend if backend is not None else (env("FASTKD_BACKEND") or None)
    index = None
    if device.type == "cuda" and forced is None and size is not None:
        index = device.index if device.index is not None else torch.cuda.current_device()
    return _choose(family, device.type, forced, backend is not None, index, dtype,
                   None if size is None else int(size))


# torch.compile evaluates this once while tracing and keeps the answer as a constant, instead
# of tracing into the native loader (file system, compiler, locks) or the tuning table.
@torch.compiler.assume_constant_result
def _choose(family: str, device_type: str, forced: Optional[str], from_argument: bool,
            device_index: Optional[int] = None, dtype: Optional[torch.dtype] = None,
            size: Optional[int] = None) -> str:
    if forced is not None:
        why = reason(forced, family, device_type)
        if why is not None:
            source = "backend=" if from_argument else "FASTKD_BACKEND="
            raise RuntimeError(f"{source}{forced!r} cannot run {family} here: {why}")
        return forced
    ready = [name for name in _AUTO_ORDER.get(device_type, ("torch",))
             if reason(name, family, device_type) is None]
    gpu = [name for name in ready if name == "triton" or (name == "cuda" and family in CUDA_VERIFIED)]
    if device_index is not None and dtype is not None and len(gpu) > 1:
        from . import _tuning

        picked = _tuning.pick(family, device_index, dtype, size, gpu)
        if picked is not None:
            return picked
    return ready[0] if ready else "torch"


def op(family: str, backend: str) -> Callable:
    """The forward op of ``family`` for ``backend`` (all share one signature).

    Plain import statements, not importlib: torch.compile(fullgraph=True) traces them.
    """
    module, name = FAMILIES[family]
    if backend == "torch":
        from . import reference

        return getattr(getattr(reference, module.rsplit(".", 1)[1]), name)
    if backend == "triton":  # importing a family module registers its fastkd_triton ops
        if family == "kd":
            from .triton import divergences  # noqa: F401
        elif family == "sparse_kd":
            from .triton import sparse  # noqa: F401
        elif family in ("rkd_distance", "rkd_angle", "similarity_preserving"):
            from .triton import relational  # noqa: F401
        elif family in ("attention_transfer", "attention_map", "attention_relation"):
            from .triton import attention  # noqa: F401
        return getattr(torch.ops.fastkd_triton, name)
    return getattr(torch.ops.fastkd, name)
