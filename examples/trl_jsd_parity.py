"""fastkd's jsd is TRL's generalized JSD: the same number on the same inputs.

TRL's GKD trainer defines the generalized Jensen-Shannon divergence with a weight beta on the
teacher: m = beta * p + (1 - beta) * q, loss = beta KL(p||m) + (1 - beta) KL(q||m), with beta = 0
meaning KL(p||q) and beta = 1 meaning KL(q||p); logits divided by T (no T**2 factor); tokens
whose label is -100 dropped; "batchmean" = sum / number of kept tokens. Below that definition
is written out in plain PyTorch the way TRL's trainer computes it (log-space mixture, F.kl_div),
and compared with fastkd.kd_loss(divergence="jsd", scale_temperature=False).

    python examples/trl_jsd_parity.py
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fastkd


def generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
    """The generalized JSD of TRL's GKD, batchmean over tokens whose label is not -100."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        per = F.kl_div(s, t, reduction="none", log_target=True)          # KL(p || q)
    elif beta == 1:
        per = F.kl_div(t, s, reduction="none", log_target=True)          # KL(q || p)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        per = beta * F.kl_div(m, t, reduction="none", log_target=True) + \
            (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True)
    if labels is not None:
        mask = labels != -100
        return per[mask].sum() / mask.sum()
    return per.sum() / (per.shape[0] * per.shape[1])


def compare(beta: float, temperature: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 9, 503, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2, 9, 503, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 503, (2, 9), generator=g)
    labels[0, :4] = -100
    ours = fastkd.kd_loss(student, teacher, labels, divergence="jsd", beta=beta,
                          temperature=temperature, scale_temperature=False)
    theirs = generalized_jsd(student, teacher, labels, beta=beta, temperature=temperature)
    return ours, theirs


def main():
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for T in (1.0, 2.0):
            ours, theirs = compare(beta, T)
            print(f"beta={beta:.1f} T={T:.0f}: fastkd {ours.item():.10f}  TRL formula "
                  f"{theirs.item():.10f}  |diff| {abs(ours - theirs).item():.1e}")


if __name__ == "__main__":
    main()
