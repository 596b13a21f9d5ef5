"""Pure-Python install by default; FASTKD_BUILD_EXT=1 builds the native extension ahead of time.

Without it, fastkd compiles ``fastkd/csrc`` on first use (``fastkd._native``), so an install never
fails for want of a compiler.  ``FASTKD_BUILD_EXT=1 pip install --no-build-isolation .`` builds
``fastkd._C`` here instead (CUDA sources too when torch has CUDA and nvcc is present).
"""
import glob
import importlib.util
import os

from setuptools import setup


def _native_flags(here):
    """(cflags, ldflags) of the JIT build (fastkd/_native.py): -O3, -march from FASTKD_MARCH (default
    native, where the compiler accepts it; without it the kernels are the scalar build) and -fopenmp.
    Loaded from the file, so that building does not import the fastkd package."""
    spec = importlib.util.spec_from_file_location("_fastkd_native_flags", os.path.join(here, "fastkd", "_native.py"))
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    return native._cflags()


ext_modules, cmdclass = [], {}
if os.environ.get("FASTKD_BUILD_EXT") == "1":
    import torch
    from torch.utils import cpp_extension as ce

    here = os.path.dirname(os.path.abspath(__file__))
    srcs = [os.path.relpath(p, here) for p in
            [os.path.join(here, "fastkd", "csrc", "fastkd.cpp")]
            + sorted(glob.glob(os.path.join(here, "fastkd", "csrc", "cpu", "*.cpp")))]
    cuda_srcs = sorted(glob.glob(os.path.join(here, "fastkd", "csrc", "cuda", "*.cu")))
    cflags, ldflags = _native_flags(here)
    # CUDA sources only where torch has CUDA, nvcc exists and the target GPU is known (a visible
    # GPU or TORCH_CUDA_ARCH_LIST), as in the JIT build
    if torch.version.cuda and ce.CUDA_HOME and cuda_srcs and os.path.exists(os.path.join(ce.CUDA_HOME, "bin", "nvcc")) \
            and (os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available()):
        ext = ce.CUDAExtension(
            "fastkd._C", srcs + [os.path.relpath(p, here) for p in cuda_srcs],
            extra_compile_args={"cxx": cflags + ["-DFASTKD_WITH_CUDA"], "nvcc": ["-O3", "-DFASTKD_WITH_CUDA"]},
            extra_link_args=ldflags)
    else:
        ext = ce.CppExtension("fastkd._C", srcs, extra_compile_args=cflags, extra_link_args=ldflags)
    ext_modules = [ext]
    cmdclass = {"build_ext": ce.BuildExtension.with_options(no_python_abi_suffix=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
