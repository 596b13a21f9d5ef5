"""The Triton kernels at the block sizes a GPU gets, in the interpreter, against the float64 oracles.

The family suites run the interpreter with the launchers' small CPU blocks (numpy runs per op,
so those are fastest there). On CUDA tensors the launchers choose other programs: kd and sparse
rows in chunks of 4096 logits, attention rows of up to 2048 keys in 2048-entry tiles and 1024-wide
transfer blocks split 32 channels at a time, relation blocks of 64 queries, relational Gram tiles
of 16 x 32 (distance) or 32 x 32 with up to 256 or 512 output columns per program. ``fastkd.triton.GPU_LAYOUT_ON_CPU`` makes them choose those on
CPU tensors too, so the programs a GPU would run are checked here, on shapes that cross their
block edges. (tests/test_triton_compile.py compiles the same programs for sm_90.)
"""
import pytest
import torch

import fastkd
import fastkd.triton
from conftest import HAS_CUDA, require_triton, skip_unless_available

if HAS_CUDA:
    pytest.skip("on a GPU the family suites run these programs natively", allow_module_level=True)
require_triton("kd")


@pytest.fixture(autouse=True)
def launches(monkeypatch):
    """GPU layouts on; yields the list of (kernel, its constexpr keywords) launched."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(fastkd.triton, "GPU_LAYOUT_ON_CPU", True)
    seen = []
    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        seen.append((self.fn.__name__, {k: v for k, v in kwargs.items() if k.isupper()}))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    yield seen


def launched(seen, kernel, **want):
    """Some launch of ``kernel`` had exactly these constexprs (the GPU layout took effect)."""
    got = [c for name, c in seen if name == kernel]
    assert any(all(c.get(k) == v for k, v in want.items()) for c in got), (kernel, want, got[:3])


@pytest.mark.parametrize("V", [4096, 9001])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                                        "skew_reverse_kl", "tvd"])
def test_kd_in_4096_logit_chunks(launches, divergence, V):
    from test_divergences import assert_close, make_inputs, run_both

    device = skip_unless_available("triton")
    for dtype, rich in ((torch.float32, True), (torch.bfloat16, False)):
        s, t, labels = make_inputs((2, 3, V), dtype, device, "partial" if rich else "none", seed=V)
        kw = dict(divergence=divergence, temperature=2.0 if rich else 1.0, beta=0.3, skew=0.2,
                  hard_label_weight=0.4 if rich else 0.0, softcap=20.0 if rich else None,
                  reduction="none" if rich else "batchmean")
        out, ref, (gs, gt), (rgs, rgt) = run_both(s, t, labels, "triton", teacher_grad=rich, **kw)
        assert_close(out, ref, dtype, f"loss {dtype}")
        assert_close(gs, rgs, dtype, f"student grad {dtype}")
        if rich:
            assert_close(gt, rgt, dtype, "teacher grad")
    launched(launches, "_kd_fwd_kernel", BLOCK=4096)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_sparse_in_4096_logit_chunks(launches, tail, divergence):
    from test_sparse import assert_close, make_sparse, run_both

    device = skip_unless_available("triton", "sparse_kd")
    z, idx, vals, labels = make_sparse((2, 3), 9001, 64, torch.float32, device, tail)
    out, ref, g, rg = run_both(z, idx, vals, labels, "triton", divergence=divergence, temperature=2.0,
                               beta=0.3, tail=tail, reduction="none", hard_label_weight=0.5)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(g, rg, torch.float32, "grad")
    launched(launches, "_sparse_kd_fwd_kernel", BLOCK=4096)


@pytest.mark.parametrize("kind,inputs,L", [("kl", "probs", 37), ("kl", "scores", 37), ("mse", "scores", 37),
                                           ("kl", "scores", 2100)])
def test_attention_map_rows_at_gpu_tiles(launches, kind, inputs, L):
    """L = 37: 64-key rows, 32 rows per program; L = 2100: two 2048-key chunks per row (one case:
    the interpreter takes half a minute over its 2100 programs)."""
    from test_attention import _maps, check, make_mask, oracle_map

    device = skip_unless_available("triton", "attention_map")
    B, H = (2, 2) if L < 100 else (1, 1)
    s, t = _maps(kind, inputs, (B, H, L, L), torch.float32, device, 70)
    mask = make_mask(B, L, "left", seed=71)
    check(lambda a, be: fastkd.attention_map_loss(a, t, kind=kind, inputs=inputs, attention_mask=mask,
                                                  backend=be),
          lambda a: oracle_map(a, t.double(), kind, inputs, mask), [s], "triton", torch.float32)
    launched(launches, "_map_kernel", **(dict(BLOCK=64, ROWS=32) if L < 100 else dict(BLOCK=2048, ROWS=1)))


def test_attention_transfer_at_gpu_blocks(launches):
    """N = 1100 spatial positions: two 1024-wide blocks; 70 channels: three slices of 32."""
    from test_attention import _rand, check, oracle_at

    device = skip_unless_available("triton", "attention_transfer")
    s, t = _rand((2, 70, 1100), torch.float32, device, 80), _rand((2, 90, 1100), torch.float32, device, 81)
    check(lambda a, be: fastkd.attention_transfer_loss(a, t, backend=be),
          lambda a: oracle_at(a, t.double()), [s], "triton", torch.float32)
    launched(launches, "_at_sums_kernel", BLOCK=1024)


def test_attention_relation_at_gpu_blocks(launches):
    """L = 150: three 64-query blocks, the first padded; fp16 goes to tl.dot as 16-bit tiles."""
    from test_attention import _states, check, make_mask, oracle_relation, poison_padding

    device = skip_unless_available("triton", "attention_relation")
    B, L, A = 2, 150, 2
    mask = make_mask(B, L, "left", seed=91)
    for dtype in (torch.float32, torch.float16):
        st = {k: poison_padding(v, mask, "states") for k, v in _states(B, L, 24, dtype, device, 92, 1.5).items()}
        tt = {k: poison_padding(v, mask, "states") for k, v in _states(B, L, 40, dtype, device, 93, 1.5).items()}
        tref = {k: v.double() for k, v in tt.items()}
        check(lambda q, k, v, be: fastkd.attention_relation_loss(
                  {"q": q, "k": k, "v": v}, tt, num_relation_heads=A, attention_mask=mask, backend=be),
              lambda q, k, v: oracle_relation({"q": q, "k": k, "v": v}, tref, A, mask=mask),
              [st["q"], st["k"], st["v"]], "triton", dtype)
    launched(launches, "_relation_fwd_kernel", BM=64, BN=64)


@pytest.mark.parametrize("loss", ["distance", "angle", "sp"])
def test_relational_at_gpu_tiles(launches, loss):
    """Shapes that cross the GPU tiles: distance N = 45 in 16-row programs over 32-column
    tiles, Ds = 300 in two gradient slices of 256; similarity N = 75 in 32 x 32 tiles, Ds = 600
    in two slices of 512; angle N = 40 in blocks of 16, Ds = 70 in one slice of 128 (the
    interpreter's own layout splits rows into slices of 32 in tests/test_relational.py; here
    two slices of 512 would take the interpreter a minute)."""
    from test_relational import FAMILY, assert_close, make_pair, run_both

    device = skip_unless_available("triton", FAMILY[loss])
    n, ds = {"distance": (45, 300), "sp": (75, 600), "angle": (40, 70)}[loss]
    s, t = make_pair(n, ds, 33, torch.float32, device, seed=5, dups=True)
    out, ref, g, rg = run_both(loss, s, t, "triton")
    assert_close(out, ref, torch.float32, "loss")
    assert_close(g, rg, torch.float32, "grad")
    kernel = {"distance": "_rkd_distance_kernel", "angle": "_rkd_angle_kernel", "sp": "_sp_kernel"}[loss]
    blocks = {"distance": dict(BI=16, BJ=32, BDO=256), "sp": dict(BI=32, BJ=32, BDO=512),
              "angle": dict(BM=16, BDO=128)}[loss]
    launched(launches, kernel, **blocks)
