"""Distill a random-config Llama teacher into a smaller student with FusedLinearKDLoss.

No downloads: both models are built from configs with random weights. The loss takes the final
hidden states and the lm_head weights, so neither model's [batch, seq, 32000] logits are ever
materialized in the loss. Run:  python examples/hf_fused_linear_distill.py
Needs the optional extra:       pip install -e ".[hf]"
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastkd


def tiny_llama(hidden: int, layers: int, vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def final_hidden(model: LlamaForCausalLM, input_ids, attention_mask):
    """The decoder's last hidden state: what lm_head would turn into logits."""
    return model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def distill(steps: int = 30, vocab: int = 32000, batch: int = 4, seq: int = 32, seed: int = 0,
            log=print):
    teacher = tiny_llama(hidden=64, layers=2, vocab=vocab, seed=seed).eval()
    student = tiny_llama(hidden=32, layers=1, vocab=vocab, seed=seed + 1)
    crit = fastkd.FusedLinearKDLoss(divergence="forward_kl", temperature=2.0,
                                    hard_label_weight=0.1, chunk_size=64)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    # A small fixed corpus (random tokens, right padding); labels are the next tokens.
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq - 5:] = 0
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], 1)
    labels[mask == 0] = -100

    losses = []
    for step in range(steps):
        with torch.no_grad():
            h_t = final_hidden(teacher, ids, mask)
        h_s = final_hidden(student, ids, mask)
        loss = crit(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step:3d}  fused linear KD loss {loss.item():.4f}")

    # The same number as kd_loss on materialized logits.
    with torch.no_grad():
        h_t = final_hidden(teacher, ids, mask)
        h_s = final_hidden(student, ids, mask)
        fused = crit(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels)
        dense = fastkd.kd_loss(student.lm_head(h_s), teacher.lm_head(h_t), labels,
                               divergence="forward_kl", temperature=2.0, hard_label_weight=0.1)
    log(f"fused {fused.item():.6f} vs kd_loss on logits {dense.item():.6f}")
    return losses, fused, dense


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    losses, fused, dense = distill(steps=args.steps)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
