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
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The settings every case uses; typical of LLM distillation (T > 1 so the scaling is exercised).
TEMPERATURE = 2.0
BETA = 0.5
SKEW = 0.1


@dataclass(frozen=True)
class Case:
    """One problem: ``kd_loss`` on [n, v] logits, the student requiring grad, the teacher not."""

    divergence: str
    dtype: str
    n: int
    v: int
    temperature: float = TEMPERATURE
    beta: float = BETA
    skew: float = SKEW
    family: str = "kd"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def bytes(self) -> int:
        """Read student + read teacher + write student gradient."""
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return 3 * self.n * self.v * itemsize

    @property
    def label(self) -> str:
        return f"{self.divergence} {self.dtype} {self.n}x{self.v}"

    def to_dict(self) -> dict:
        return asdict(self)


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
@dataclass
class Impl:
    """A named way to compute one case: ``fn(student, teacher) -> scalar loss``."""

    name: str          # what --backend filters on: cpp, torch, triton, cuda, eager, compile, liger
    kind: str          # "fastkd" or "baseline"
    fn: Callable
    warmup: int = 1    # untimed calls before timing (torch.compile compiles on the first)

    @property
    def display(self) -> str:
        return f"fastkd[{self.name}]" if self.kind == "fastkd" else _DISPLAY.get(self.name, self.name)


_DISPLAY = {"compile": "torch.compile", "eager": "eager"}
BASELINES = ("eager", "compile", "liger")


def fastkd_backends(device) -> List[str]:
    """fastkd backends that run natively on ``device`` (never the Triton interpreter on CPU)."""
    import fastkd

    dev = torch.device(device)
    avail = fastkd.available_backends(dev)
    names = [b for b, why in avail.items() if why is None]
    if dev.type != "cuda":
        names = [b for b in names if b != "triton"]
    # fastest first, as the automatic choice orders them
    order = {"cuda": 0, "triton": 1, "cpp": 2, "torch": 3}
    return sorted(names, key=lambda b: order.get(b, 9))


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

    dev = torch.device(device)
    T, beta, skew = case.temperature, case.beta, case.skew
    out: List[Impl] = []
    for b in fastkd_backends(dev):
        fn = functools.partial(fastkd.kd_loss, divergence=case.divergence, temperature=T,
                               beta=beta, skew=skew, backend=b)
        out.append(Impl(b, "fastkd", fn))
    eager = EAGER[case.divergence]

    def eager_fn(s, t):
        return eager(s, t, T, beta, skew)

    out.append(Impl("eager", "baseline", eager_fn))
    out.append(Impl("compile", "baseline", torch.compile(eager_fn, dynamic=False), warmup=2))
    if dev.type == "cuda":
        lig = _liger(case)
        if lig is not None:
            out.append(Impl("liger", "baseline", lig))
    if selected:
        out = [i for i in out if i.name in selected]
    return out


def cases(divergences, dtypes, shapes) -> List[Case]:
    """The cross product, shapes outermost then dtype then divergence (the table's order)."""
    return [Case(d, dt, n, v) for (n, v) in shapes for dt in dtypes for d in divergences]
