"""A distillation training step under torch.compile(fullgraph=True), with fastkd losses inside.

fastkd's kernels are torch.library custom ops with fake (meta) kernels, and the backend choice
is a compile-time constant, so a whole forward pass (frozen teacher, student, losses) traces
into one graph with no breaks. Here a small student MLP learns from a wider frozen teacher
through three losses at once:

* fastkd.KDLoss on the logits (forward KL at T=2 plus a hard-label cross-entropy),
* fastkd.RKDLoss on the embeddings (distances and angles between the samples of a batch),
* fastkd.SimilarityPreservingLoss on the same embeddings (their batch similarity matrix).

The compiled step first has to give the eager step's loss and gradients; then a few AdamW
steps with it lower the loss. fastkd picks its backend as usual (on CPU the C++ kernels, or the
pure-PyTorch ones where the native build is unavailable); the Triton kernels run on GPU only.
Run:

    python examples/compile_train_step.py                            # inductor (the default)
    python examples/compile_train_step.py --compile-backend aot_eager   # no code generation
"""
from __future__ import annotations

import argparse
import time

import torch

import fastkd


class Net(torch.nn.Module):
    """An MLP that returns an embedding and the class logits computed from it."""

    def __init__(self, d_in: int, hidden: int, d_emb: int, classes: int):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(),
                                         torch.nn.Linear(hidden, d_emb))
        self.head = torch.nn.Linear(d_emb, classes)

    def forward(self, x):
        emb = self.trunk(x)
        return emb, self.head(torch.nn.functional.gelu(emb))


class DistillStep(torch.nn.Module):
    """forward(x, labels) -> the distillation loss of the student against the frozen teacher."""

    def __init__(self, teacher: Net, student: Net):
        super().__init__()
        self.teacher, self.student = teacher.requires_grad_(False).eval(), student
        self.kd = fastkd.KDLoss(divergence="forward_kl", temperature=2.0, hard_label_weight=0.5)
        self.rkd = fastkd.RKDLoss(distance_weight=1.0, angle_weight=2.0)
        self.sp = fastkd.SimilarityPreservingLoss()

    def forward(self, x, labels):
        with torch.no_grad():
            t_emb, t_logits = self.teacher(x)
        s_emb, s_logits = self.student(x)
        return (self.kd(s_logits, t_logits, labels) + self.rkd(s_emb, t_emb)
                + self.sp(s_emb, t_emb))


def loss_and_grads(step_fn, student, x, labels):
    student.zero_grad(set_to_none=True)
    loss = step_fn(x, labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in student.parameters()]


def run(steps: int = 30, batch: int = 64, compile_backend: str = "inductor", seed: int = 0,
        log=print) -> dict:
    torch.manual_seed(seed)
    d_in, classes = 32, 10
    teacher = Net(d_in, 256, 64, classes)
    student = Net(d_in, 32, 16, classes)
    model = DistillStep(teacher, student)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)

    # A fixed synthetic data set; the labels are the teacher's own predictions.
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(4 * batch, d_in, generator=g)
    with torch.no_grad():
        ys = teacher(xs)[1].argmax(-1)

    # 1. The compiled step computes what the eager one does, loss and gradients.
    t0 = time.perf_counter()
    c_loss, c_grads = loss_and_grads(compiled, student, xs[:batch], ys[:batch])
    compile_s = time.perf_counter() - t0
    e_loss, e_grads = loss_and_grads(model, student, xs[:batch], ys[:batch])
    grad_diff = max(((c - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
                    for c, e in zip(c_grads, e_grads))
    runnable = [b for b, why in fastkd.available_backends("cpu").items() if why is None]
    log(f"fastkd backends that run here: {', '.join(runnable)} (backend=None takes the fastest)")
    log(f"first call (compiles): {compile_s:.1f} s with torch.compile backend={compile_backend!r}")
    log(f"eager loss {e_loss.item():.6f}  compiled loss {c_loss.item():.6f}  "
        f"max relative gradient difference {grad_diff:.1e}")

    # 2. Train with the compiled step.
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        idx = torch.arange(i * batch, (i + 1) * batch) % len(xs)
        loss = compiled(xs[idx], ys[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if i % 10 == 0 or i == steps - 1:
            log(f"step {i:3d}  loss {losses[-1]:.4f}")
    log(f"{steps} compiled steps: {time.perf_counter() - t0:.2f} s")
    return dict(eager=e_loss.item(), compiled=c_loss.item(), grad_diff=grad_diff, losses=losses)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend: inductor (default), aot_eager, eager")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; models this small run fastest on one")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        out = run(args.steps, args.batch, args.compile_backend)
    finally:
        torch.set_num_threads(threads)
    agree = abs(out["compiled"] - out["eager"]) <= 1e-5 * abs(out["eager"]) + 1e-6 \
        and out["grad_diff"] < 1e-4
    print(f"compiled == eager: {agree}; loss {out['losses'][0]:.4f} -> {out['losses'][-1]:.4f}")
    return out


if __name__ == "__main__":
    main()
