"""sparse_kd_loss (top-k teacher) on every backend against an independent float64 oracle."""
import itertools

import pytest
import torch

import fastkd
from conftest import HAS_CUDA, skip_unless_available
from test_divergences import DIVS, DTYPES, assert_close, oracle_divergence, oracle_finish

BACKENDS = ["torch", "cpp", "triton", "cuda"]
# tail="bucket": each tail mass is floored at 2**-20 (README, fastkd.reference.sparse.TAIL_FLOOR)
TAIL_FLOOR = 2.0 ** -20


def sparse_oracle(z, idx, vals, labels=None, divergence="forward_kl", temperature=1.0,
                  beta=0.5, skew=0.1, tail="renormalize", ignore_index=-100,
                  hard_label_weight=0.0, soft_label_weight=1.0, scale_temperature=True,
                  reduction="batchmean", num_items_in_batch=None):
    """The issue's formulas in float64: student normalized over the full vocabulary.

    tail="bucket": the teacher's tail is 1 - sum exp(vals), the student's its probability mass
    outside idx (summed directly); both are floored at TAIL_FLOOR, and the student's floored
    tail moves with the unfloored one (straight-through: value max(q, floor), derivative 1)."""
    if labels is not None:
        z = torch.where((labels != ignore_index).unsqueeze(-1), z, torch.zeros_like(z))
    T = temperature
    lq_all = torch.log_softmax(z / T, -1)
    lq = lq_all.gather(-1, idx)
    if tail == "renormalize":
        lp = torch.log_softmax(vals / T, -1)
        full = divergence == "forward_kl" or (divergence == "jsd" and beta == 0)
        if not full:
            lq = lq - torch.logsumexp(lq, -1, keepdim=True)
    else:
        lp = vals
        p_tail = (1 - lp.exp().sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR)
        outside = torch.ones_like(lq_all).scatter(-1, idx, torch.zeros_like(lq))
        q_tail = (lq_all.exp() * outside).sum(-1, keepdim=True)
        q_tail = q_tail + (q_tail.clamp_min(TAIL_FLOOR) - q_tail).detach()
        lp = torch.cat([lp, p_tail.log()], -1)
        lq = torch.cat([lq, q_tail.log()], -1)
    D = oracle_divergence(lp, lq, divergence, beta, skew)
    row = soft_label_weight * D * (T * T if scale_temperature else 1.0)
    return oracle_finish(row, z, labels, ignore_index, hard_label_weight, reduction,
                         num_items_in_batch)


def make_sparse(lead, V, K, dtype, device, tail, label_mode="partial", seed=0, T=2.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*lead, V, generator=g) * 3).to(dtype)
    teacher = torch.randn(*lead, V, generator=g) * 3
    idx = teacher.topk(K, dim=-1).indices  # a real top-k: distinct, sorted by value
    if tail == "renormalize":
        vals = teacher.gather(-1, idx)
    else:
        vals = torch.log_softmax(teacher / T, -1).gather(-1, idx)
    vals = vals.to(dtype)
    labels = None
    if label_mode != "none":
        labels = torch.randint(0, V, lead, generator=g)
        if label_mode == "partial":
            labels[torch.rand(lead, generator=g) < 0.3] = -100
        else:
            labels[...] = -100
        labels = labels.to(device)
    return z.to(device), idx.to(device), vals.to(device), labels


def run_both(z, idx, vals, labels, backend, **kw):
    z1 = z.detach().clone().requires_grad_()
    out = fastkd.sparse_kd_loss(z1, idx, vals, labels, backend=backend, **kw)
    z2 = z.detach().double().requires_grad_()
    ref = sparse_oracle(z2, idx, vals.double(), labels, **kw)
    gout = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gout = (gout + 0.5).to(z.device)
    (out.double() * gout).sum().backward()
    (ref * gout).sum().backward()
    return out, ref, z1.grad, z2.grad


GRID = list(itertools.product(["renormalize", "bucket"], DIVS, DTYPES,
                              [("batchmean", "partial", 0.0), ("sum", "none", 0.0),
                               ("none", "partial", 0.5), ("batchmean", "all_ignored", 0.5)]))


def _params():
    out = []
    for b in BACKENDS:
        for i, (tail, div, dt, (red, lab, hw)) in enumerate(GRID):
            if b == "triton" and not HAS_CUDA and i % 5:
                continue  # interpreter: a covering stride of the grid; all of it on a GPU
            out.append(pytest.param(b, tail, div, dt, red, lab, hw,
                                    id=f"{b}-{tail}-{div}-{str(dt)[6:]}-{red}-{lab}-hw{hw}"))
    return out


@pytest.mark.parametrize("backend,tail,divergence,dtype,reduction,label_mode,hard", _params())
def test_sparse_matches_oracle(backend, tail, divergence, dtype, reduction, label_mode, hard):
    device = skip_unless_available(backend, "sparse_kd")
    z, idx, vals, labels = make_sparse((3, 5), 301, 17, dtype, device, tail, label_mode)
    kw = dict(divergence=divergence, temperature=2.0, beta=0.3, skew=0.2, tail=tail,
              reduction=reduction, hard_label_weight=hard, soft_label_weight=0.9)
    out, ref, g, rg = run_both(z, idx, vals, labels, backend, **kw)
    assert_close(out, ref, dtype, "loss")
    assert_close(g, rg, dtype, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 8, 64])
def test_sparse_k_and_order(backend, k):
    """k from 1 up; index order within a row does not matter."""
    device = skip_unless_available(backend, "sparse_kd")
    for tail in ("renormalize", "bucket"):
        z, idx, vals, labels = make_sparse((7,), 97, k, torch.float32, device, tail, seed=k)
        out, ref, g, rg = run_both(z, idx, vals, labels, backend, tail=tail, temperature=1.5)
        assert_close(out, ref, torch.float32, f"loss {tail}")
        assert_close(g, rg, torch.float32, f"grad {tail}")
        perm = torch.randperm(k)
        out2 = fastkd.sparse_kd_loss(z, idx[:, perm], vals[:, perm], labels, tail=tail,
                                     temperature=1.5, backend=backend)
        assert torch.allclose(out, out2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_full_vocab_equals_kd_loss(backend):
    """With k = V and renormalize, the sparse loss is kd_loss on the dense teacher."""
    device = skip_unless_available(backend, "sparse_kd")
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(6, 50, generator=g).to(device), torch.randn(6, 50, generator=g).to(device)
    idx = torch.arange(50).expand(6, 50).contiguous().to(device)
    for div in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        a = fastkd.sparse_kd_loss(z, idx, t, divergence=div, temperature=2.0, backend=backend)
        b = fastkd.kd_loss(z, t, divergence=div, temperature=2.0, backend="torch")
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), div


def _near_complete(V, k, rows, s_off, t_off, seed, device, T=1.0):
    """Rows whose k teacher entries hold nearly all of both models' mass: random logits plus
    s_off (student) / t_off (teacher) at the k indices, one offset per row, so the tails run
    from ~1e-2 down to far below float32's resolution of 1 - sum, and either side may be the
    larger. Values: the teacher's log-probabilities at T computed in float64, stored as float32."""
    g = torch.Generator().manual_seed(seed)
    zs, zt = torch.randn(rows, V, generator=g), torch.randn(rows, V, generator=g)
    idx = torch.rand(rows, V, generator=g).argsort(-1)[:, :k]
    zs.scatter_add_(1, idx, s_off.view(-1, 1).expand(rows, k))
    zt.scatter_add_(1, idx, t_off.view(-1, 1).expand(rows, k))
    vals = torch.log_softmax(zt.double() / T, -1).gather(-1, idx).float()
    return zs.to(device), idx.to(device), vals.to(device)


# per-row offsets (student, teacher): both tails tiny (the audit's case: 20 / 19), one tiny and
# the other not (either way round), both small but resolved, and both ordinary
NEAR_COMPLETE_OFFSETS = [(20.0, 19.0), (19.0, 20.0), (25.0, 10.0), (10.0, 25.0), (30.0, 30.0),
                         (14.0, 12.0), (8.0, 9.0), (0.0, 3.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
def test_sparse_bucket_near_complete_mass(backend, divergence):
    """tail="bucket" where the k entries hold all but ~1e-8 of the mass: finite, and the floored
    rule of the float64 oracle, loss and gradient, whichever side's tail rounds to 0 (it was inf,
    or NaN gradients, on some backends)."""
    device = skip_unless_available(backend, "sparse_kd")
    s_off, t_off = (torch.tensor(c) for c in zip(*NEAR_COMPLETE_OFFSETS))
    for seed, (V, k, T) in enumerate([(37, 5, 1.0), (300, 40, 2.0)]):
        z, idx, vals = _near_complete(V, k, len(s_off), s_off * T, t_off * T, seed + 11, device,
                                      T)
        kw = dict(divergence=divergence, temperature=T, beta=0.3, skew=0.2, tail="bucket",
                  reduction="none")
        out, ref, g, rg = run_both(z, idx, vals, None, backend, **kw)
        assert torch.isfinite(out).all() and torch.isfinite(g).all(), (V, k)
        assert_close(out, ref, torch.float32, f"loss V={V}")
        assert_close(g, rg, torch.float32, f"grad V={V}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_bucket_full_vocab_equals_kd_loss(backend):
    """k = V with tail="bucket" and values = log_softmax(teacher / T) over all V entries (both
    tails are rounding noise, floored alike): kd_loss on the dense teacher, loss and gradient,
    against kd_loss's float64 oracle. Large logits make the float32 tails noisier."""
    device = skip_unless_available(backend, "sparse_kd")
    from test_divergences import oracle

    g = torch.Generator().manual_seed(23)
    B, V, T = 5, 61, 1.5
    z, t = torch.randn(B, V, generator=g) * 6, torch.randn(B, V, generator=g) * 6
    z[0] += 40.0  # a large common offset: float32 log-sum-exps of magnitude ~30
    idx = torch.rand(B, V, generator=g).argsort(-1)  # every entry, in a shuffled order
    vals = torch.log_softmax(t / T, -1).gather(-1, idx)  # float32, as stored
    for div in DIVS:
        x = z.clone().to(device).requires_grad_()
        a = fastkd.sparse_kd_loss(x, idx.to(device), vals.to(device), divergence=div,
                                  temperature=T, tail="bucket", reduction="none", beta=0.3,
                                  skew=0.2, backend=backend)
        x64 = z.double().requires_grad_()
        # the teacher the stored values describe: kd's teacher logits = T * values (any shift)
        t64 = torch.zeros(B, V, dtype=torch.float64).scatter(-1, idx, T * vals.double())
        b = oracle(x64, t64, divergence=div, temperature=T, beta=0.3, skew=0.2,
                   reduction="none")
        gout = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
        (a.double().cpu() * gout).sum().backward()
        (b * gout).sum().backward()
        assert torch.isfinite(a).all() and torch.isfinite(x.grad).all(), div
        assert_close(a, b, torch.float32, f"loss {div}")
        assert_close(x.grad, x64.grad, torch.float32, f"grad {div}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_strided_and_3d(backend):
    device = skip_unless_available(backend, "sparse_kd")
    z, idx, vals, labels = make_sparse((2, 6), 131, 9, torch.float32, device, "bucket", seed=4)
    zs = z[:, :-1]  # time-shifted logits, read in place
    out, ref, g, rg = run_both(zs, idx[:, 1:], vals[:, 1:], labels[:, 1:], backend,
                               tail="bucket", divergence="jsd", reduction="none")
    assert out.shape == (2, 5)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(g, rg, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_ignored_rows_never_nan(backend):
    device = skip_unless_available(backend, "sparse_kd")
    z, idx, vals, _ = make_sparse((4,), 40, 5, torch.float32, device, "renormalize", "none")
    z[1] = float("nan")
    labels = torch.tensor([3, -100, 5, -100], device=device)
    x = z.clone().requires_grad_()
    out = fastkd.sparse_kd_loss(x, idx, vals, labels, hard_label_weight=1.0, backend=backend)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert (x.grad[[1, 3]] == 0).all()


def test_sparse_bad_inputs():
    z = torch.randn(3, 20)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5]])
    vals = torch.randn(3, 2)
    cases = [
        (ValueError, "distinct", lambda: fastkd.sparse_kd_loss(z, torch.tensor([[0, 0], [1, 2], [3, 4]]), vals)),
        (ValueError, r"\[0, 20\)", lambda: fastkd.sparse_kd_loss(z, idx + 18, vals)),
        (ValueError, r"\[0, 20\)", lambda: fastkd.sparse_kd_loss(z, idx - 1, vals)),
        (TypeError, "teacher_indices", lambda: fastkd.sparse_kd_loss(z, idx.float(), vals)),
        (ValueError, "teacher_values", lambda: fastkd.sparse_kd_loss(z, idx, vals[:, :1])),
        (ValueError, "leading shape", lambda: fastkd.sparse_kd_loss(z, idx[:2], vals[:2])),
        (ValueError, "tail", lambda: fastkd.sparse_kd_loss(z, idx, vals, tail="drop")),
        (ValueError, "log-probabilities", lambda: fastkd.sparse_kd_loss(z, idx, vals.abs() + 1, tail="bucket")),
        (ValueError, "between 1 and", lambda: fastkd.sparse_kd_loss(z, torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0))),
        (ValueError, "divergence", lambda: fastkd.sparse_kd_loss(z, idx, vals, divergence="x")),
        (ValueError, "mean", lambda: fastkd.sparse_kd_loss(z, idx, vals, reduction="mean")),
    ]
    for exc, needle, call in cases:
        with pytest.raises(exc, match=needle):
            call()
    # validate=False skips the checks for callers who guarantee the indices
    fastkd.sparse_kd_loss(z, idx, vals, validate=False)


def test_sparse_module():
    z, idx, vals, labels = make_sparse((4,), 30, 6, torch.float32, "cpu", "bucket")
    crit = fastkd.SparseKDLoss(tail="bucket", temperature=2.0, divergence="reverse_kl")
    a = crit(z, idx, vals, labels)
    b = fastkd.sparse_kd_loss(z, idx, vals, labels, tail="bucket", temperature=2.0,
                              divergence="reverse_kl")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="tail"):
        fastkd.SparseKDLoss(tail="x")


def _soft_reads_whole_row(tail, divergence, hard):
    """Whether the row's loss reads every student logit: not for tail="renormalize" with a
    divergence other than forward_kl and no hard label (D lives on the k gathered logits)."""
    return tail == "bucket" or divergence == "forward_kl" or hard != 0.0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # triton interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("hard", [0.0, 0.5], ids=["soft", "hard"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_nan_makes_its_row_nan(backend, tail, side, hard, dtype):
    """As kd_loss: a NaN in a counted row's teacher values, or in the student logits the row
    reads, makes that row's loss and whole gradient NaN on every divergence (the bucket tails'
    floors keep NaN); the other rows are bitwise what they are without it, and an ignored row
    holding NaN still gives 0. tail="renormalize" with a divergence other than forward_kl and no
    hard label reads only the student's logits at the k indices: a NaN elsewhere leaves the row
    as it is, on every backend (no kernel reads the rest of the row then)."""
    device = skip_unless_available(backend, "sparse_kd")
    z, idx, vals, _ = make_sparse((6,), 37, 5, dtype, device, tail, "none", seed=23)
    labels = torch.tensor([3, 5, -100, 7, 1, 11], device=device)
    ns, nv = z.clone(), vals.clone()
    outside = [int(next(j for j in range(37) if j not in idx[r].tolist())) for r in range(6)]
    elsewhere = []  # rows whose only NaN is a student logit outside the teacher's entries
    if side == "student":
        ns[1, idx[1, 2]] = float("nan")  # at a teacher entry
        ns[2, idx[2, 0]] = ns[2, outside[2]] = float("nan")  # ignored row
        ns[3, ::2] = float("-inf")
        ns[3, idx[3, 1]] = float("nan")  # NaN beats -inf entries (and the inf losses they give)
        ns[4, outside[4]] = float("nan")  # outside the teacher's entries
        labels[4] = outside[4]  # at the label
        elsewhere = [4]
    else:
        nv[1, 2] = float("nan")
        nv[2, 0] = float("nan")  # ignored row
        nv[3, 1::2] = float("-inf")
        nv[3, 0] = float("nan")
        nv[4, 4] = float("nan")  # the smallest value
    for div in DIVS:
        kw = dict(divergence=div, tail=tail, hard_label_weight=hard, temperature=2.0,
                  reduction="none")
        outs = []
        for s, v in ((ns, nv), (z, vals)):
            x = s.clone().requires_grad_()
            out = fastkd.sparse_kd_loss(x, idx, v, labels, backend=backend, **kw)
            (out.double() * torch.linspace(0.5, 1.5, 6, dtype=torch.float64,
                                           device=device)).sum().backward()
            outs.append((out.detach(), x.grad))
        (out, g), (clean, cg) = outs
        whole = _soft_reads_whole_row(tail, div, hard)
        bad = [1, 3, 4] if side == "teacher" or whole else [1, 3]
        good = [0, 5] + [r for r in elsewhere if r not in bad]
        assert out[bad].isnan().all(), (div, out)
        assert g[bad].isnan().all(), div
        assert out[2] == 0 and (g[2] == 0).all(), div
        assert torch.isfinite(clean[good]).all(), div
        assert torch.equal(out[good], clean[good]) and torch.equal(g[good], cg[good]), div
