"""The CPU gradient-buffer cache (fastkd/_buffers.py, csrc/cpu/buffers.cpp).

A block goes back to the cache only when no tensor references it, is reused by the next buffer
of about its size, respects FASTKD_CPU_CACHE_MB (0: off), and the losses that use it give the
same results as without it (and as the float64 oracle), even when a reused block holds garbage.
"""
import threading

import pytest
import torch

import fastkd
from fastkd import _buffers, _native
from test_divergences import assert_close, make_inputs, oracle

if not _native.load():
    pytest.skip(f"native extension unavailable: {_native.reason()}", allow_module_level=True)

MiB = 2**20
LIKE = torch.empty(2, 1024, 1024)  # 8 MiB of float32: above the 4 MiB threshold


@pytest.fixture
def cache(monkeypatch):
    """The cache with a given FASTKD_CPU_CACHE_MB (default 64), emptied before and after."""
    def set_mb(mb):
        monkeypatch.setenv("FASTKD_CPU_CACHE_MB", str(mb))
        _buffers.configure()
        fastkd.empty_cache()

    set_mb(64)
    yield set_mb
    monkeypatch.undo()
    _buffers.configure()
    fastkd.empty_cache()


def info():
    return fastkd.cpu_cache_info()


def test_reuses_a_block_after_its_tensor_dies(cache):
    a = _buffers.empty_like(LIKE)
    ptr = a.data_ptr()
    assert info()["in_use_blocks"] == 1 and info()["idle_blocks"] == 0
    del a
    assert info()["idle_bytes"] == 8 * MiB
    hits = info()["hits"]
    b = _buffers.empty_like(LIKE)
    assert b.data_ptr() == ptr and info()["hits"] == hits + 1 and info()["idle_blocks"] == 0


def test_never_hands_out_a_block_that_a_tensor_still_references(cache):
    a = _buffers.empty_like(LIKE).fill_(1.0)
    b = _buffers.empty_like(LIKE).fill_(2.0)
    assert a.data_ptr() != b.data_ptr()
    view = a[1, 5:9]  # a view keeps the storage, hence the block, alive
    ptr = a.data_ptr()
    del a
    assert info()["idle_blocks"] == 0
    c = _buffers.empty_like(LIKE).fill_(3.0)
    assert c.untyped_storage().data_ptr() != ptr
    assert torch.equal(view, torch.ones_like(view)) and bool((b == 2.0).all())
    del view
    assert info()["idle_blocks"] == 1
    d = _buffers.empty_like(LIKE)
    assert d.data_ptr() == ptr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_buffers_are_aligned_contiguous_and_shaped(cache, dtype):
    like = torch.empty(3, 700, 2001, dtype=dtype)
    for zero in (False, True):
        x = _buffers.empty_like(like, zero=zero)
        assert x.shape == like.shape and x.dtype == dtype and x.is_contiguous()
        assert x.data_ptr() % 64 == 0 and info()["in_use_blocks"] == 1
        if zero:
            assert not x.any()
        x.fill_(float("nan"))  # garbage for the next one, which must still come out zeroed
        del x


def test_small_and_non_cpu_buffers_bypass_the_cache(cache):
    small = _buffers.empty_like(torch.empty(1000, 1000))  # 3.8 MiB
    assert info()["in_use_blocks"] == 0 and small.shape == (1000, 1000)
    with torch._subclasses.FakeTensorMode():
        fake = _buffers.empty_like(torch.empty(2, 1024, 1024))
    assert isinstance(fake, torch._subclasses.FakeTensor) and info()["in_use_blocks"] == 0


def test_limit_bounds_the_idle_bytes(cache):
    cache(20)  # MiB
    blocks = [_buffers.empty_like(LIKE) for _ in range(3)]
    del blocks
    assert info()["idle_bytes"] <= 20 * MiB and info()["idle_blocks"] == 2  # also: two per size
    big = _buffers.empty_like(torch.empty(3, 1024, 1024, 2))  # 24 MiB > the limit: never kept
    del big
    assert info()["idle_bytes"] <= 20 * MiB and info()["in_use_bytes"] == 0
    other = _buffers.empty_like(torch.empty(3, 1024, 1024))  # 12 MiB: the oldest 8 MiB goes
    del other
    assert info()["idle_bytes"] == 20 * MiB and info()["idle_blocks"] == 2


def test_zero_disables_the_cache(cache):
    cache(0)
    assert info()["limit_bytes"] == 0
    misses = info()["misses"]
    x = _buffers.empty_like(LIKE)
    assert x.shape == LIKE.shape and info()["in_use_blocks"] == 0
    del x
    assert info()["idle_blocks"] == 0 and info()["misses"] == misses


def test_bad_limit_is_a_value_error(cache, monkeypatch):
    monkeypatch.setenv("FASTKD_CPU_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="FASTKD_CPU_CACHE_MB"):
        _buffers.configure()


def test_empty_cache_frees_idle_blocks_only(cache):
    keep = _buffers.empty_like(LIKE)
    drop = _buffers.empty_like(LIKE)
    del drop
    assert fastkd.empty_cache() == 8 * MiB
    assert info()["idle_bytes"] == 0 and info()["in_use_blocks"] == 1
    del keep
    assert info()["idle_blocks"] == 1


def test_threads_allocating_and_freeing(cache):
    errors = []

    def work(k):
        try:
            for i in range(20):
                x = _buffers.empty_like(LIKE).fill_(k)
                assert bool((x[:, ::4096] == k).all())
                del x
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and info()["in_use_blocks"] == 0 and info()["idle_bytes"] <= 64 * MiB


# ----------------------------------------------------------------------------- the losses
def _kd(s, t, labels, teacher_grad=False, **kw):
    s1 = s.detach().clone().requires_grad_()
    t1 = t.detach().clone().requires_grad_(teacher_grad)
    out = fastkd.kd_loss(s1, t1, labels, backend="cpp", temperature=2.0, **kw)
    out.backward()
    return out.detach(), s1.grad, t1.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_with_cached_buffers_matches_the_oracle(cache, dtype, divergence):
    rows = 64 if dtype == torch.float32 else 128  # 5 MiB of gradient either way
    s, t, labels = make_inputs((rows, 20000), dtype, "cpu", seed=3)
    for _ in range(2):  # the second call reuses the first one's block
        _buffers.empty_like(s).fill_(float("nan"))  # a dirty block for the cache
        hits = info()["hits"]
        out, gs, _ = _kd(s, t, labels, divergence=divergence)
        assert info()["hits"] == hits + 1
        s2 = s.detach().double().requires_grad_()
        ref = oracle(s2, t.double(), labels, divergence=divergence, temperature=2.0)
        ref.backward()
        assert_close(out, ref.detach(), dtype, "loss")
        assert_close(gs, s2.grad, dtype, "grad_student")
        del gs


def test_cached_buffers_change_no_bit(cache):
    s, t, labels = make_inputs((2, 32, 20000), torch.float32, "cpu", seed=4)
    t = torch.cat([t, torch.full((2, 32, 64), 1e4)], -1)  # a padded teacher: gradient zero-filled
    kw = dict(divergence="jsd", vocab_size=20000, teacher_grad=True, hard_label_weight=0.3)
    cached = _kd(s, t, labels, **kw)
    assert info()["in_use_blocks"] == 2  # both gradients come from the cache
    del cached
    _buffers.empty_like(t).fill_(float("nan"))
    cached = _kd(s, t, labels, **kw)
    cache(0)
    plain = _kd(s, t, labels, **kw)
    assert not cached[2][..., 20000:].any()
    for a, b in zip(cached, plain):
        assert torch.equal(a, b)


def test_sparse_kd_loss_uses_the_cache_and_changes_no_bit(cache):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(64, 20000, generator=g)
    idx = torch.randperm(20000, generator=g)[:16].repeat(64, 1)
    val = torch.randn(64, 16, generator=g)

    def run():
        s1 = s.clone().requires_grad_()
        out = fastkd.sparse_kd_loss(s1, idx, val, backend="cpp", temperature=2.0)
        out.backward()
        return out.detach(), s1.grad

    first = run()
    assert info()["misses"] >= 1
    del first
    hits = info()["hits"]
    cached = run()
    assert info()["hits"] == hits + 1
    cache(0)
    plain = run()
    for a, b in zip(cached, plain):
        assert torch.equal(a, b)


def test_compiled_kd_loss_does_not_use_the_cache(cache):
    s, t, _ = make_inputs((64, 20000), torch.float32, "cpu", seed=6)
    f = torch.compile(lambda a, b: fastkd.kd_loss(a, b, backend="cpp"), fullgraph=True)
    s1 = s.clone().requires_grad_()
    before = info()
    f(s1, t).backward()
    after = info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    assert after["in_use_blocks"] == 0
    s2 = s.clone().requires_grad_()
    fastkd.kd_loss(s2, t, backend="cpp").backward()
    assert info()["in_use_blocks"] == 1
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-5, atol=1e-9)
