"""Triton kernels, one module per loss family (``divergences``: the ``kd`` family).

Importing this package imports neither triton nor anything that touches a GPU; importing a
family module does (and registers its ``fastkd_triton::*`` ops). Triton picks interpreter mode
(``TRITON_INTERPRET=1``, CPU tensors) when a module's kernels are defined, so set that variable
before importing a family module.
"""
