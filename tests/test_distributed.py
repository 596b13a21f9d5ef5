"""Distributed losses on gloo (CPU): world sizes 2 and 3, uneven shards.

Every rank builds the same full problem from one seed, takes its part (a vocabulary slice for
the logits losses, a slice of the batch for the relational ones), runs the loss with
``process_group`` and compares the value and its gradients with the single-process loss on
the whole problem in float64.
"""
import datetime
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd
from fastkd.reference.divergences import DIVERGENCES

# uneven vocabulary / batch splits per world size
VOCAB_SPLITS = {2: [13, 28], 3: [9, 20, 12]}
ROW_SPLITS = {2: [3, 6], 3: [4, 1, 5]}


def _slices(sizes):
    starts = list(itertools.accumulate([0] + sizes[:-1]))
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def _close(actual, expected, what, tol):
    a, e = actual.detach().double(), expected.detach().double()
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1e-30)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    assert err <= tol * max(scale, 1.0), f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _weights(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64) + 0.5


# ----------------------------------------------------------------------------- kd_loss
def _kd_cases():
    for div, red in itertools.product(DIVERGENCES, ("batchmean", "sum", "none")):
        yield dict(divergence=div, reduction=red, temperature=2.0, hard_label_weight=0.0,
                   labels="none", softcap=None)
    for div in DIVERGENCES:
        yield dict(divergence=div, reduction="batchmean", temperature=0.7,
                   hard_label_weight=0.5, labels="partial", softcap=4.0, beta=0.3, skew=0.2)
    yield dict(divergence="jsd", beta=0.0, reduction="sum", labels="partial")
    yield dict(divergence="forward_kl", reduction="batchmean", labels="all_ignored",
               hard_label_weight=1.0)


def _labels(kind, lead, V, seed):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, V, lead, generator=g)
    if kind == "all_ignored":
        return torch.full(lead, -100)
    lab[..., ::3] = -100
    return lab


def _check_kd(rank, world, group):
    V = sum(VOCAB_SPLITS[world])
    part = _slices(VOCAB_SPLITS[world])[rank]
    for i, case in enumerate(_kd_cases()):
        case = dict(case)
        g = torch.Generator().manual_seed(100 + i)
        s_full = torch.randn(2, 6, V, generator=g, dtype=torch.float64) * 3
        t_full = torch.randn(2, 6, V, generator=g, dtype=torch.float64) * 3
        if case["divergence"] != "reverse_kl":  # KL(q || p) is inf where p = 0
            t_full[0, 1, ::4] = float("-inf")  # teacher entries at -inf on some slices
        labels = _labels(case.pop("labels"), (2, 6), V, 7 + i)
        teacher_grad = i % 3 == 0
        w = _weights((2, 6), i) if case["reduction"] == "none" else torch.tensor(0.7,
                                                                                  dtype=torch.float64)

        ref_s = s_full.clone().requires_grad_()
        ref_t = t_full.clone().requires_grad_(teacher_grad)
        ref = fastkd.kd_loss(ref_s, ref_t, labels, backend="torch", **case)
        (ref * w).sum().backward()

        s = s_full[..., part].clone().requires_grad_()
        t = t_full[..., part].clone().requires_grad_(teacher_grad)
        out = fastkd.kd_loss(s, t, labels, process_group=group, **case)
        (out * w).sum().backward()
        what = f"kd {case} rank {rank}/{world}"
        _close(out, ref, what + " loss", 1e-10)
        _close(s.grad, ref_s.grad[..., part], what + " student grad", 1e-10)
        if teacher_grad:
            _close(t.grad, ref_t.grad[..., part], what + " teacher grad", 1e-10)

    # float32 and bfloat16 slices, strided (time-shifted) student, against float64
    g = torch.Generator().manual_seed(5)
    s_full = torch.randn(2, 9, V, generator=g, dtype=torch.float64) * 2
    t_full = torch.randn(2, 8, V, generator=g, dtype=torch.float64) * 2
    labels = _labels("partial", (2, 8), V, 3)
    ref_s = s_full.clone().requires_grad_()
    ref = fastkd.kd_loss(ref_s[:, :-1], t_full, labels, divergence="jsd", temperature=1.5,
                         hard_label_weight=0.3, backend="torch")
    ref.backward()
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2e-2)):
        s = s_full[..., part].to(dtype).requires_grad_()
        out = fastkd.kd_loss(s[:, :-1], t_full[..., part].to(dtype), labels, divergence="jsd",
                             temperature=1.5, hard_label_weight=0.3, process_group=group)
        out.backward()
        assert out.dtype == dtype and s.grad.dtype == dtype
        _close(out, ref, f"kd {dtype} strided loss", tol)
        _close(s.grad, ref_s.grad[..., part], f"kd {dtype} strided grad", tol)

    # inplace: the gradient is written over the student's slice (a non-leaf, as from an lm_head)
    # (float32: float64 gradients are kept intact for gradcheck, so they are not in place)
    x = s_full[:, :-1, part].float().contiguous().requires_grad_()
    logits = x * 1.0
    ptr = logits.data_ptr()
    out = fastkd.kd_loss(logits, t_full[..., part].float(), labels, divergence="jsd", temperature=1.5,
                         hard_label_weight=0.3, inplace=True, process_group=group)
    captured = {}
    logits.register_hook(lambda grad: captured.setdefault("g", grad))
    out.backward()
    _close(out, ref, "kd inplace loss", 2e-6)
    assert captured["g"].data_ptr() == ptr, "gradient was not written over the logits"
    _close(x.grad, ref_s.grad[:, :-1, part], "kd inplace grad", 2e-6)

    # the module form takes the group too
    crit = fastkd.KDLoss(divergence="reverse_kl", temperature=3.0, process_group=group)
    ref = fastkd.kd_loss(s_full, s_full.flip(-1), divergence="reverse_kl", temperature=3.0)
    _close(crit(s_full[..., part], s_full.flip(-1)[..., part]), ref, "KDLoss module", 1e-10)

    # clear errors, raised on every rank alike
    x = s_full[..., part]
    with pytest.raises(ValueError, match="backend"):
        fastkd.kd_loss(x, x, process_group=group, backend="cpp")
    with pytest.raises(ValueError, match="vocab_size"):
        fastkd.kd_loss(x, x, process_group=group, vocab_size=2)
    with pytest.raises(TypeError, match="process_group"):
        fastkd.kd_loss(x, x, process_group="world")
    bad = torch.full((2, 9), V)  # a label past the whole vocabulary
    with pytest.raises(ValueError, match="labels must lie in"):
        fastkd.kd_loss(x, x, bad, hard_label_weight=1.0, process_group=group)


# ----------------------------------------------------------------------------- sparse_kd_loss
def _check_sparse(rank, world, group):
    V = sum(VOCAB_SPLITS[world])
    part = _slices(VOCAB_SPLITS[world])[rank]
    K = 6
    cases = [dict(divergence=d, tail=tail) for d in DIVERGENCES for tail in ("renormalize", "bucket")]
    cases += [dict(divergence="forward_kl", tail="renormalize", hard_label_weight=0.4,
                   reduction="none"),
              dict(divergence="jsd", tail="bucket", hard_label_weight=1.0, reduction="sum")]
    for i, case in enumerate(cases):
        g = torch.Generator().manual_seed(300 + i)
        z = torch.randn(3, 5, V, generator=g, dtype=torch.float64) * 2
        idx = torch.rand(3, 5, V, generator=g).argsort(-1)[..., :K]
        vals = torch.randn(3, 5, K, generator=g, dtype=torch.float64)
        if case["tail"] == "bucket":
            vals = torch.log_softmax(vals, -1) + torch.log(torch.tensor(0.8, dtype=torch.float64))
        labels = _labels("partial", (3, 5), V, i) if case.get("hard_label_weight") else None
        w = _weights((3, 5), i) if case.get("reduction") == "none" else torch.tensor(1.3,
                                                                                     dtype=torch.float64)
        kw = dict(temperature=1.7, **case)
        ref_z = z.clone().requires_grad_()
        ref = fastkd.sparse_kd_loss(ref_z, idx, vals, labels, backend="torch", **kw)
        (ref * w).sum().backward()
        s = z[..., part].clone().requires_grad_()
        out = fastkd.sparse_kd_loss(s, idx, vals, labels, process_group=group, **kw)
        (out * w).sum().backward()
        what = f"sparse {case} rank {rank}/{world}"
        _close(out, ref, what + " loss", 1e-10)
        _close(s.grad, ref_z.grad[..., part], what + " grad", 1e-10)
    # float32 bucket with the k entries holding nearly all of both models' mass: tails at the
    # floor, finite, the same as one process (the teacher entries' gradient is computed as
    # h - q H, not as q gamma + e, which cancels terms of up to 1/TAIL_FLOOR)
    g = torch.Generator().manual_seed(399)
    z = torch.randn(3, 5, V, generator=g) * 2
    idx = torch.rand(3, 5, V, generator=g).argsort(-1)[..., :K]
    zt = torch.randn(3, 5, V, generator=g).scatter_add(-1, idx, torch.full((3, 5, K), 19.0))
    z = z.scatter_add(-1, idx, torch.full((3, 5, K), 20.0))
    vals = torch.log_softmax(zt.double(), -1).gather(-1, idx).float()
    for div in ("forward_kl", "reverse_kl"):
        ref_z = z.clone().requires_grad_()
        ref = fastkd.sparse_kd_loss(ref_z, idx, vals, tail="bucket", divergence=div, backend="torch")
        ref.backward()
        s = z[..., part].clone().requires_grad_()
        out = fastkd.sparse_kd_loss(s, idx, vals, tail="bucket", divergence=div, process_group=group)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(s.grad).all(), div
        _close(out, ref, f"sparse near-complete {div} rank {rank}/{world} loss", 1e-5)
        _close(s.grad, ref_z.grad[..., part], f"sparse near-complete {div} rank {rank}/{world} grad", 1e-5)
    with pytest.raises(ValueError, match="teacher_indices must lie in"):
        fastkd.sparse_kd_loss(s.detach(), torch.full((3, 5, 1), V), vals[..., :1],
                              process_group=group)


# ----------------------------------------------------------------------------- fused linear
def _check_fused_linear(rank, world, group):
    V = sum(VOCAB_SPLITS[world])
    part = _slices(VOCAB_SPLITS[world])[rank]
    g = torch.Generator().manual_seed(11)
    hs_full = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)
    ht_full = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)
    ws_full = torch.randn(V, 8, generator=g, dtype=torch.float64) * 0.5
    wt_full = torch.randn(V, 12, generator=g, dtype=torch.float64) * 0.5
    bs_full = torch.randn(V, generator=g, dtype=torch.float64)
    labels = _labels("partial", (2, 7), V, 2)
    for i, (div, red, chunk) in enumerate(itertools.product(
            ("forward_kl", "skew_reverse_kl", "tvd"), ("batchmean", "none"), (None, 3))):
        kw = dict(divergence=div, reduction=red, temperature=2.0, hard_label_weight=0.25,
                  softcap=6.0, chunk_size=chunk)
        w = _weights((2, 7), i) if red == "none" else torch.tensor(0.9, dtype=torch.float64)
        ref_in = [x.clone().requires_grad_() for x in (hs_full, ws_full, bs_full)]
        ref = fastkd.fused_linear_kd_loss(ref_in[0], ref_in[1], ht_full, wt_full, labels,
                                          student_bias=ref_in[2], backend="torch", **kw)
        (ref * w).sum().backward()
        mine = [x.clone().requires_grad_() for x in (hs_full, ws_full[part], bs_full[part])]
        out = fastkd.fused_linear_kd_loss(mine[0], mine[1], ht_full, wt_full[part], labels,
                                          student_bias=mine[2], process_group=group, **kw)
        (out * w).sum().backward()
        what = f"fused {kw} rank {rank}/{world}"
        _close(out, ref, what + " loss", 1e-10)
        _close(mine[0].grad, ref_in[0].grad, what + " grad hidden", 1e-10)
        _close(mine[1].grad, ref_in[1].grad[part], what + " grad weight", 1e-10)
        _close(mine[2].grad, ref_in[2].grad[part], what + " grad bias", 1e-10)


# ----------------------------------------------------------------------------- relational
def _check_relational(rank, world, group):
    sizes = ROW_SPLITS[world]
    part = _slices(sizes)[rank]
    g = torch.Generator().manual_seed(21)
    n = sum(sizes)
    s_full = torch.randn(n, 3, 4, generator=g, dtype=torch.float64)
    t_full = torch.randn(n, 7, generator=g, dtype=torch.float64)
    s_full[1] = s_full[0]  # duplicated embeddings (zero distance) across a rank boundary
    losses = {
        "rkd_distance_loss": dict(huber_delta=0.5),
        "rkd_angle_loss": dict(),
        "rkd_loss": dict(distance_weight=1.0, angle_weight=2.0),
        "similarity_preserving_loss": dict(),
    }
    for name, kw in losses.items():
        fn = getattr(fastkd, name)
        ref_s = s_full.clone().requires_grad_()
        ref = fn(ref_s, t_full, **kw)
        (ref * 1.5).backward()
        for backend in (None, "torch"):
            s = s_full[part].clone().requires_grad_()
            out = fn(s, t_full[part], process_group=group, backend=backend, **kw)
            (out * 1.5).backward()
            what = f"{name} {backend} rank {rank}/{world}"
            _close(out, ref, what + " loss", 1e-10)
            _close(s.grad, ref_s.grad[part], what + " grad", 1e-10)
    crit = fastkd.RKDLoss(process_group=group)
    _close(crit(s_full[part], t_full[part]), fastkd.rkd_loss(s_full, t_full), "RKDLoss module",
           1e-10)
    with pytest.raises(ValueError, match="same size per row"):
        fastkd.rkd_distance_loss(s_full[part][:, :, : rank + 1], t_full[part], process_group=group)


CHECKS = {"kd": _check_kd, "sparse_kd": _check_sparse, "fused_linear": _check_fused_linear,
          "relational": _check_relational}


def _worker(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for check in CHECKS.values():
            check(rank, world, dist.group.WORLD)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_process(tmp_path, world):
    """Every family in one spawn per world size (starting processes is the slow part); a
    failure names the family, the case and the rank."""
    mp.spawn(_worker, args=(world, str(tmp_path / "store")), nprocs=world, join=True)


def test_torchrun_example():
    """examples/distributed_distill.py under torchrun with 2 CPU processes, tiny sizes."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "examples" / "distributed_distill.py"), "--vocab", "301", "--tokens",
           "48", "--batch", "5", "--steps", "4"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "slice sizes=[151, 150]" in out, out
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 4 and losses[-1] < losses[0], out
    for check in ("vocab-parallel loss", "global-batch rkd_loss"):
        line = next(line for line in out.splitlines() if check in line)
        a, b = line.split(" == single-process ")
        assert abs(float(a.split()[-1]) - float(b)) <= 1e-4 * max(1.0, abs(float(b))), line


def test_needs_initialized_torch_distributed():
    x = torch.randn(2, 5)
    if dist.is_initialized():  # pragma: no cover - the suite never leaves a group behind
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastkd.kd_loss(x, x, process_group=object())
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastkd.rkd_distance_loss(x, x, process_group=object())
