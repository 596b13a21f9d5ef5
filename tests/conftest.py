"""Shared test configuration.

The one GPU marker lives here. Without CUDA, Triton kernels run in the interpreter on CPU
tensors; that must be decided before fastkd's Triton modules are imported, hence the env var.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (the README's test command): one worker per core, at most 8, since each worker
    is a torch process of its own (up to about 1 GiB resident each in a 2-core run)."""
    return max(1, min(_cores(), 8))


# Under pytest-xdist the workers share the cores: each takes its share of torch's intra-op
# threads instead of all of them, so the C++ kernels' parallel loops do not oversubscribe the
# machine. (Tests that are about thread counts set them explicitly.)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
    torch.set_num_threads(max(1, _cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def backend_device(backend: str) -> str:
    """Where a backend's tests run: the GPU when there is one, else the CPU (triton interpreted)."""
    if backend == "cpp":
        return "cpu"
    if backend in ("triton", "cuda"):
        return "cuda" if HAS_CUDA else "cpu"
    return "cuda" if HAS_CUDA else "cpu"


def skip_unless_available(backend: str, family: str = "kd") -> str:
    """Skip with the registry's reason when ``backend`` cannot run here; returns the device.

    CI sets FASTKD_REQUIRE_BACKENDS (e.g. "torch,cpp,triton") so that a backend that fails to
    build there fails the run instead of silently skipping.
    """
    import fastkd._backend as B

    device = backend_device(backend)
    why = B.reason(backend, family, torch.device(device).type)
    if why is not None:
        required = os.environ.get("FASTKD_REQUIRE_BACKENDS", "").split(",")
        # a family without a kernel in a working backend skips; a broken backend fails
        if backend in required and not B.lacks_kernel(backend, family):
            pytest.fail(f"backend {backend} is required here but unavailable: {why}")
        pytest.skip(f"backend {backend} unavailable: {why}")
    return device


def require_cuda_kernel(family: str) -> None:
    """At the top of a CUDA-only test module: skip it without a GPU or without the family's CUDA
    kernel; fail instead where FASTKD_REQUIRE_BACKENDS names cuda and the backend is broken."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    import fastkd._backend as B

    why = B.reason("cuda", family, "cuda")
    if why is None:
        return
    if "cuda" in os.environ.get("FASTKD_REQUIRE_BACKENDS", "").split(",") and not B.lacks_kernel("cuda", family):
        pytest.fail(f"backend cuda is required here but unavailable: {why}", pytrace=False)
    pytest.skip(f"backend cuda unavailable: {why}", allow_module_level=True)


def require_triton(family: str = "kd", device: str = "") -> None:
    """At the top of a module that calls fastkd's Triton kernels directly: skip it when the
    triton backend cannot run ``family`` here (not installed, a Triton release the kernels fail
    with, an interpreter that fails with this numpy); fail instead where FASTKD_REQUIRE_BACKENDS
    names triton. ``device="cuda"`` asks about the compiled kernels only (the offline compile
    tests), not about the interpreter."""
    pytest.importorskip("triton")
    import fastkd._backend as B

    why = B.reason("triton", family, device or backend_device("triton"))
    if why is None:
        return
    if "triton" in os.environ.get("FASTKD_REQUIRE_BACKENDS", "").split(",") and not B.lacks_kernel("triton", family):
        pytest.fail(f"backend triton is required here but unavailable: {why}", pytrace=False)
    pytest.skip(f"backend triton unavailable: {why}", allow_module_level=True)
