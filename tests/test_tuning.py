"""The measured choice between triton and cuda (fastkd/_tuning.py) and how backend=None uses it.

Without a GPU the measurement itself runs on CPU backends (cpp vs torch: the same code path,
with wall-clock instead of CUDA-event timing), and the CUDA-only parts (device names, the
registry saying both GPU backends are there) are replaced by stand-ins.
"""
import json

import pytest
import torch

import fastkd
from fastkd import _backend, _tuning


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty tuning state with the cache in a temporary file and a fake GPU name."""
    cache = tmp_path / "tuning.json"
    monkeypatch.setenv("FASTKD_TUNING_CACHE", str(cache))
    monkeypatch.delenv("FASTKD_AUTOTUNE", raising=False)
    monkeypatch.setattr(_tuning, "_measured", {})
    monkeypatch.setattr(_tuning, "_failed", set())
    monkeypatch.setattr(_tuning, "_files", {})
    monkeypatch.setattr(_tuning, "_SHIPPED_DIR", str(tmp_path / "shipped"))
    monkeypatch.setattr(_tuning, "device_key", lambda index: f"Fake GPU {index}|fastkd x")
    return cache


def _fake_measure(times, calls):
    def measure(family, device, dtype, size, candidates):
        calls.append((family, device.index, dtype, size, tuple(candidates)))
        return {c: times[c] for c in candidates}
    return measure


def test_bucket_is_the_next_power_of_two():
    assert [_tuning.bucket(n) for n in (1, 64, 65, 1000, 32000, 32768, 128256)] == \
        [64, 64, 128, 1024, 32768, 32768, 131072]
    assert _tuning.class_key("kd", "bfloat16", 128256) == "kd|bfloat16|131072"


def test_pick_measures_once_per_class_and_saves(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(_tuning, "measure", _fake_measure({"triton": 2.0, "cuda": 1.5}, calls))
    got = _tuning.pick("kd", 0, torch.bfloat16, 128256, ("triton", "cuda"))
    assert got == "cuda"
    assert calls == [("kd", 0, "bfloat16", 131072, ("triton", "cuda"))]
    # same class (another size in the bucket): no second measurement
    assert _tuning.pick("kd", 0, torch.bfloat16, 100000, ("triton", "cuda")) == "cuda"
    assert len(calls) == 1
    # another dtype, size bucket or family is another class
    monkeypatch.setattr(_tuning, "measure", _fake_measure({"triton": 1.0, "cuda": 1.5}, calls))
    assert _tuning.pick("kd", 0, torch.float32, 128256, ("triton", "cuda")) == "triton"
    assert _tuning.pick("kd", 0, torch.bfloat16, 4000, ("triton", "cuda")) == "triton"
    assert _tuning.pick("sparse_kd", 0, torch.bfloat16, 128256, ("triton", "cuda")) == "triton"
    assert len(calls) == 4
    saved = json.loads(fresh.read_text())["Fake GPU 0|fastkd x"]
    assert saved["kd|bfloat16|131072"] == {"backend": "cuda", "ms": {"triton": 2.0, "cuda": 1.5}}
    assert set(saved) == {"kd|bfloat16|131072", "kd|float32|131072", "kd|bfloat16|4096",
                          "sparse_kd|bfloat16|131072"}


def test_a_new_process_starts_from_the_cache_file(fresh, monkeypatch):
    fresh.write_text(json.dumps({"Fake GPU 0|fastkd x": {"kd|float16|32768": {"backend": "cuda"}}}))
    monkeypatch.setattr(_tuning, "measure", lambda *a, **k: pytest.fail("must not measure"))
    assert _tuning.pick("kd", 0, torch.float16, 32000, ("triton", "cuda")) == "cuda"
    # another GPU has its own entries
    monkeypatch.setenv("FASTKD_AUTOTUNE", "0")
    assert _tuning.pick("kd", 1, torch.float16, 32000, ("triton", "cuda")) is None


def test_shipped_tables_answer_after_the_users_cache(fresh, monkeypatch, tmp_path):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "fake.json").write_text(json.dumps({"Fake GPU 0|fastkd x": {
        "kd|bfloat16|131072": {"backend": "cuda"}, "kd|float32|131072": {"backend": "cuda"}}}))
    fresh.write_text(json.dumps({"Fake GPU 0|fastkd x": {"kd|float32|131072": {"backend": "triton"}}}))
    monkeypatch.setattr(_tuning, "measure", lambda *a, **k: pytest.fail("must not measure"))
    assert _tuning.pick("kd", 0, torch.bfloat16, 128256, ("triton", "cuda")) == "cuda"
    assert _tuning.pick("kd", 0, torch.float32, 128256, ("triton", "cuda")) == "triton"
    # a recorded backend that is not among the candidates now is ignored
    monkeypatch.setenv("FASTKD_AUTOTUNE", "0")
    assert _tuning.pick("kd", 0, torch.bfloat16, 128256, ("triton", "torch")) is None


def test_no_measurement_when_disabled_compiling_or_unsupported(fresh, monkeypatch):
    monkeypatch.setattr(_tuning, "measure", lambda *a, **k: pytest.fail("must not measure"))
    monkeypatch.setenv("FASTKD_AUTOTUNE", "0")
    assert _tuning.pick("kd", 0, torch.bfloat16, 1000, ("triton", "cuda")) is None
    monkeypatch.delenv("FASTKD_AUTOTUNE")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _tuning.pick("kd", 0, torch.bfloat16, 1000, ("triton", "cuda")) is None
    monkeypatch.undo()
    # float64, families without a class size and a single candidate never measure
    assert _tuning.pick("kd", 0, torch.float64, 1000, ("triton", "cuda")) is None
    assert _tuning.pick("rkd_angle", 0, torch.float32, 1000, ("triton", "cuda")) is None
    assert _tuning.pick("kd", 0, torch.float32, 1000, ("triton",)) is None


def test_a_failed_measurement_keeps_the_static_order_and_is_not_retried(fresh, monkeypatch):
    calls = []

    def boom(*args, **kwargs):
        calls.append(args)
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(_tuning, "measure", boom)
    assert _tuning.pick("kd", 0, torch.bfloat16, 1000, ("triton", "cuda")) is None
    assert _tuning.pick("kd", 0, torch.bfloat16, 1000, ("triton", "cuda")) is None
    assert len(calls) == 1
    assert not fresh.exists()


def test_backend_none_takes_the_measured_choice_on_cuda(fresh, monkeypatch):
    """_choose asks the tuning only with a class (device index, dtype, size) and two GPU
    backends; otherwise it keeps the static order (triton first)."""
    real = _backend.reason
    monkeypatch.setattr(_backend, "reason", lambda b, fam, dt: None if dt == "cuda" else real(b, fam, dt))
    monkeypatch.setattr(_backend, "CUDA_VERIFIED", frozenset({"kd", "rkd_angle"}))
    calls = []
    monkeypatch.setattr(_tuning, "measure", _fake_measure({"triton": 3.0, "cuda": 1.0}, calls))
    choose = _backend._choose.__wrapped__ if hasattr(_backend._choose, "__wrapped__") else _backend._choose
    assert choose("kd", "cuda", None, False, 0, torch.bfloat16, 128256) == "cuda"
    assert choose("kd", "cuda", None, False, None, None, None) == "triton"
    assert choose("kd", "cuda", "triton", True, None, None, None) == "triton"
    assert choose("rkd_angle", "cuda", None, False, 0, torch.float32, 512) == "triton"
    assert len(calls) == 1
    # CPU tensors never consult it
    assert choose("kd", "cpu", None, False, None, torch.float32, 1000) in ("cpp", "torch")


@pytest.mark.parametrize("family", ["kd", "sparse_kd", "attention_map", "rkd_distance"])
def test_measure_runs_each_backend_on_a_representative_case(family):
    """The real measurement path (bench case, forward + backward, median), on CPU backends."""
    cands = [b for b in ("cpp", "torch") if _backend.reason(b, family, "cpu") is None]
    if len(cands) < 2:
        pytest.skip(f"needs cpp and torch for {family}: {_backend.reason('cpp', family, 'cpu')}")
    size = 64 if family == "rkd_distance" else 128
    times = _tuning.measure(family, "cpu", "float32", size, cands, warmup=1, reps=3,
                            elements=1 << 14)
    assert set(times) == set(cands)
    assert all(t > 0 for t in times.values())


def test_representative_cases_have_the_class_size():
    assert _tuning.representative_case("kd", "bfloat16", 131072).v == 131072
    assert _tuning.representative_case("sparse_kd", "bfloat16", 131072).n == 512
    assert _tuning.representative_case("attention_map", "float16", 2048).l == 2048
    assert _tuning.representative_case("rkd_distance", "float32", 16384).n == 16384
    with pytest.raises(ValueError, match="rkd_angle"):
        _tuning.representative_case("rkd_angle", "float32", 64)


def test_autotune_backends_checks_its_arguments():
    with pytest.raises(ValueError, match="device must be a CUDA device"):
        fastkd.autotune_backends("cpu")


def test_lacks_kernel_tells_a_missing_family_kernel_from_a_broken_backend(monkeypatch):
    """FASTKD_REQUIRE_BACKENDS turns skips into failures only for a broken backend."""
    assert not _backend.lacks_kernel("triton", "kd")
    assert not _backend.lacks_kernel("cpp", "kd")
    monkeypatch.setitem(_backend.FAMILIES, "made_up", ("fastkd.reference.made_up", "made_up_fwd"))
    assert _backend.lacks_kernel("triton", "made_up") == (
        __import__("importlib").util.find_spec("triton") is not None)
    # on a torch without CUDA the cuda backend is unavailable as a whole, not per family
    if not torch.version.cuda:
        assert not _backend.lacks_kernel("cuda", "kd")


def test_an_unverified_cuda_kernel_is_never_measured_into_use(fresh, monkeypatch):
    """Until a family's CUDA kernel has passed the suite on a GPU, backend=None keeps triton."""
    real = _backend.reason
    monkeypatch.setattr(_backend, "reason", lambda b, fam, dt: None if dt == "cuda" else real(b, fam, dt))
    monkeypatch.setattr(_backend, "CUDA_VERIFIED", frozenset({"kd"}))
    monkeypatch.setattr(_tuning, "measure", _fake_measure({"triton": 3.0, "cuda": 1.0}, []))
    choose = _backend._choose.__wrapped__ if hasattr(_backend._choose, "__wrapped__") else _backend._choose
    assert choose("sparse_kd", "cuda", None, False, 0, torch.bfloat16, 128256) == "triton"
    assert choose("kd", "cuda", None, False, 0, torch.bfloat16, 128256) == "cuda"
