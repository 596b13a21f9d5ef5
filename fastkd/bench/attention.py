"""Benchmark cases of the ``attention`` family: attention transfer, attention maps, relations.

One training step of the loss each, forward + backward into the student (the teacher is a
constant), against eager PyTorch written the way the papers' code writes it:

* ``attention_transfer_loss``: Zagoruyko and Komodakis' ``at`` / ``at_loss`` (pow, mean,
  F.normalize) on feature maps [B, C, H, W];
* ``attention_map_loss`` kind="kl" on scores [B, H, L, L]: HF-style additive mask, log_softmax /
  softmax / F.kl_div summed over keys, averaged over valid query rows; kind="mse": TinyBERT's
  code (scores carrying the additive mask, entries <= -100 set to 0, F.mse_loss);
* ``attention_relation_loss``: MiniLMv2 (heads split from [B, L, D], X X^T / sqrt(d),
  log_softmax, softmax, F.kl_div summed and divided by B * A * L) for the q-q, k-k and v-v
  relations.

Counts, for GB/s and TFLOP/s: transfer reads both feature maps and writes the student's
gradient, ``(2*C_s + C_t)*B*H*W*itemsize``; maps read both maps and write the gradient,
``3*B*H*L*L*itemsize``; relations are matmul-bound: per relation the student's and teacher's
scores (``2*B*L*L*D_s + 2*B*L*L*D_t``) and the student's gradient (``dS X`` and ``dS^T X``,
``4*B*L*L*D_s``), ``6*B*L*L*(3*D_s + D_t)`` for the three relations (useful FLOPs: fastkd
recomputes the scores in backward rather than store L x L).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .case import BenchCase, Impl, generator, implementations_for, itemsize

TITLE = ("attention_transfer_loss, attention_map_loss (kl and mse, on scores), "
         "attention_relation_loss (q-q, k-k, v-v relations)")


# ----------------------------------------------------------------------------- eager baselines
def at(x):  # Zagoruyko and Komodakis (github.com/szagoruyko/attention-transfer)
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def eager_transfer(s, t):
    return (at(s) - at(t)).pow(2).mean()


def eager_map_kl(s, t, mask):  # scores of [B, H, L, L] with the usual additive mask
    ext = (1.0 - mask[:, None, None, :].to(s.dtype)) * -10000.0
    kl = F.kl_div(F.log_softmax(s + ext, -1), F.softmax(t + ext, -1), reduction="none").sum(-1)
    rows = mask[:, None, :].to(s.dtype)
    return (kl * rows).sum() / (s.shape[1] * rows.sum())


def eager_map_mse(s, t):  # TinyBERT (github.com/huawei-noah/Pretrained-Language-Model)
    s = torch.where(s <= -1e2, torch.zeros_like(s), s)
    t = torch.where(t <= -1e2, torch.zeros_like(t), t)
    return F.mse_loss(s, t)


def minilm_relation(x, y, heads):  # MiniLMv2: [B, L, D] -> [B, A, L, L] relation scores
    B, L, D = x.shape
    d = D // heads
    xh = x.view(B, L, heads, d).transpose(1, 2)
    yh = y.view(B, L, heads, d).transpose(1, 2)
    return xh @ yh.transpose(-1, -2) / math.sqrt(d)


def eager_relation(st, tt, heads):
    B, L = st[0].shape[:2]
    total = 0.0
    for xs, xt in zip(st, tt):
        s = minilm_relation(xs, xs, heads)
        with torch.no_grad():
            t = minilm_relation(xt, xt, heads)
        kl = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="sum")
        total = total + kl / (B * heads * L)
    return total / len(st)


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class TransferCase(BenchCase):
    dtype: str
    b: int
    cs: int
    ct: int
    h: int
    w: int

    family = "attention"
    loss = "attention_transfer_loss"
    SIZE_FIELD, SIZE_NAME = "b", "B (batch)"
    BYTES_FORMULA = "(2*C_s + C_t)*B*H*W*itemsize: read both feature maps + write student grad"

    @property
    def name(self) -> str:
        return "transfer"

    @property
    def shape(self) -> str:
        return f"B{self.b},Cs{self.cs},Ct{self.ct},{self.h}x{self.w}"

    @property
    def bytes(self) -> int:
        return (2 * self.cs + self.ct) * self.b * self.h * self.w * itemsize(self.dtype)

    def make_inputs(self, device, seed: int = 0):
        g = generator(device, seed)
        s = torch.randn(self.b, self.cs, self.h, self.w, generator=g, device=device)
        t = torch.randn(self.b, self.ct, self.h, self.w, generator=g, device=device)
        s = s.to(self.torch_dtype).requires_grad_()
        return (s, t.to(self.torch_dtype)), (s,)

    def implementations(self, device, selected: Optional[List[str]] = None) -> List[Impl]:
        import fastkd

        def ours(backend):
            return lambda s, t: fastkd.attention_transfer_loss(s, t, backend=backend)

        return implementations_for(device, "attention_transfer", ours, eager_transfer, None,
                                   selected)


@dataclass(frozen=True)
class MapCase(BenchCase):
    kind: str          # "kl" (with an attention mask) or "mse" (TinyBERT, mask in the scores)
    dtype: str
    b: int
    heads: int
    l: int  # noqa: E741

    family = "attention"
    loss = "attention_map_loss"
    SIZE_FIELD, SIZE_NAME = "b", "B (batch)"
    BYTES_FORMULA = "3*B*H*L*L*itemsize: read both maps + write student grad"

    @property
    def name(self) -> str:
        return f"map_{self.kind}"

    @property
    def shape(self) -> str:
        return f"B{self.b},H{self.heads},L{self.l}" + (",mask" if self.kind == "kl" else "")

    @property
    def bytes(self) -> int:
        return 3 * self.b * self.heads * self.l * self.l * itemsize(self.dtype)

    def make_inputs(self, device, seed: int = 0):
        g = generator(device, seed)
        B, H, L = self.b, self.heads, self.l
        lengths = torch.randint(L // 2, L + 1, (B,), generator=g, device=device)
        mask = (torch.arange(L, device=device)[None, :] < lengths[:, None]).long()
        s = torch.randn(B, H, L, L, generator=g, device=device).mul_(2.0)
        t = torch.randn(B, H, L, L, generator=g, device=device).mul_(2.0)
        if self.kind == "mse":  # TinyBERT compares scores that carry the additive mask
            ext = (1.0 - mask[:, None, None, :].float()) * -10000.0
            s, t = s + ext, t + ext
        s = s.to(self.torch_dtype).requires_grad_()
        t = t.to(self.torch_dtype)
        return ((s, t, mask) if self.kind == "kl" else (s, t)), (s,)

    def implementations(self, device, selected: Optional[List[str]] = None) -> List[Impl]:
        import fastkd

        if self.kind == "kl":
            eager = eager_map_kl

            def ours(backend):
                return lambda s, t, m: fastkd.attention_map_loss(
                    s, t, kind="kl", inputs="scores", attention_mask=m, backend=backend)
        else:
            eager = eager_map_mse

            def ours(backend):
                return lambda s, t: fastkd.attention_map_loss(s, t, kind="mse", inputs="scores",
                                                              backend=backend)

        return implementations_for(device, "attention_map", ours, eager, None, selected)


@dataclass(frozen=True)
class RelationCase(BenchCase):
    dtype: str
    b: int
    l: int  # noqa: E741
    ds: int
    dt: int
    a: int             # relation heads

    family = "attention"
    loss = "attention_relation_loss"
    SIZE_FIELD, SIZE_NAME = "b", "B (batch)"
    FLOPS_FORMULA = ("6*B*L*L*(3*D_s + D_t): per q-q/k-k/v-v relation both score matmuls + the "
                     "two of the student gradient (useful FLOPs, no recomputation)")

    @property
    def name(self) -> str:
        return "relation"

    @property
    def shape(self) -> str:
        return f"B{self.b},L{self.l},Ds{self.ds},Dt{self.dt},A{self.a}"

    @property
    def flops(self) -> int:
        return 6 * self.b * self.l * self.l * (3 * self.ds + self.dt)

    def make_inputs(self, device, seed: int = 0):
        g = generator(device, seed)
        dt = self.torch_dtype
        st = [torch.randn(self.b, self.l, self.ds, generator=g, device=device).to(dt)
              .requires_grad_() for _ in range(3)]
        tt = [torch.randn(self.b, self.l, self.dt, generator=g, device=device).to(dt)
              for _ in range(3)]
        return (*st, *tt), tuple(st)

    def implementations(self, device, selected: Optional[List[str]] = None) -> List[Impl]:
        import fastkd

        A = self.a

        def eager(q, k, v, tq, tk, tv):
            return eager_relation((q, k, v), (tq, tk, tv), A)

        def ours(backend):
            def f(q, k, v, tq, tk, tv):
                return fastkd.attention_relation_loss((q, k, v), (tq, tk, tv),
                                                      num_relation_heads=A, backend=backend)
            return f

        return implementations_for(device, "attention_relation", ours, eager, None, selected)


# ----------------------------------------------------------------------------- presets
# (transfer (b, cs, ct, h, w), maps (b, heads, l), relations (b, l, ds, dt, a), map kinds) per
# preset; quick has one case per loss (torch.compile's compile time is most of its minute).
# float32 throughout: the eager baselines compute in the input dtype, so in bf16 they would be
# checked against fastkd's fp32 accumulation with bf16 error.
_SHAPES = {
    "tiny": ((2, 4, 6, 4, 4), (2, 2, 8), (2, 8, 8, 12, 2), ("kl", "mse")),
    "quick": ((8, 64, 128, 16, 16), (2, 4, 128), (2, 128, 128, 256, 4), ("kl",)),
    # the CPU targets
    "default": ((32, 256, 512, 32, 32), (4, 12, 512), (2, 1024, 384, 768, 12), ("kl", "mse")),
    # relations: issue 4's H100 target, L=4096, B=8, A_r=12, D=768 in bfloat16 (below)
    "full": ((128, 256, 512, 32, 32), (8, 16, 2048), (8, 4096, 768, 768, 12), ("kl", "mse")),
}
# a preset's relation case in this dtype when no --dtype is given (its target names one)
_RELATION_DTYPE = {"full": "bfloat16"}


def preset_cases(preset: str, device_type: str,
                 dtypes: Optional[Sequence[str]] = None) -> List[BenchCase]:
    transfer, maps, relation, kinds = _SHAPES[preset]
    out: List[BenchCase] = []
    for dt in dtypes or ["float32"]:
        out.append(TransferCase(dt, *transfer))
        out += [MapCase(kind, dt, *maps) for kind in kinds]
        out.append(RelationCase(dt if dtypes else _RELATION_DTYPE.get(preset, dt), *relation))
    return out
