"""Benchmark cases of the ``sparse_kd`` family: ``sparse_kd_loss`` with a top-k teacher.

The teacher is stored as its top-k logits per token (indices and values); the student's logits
are dense over V. Eager baseline, as distillation code writes it: the student's log-softmax over
V in float32, gathered at the teacher's indices, against the teacher's softmax renormalized over
its k entries (``tail="renormalize"``, forward KL), batchmean, times T**2.

Bytes moved, for GB/s: read the student logits and write their gradient (``2 * N * V *
itemsize``), read the teacher's indices (int64) and values (``N * k * (8 + itemsize)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .case import BenchCase, Impl, generator, implementations_for, itemsize

TITLE = "sparse_kd_loss, top-k teacher renormalized over its k entries, forward_kl, T=2"

TEMPERATURE = 2.0


def eager_sparse_forward_kl(z, idx, vals, T):
    lq = F.log_softmax(z.float() / T, -1).gather(-1, idx)
    lp = F.log_softmax(vals.float() / T, -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean() * T * T


@dataclass(frozen=True)
class SparseCase(BenchCase):
    dtype: str
    n: int
    v: int
    k: int = 64
    temperature: float = TEMPERATURE

    family = "sparse_kd"
    loss = "sparse_kd_loss"
    BYTES_FORMULA = ("2*N*V*itemsize + N*k*(8+itemsize): read student + write student grad + "
                     "read teacher top-k indices and values")

    @property
    def name(self) -> str:
        return "forward_kl"

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.v},k={self.k}"

    @property
    def bytes(self) -> int:
        item = itemsize(self.dtype)
        return 2 * self.n * self.v * item + self.n * self.k * (8 + item)

    def make_inputs(self, device, seed: int = 0):
        g = generator(device, seed)
        z = torch.randn(self.n, self.v, generator=g, device=device).mul_(3.0)
        teacher = torch.randn(self.n, self.v, generator=g, device=device).mul_(3.0)
        vals, idx = teacher.topk(self.k, dim=-1)
        del teacher
        z = z.to(self.torch_dtype).requires_grad_()
        return (z, idx, vals.to(self.torch_dtype)), (z,)

    def implementations(self, device, selected: Optional[List[str]] = None) -> List[Impl]:
        import fastkd

        T = self.temperature

        def eager(z, idx, vals):
            return eager_sparse_forward_kl(z, idx, vals, T)

        def ours(backend):
            def f(z, idx, vals):
                return fastkd.sparse_kd_loss(z, idx, vals, temperature=T, backend=backend)
            return f

        # Liger-Kernel has no top-k teacher loss: no third baseline here.
        return implementations_for(device, "sparse_kd", ours, eager, None, selected)


# preset -> device type -> list of (n, v, k) and dtypes
PRESETS = {
    "tiny": {"cpu": ([(8, 128, 8)], ["float32"]), "cuda": ([(64, 1024, 16)], ["float32"])},
    "quick": {"cpu": ([(256, 4096, 64)], ["float32"]),
              "cuda": ([(2048, 32000, 64)], ["bfloat16"])},
    "default": {"cpu": ([(4096, 32000, 64)], ["float32", "bfloat16"]),
                "cuda": ([(4096, 32000, 64)], ["float32", "bfloat16"])},
    "full": {"cpu": ([(8192, 128256, 64)], ["bfloat16"]),
             "cuda": ([(8192, 128256, 64)], ["bfloat16"])},
}


def preset_cases(preset: str, device_type: str,
                 dtypes: Optional[Sequence[str]] = None) -> List[SparseCase]:
    shapes, p_dtypes = PRESETS[preset]["cuda" if device_type == "cuda" else "cpu"]
    return [SparseCase(dt, n, v, k) for (n, v, k) in shapes for dt in (dtypes or p_dtypes)]
