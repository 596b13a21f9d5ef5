"""Triton kernels, one module per loss family (``divergences``: the ``kd`` family).

Importing this package imports neither triton nor anything that touches a GPU; importing a
family module does (and registers its ``fastkd_triton::*`` ops). Triton picks interpreter mode
(``TRITON_INTERPRET=1``, CPU tensors) when a module's kernels are defined, so set that variable
before importing a family module.
"""

# The launchers pick block sizes, chunking and warps for a GPU on CUDA tensors and smaller ones in
# the interpreter (numpy per op). Tests set this to run the interpreter with the GPU's choices, so
# the arithmetic of exactly the programs a GPU runs is checked without one.
GPU_LAYOUT_ON_CPU = False


def gpu_layout(t) -> bool:
    """Whether a launcher takes its GPU block sizes for tensor ``t``."""
    return t.device.type != "cpu" or GPU_LAYOUT_ON_CPU
