"""Triton kernels, one module per loss family (``divergences``: the ``kd`` family).

Importing this package imports neither triton nor anything that touches a GPU; importing a
family module does (and registers its ``fastkd_triton::*`` ops). Triton picks interpreter mode
(``TRITON_INTERPRET=1``, CPU tensors) when a module's kernels are defined, so set that variable
before importing a family module.
"""

import contextlib
import functools

# The launchers pick block sizes, chunking and warps for a GPU on CUDA tensors and smaller ones in
# the interpreter (numpy per op). Tests set this to run the interpreter with the GPU's choices, so
# the arithmetic of exactly the programs a GPU runs is checked without one.
GPU_LAYOUT_ON_CPU = False


def gpu_layout(t) -> bool:
    """Whether a launcher takes its GPU block sizes for tensor ``t``."""
    return t.device.type != "cpu" or GPU_LAYOUT_ON_CPU


FP32_DOT_PRECISIONS = ("ieee", "tf32x3")


def fp32_dot_precision() -> str:
    """``input_precision`` of the fp32 ``tl.dot`` calls that build Gram and score tiles (the
    relational losses, attention relations): ``FASTKD_TRITON_FP32_DOT``, default ``ieee``
    (exact fp32 products: plain FMA, no tensor cores on NVIDIA GPUs). ``tf32x3`` splits each
    operand in two TF32 halves and adds three tensor-core products, close to fp32 accuracy
    (about 1e-6 relative per product instead of 6e-8) at several times the FMA rate. Not yet
    timed or checked on a GPU: opt-in. The interpreter computes both alike."""
    import os

    value = os.environ.get("FASTKD_TRITON_FP32_DOT", "ieee").strip() or "ieee"
    if value not in FP32_DOT_PRECISIONS:
        raise ValueError(f"FASTKD_TRITON_FP32_DOT must be one of {FP32_DOT_PRECISIONS}, got {value!r}")
    return value


def on_tensor_device(launcher):
    """Runs ``launcher`` with the CUDA device of its first argument (a tensor) made current.

    A Triton launch goes to the current CUDA device and that device's current stream, not to the
    device of its tensors (the CUDA C++ ops take a device guard for the same reason). Without
    this, inputs on ``cuda:1`` while ``cuda:0`` is current (HF ``device_map="auto"`` puts the
    lm_head and the loss on the last GPU) would run on the wrong GPU and stream: an error, an
    illegal access, or a read unordered with the kernels that wrote the inputs."""

    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        import torch

        guard = torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext()
        with guard:
            return launcher(first, *args, **kwargs)

    launch.on_tensor_device = True
    return launch
