"""Relational losses (RKD distance, RKD angle, similarity-preserving, FitNets hints) end to end,
every backend against an independent float64 oracle.

The oracle below follows Park et al.'s and Tung and Mori's code with plain torch ops in
float64 (explicit pairwise differences, F.normalize, the N x N x N angle tensor) and autograd
for the gradients; it shares no code with fastkd. Inputs are rounded to the tested dtype first
and the oracle runs on the rounded values, so the error measured is the kernels' own: fp32
arithmetic (including the Gram-identity cancellation) plus one rounding of the output.
"""
import pytest
import torch
import torch.nn.functional as F

import fastkd
from conftest import HAS_CUDA, requires_cuda, skip_unless_available

# cuda has a kernel for the distance family only: its angle and similarity-preserving cases skip
# (skip_unless_available with the case's family)
BACKENDS = ["torch", "cpp", "triton", "cuda"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 1.2e-7, torch.bfloat16: 7.8e-3, torch.float16: 9.8e-4, torch.float64: 2.2e-16}
LOSSES = ["distance", "angle", "sp"]
OPS = {"distance": "rkd_distance_fwd", "angle": "rkd_angle_fwd", "sp": "similarity_preserving_fwd"}
FAMILY = {"distance": "rkd_distance", "angle": "rkd_angle", "sp": "similarity_preserving"}
INTERPRETED = not HAS_CUDA  # triton runs in the interpreter: keep its shapes small


# ----------------------------------------------------------------------------- oracle
def _smooth_l1(z, beta):
    az = z.abs()
    return az if beta == 0 else torch.where(az < beta, 0.5 * z * z / beta, az - 0.5 * beta)


def _park_pdist(e, eps):
    """Park et al.'s pdist (squared distance clamped at eps, zero diagonal), from differences."""
    diff = e.unsqueeze(1) - e.unsqueeze(0)
    d = (diff * diff).sum(-1).clamp(min=eps).sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return torch.where(eye, torch.zeros_like(d), d)


def oracle_distance(s, t, eps=1e-12, huber_delta=1.0):
    off = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    ds, dt = _park_pdist(s, eps), _park_pdist(t, eps)
    ds, dt = ds / ds[off].mean(), dt / dt[off].mean()  # = d[d > 0].mean() for eps > 0
    return _smooth_l1(ds - dt, huber_delta).mean()


def _park_angles(e):
    u = e.unsqueeze(0) - e.unsqueeze(1)  # u[i, j] = e_j - e_i
    n2 = (u * u).sum(-1, keepdim=True)
    nz = n2 > 0
    un = torch.where(nz, u / torch.where(nz, n2, torch.ones_like(n2)).sqrt(), torch.zeros_like(u))
    return un @ un.transpose(1, 2)  # [i, j, k] = e_ij . e_ik


def oracle_angle(s, t, huber_delta=1.0):
    return _smooth_l1(_park_angles(s) - _park_angles(t), huber_delta).mean()


def oracle_sp(s, t):
    A, B = F.normalize(s @ s.T), F.normalize(t @ t.T)
    return ((A - B) ** 2).sum() / s.shape[0] ** 2


ORACLE = {"distance": oracle_distance, "angle": oracle_angle, "sp": oracle_sp}
FN = {"distance": fastkd.rkd_distance_loss, "angle": fastkd.rkd_angle_loss,
      "sp": fastkd.similarity_preserving_loss}
KW = {"distance": dict(huber_delta=0.7), "angle": dict(huber_delta=0.6), "sp": {}}


# ----------------------------------------------------------------------------- helpers
def _reason(backend, family, device):
    """None when ``backend`` runs ``family`` on ``device`` tensors here, else why not."""
    import fastkd._backend as B

    return B.reason(backend, family, torch.device(device).type)


def make_pair(n, ds, dt, dtype, device, seed=0, dups=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, ds, generator=g, dtype=torch.float64) * scale + 0.5
    t = torch.randn(n, dt, generator=g, dtype=torch.float64) * 2.0
    if dups:  # duplicated rows: in the student only, in the teacher only, and in both
        s[2], t[4] = s[0], t[1]
        s[n - 1], t[n - 1] = s[1], t[1]
    return s.to(dtype).to(device), t.to(dtype).to(device)


def run_both(loss, s, t, backend, gout=0.7, **kw):
    """(fastkd loss, oracle loss, fastkd grad, oracle grad) for grad_output = gout."""
    kw = {**KW[loss], **kw}
    x = s.detach().clone().requires_grad_()
    out = FN[loss](x, t, backend=backend, **kw)
    (out.double() * gout).backward()
    x64 = s.detach().double().requires_grad_()
    n = s.shape[0]  # [N, ...] inputs are flattened to [N, D]
    ref = ORACLE[loss](x64.reshape(n, -1), t.detach().double().reshape(n, -1), **kw)
    (ref * gout).backward()
    return out, ref.detach(), x.grad, x64.grad


def assert_close(actual, expected, dtype, what, rel32=4e-6, atol=1e-7):
    """|error| <= (2 roundings of dtype + fp32 arithmetic) * max|expected| + atol."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    mag = e.abs().max().item()
    tol = (2 * EPS[dtype] + rel32) * mag + atol
    err = (a - e).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3e} > tol {tol:.3e} (max |expected| {mag:.3e})"


def _shape(loss, backend):
    """Odd sizes that cross each backend's tiles: cpp strips of 64 rows (angle blocks of <= 64),
    triton tiles of 16, cuda tiles of 64 (150 rows: 3 row blocks, the gradient split 3 ways;
    D = 45 pads to 48)."""
    if backend == "cuda":
        return (150, 45, 17)
    if backend == "triton":
        return (21, 19, 40) if loss == "angle" else (37, 45, 17)
    if backend == "cpp":
        return (67, 19, 40) if loss == "angle" else (263, 45, 17)
    return (37, 45, 17)


# ----------------------------------------------------------------------------- oracle agreement
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_oracle(backend, loss, dtype):
    device = skip_unless_available(backend, FAMILY[loss])
    n, ds, dt = _shape(loss, backend)
    s, t = make_pair(n, ds, dt, dtype, device, seed=1, dups=True)
    out, ref, g, rg = run_both(loss, s, t, backend)
    assert_close(out, ref, dtype, "loss")
    assert_close(g, rg, dtype, "grad student")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_small_and_degenerate_shapes(backend, loss):
    """N = 2 and 3, D = 1 on both sides, [N, C, L] inputs, different student/teacher D."""
    device = skip_unless_available(backend, FAMILY[loss])
    for n, ds, dt in [(2, 3, 5), (3, 4, 2), (3, 1, 1), (5, 1, 3), (2, 1, 1)]:
        s, t = make_pair(n, ds, dt, torch.float32, device, seed=n + ds)
        out, ref, g, rg = run_both(loss, s, t, backend, gout=1.3)
        assert_close(out, ref, torch.float32, f"loss {n}x{ds}")
        # D = 1 angles are +-1, so their gradient is 0 up to fp32 noise in a_s - a_t
        assert_close(g, rg, torch.float32, f"grad {n}x{ds}", atol=1e-6 if ds == 1 else 1e-7)
    s, t = make_pair(6, 12, 8, torch.float32, device, seed=7)
    out, ref, g, rg = run_both(loss, s.view(6, 3, 4), t.view(6, 2, 2, 2), backend)
    assert g.shape == (6, 3, 4)
    assert_close(out, ref, torch.float32, "loss [N, C, L]")
    assert_close(g.view(6, 12), rg.view(6, 12), torch.float32, "grad [N, C, L]")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_give_finite_gradients(backend, loss):
    """Duplicated rows: distance clamps at sqrt(eps) and passes no gradient between them; the
    angle of a zero difference is 0; a fully collapsed student (all rows equal) is finite."""
    device = skip_unless_available(backend, FAMILY[loss])
    s, t = make_pair(9, 6, 4, torch.float32, device, seed=3, dups=True)
    s[3:6] = s[6]  # a cluster of four equal rows
    out, ref, g, rg = run_both(loss, s, t, backend)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(g, rg, torch.float32, "grad")
    if loss == "distance":  # equal rows pass each other nothing: the cluster's rows move alike
        assert torch.isfinite(g).all()
    collapsed = s[:1].expand(9, 6).contiguous()
    out, ref, g, rg = run_both(loss, collapsed, t, backend)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    assert_close(out, ref, torch.float32, "loss (collapsed student)")
    assert_close(g, rg, torch.float32, "grad (collapsed student)")


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_input_gives_nan(backend, loss, value, side):
    """A NaN or inf embedding makes the loss NaN, as in the eager code, never a finite number
    (the distance's clamp max(r, eps) dropped a NaN in triton and cuda)."""
    device = skip_unless_available(backend, FAMILY[loss])
    s, t = make_pair(9, 6, 4, torch.float32, device, seed=5)
    (s if side == "student" else t)[3, 1] = value
    out = FN[loss](s.clone().requires_grad_(), t, backend=backend, **KW[loss])
    assert torch.isnan(out).item(), f"{loss} on {backend}: {out.item()} for a {value} in the {side}"


@pytest.mark.parametrize("offset", [1e-3, 1e-4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_angle_near_duplicates(backend, offset):
    """Rows much closer than the batch's spread (a pair in each side, and a tight cluster of
    three): each angle's numerator G_jk - G_ij - G_ik + G_ii cancels down to u_ij . u_ik, far
    below float32's rounding of G, so kernels form the Gram entries and numerators in float64
    (the cpp and torch backends compute the angle in float64, triton its Gram tiles, numerators
    and gradient product). With float32 Grams the loss was 7-14% off and the gradient wrong by
    up to 40x its largest entry; eager float32 code (explicit differences) is within 1e-6."""
    device = skip_unless_available(backend, "rkd_angle")
    n = 21 if backend == "triton" and INTERPRETED else 37
    g = torch.Generator().manual_seed(11)
    s = torch.randn(n, 24, generator=g, dtype=torch.float64) * 3 + 1.0
    t = torch.randn(n, 16, generator=g, dtype=torch.float64)
    s[5] = s[9] + offset * torch.randn(24, generator=g, dtype=torch.float64)
    t[2] = t[7] + offset * torch.randn(16, generator=g, dtype=torch.float64)
    s[12:15] = s[11] + offset * torch.randn(3, 24, generator=g, dtype=torch.float64)
    s, t = s.float().to(device), t.float().to(device)
    out, ref, grad, rgrad = run_both("angle", s, t, backend)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(grad, rgrad, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_huber_delta_and_eps(backend):
    """delta = 0 is L1; a larger eps (as a clamp of squared distances) is honoured; a small
    spread around a large offset (kernels centre the rows) loses no accuracy."""
    device = skip_unless_available(backend, "rkd_distance")
    s, t = make_pair(11, 5, 7, torch.float32, device, seed=4, dups=True, scale=0.01)
    for kw in (dict(huber_delta=5.0), dict(eps=1e-5, huber_delta=0.1)):
        out, ref, g, rg = run_both("distance", s, t, backend, **kw)
        assert_close(out, ref, torch.float32, f"distance {kw}")
        assert_close(g, rg, torch.float32, f"distance grad {kw}")
    # L1's gradient jumps where a_s = a_t (duplicated pairs on both sides): no duplicates here
    s, t = make_pair(11, 5, 7, torch.float32, device, seed=4, scale=0.01)
    out, ref, g, rg = run_both("distance", s, t, backend, huber_delta=0.0)
    assert_close(out, ref, torch.float32, "distance L1")
    assert_close(g, rg, torch.float32, "distance L1 grad")
    if _reason(backend, "rkd_angle", device) is not None:
        return  # no angle kernel in this backend (cuda): the distance part above is this test's
    out, ref, g, rg = run_both("angle", s[:9], t[:9], backend, huber_delta=0.0)
    assert_close(out, ref, torch.float32, "angle L1")
    assert_close(g, rg, torch.float32, "angle L1 grad", atol=1e-6)


@pytest.mark.parametrize("huber_delta", [50.0, 0.05, 0.0], ids=["quadratic", "mixed", "l1"])
@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_distance_paths_across_tiles(backend, huber_delta):
    """The cpp distance kernel takes a closed form when every pair sits in smooth-L1's
    quadratic part, a correction sweep when some do not, and its own sweep for L1: each one
    at a size that crosses its 64 x 128 tiles, against the float64 oracle. The cuda kernel at
    the same size: 5 x 5 tiles of 64 (15 upper-triangle tiles in its scalar sweeps) and its
    gradient split 5 ways."""
    device = skip_unless_available(backend, "rkd_distance")
    s, t = make_pair(263, 45, 17, torch.float32, device, seed=12, dups=huber_delta != 0.0)
    out, ref, g, rg = run_both("distance", s, t, backend, huber_delta=huber_delta)
    assert_close(out, ref, torch.float32, f"distance delta={huber_delta}")
    assert_close(g, rg, torch.float32, f"distance grad delta={huber_delta}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sp_zero_row(backend):
    """A zero student row: its Gram row is 0 and F.normalize's eps takes over, as in torch."""
    device = skip_unless_available(backend, "similarity_preserving")
    s, t = make_pair(7, 5, 3, torch.float32, device, seed=5)
    s[2] = 0
    out, ref, g, rg = run_both("sp", s, t, backend)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(g, rg, torch.float32, "grad")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("form", ["pairs", "features"])
def test_sp_cpp_forms(form, dtype, monkeypatch):
    """The cpp similarity-preserving op has two forms of one function: pairwise (N x N Gram
    tiles) and feature (D x D feature Gram matrices, taken where it is cheaper). Each, forced,
    against the oracle at sizes that cross both forms' tiles (64 x 128 pair tiles; 128-wide
    feature tiles and 256-row blocks), with duplicated rows and a zero row; and without
    gradient (the loss alone), the same loss bitwise."""
    device = skip_unless_available("cpp", "similarity_preserving")
    monkeypatch.setenv("FASTKD_SP_FORM", form)
    for n, ds, dt in [(263, 140, 130), (300, 7, 257), (5, 3, 2)]:
        s, t = make_pair(n, ds, dt, dtype, device, seed=n + ds, dups=True)
        if dtype in (torch.float32, torch.float64):  # the zero row's gradient, ~1/eps, overflows fp16
            s[1] = 0
        out, ref, g, rg = run_both("sp", s, t, "cpp", gout=1.7)
        assert_close(out, ref, dtype, f"{form} loss {n}x{ds}x{dt}")
        assert_close(g, rg, dtype, f"{form} grad {n}x{ds}x{dt}", atol=1e-7 if dtype != torch.float64 else 1e-15)
        with torch.no_grad():
            alone = fastkd.similarity_preserving_loss(s, t, backend="cpp")
        assert torch.equal(alone, out.detach())


def test_sp_cpp_form_choice(monkeypatch):
    """Unset, FASTKD_SP_FORM means pairs; auto takes the feature form where it needs fewer
    multiply-adds (N = 263 rows of 45 and 17: about 11.7k per row against 28k) and the
    pairwise form where N is small against D; the feature form's result does not depend on
    the thread count; a bad FASTKD_SP_FORM is an error that names it."""
    skip_unless_available("cpp", "similarity_preserving")

    def run(s, t, form):
        monkeypatch.setenv("FASTKD_SP_FORM", form)
        x = s.clone().requires_grad_()
        out = fastkd.similarity_preserving_loss(x, t, backend="cpp")
        out.backward()
        return out, x.grad

    def same(a, b):
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    tall = make_pair(263, 45, 17, torch.float32, "cpu", seed=13)
    wide = make_pair(20, 300, 200, torch.float32, "cpu", seed=14)
    assert same(run(*tall, "auto"), run(*tall, "features"))
    pairs = run(*tall, "pairs")
    monkeypatch.delenv("FASTKD_SP_FORM")
    x = tall[0].clone().requires_grad_()
    out = fastkd.similarity_preserving_loss(x, tall[1], backend="cpp")
    out.backward()
    assert same((out, x.grad), pairs)
    assert not same(run(*tall, "pairs"), run(*tall, "features"))  # two computations, not one
    assert same(run(*wide, "auto"), run(*wide, "pairs"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(*tall, "features")
        torch.set_num_threads(max(2, threads))
        assert same(one, run(*tall, "features"))
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="FASTKD_SP_FORM"):
        run(*tall, "fast")
    with pytest.raises(RuntimeError, match="FASTKD_SP_FORM"):  # the op checks it too
        torch.ops.fastkd.similarity_preserving_fwd(*tall, torch.empty(()), None)


@pytest.mark.parametrize("loss", LOSSES)
def test_triton_tf32x3_opt_in(loss, monkeypatch):
    """FASTKD_TRITON_FP32_DOT=tf32x3: Gram tiles from three TF32 tensor-core products, close to
    fp32 (about 1e-6 relative per product instead of 6e-8; tolerance 10x the fp32 one). The
    interpreter computes every precision alike, so on CPU this checks the plumbing; a GPU
    checks the accuracy. A bad value is an error that names the variable."""
    device = skip_unless_available("triton", FAMILY[loss])
    monkeypatch.setenv("FASTKD_TRITON_FP32_DOT", "tf32x3")
    n, ds, dt = _shape(loss, "triton")
    s, t = make_pair(n, ds, dt, torch.float32, device, seed=16, dups=True)
    out, ref, g, rg = run_both(loss, s, t, "triton")
    assert_close(out, ref, torch.float32, "loss", rel32=4e-5)
    assert_close(g, rg, torch.float32, "grad", rel32=4e-5, atol=1e-6)
    monkeypatch.setenv("FASTKD_TRITON_FP32_DOT", "fast")
    with pytest.raises(ValueError, match="FASTKD_TRITON_FP32_DOT"):
        FN[loss](s, t, backend="triton")


def test_sp_cpp_forms_near_a_match(monkeypatch):
    """What the README says of the two forms' precision when the student nearly matches the
    teacher (rows 1% apart; loss ~4e-7): the pairwise form's gradient error stays within 3x
    that of the eager fp32 code (Tung and Mori's, run in fp32), the feature form's within
    30x (measured 3-13x), and the feature form's loss within 1e-2 relative (measured 3e-4)."""
    skip_unless_available("cpp", "similarity_preserving")
    g = torch.Generator().manual_seed(15)
    s = torch.randn(300, 64, generator=g) + 0.3
    t = s + 1e-2 * torch.randn(300, 64, generator=g)

    def eager_sp(x, y):
        a, b = F.normalize(x @ x.T), F.normalize(y @ y.T)
        return ((a - b) ** 2).sum() / x.shape[0] ** 2

    def grad(fn, x, y):
        x = x.clone().requires_grad_()
        out = fn(x, y)
        out.backward()
        return out.detach().double(), x.grad.double()

    l64, g64 = grad(eager_sp, s.double(), t.double())
    _, g32 = grad(eager_sp, s, t)

    def err(a):
        return ((a - g64).norm() / g64.norm()).item()

    for form, factor in (("pairs", 3.0), ("features", 30.0)):
        monkeypatch.setenv("FASTKD_SP_FORM", form)
        loss, gf = grad(lambda x, y: fastkd.similarity_preserving_loss(x, y, backend="cpp"), s, t)
        assert err(gf) <= factor * err(g32), f"{form}: grad error {err(gf):.2e}, eager fp32 {err(g32):.2e}"
        assert abs(loss - l64).item() <= 1e-2 * l64.item(), form


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_teacher_constant(backend):
    device = skip_unless_available(backend, "rkd_angle")
    s, _ = make_pair(10, 6, 6, torch.bfloat16, device, seed=6)
    _, t = make_pair(10, 6, 9, torch.float32, device, seed=7)
    t.requires_grad_()
    out, ref, g, rg = run_both("angle", s, t, backend)
    assert_close(out, ref, torch.bfloat16, "loss")
    assert_close(g, rg, torch.bfloat16, "grad")
    x = s.detach().clone().requires_grad_()
    fastkd.rkd_loss(x, t, backend=backend).backward()
    assert t.grad is None and x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_rkd_loss_is_the_weighted_sum(backend):
    device = skip_unless_available(backend, "rkd_angle")
    s, t = make_pair(8, 5, 3, torch.float32, device, seed=8)
    out, ref_d, _, _ = run_both("distance", s, t, backend, huber_delta=1.0)
    _, ref_a, _, _ = run_both("angle", s, t, backend, huber_delta=1.0)
    both = fastkd.rkd_loss(s, t, distance_weight=25.0, angle_weight=50.0, backend=backend)
    assert_close(both, 25 * ref_d + 50 * ref_a, torch.float32, "rkd_loss")
    only = fastkd.rkd_loss(s, t, angle_weight=0.0, backend=backend)
    assert torch.equal(only, out)


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("loss", LOSSES)
def test_deterministic(backend, loss):
    device = skip_unless_available(backend, FAMILY[loss])
    n = {"cpp": 40, "triton": 20, "cuda": 150}[backend]
    s, t = make_pair(n, 9, 5, torch.float32, device, seed=9)
    res = []
    for _ in range(2):
        x = s.clone().requires_grad_()
        out = FN[loss](x, t, backend=backend)
        out.backward()
        res.append((out, x.grad))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend, loss):
    skip_unless_available(backend, FAMILY[loss])
    s, t = make_pair(6, 4, 3, torch.float64, "cpu", seed=10, dups=loss != "angle")
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: FN[loss](a, t, backend=backend, **KW[loss]), (s,),
                                    eps=1e-6, atol=1e-7)


def _op(backend, loss):
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.fastkd, OPS[loss])
    import fastkd.triton.relational  # noqa: F401  (registers the fastkd_triton ops)
    return getattr(torch.ops.fastkd_triton, OPS[loss])


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
def test_opcheck(backend, loss, grad):
    device = skip_unless_available(backend, FAMILY[loss])
    s, t = make_pair(5, 4, 3, torch.float32, device, seed=11)
    args = (s, t, torch.empty((), device=device), torch.empty_like(s) if grad else None,
            *({"distance": (1e-12, 1.0), "angle": (1.0,), "sp": ()}[loss]))
    torch.library.opcheck(_op(backend, loss), args)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "cuda"])
def test_torch_compile_fullgraph(backend):
    device = skip_unless_available(backend, "rkd_distance")
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("torch.compile cannot trace interpreted triton kernels on CPU tensors")
    torch._dynamo.reset()

    class Distill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(6, 8)
            # cuda: the distance loss alone (its one relational kernel)
            self.rkd = (fastkd.RKDDistanceLoss(backend=backend) if backend == "cuda"
                        else fastkd.RKDLoss(backend=backend))
            self.sp = None if backend == "cuda" else fastkd.SimilarityPreservingLoss(backend=backend)

        def forward(self, h, teacher):
            e = self.head(h)
            out = self.rkd(e, teacher)
            return out if self.sp is None else out + self.sp(e, teacher)

    torch.manual_seed(0)
    m = Distill().to(device)
    h, teacher = torch.randn(12, 6, device=device), torch.randn(12, 5, device=device)
    eager = m(h, teacher)
    eager.backward()
    g_eager = m.head.weight.grad.clone()
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out = compiled(h, teacher)
    out.backward()
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-7)
    assert torch.allclose(m.head.weight.grad, g_eager, rtol=1e-4, atol=1e-8)


# ----------------------------------------------------------------------------- modules, FitNets
@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_match_functions(backend):
    device = skip_unless_available(backend, "rkd_angle")
    s, t = make_pair(9, 4, 6, torch.float32, device, seed=12)
    pairs = [(fastkd.RKDDistanceLoss(huber_delta=0.5, backend=backend),
              fastkd.rkd_distance_loss(s, t, huber_delta=0.5, backend=backend)),
             (fastkd.RKDAngleLoss(backend=backend), fastkd.rkd_angle_loss(s, t, backend=backend)),
             (fastkd.RKDLoss(distance_weight=2.0, angle_weight=3.0, backend=backend),
              fastkd.rkd_loss(s, t, distance_weight=2.0, angle_weight=3.0, backend=backend)),
             (fastkd.SimilarityPreservingLoss(backend=backend),
              fastkd.similarity_preserving_loss(s, t, backend=backend))]
    for crit, expected in pairs:
        assert torch.equal(crit(s, t), expected), repr(crit)
    assert "huber_delta=0.5" in repr(pairs[0][0])


def test_feature_hint_loss_linear_and_conv():
    torch.manual_seed(0)
    hint = fastkd.FeatureHintLoss(6, 10)
    s, t = torch.randn(4, 7, 6, requires_grad=True), torch.randn(4, 7, 10)
    loss = hint(s, t)
    assert torch.allclose(loss, ((hint.proj(s) - t) ** 2).mean())
    loss.backward()
    assert hint.proj.weight.grad is not None and s.grad is not None
    fm_s, fm_t = torch.randn(2, 6, 5, 3), torch.randn(2, 10, 5, 3)  # [N, C, H, W]: 1x1 conv
    conv = torch.nn.Conv2d(6, 10, 1)
    conv.weight.data.copy_(hint.proj.weight.data[:, :, None, None])
    conv.bias.data.copy_(hint.proj.bias.data)
    assert torch.allclose(hint(fm_s, fm_t), F.mse_loss(conv(fm_s), fm_t), rtol=1e-6)
    assert fastkd.feature_hint_loss(fm_s, fm_t, hint.proj.weight, hint.proj.bias).shape == ()


def test_feature_hint_loss_mixed_dtypes():
    """A bfloat16 student against a float32 teacher: the MSE is taken in float32 (the teacher is
    not rounded to bfloat16, whose spacing near 3 is 1.6e-2) and returned in bfloat16."""
    torch.manual_seed(1)
    hint = fastkd.FeatureHintLoss(8, 5).to(torch.bfloat16)
    s = torch.randn(64, 8, dtype=torch.bfloat16)
    proj = hint.proj(s)
    t = proj.float() + 1e-3 * torch.randn(64, 5)  # a teacher the projection nearly matches
    loss = hint(s, t)
    assert loss.dtype == torch.bfloat16
    expected = ((proj.double() - t.double()) ** 2).mean()  # float64 reference, about 1e-6
    assert abs(loss.double() - expected) <= 1e-2 * expected
    rounded = ((proj - t.to(torch.bfloat16)) ** 2).mean()  # the teacher rounded to bfloat16 first
    assert abs(loss.double() - expected) < 0.1 * abs(rounded.double() - expected)


# ----------------------------------------------------------------------------- errors
def _bad_calls():
    s, t = torch.randn(5, 4), torch.randn(5, 3)
    return [
        ("same number N", ValueError, lambda: fastkd.rkd_distance_loss(s, torch.randn(4, 3))),
        ("same number N", ValueError, lambda: fastkd.rkd_angle_loss(s, torch.randn(6, 4))),
        ("same number N", ValueError, lambda: fastkd.similarity_preserving_loss(s, t[:2])),
        ("N=2", ValueError, lambda: fastkd.rkd_distance_loss(s[:1], t[:1])),
        ("N=2", ValueError, lambda: fastkd.rkd_angle_loss(s[:1], t[:1])),
        ("N=2", ValueError, lambda: fastkd.similarity_preserving_loss(s[:1], t[:1])),
        ("student must be a floating", TypeError, lambda: fastkd.rkd_distance_loss(s.long(), t)),
        ("teacher must be a floating", TypeError, lambda: fastkd.rkd_angle_loss(s, t.int())),
        ("student must be a floating", TypeError,
         lambda: fastkd.similarity_preserving_loss(s.bool(), t)),
        ("teacher must be a torch.Tensor", TypeError, lambda: fastkd.rkd_loss(s, [[1.0]])),
        ("student must be a batch", ValueError, lambda: fastkd.rkd_loss(torch.tensor(1.0), t)),
        ("student embeddings are empty", ValueError,
         lambda: fastkd.rkd_distance_loss(torch.randn(5, 0), t)),
        ("eps", ValueError, lambda: fastkd.rkd_distance_loss(s, t, eps=0.0)),
        ("eps", ValueError, lambda: fastkd.RKDLoss(eps=-1e-3)),
        ("huber_delta", ValueError, lambda: fastkd.rkd_angle_loss(s, t, huber_delta=-1.0)),
        ("huber_delta", ValueError, lambda: fastkd.RKDDistanceLoss(huber_delta=float("inf"))),
        ("angle_weight", ValueError, lambda: fastkd.rkd_loss(s, t, angle_weight=float("nan"))),
        ("distance_weight", ValueError, lambda: fastkd.RKDLoss(distance_weight="1")),
        ("backend", ValueError, lambda: fastkd.rkd_distance_loss(s, t, backend="numpy")),
        ("student_dim", ValueError, lambda: fastkd.FeatureHintLoss(0, 4)),
        ("teacher must have the projected", ValueError,
         lambda: fastkd.FeatureHintLoss(4, 3)(s, torch.randn(5, 4))),
        ("student_dim=4", ValueError, lambda: fastkd.FeatureHintLoss(4, 3)(t, t)),
    ]


@pytest.mark.parametrize("needle,exc,call", _bad_calls(),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_is_a_clear_error(needle, exc, call):
    with pytest.raises(exc, match=needle):
        call()


_MEMORY_CHILD = r"""
import ctypes, gc, json, os, sys, torch, fastkd
from fastkd import _native
assert _native.load(), _native.reason()
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
n, d = 4096, 8
s, t = torch.randn(n, d), torch.randn(n, d)
out = {}
for name, form in (("rkd_distance_loss", ""), ("similarity_preserving_loss", "pairs"),
                   ("similarity_preserving_loss", "features")):
    os.environ["FASTKD_SP_FORM"] = form
    fn = getattr(fastkd, name)
    x = s.clone().requires_grad_()
    fn(x, t, backend="cpp").backward()  # warm-up
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    x = s.clone().requires_grad_()
    fn(x, t, backend="cpp").backward()
    out[name + (" " + form if form else "")] = rss("VmHWM") - base
print(json.dumps(out))
"""


def test_cpp_memory_is_not_quadratic():
    """N = 4096, D = 8: one N x N float32 matrix is 64 MiB; the kernels need strips of 64 rows
    (1 MiB each) and O(N D) vectors; similarity-preserving's feature form D x D matrices and
    blocks of 256 rows. Peak RSS of a fresh process, measured as the benchmark does."""
    import json
    import os
    import subprocess
    import sys

    skip_unless_available("cpp", "rkd_distance")
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    peaks = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(peaks) == 3
    for name, peak in peaks.items():
        assert peak < 16 * 2**20, f"{name}: peak {peak / 2**20:.1f} MiB (an N x N matrix is 64 MiB)"


@requires_cuda
def test_cuda_distance_memory_is_not_quadratic():
    """The issue's case in small: N = 4096 on the GPU, where one N x N float32 matrix is 64 MiB
    and the kernel needs O(N D) (centred copies, the gradient accumulator split 4 ways: ~5 MiB
    here). At this size the scalar sweeps spread 2080 tiles over 1024 CTAs: loss and gradient
    against the float64 reference (the test's oracle would build N x N x D differences)."""
    from fastkd.reference.relational import rkd_distance_fwd as reference

    skip_unless_available("cuda", "rkd_distance")
    n = 4096
    s, t = make_pair(n, 40, 24, torch.float32, "cuda", seed=13, dups=True)
    x = s.clone().requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fastkd.rkd_distance_loss(x, t, huber_delta=0.7, backend="cuda")
    out.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB (an N x N matrix is 64 MiB)"
    loss, g = torch.empty((), dtype=torch.float64), torch.empty(n, 40, dtype=torch.float64)
    reference(s.double().cpu(), t.double().cpu(), loss, g, 1e-12, 0.7)
    assert_close(out, loss, torch.float32, "loss", rel32=2e-5)
    assert_close(x.grad, g, torch.float32, "grad student", rel32=2e-5)
