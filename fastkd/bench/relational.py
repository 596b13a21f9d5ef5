"""Benchmark cases of the ``relational`` family: RKD distance, RKD angle, similarity-preserving.

One training step each, forward + backward into the student embeddings [N, D] (the teacher's
are a constant), against the authors' code: Park et al.'s RKD (``pdist`` by the Gram identity,
clamp, sqrt, zeroed diagonal, ``d[d > 0].mean()``; angles from the N x N x D difference tensor,
F.normalize and bmm) and Tung and Mori's similarity-preserving loss (as in RepDistiller).

FLOPs, for TFLOP/s, where the loss is Gram-bound: distance and similarity-preserving need the
student's and the teacher's Gram matrices and one N x N by N x D product for the student's
gradient, ``2*N*N*(2*D_s + D_t)`` (student and teacher D are equal here). The angle loss works
on N^3 triplets with no standard FLOP count, so it gets no rate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .case import BenchCase, Impl, generator, implementations_for

TITLE = "rkd_distance_loss, rkd_angle_loss, similarity_preserving_loss on embeddings [N, D]"


# ----------------------------------------------------------------------------- eager baselines
def park_pdist(e, squared=False, eps=1e-12):  # Park et al., RKD (github.com/lenscloth/RKD)
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def eager_rkd_distance(student, teacher):
    with torch.no_grad():
        t_d = park_pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = park_pdist(student)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d)


def eager_rkd_angle(student, teacher):
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle)


def eager_similarity_preserving(f_s, f_t):  # Tung and Mori, as in RepDistiller
    bsz = f_s.shape[0]
    G_s = F.normalize(torch.mm(f_s, f_s.t()))
    G_t = F.normalize(torch.mm(f_t, f_t.t()))
    G_diff = G_t - G_s
    return (G_diff * G_diff).sum() / (bsz * bsz)  # RepDistiller: .view(-1, 1).sum(0), shape [1]


EAGER = {"rkd_distance": eager_rkd_distance, "rkd_angle": eager_rkd_angle,
         "similarity_preserving": eager_similarity_preserving}


@dataclass(frozen=True)
class RelationalCase(BenchCase):
    which: str         # rkd_distance, rkd_angle or similarity_preserving
    dtype: str
    n: int
    d: int

    family = "relational"
    FLOPS_FORMULA = "2*N*N*(2*D_s + D_t): student and teacher Gram + the student gradient"

    @property
    def loss(self) -> str:
        return f"{self.which}_loss"

    @property
    def name(self) -> str:
        return self.which

    @property
    def shape(self) -> str:
        return f"N{self.n},D{self.d}"

    @property
    def flops(self) -> Optional[int]:
        if self.which == "rkd_angle":
            return None
        return 2 * self.n * self.n * 3 * self.d

    def make_inputs(self, device, seed: int = 0):
        g = generator(device, seed)
        s = torch.randn(self.n, self.d, generator=g, device=device).to(self.torch_dtype)
        t = torch.randn(self.n, self.d, generator=g, device=device).to(self.torch_dtype)
        s.requires_grad_()
        return (s, t), (s,)

    def implementations(self, device, selected: Optional[List[str]] = None) -> List[Impl]:
        import fastkd

        fn = getattr(fastkd, self.loss)

        def ours(backend):
            return lambda s, t: fn(s, t, backend=backend)

        return implementations_for(device, self.which, ours, EAGER[self.which], None, selected)


# preset -> ((n, d) for distance and similarity-preserving, (n, d) for angle); float32
_SHAPES = {
    "tiny": ((8, 4), (6, 4)),
    "quick": ((512, 128), (64, 128)),
    "default": ((2048, 512), (256, 512)),   # the CPU targets
    "full": ((16384, 512), (1024, 512)),    # GPU-sized
}


def preset_cases(preset: str, device_type: str,
                 dtypes: Optional[Sequence[str]] = None) -> List[RelationalCase]:
    (n, d), (na, da) = _SHAPES[preset]
    out = []
    for dt in dtypes or ["float32"]:
        out += [RelationalCase("rkd_distance", dt, n, d), RelationalCase("rkd_angle", dt, na, da),
                RelationalCase("similarity_preserving", dt, n, d)]
    return out
