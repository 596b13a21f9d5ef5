"""Builds (or finds) and loads fastkd's native extension, which registers ``torch.ops.fastkd.*``.

Native code is optional: nothing here runs at import, and a failure only warns once and makes
``load()`` return False, so callers fall back to the other backends.

* ``load()``   -> bool: the ops are registered (idempotent, cached). First ``import fastkd._C``
  (the ahead-of-time build: ``FASTKD_BUILD_EXT=1 pip install --no-build-isolation .``), else
  compile ``fastkd/csrc`` once with ``torch.utils.cpp_extension.load`` (ninja, cached under
  ``TORCH_EXTENSIONS_DIR``). ``FASTKD_NO_NATIVE=1`` disables both.
* ``reason()`` -> str: why native ops are unavailable, ``""`` when they are.
* ``cuda_reason()`` -> str: why the build left out the CUDA kernels (``csrc/cuda``), ``""`` if it did not.
* ``has_op(name)`` -> bool: ``torch.ops.fastkd.<name>`` exists.

After loading, fake (meta) kernels are registered so ``torch.compile`` can trace the ops; every
op fills caller-allocated outputs and returns nothing, so each fake is trivial.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import torch

_NAME = "fastkd_native"
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

_lock = threading.RLock()
_state: dict = {}  # "ok": bool, "reason": str, "how": "aot" | "jit" once load() has run


def _sources() -> tuple[list[str], list[str]]:
    cpp = [os.path.join(_CSRC, "fastkd.cpp")] + sorted(glob.glob(os.path.join(_CSRC, "cpu", "*.cpp")))
    cu = sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cu")))
    return cpp, cu


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _accepts(flag: str) -> bool:
    """Whether the C++ compiler torch will use accepts ``flag`` (compiles and links a stub)."""
    cxx = shutil.which(_compiler())
    if cxx is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            r = subprocess.run([cxx, flag, src, "-o", os.path.join(d, "t")], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


def _cflags() -> tuple[list[str], list[str]]:
    cflags, ldflags = ["-O3"], []
    # at::vec emits AVX2/AVX-512 code only when the compiler may use it; the kernels pick the
    # widest CPU_CAPABILITY the flags allow (csrc/cpu/*.cpp) and fall back to scalar code.
    # FASTKD_MARCH picks the target: "native" (default), "none" (portable scalar build), or any
    # -march value (e.g. x86-64-v3 for an AVX2 build that also runs on older machines).
    march = os.environ.get("FASTKD_MARCH", "native").strip()
    if march and march != "none" and _accepts(f"-march={march}"):
        cflags.append(f"-march={march}")
    # Required for parallelism: at::parallel_for is a `#pragma omp parallel` in a torch header.
    if _accepts("-fopenmp"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _needs_compile(build_dir: str, sources: list[str]) -> bool:
    built = glob.glob(os.path.join(build_dir, _NAME + "*.so"))
    if not built:
        return True
    headers = glob.glob(os.path.join(_CSRC, "**", "*.h"), recursive=True)  # e.g. cpu/vec_math.h
    newest_src = max(os.path.getmtime(p) for p in sources + headers)
    return max(os.path.getmtime(p) for p in built) < newest_src


def _build_dir(ce, cflags: list[str]) -> str:
    """TORCH_EXTENSIONS_DIR/<pyver_device>/fastkd_native-<key>: one cache per checkout, torch
    install and set of flags, so that environments sharing a home directory never rebuild over
    each other."""
    key = hashlib.sha1(f"{_CSRC}|{torch.__file__}|{torch.__version__}|{cflags}".encode()).hexdigest()[:10]
    return ce._get_build_directory(f"{_NAME}-{key}", verbose=False)  # creates it


def _cuda_skip_reason(ce, cu: list[str]) -> str:
    """Why the CUDA sources are left out of the build; "" when they are compiled."""
    if not cu:
        return "there are no CUDA sources"
    if not torch.version.cuda:
        return f"this torch ({torch.__version__}) is a build without CUDA"
    if not ce.CUDA_HOME or not os.path.exists(os.path.join(ce.CUDA_HOME, "bin", "nvcc")):
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit that matches torch)"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch's build picks the architectures from the visible GPUs: with none (a CUDA build of
        # torch on a CPU machine, where pip puts it by default) it fails, CPU kernels and all
        return "no CUDA GPU is visible (set TORCH_CUDA_ARCH_LIST to build for one anyway)"
    return ""


def _jit_load() -> None:
    from torch.utils import cpp_extension as ce

    cpp, cu = _sources()
    cflags, ldflags = _cflags()
    sources, cuda_flags = list(cpp), None
    # CUDA sources compile only where torch has CUDA and nvcc exists; elsewhere the extension
    # holds the CPU kernels alone (and its cache directory differs, by the -D flag below).
    _state["cuda_skip"] = _cuda_skip_reason(ce, cu)
    if not _state["cuda_skip"]:
        sources += cu
        cflags.append("-DFASTKD_WITH_CUDA")
        cuda_flags = ["-O3", "-DFASTKD_WITH_CUDA"]
    build_dir = _build_dir(ce, cflags)
    if _needs_compile(build_dir, sources):
        print(f"fastkd: compiling native kernels (once, cached in {build_dir})", file=sys.stderr, flush=True)
    try:
        ce.load(name=_NAME, sources=sources, extra_cflags=cflags, extra_ldflags=ldflags,
                extra_cuda_cflags=cuda_flags, build_directory=build_dir, is_python_module=False,
                verbose=False)
    except Exception as e:  # noqa: BLE001
        if cuda_flags is None:
            raise
        # the CUDA half failed (e.g. a toolkit torch cannot use): keep the CPU kernels
        _state["cuda_skip"] = "the CUDA sources failed to compile: " + _first_error(e)
        warnings.warn(f"fastkd: {_state['cuda_skip']}; building the CPU kernels alone",
                      RuntimeWarning, stacklevel=3)
        cflags.remove("-DFASTKD_WITH_CUDA")
        build_dir = _build_dir(ce, cflags)
        ce.load(name=_NAME, sources=list(cpp), extra_cflags=cflags, extra_ldflags=ldflags,
                build_directory=build_dir, is_python_module=False, verbose=False)


# Fake kernels. Every fastkd op fills caller-allocated outputs and returns nothing (`-> ()`), so
# its fake kernel is "return None"; it is registered for each such op the library defines, so a
# new op needs no edit here. An op that returns tensors must get its own entry in _FAKES.
def _fake_none(*args, **kwargs):
    return None


_FAKES: dict = {}  # op name -> fake kernel, for ops that return something
_registered_fakes: set = set()


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.fastkd, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _op_names() -> list[str]:
    names = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("fastkd::")}
    return sorted(names)


def _register_fakes() -> None:
    for name in _op_names():
        if name in _registered_fakes:
            continue
        fn = _FAKES.get(name)
        if fn is None:
            if getattr(torch.ops.fastkd, name).default._schema.returns:
                continue  # returns tensors: needs a real fake kernel in _FAKES
            fn = _fake_none
        try:
            torch.library.register_fake(f"fastkd::{name}")(fn)
        except RuntimeError as e:  # someone registered one already
            if "already" not in str(e):
                raise
        _registered_fakes.add(name)


def _first_error(e: Exception) -> str:
    """The line of a build failure worth reading: the first compiler error, else the last line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and "error building extension" not in ln.lower():
            return ln[:300]
    return lines[-1][:300] if lines else type(e).__name__


def load() -> bool:
    """Register ``torch.ops.fastkd.*`` (once); False, with ``reason()`` set, when impossible."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        if os.environ.get("FASTKD_NO_NATIVE", "") not in ("", "0"):
            _state.update(ok=False, reason="native ops disabled by FASTKD_NO_NATIVE=1")
            return False
        aot_error = None
        try:
            import fastkd._C  # noqa: F401  (registers the ops as an import side effect)
            _state["how"] = "aot"
        except ImportError as e:
            if not (isinstance(e, ModuleNotFoundError) and e.name == "fastkd._C"):
                aot_error = f"fastkd._C did not import ({e}); "
            try:
                _jit_load()
                _state["how"] = "jit"
            except Exception as e:  # noqa: BLE001 - any build failure means "no native backend"
                why = (aot_error or "") + "compiling fastkd/csrc failed: " + _first_error(e)
                _state.update(ok=False, reason=why)
                warnings.warn(f"fastkd: native kernels unavailable, using other backends ({why})",
                              RuntimeWarning, stacklevel=2)
                return False
        _register_fakes()
        _state.update(ok=True, reason="")
        return True


def reason() -> str:
    """Why native ops are unavailable; "" when they are loaded."""
    load()
    return _state["reason"]


def cuda_reason() -> str:
    """Why the loaded extension has no CUDA kernels, as far as the build knows; "" otherwise."""
    if not load():
        return _state["reason"]
    if _state.get("how") == "aot":
        return "" if torch.version.cuda else f"this torch ({torch.__version__}) is a build without CUDA"
    return _state.get("cuda_skip", "")


def has_op(name: str) -> bool:
    """Whether ``torch.ops.fastkd.<name>`` is available (loads the extension if needed)."""
    return load() and _op_exists(name)
