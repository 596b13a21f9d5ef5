"""Distributed distillation with fastkd on torch.distributed (gloo on CPU, NCCL on GPUs).

    torchrun --nproc_per_node=2 examples/distributed_distill.py

Two things a multi-process trainer does with fastkd:

1. Vocab-parallel LM distillation: the student's and the teacher's lm_heads are split over the
   vocabulary across the ranks (tensor parallelism, as in Megatron-LM); every rank holds the
   same tokens' hidden states. ``fused_linear_kd_loss(..., process_group=group)`` returns the
   loss over the whole vocabulary on every rank, the full hidden-state gradient and each rank's
   slice of the lm_head gradient, communicating only per-token scalars.
2. Global-batch relational distillation: each rank embeds its own part of the batch;
   ``rkd_loss(..., process_group=group)`` all-gathers the embeddings so the relations span the
   whole global batch, and each rank's embeddings get their gradient.

The script checks both against a single-process computation on the gathered tensors and
prints the losses of a few training steps. No downloads; random data.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import fastkd


def vocab_slice(vocab: int, rank: int, world: int) -> slice:
    """Rank r's rows of the vocabulary: near-even, the remainder on the first ranks."""
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class Body(torch.nn.Module):
    """Stand-in for a transformer body: token embedding + MLP, replicated on every rank."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, hidden))

    def forward(self, tokens):
        return self.mlp(self.embed(tokens))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=5003)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per step (every rank)")
    ap.add_argument("--batch", type=int, default=32, help="embeddings per rank (relational)")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                          if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    torch.manual_seed(0)  # the same replicated weights and data on every rank
    hs_dim, ht_dim = 64, 128
    student, teacher = Body(args.vocab, hs_dim).to(device), Body(args.vocab, ht_dim).to(device)
    full_head_s = torch.randn(args.vocab, hs_dim, device=device) * hs_dim ** -0.5
    full_head_t = torch.randn(args.vocab, ht_dim, device=device) * ht_dim ** -0.5
    mine = vocab_slice(args.vocab, rank, world)
    head_s = torch.nn.Parameter(full_head_s[mine].clone())  # this rank's vocabulary rows
    head_t = full_head_t[mine].clone()
    opt = torch.optim.AdamW(list(student.parameters()) + [head_s], lr=3e-3)
    crit = fastkd.FusedLinearKDLoss(divergence="forward_kl", temperature=2.0,
                                    hard_label_weight=0.5, process_group=group)

    # 1) vocab-parallel loss == the single-process loss on the whole vocabulary
    tokens = torch.randint(0, args.vocab, (args.tokens,), device=device)
    labels = torch.roll(tokens, -1)
    with torch.no_grad():
        h_s, h_t = student(tokens), teacher(tokens)
        sharded = crit(h_s, head_s, h_t, head_t, labels)
        whole = fastkd.fused_linear_kd_loss(h_s, full_head_s, h_t, full_head_t, labels,
                                            divergence="forward_kl", temperature=2.0,
                                            hard_label_weight=0.5)
    assert torch.allclose(sharded, whole, rtol=1e-4, atol=1e-5), (sharded, whole)
    if rank == 0:
        print(f"world={world} vocab={args.vocab} slice sizes="
              f"{[vocab_slice(args.vocab, r, world).stop - vocab_slice(args.vocab, r, world).start for r in range(world)]}"
              f" vocab-parallel loss {sharded.item():.6f} == single-process {whole.item():.6f}")

    # 2) global-batch RKD: each rank embeds its own examples
    g = torch.Generator(device="cpu").manual_seed(1 + rank)
    own = torch.randint(0, args.vocab, (args.batch,), generator=g).to(device)
    emb_s = student(own).requires_grad_()
    rkd = fastkd.rkd_loss(emb_s, teacher(own).detach(), process_group=group)
    everything = [torch.empty_like(own) for _ in range(world)]
    dist.all_gather(everything, own)
    everything = torch.cat(everything)
    whole = fastkd.rkd_loss(student(everything), teacher(everything).detach())
    assert torch.allclose(rkd, whole, rtol=1e-4, atol=1e-6), (rkd, whole)
    if rank == 0:
        print(f"global-batch rkd_loss over {world} x {args.batch} embeddings {rkd.item():.6f} "
              f"== single-process {whole.item():.6f}")

    # 3) a few training steps of the vocab-parallel student on one batch (the body is
    #    replicated; its gradient is the same on every rank because fastkd all-reduces the
    #    hidden-state gradient, so the replicas stay identical without further communication)
    with torch.no_grad():
        h_t = teacher(tokens)
    for step in range(args.steps):
        loss = crit(student(tokens), head_s, h_t, head_t, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.5f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
