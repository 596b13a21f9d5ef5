"""Benchmark cases of the ``fused_linear`` family: ``fused_linear_kd_loss`` (LM heads + KD).

The student's hidden states [N, H_s] and lm_head weight [V, H_s] get gradients; the teacher's
[N, H_t] and [V, H_t] are constants. Eager baseline: materialize both logits (``hs @ ws.T``,
``ht @ wt.T``) and apply the ``kd`` family's eager divergence to them (float32 log-softmax,
``F.kl_div``, TRL's jsd), batchmean, times T**2. Liger-Kernel's ``LigerFusedLinearJSD`` is the
third baseline for jsd on GPU.

FLOPs, for TFLOP/s: the four matmuls of a forward+backward, ``2*N*V*H_s`` (student logits) +
``2*N*V*H_t`` (teacher logits) + ``2 * 2*N*V*H_s`` (gradients of hidden states and weight), i.e.
``2*N*V*(3*H_s + H_t)``; the softmax work is small beside them at these sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .case import BenchCase, Impl, generator, implementations_for
from .divergences import BETA, EAGER, SKEW

TITLE = ("fused_linear_kd_loss: lm_head matmuls + kd_loss, gradients to the student's hidden "
         "states and weight, T=2")

TEMPERATURE = 2.0


@dataclass(frozen=True)
class FusedLinearCase(BenchCase):
    divergence: str
    dtype: str
    n: int
    hs: int
    ht: int
    v: int
    temperature: float = TEMPERATURE
    beta: float = BETA
    skew: float = SKEW
    fp32_acc: bool = True  # fused_linear_kd_loss(fp32_grad_accumulation=...)

    family = "fused_linear"
    loss = "fused_linear_kd_loss"
    FLOPS_FORMULA = ("2*N*V*(3*H_s + H_t): student and teacher logits, student hidden and "
                     "weight gradients")

    @property
    def name(self) -> str:
        # the weight gradient summed in the weight's dtype: no V x H float32 buffer
        return self.divergence if self.fp32_acc else f"{self.divergence}/lean-acc"

    @property
    def shape(self) -> str:
        return f"N{self.n},Hs{self.hs},Ht{self.ht},V{self.v}"

    @property
    def flops(self) -> int:
        return 2 * self.n * self.v * (3 * self.hs + self.ht)

    def make_inputs(self, device, seed: int = 0):
        g = generator(device, seed)
        dt = self.torch_dtype

        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, device=device).mul_(scale).to(dt)

        hs = rnd(self.n, self.hs).requires_grad_()
        ws = rnd(self.v, self.hs, scale=self.hs ** -0.5).requires_grad_()
        ht = rnd(self.n, self.ht)
        wt = rnd(self.v, self.ht, scale=self.ht ** -0.5)
        labels = torch.randint(0, self.v, (self.n,), generator=g, device=device)
        return (hs, ws, ht, wt, labels), (hs, ws)

    def implementations(self, device, selected: Optional[List[str]] = None) -> List[Impl]:
        import fastkd

        T, beta, skew, div = self.temperature, self.beta, self.skew, self.divergence
        eager_kd = EAGER[div]

        def eager(hs, ws, ht, wt, labels):
            return eager_kd(hs @ ws.T, ht @ wt.T, T, beta, skew)

        def ours(backend):
            def f(hs, ws, ht, wt, labels):
                return fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, divergence=div,
                                                   temperature=T, beta=beta, skew=skew,
                                                   backend=backend,
                                                   fp32_grad_accumulation=self.fp32_acc)
            return f

        liger = _liger(self) if torch.device(device).type == "cuda" and self.fp32_acc else None
        # the chunks run the kd family's kernel, so its backends are the ones available
        return implementations_for(device, "kd", ours, eager, liger, selected)


def _liger(case: FusedLinearCase):
    """LigerFusedLinearJSD for jsd (its beta is TRL's, as fastkd's), when installed."""
    if case.divergence != "jsd":
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        crit = LigerFusedLinearJSD(jsd_beta=case.beta, temperature=case.temperature)
    except Exception:  # not installed, or an API it does not have: no baseline
        return None
    T = case.temperature

    def liger(hs, ws, ht, wt, labels):
        # shift_labels=None: no row is ignored, as in the other implementations (the bench's
        # labels are all in range and no implementation uses them for a hard loss); it is a
        # required argument in Liger 0.8. Liger leaves out the T**2 scaling.
        return crit(hs, ws, ht, wt, None) * T * T

    return liger


# preset -> device type -> list of (n, hs, ht, v), dtypes, divergences; on GPU, 16-bit cases of
# the full preset also run with the weight gradient summed in the weight's dtype (lean-acc): the
# float32 accumulator alone is V x H_s x 4 bytes, 1 GiB at the target shape
PRESETS = {
    "tiny": {"cpu": ([(16, 8, 12, 64)], ["float32"], ["forward_kl"]),
             "cuda": ([(128, 64, 96, 1024)], ["float32"], ["forward_kl", "jsd"])},
    "quick": {"cpu": ([(256, 64, 128, 4000)], ["float32"], ["forward_kl"]),
              "cuda": ([(2048, 512, 1024, 32000)], ["bfloat16"], ["forward_kl", "jsd"])},
    "default": {"cpu": ([(2048, 512, 1024, 32000)], ["float32"], ["forward_kl"]),
                "cuda": ([(2048, 512, 1024, 32000)], ["float32", "bfloat16"],
                         ["forward_kl", "jsd"])},
    "full": {"cpu": ([(8192, 2048, 4096, 128256)], ["bfloat16"], ["forward_kl"]),
             "cuda": ([(8192, 2048, 4096, 128256)], ["bfloat16"], ["forward_kl", "jsd"])},
}


def preset_cases(preset: str, device_type: str,
                 dtypes: Optional[Sequence[str]] = None) -> List[FusedLinearCase]:
    shapes, p_dtypes, divs = PRESETS[preset]["cuda" if device_type == "cuda" else "cpu"]
    cases = [FusedLinearCase(d, dt, *shape) for shape in shapes for dt in (dtypes or p_dtypes)
             for d in divs]
    if preset == "full" and device_type == "cuda":
        cases += [FusedLinearCase(d, dt, *shape, fp32_acc=False) for shape in shapes
                  for dt in (dtypes or p_dtypes) if dt != "float32" for d in divs[:1]]
    return cases
