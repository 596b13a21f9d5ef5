"""Benchmark cases of the ``kd`` family: kd_loss forward+backward against the code users write.

The baselines are what a distillation script holds today: log-softmax in float32 (``.float()``
upcast, as in most training code), ``F.kl_div`` where it fits, TRL's ``generalized_jsd_loss``
formula for jsd (log-sum-exp mixture), and the skews and tvd written plainly. Each computes the
same value as ``fastkd.kd_loss`` with the case's settings (batchmean over rows, T**2 scaling), so
the harness can check every implementation against eager before it times it.

Bytes moved, for GB/s: one read of the student logits, one read of the teacher logits and one
write of the student gradient, ``3 * N * V * itemsize``. Temporaries are not counted: the point of
a fused kernel is not to have them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .case import (BASELINES, DTYPES, BenchCase, Impl, fastkd_backends, implementations_for,
                   itemsize)

TITLE = "kd_loss, batchmean, T=2, no labels"

__all__ = ["BASELINES", "DIVERGENCES", "DTYPES", "EAGER", "Case", "Impl", "cases",
           "fastkd_backends", "implementations", "make_inputs", "preset_cases"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")

# The settings every case uses; typical of LLM distillation (T > 1 so the scaling is exercised).
TEMPERATURE = 2.0
BETA = 0.5
SKEW = 0.1


@dataclass(frozen=True)
class Case(BenchCase):
    """One problem: ``kd_loss`` on [n, v] logits, the student requiring grad, the teacher not."""

    divergence: str
    dtype: str
    n: int
    v: int
    temperature: float = TEMPERATURE
    beta: float = BETA
    skew: float = SKEW

    family = "kd"
    loss = "kd_loss"
    BYTES_FORMULA = "3*N*V*itemsize: read student + read teacher + write student grad"

    @property
    def name(self) -> str:
        return self.divergence

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.v}"

    @property
    def bytes(self) -> int:
        """Read student + read teacher + write student gradient."""
        return 3 * self.n * self.v * itemsize(self.dtype)

    def make_inputs(self, device, seed: int = 0):
        s, t = make_inputs(self, device, seed)
        return (s, t), (s,)

    def implementations(self, device, selected: Optional[List[str]] = None) -> List[Impl]:
        return implementations(self, device, selected)


def make_inputs(case: Case, device, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student logits (a leaf requiring grad) and teacher logits, both [n, v] in the case dtype."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(case.n, case.v, generator=g, device=device).mul_(2.0).to(case.torch_dtype)
    t = torch.randn(case.n, case.v, generator=g, device=device).mul_(2.0).to(case.torch_dtype)
    return s.requires_grad_(), t


# ----------------------------------------------------------------------------- eager baselines
# Written the way distillation code writes them; all return the batchmean loss times T**2.
def eager_forward_kl(s, t, T, beta, skew):
    log_q = F.log_softmax(s.float() / T, dim=-1)
    log_p = F.log_softmax(t.float() / T, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * T * T


def eager_reverse_kl(s, t, T, beta, skew):
    log_q = F.log_softmax(s.float() / T, dim=-1)
    log_p = F.log_softmax(t.float() / T, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * T * T


def eager_jsd(s, t, T, beta, skew):
    """TRL's generalized_jsd_loss (mixture by logsumexp), batchmean over rows, times T**2."""
    student_log_probs = F.log_softmax(s.float() / T, dim=-1)
    teacher_log_probs = F.log_softmax(t.float() / T, dim=-1)
    beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=s.device)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log(1 - beta), teacher_log_probs + torch.log(beta)]),
        dim=0)
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
    return jsd.sum() / s.shape[0] * T * T


def eager_skew_forward_kl(s, t, T, beta, skew):
    """DistiLLM's skew KL: KL(p || skew p + (1 - skew) q)."""
    log_p = F.log_softmax(t.float() / T, dim=-1)
    p = log_p.exp()
    q = F.softmax(s.float() / T, dim=-1)
    mixed = skew * p + (1 - skew) * q
    return (p * (log_p - torch.log(mixed))).sum(-1).mean() * T * T


def eager_skew_reverse_kl(s, t, T, beta, skew):
    """DistiLLM's skew reverse KL: KL(q || (1 - skew) p + skew q)."""
    log_q = F.log_softmax(s.float() / T, dim=-1)
    q = log_q.exp()
    p = F.softmax(t.float() / T, dim=-1)
    mixed = (1 - skew) * p + skew * q
    return (q * (log_q - torch.log(mixed))).sum(-1).mean() * T * T


def eager_tvd(s, t, T, beta, skew):
    q = F.softmax(s.float() / T, dim=-1)
    p = F.softmax(t.float() / T, dim=-1)
    return 0.5 * (p - q).abs().sum(-1).mean() * T * T


EAGER: Dict[str, Callable] = {
    "forward_kl": eager_forward_kl,
    "reverse_kl": eager_reverse_kl,
    "jsd": eager_jsd,
    "skew_forward_kl": eager_skew_forward_kl,
    "skew_reverse_kl": eager_skew_reverse_kl,
    "tvd": eager_tvd,
}


# ----------------------------------------------------------------------------- implementations
def _liger(case: Case) -> Optional[Callable]:
    """Liger-Kernel's matching loss on log-probabilities, when it is installed (CUDA only)."""
    try:
        if case.divergence == "forward_kl":
            from liger_kernel.transformers import LigerKLDIVLoss

            crit = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        elif case.divergence == "jsd":
            from liger_kernel.transformers import LigerJSD

            crit = LigerJSD(beta=case.beta)
        else:
            return None
    except Exception:  # not installed, or an API it does not have: no baseline
        return None
    T = case.temperature

    def liger(s, t):
        log_q = F.log_softmax(s.float() / T, dim=-1)
        log_p = F.log_softmax(t.float() / T, dim=-1)
        return crit(log_q, log_p) * T * T

    return liger


def implementations(case: Case, device, selected: Optional[List[str]] = None) -> List[Impl]:
    """Every implementation of ``case`` on ``device``, fastkd backends first, then baselines.

    ``selected`` keeps only the names listed (fastkd backend names and baseline names).
    """
    import fastkd

    T, beta, skew = case.temperature, case.beta, case.skew
    eager = EAGER[case.divergence]

    def eager_fn(s, t):
        return eager(s, t, T, beta, skew)

    def ours(backend):
        return functools.partial(fastkd.kd_loss, divergence=case.divergence, temperature=T,
                                 beta=beta, skew=skew, backend=backend)

    liger = _liger(case) if torch.device(device).type == "cuda" else None
    return implementations_for(device, "kd", ours, eager_fn, liger, selected)


def cases(divergences, dtypes, shapes) -> List[Case]:
    """The cross product, shapes outermost then dtype then divergence (the table's order)."""
    return [Case(d, dt, n, v) for (n, v) in shapes for dt in dtypes for d in divergences]


# preset -> device type -> (shapes, dtypes, divergences)
_CPU_DIVS = ("forward_kl", "jsd", "reverse_kl")
PRESETS = {
    "tiny": {"cpu": ([(8, 128)], ["float32"], DIVERGENCES),
             "cuda": ([(64, 1024)], ["float32"], DIVERGENCES)},
    "quick": {"cpu": ([(256, 4096)], ["float32"], ("forward_kl",)),  # compile time: ~1 min budget
              "cuda": ([(2048, 32000)], ["bfloat16"], DIVERGENCES)},
    # the CPU target: 3-6 minutes on 2 cores (eager jsd takes ~6 s a call)
    "default": {"cpu": ([(4096, 32000)], ["float32", "bfloat16"], _CPU_DIVS),
                "cuda": ([(4096, 32000)], ["float32", "bfloat16"], DIVERGENCES)},
    "full": {"cpu": ([(8192, 128256)], ["bfloat16"], DIVERGENCES),  # Llama-3's vocabulary
             "cuda": ([(8192, 128256)], ["bfloat16"], DIVERGENCES)},
}


def preset_cases(preset: str, device_type: str, dtypes: Optional[Sequence[str]] = None,
                 divergences: Optional[Sequence[str]] = None,
                 shapes: Optional[Sequence[Tuple[int, int]]] = None) -> List[Case]:
    """The preset's cases; ``dtypes`` / ``divergences`` / ``shapes`` replace the preset's."""
    p_shapes, p_dtypes, p_divs = PRESETS[preset]["cuda" if device_type == "cuda" else "cpu"]
    return cases(divergences or p_divs, dtypes or p_dtypes, shapes or p_shapes)
