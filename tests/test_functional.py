"""The layer every family shares (fastkd/functional.py): argument checks that no kernel sees,
the batchmean denominator, the scaling of stored gradients, and the once-only backward."""
import pytest
import torch

import fastkd

S = lambda *shape, dtype=torch.float32: torch.randn(*shape, dtype=dtype)  # noqa: E731


def _losses():
    """One call per logits family, taking the same reduction keywords."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 11, generator=g), torch.randn(3, 4, 11, generator=g)
    idx = torch.topk(t, 3, dim=-1).indices
    h, w = torch.randn(3, 4, 6, generator=g), torch.randn(11, 6, generator=g)
    return {
        "kd": lambda **kw: fastkd.kd_loss(s, t, **kw),
        "sparse": lambda **kw: fastkd.sparse_kd_loss(s, idx, t.gather(-1, idx), **kw),
        "fused": lambda **kw: fastkd.fused_linear_kd_loss(h, w, h * 0.5, w, **kw),
    }


@pytest.mark.parametrize("family", ["kd", "sparse", "fused"])
def test_num_items_in_batch_is_checked(family):
    """A tensor num_items_in_batch must hold one positive finite number (it used to broadcast a
    [2] tensor into a [2] "loss", and 0, negatives and NaN gave inf / negative / NaN losses)."""
    call = _losses()[family]
    ref = call(reduction="sum")
    for good in (4, 4.0, torch.tensor(4), torch.tensor([4.0]), torch.tensor([[4]])):
        out = call(num_items_in_batch=good)
        assert out.shape == () and torch.allclose(out, ref / 4)
    for bad in (torch.tensor([2, 3]), torch.tensor(0), torch.tensor(-2.0), torch.tensor(float("nan")),
                torch.tensor(True), 0, -1, float("nan"), float("inf"), True, "4"):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            call(num_items_in_batch=bad)


@pytest.mark.parametrize("family", ["kd", "sparse", "fused"])
def test_bools_are_not_numbers_and_flags_are_bools(family):
    call = _losses()[family]
    for kw in (dict(temperature=True), dict(beta=True), dict(skew=False), dict(hard_label_weight=True),
               dict(soft_label_weight=True)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            call(**kw)
    with pytest.raises(TypeError, match="scale_temperature"):
        call(scale_temperature="no")
    with pytest.raises(ValueError, match="ignore_index"):
        call(ignore_index=2 ** 70)


def test_kd_flags_and_empty_vocabulary():
    s, t = S(4, 7), S(4, 7)
    with pytest.raises(TypeError, match="inplace"):
        fastkd.kd_loss(s, t, inplace="yes")
    with pytest.raises(TypeError, match="validate"):
        fastkd.sparse_kd_loss(s, torch.zeros(4, 1, dtype=torch.long), S(4, 1), validate=1)
    for backend in ("torch", "cpp"):
        with pytest.raises(ValueError, match="empty vocabulary"):
            fastkd.kd_loss(S(4, 0), S(4, 0), backend=backend)
        with pytest.raises(ValueError, match="empty vocabulary"):
            fastkd.sparse_kd_loss(S(4, 0), torch.zeros(4, 1, dtype=torch.long), S(4, 1), backend=backend)
    with pytest.raises(ValueError, match="empty vocabulary"):
        fastkd.fused_linear_kd_loss(S(4, 3), S(0, 3), S(4, 2), S(0, 2))


def test_inplace_refuses_rows_sharing_memory():
    """inplace=True on an expand()ed student would write every row's gradient over the same
    memory (triton returned a wrong loss and gradient; torch and cpp raised from inside)."""
    row = S(1, 10).requires_grad_()
    with pytest.raises(ValueError, match="inplace"):
        fastkd.kd_loss(row.expand(4, 10), S(4, 10), inplace=True)
    out = fastkd.kd_loss(row.expand(4, 10), S(4, 10))  # without inplace it is fine
    out.backward()
    assert torch.isfinite(row.grad).all()


@pytest.mark.parametrize("family", ["kd", "sparse", "fused", "rkd_distance", "attention_map"])
def test_double_backward_is_refused(family):
    """The gradient is computed in the forward, so it has no graph: create_graph=True used to
    give silently zero second derivatives."""
    x = S(3, 5, dtype=torch.float64).requires_grad_()
    y = S(3, 5, dtype=torch.float64)
    calls = {
        "kd": lambda: fastkd.kd_loss(x, y),
        "sparse": lambda: fastkd.sparse_kd_loss(x, torch.topk(y, 2).indices, torch.topk(y, 2).values),
        "fused": lambda: fastkd.fused_linear_kd_loss(x, y, x.detach(), y),
        "rkd_distance": lambda: fastkd.rkd_distance_loss(x, y),
        "attention_map": lambda: fastkd.attention_map_loss(x.view(1, 1, 3, 5)[..., :3],
                                                           y.view(1, 1, 3, 5)[..., :3].softmax(-1),
                                                           inputs="scores"),
    }
    (g,) = torch.autograd.grad(calls[family](), x)  # a plain backward works
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(calls[family](), x, create_graph=True)


@pytest.mark.parametrize("family,reduction", [("kd", "batchmean"), ("kd", "sum"), ("sparse", "batchmean"),
                                               ("sparse", "sum"), ("rkd_distance", None)])
def test_float64_gradients_keep_float64_precision(family, reduction):
    """grad_output and 1/denominator scale float64 gradients in float64 (they were rounded to
    float32 first: 1e-8 relative errors where gradcheck-grade inputs expect 1e-16)."""
    x = S(7, 13, dtype=torch.float64).requires_grad_()
    y = S(7, 13, dtype=torch.float64)
    kw = {} if reduction is None else dict(reduction=reduction)
    call = {
        "kd": lambda: fastkd.kd_loss(x, y, backend="cpp", **kw),
        "sparse": lambda: fastkd.sparse_kd_loss(x, torch.topk(y, 4).indices, torch.topk(y, 4).values,
                                                backend="cpp", **kw),
        "rkd_distance": lambda: fastkd.rkd_distance_loss(x, y, backend="cpp"),
    }[family]
    (g1,) = torch.autograd.grad(call(), x)
    gout = torch.tensor(0.1, dtype=torch.float64)  # not a float32 number
    (g2,) = torch.autograd.grad(call(), x, gout)
    err = ((g2 - 0.1 * g1).abs().max() / g1.abs().max()).item()
    assert err < 1e-14, err


def test_modules_check_the_backend_name_at_construction():
    """A misspelt backend fails when the module is built, not at its first batch (the modules'
    construction probe runs the torch backend, so the name itself was never looked at)."""
    modules = [fastkd.KDLoss, fastkd.SparseKDLoss, fastkd.FusedLinearKDLoss, fastkd.RKDLoss,
               fastkd.RKDDistanceLoss, fastkd.RKDAngleLoss, fastkd.SimilarityPreservingLoss,
               fastkd.AttentionTransferLoss, fastkd.AttentionMapLoss,
               lambda backend: fastkd.AttentionRelationLoss(num_relation_heads=2, backend=backend)]
    for make in modules:
        with pytest.raises(ValueError, match="backend must be one of"):
            make(backend="Triton")
        make(backend="torch")


def _every_family(backend):
    """One call per loss family on a leaf x (student side), each with its own teacher."""
    g = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    t = r(2, 3, 11)
    idx = torch.topk(t, 3, dim=-1).indices
    w, tw = r(11, 6), r(11, 6)
    tq, tf, tm, te = r(2, 5, 12), r(2, 4, 4, 5), r(2, 2, 5, 5), r(9, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    kw = dict(backend=backend)
    return {
        "kd": (r(2, 3, 11), lambda x, red: fastkd.kd_loss(x, t, reduction=red, **kw)),
        "sparse_kd": (r(2, 3, 11), lambda x, red: fastkd.sparse_kd_loss(x, idx, t.gather(-1, idx),
                                                                          reduction=red, **kw)),
        "fused_linear": (r(2, 3, 6), lambda x, red: fastkd.fused_linear_kd_loss(
            x, w, x.detach() * 0.5, tw, reduction=red, **kw)),
        "attention_transfer": (r(2, 3, 4, 5), lambda x, red: fastkd.attention_transfer_loss(
            x, tf, reduction={"batchmean": "mean"}.get(red, red), **kw)),
        "attention_map": (r(2, 2, 5, 5), lambda x, red: fastkd.attention_map_loss(
            x, tm, inputs="scores", attention_mask=mask, reduction=red, **kw)),
        "attention_relation": (r(2, 5, 8), lambda x, red: fastkd.attention_relation_loss(
            (x, x * 2, x * 3), (tq, tq, tq), num_relation_heads=2, attention_mask=mask, **kw)),
        "rkd_distance": (r(9, 6), lambda x, red: fastkd.rkd_distance_loss(x, te, **kw)),
        "rkd_angle": (r(7, 6), lambda x, red: fastkd.rkd_angle_loss(x, te[:7], **kw)),
        "similarity_preserving": (r(9, 6), lambda x, red: fastkd.similarity_preserving_loss(
            x, te, **kw)),
    }


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compiled_gradients_are_eager_gradients(backend, reduction):
    """torch.compile(fullgraph=True) gives every family the gradients of eager mode. Under torch
    2.11 every fastkd loss came out of a compiled graph with zero gradients: its autograd.Function
    returned a tensor that aliased a forward intermediate (a no-op .to(), a reshape view), which
    that release's dynamo mishandles; every Function now returns a fresh tensor."""
    from conftest import skip_unless_available

    skip_unless_available(backend, "kd")
    for family, (x0, call) in _every_family(backend).items():
        if reduction != "batchmean" and family.startswith(("attention_relation", "rkd", "similarity")):
            continue  # scalar losses without a reduction argument: one case is enough
        x = x0.clone().requires_grad_(True)
        f = lambda x: call(x, reduction).sum()  # noqa: E731
        eager = f(x)
        eager.backward()
        g_eager, x.grad = x.grad.clone(), None
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        out.backward()
        assert torch.allclose(out, eager, rtol=1e-5, atol=1e-7), family
        assert g_eager.abs().max() > 0, family
        assert torch.allclose(x.grad, g_eager, rtol=1e-4, atol=1e-7), (family, x.grad.abs().max(), g_eager.abs().max())
