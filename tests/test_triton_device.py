"""Triton launches go to the inputs' CUDA device, not to whichever device is current.

A Triton launch uses the current CUDA device and its current stream. Every launcher of
fastkd.triton therefore runs under ``torch.cuda.device(<its first tensor>.device)``, as the CUDA
C++ ops run under a device guard. Checked here without a GPU through the wrapper itself and the
list of launchers; on a machine with two GPUs, with inputs on cuda:1 while cuda:0 is current.
"""
import contextlib
import inspect
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import fastkd  # noqa: E402
import fastkd.triton as ft  # noqa: E402
from fastkd.triton import attention, divergences, relational, sparse  # noqa: E402

MODULES = (divergences, sparse, attention, relational)


def _launchers():
    for mod in MODULES:
        for name, fn in vars(mod).items():
            if name.endswith("_triton") and inspect.isfunction(fn) and fn.__module__ == mod.__name__:
                yield f"{mod.__name__.rsplit('.', 1)[-1]}.{name}", fn


def test_every_launcher_takes_its_inputs_device():
    found = dict(_launchers())
    # the nine launchers of the four families (a new one must be wrapped too)
    assert len(found) == 9, sorted(found)
    unwrapped = [name for name, fn in found.items() if not getattr(fn, "on_tensor_device", False)]
    assert not unwrapped, f"launchers without the device guard: {unwrapped}"


class _FakeCudaTensor:
    is_cuda = True

    def __init__(self, index):
        self.device = torch.device("cuda", index)


def test_wrapper_makes_the_tensors_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(dev)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    seen = []

    @ft.on_tensor_device
    def launcher(x, y, *, z):
        seen.append((entered[-1], y, z))
        return "ok"

    assert launcher(_FakeCudaTensor(1), 5, z=7) == "ok"
    assert seen == [(torch.device("cuda", 1), 5, 7)]
    entered.clear()
    # CPU tensors (the interpreter) run without touching torch.cuda
    assert launcher.__wrapped__ is not None
    cpu_seen = []
    ft.on_tensor_device(lambda x: cpu_seen.append(x.device))(torch.zeros(1))
    assert cpu_seen == [torch.device("cpu")] and entered == []


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_inputs_on_the_second_gpu():
    torch.manual_seed(0)
    with torch.cuda.device(0):
        dev = torch.device("cuda", 1)
        s = torch.randn(8, 300, device=dev, requires_grad=True)
        t = torch.randn(8, 300, device=dev)
        cases = [
            lambda b: fastkd.kd_loss(s, t, divergence="jsd", beta=0.3, backend=b),
            lambda b: fastkd.rkd_distance_loss(s, t, backend=b),
            lambda b: fastkd.similarity_preserving_loss(s, t, backend=b),
            lambda b: fastkd.attention_relation_loss(
                {"q": s.view(2, 4, 300), "k": s.view(2, 4, 300) * 0.5, "v": s.view(2, 4, 300)},
                {"q": t.view(2, 4, 300), "k": t.view(2, 4, 300), "v": t.view(2, 4, 300) * 2},
                num_relation_heads=3, backend=b),
        ]
        for case in cases:
            out = {}
            for b in ("triton", "torch"):
                s.grad = None
                loss = case(b)
                loss.backward()
                assert loss.device == dev and torch.cuda.current_device() == 0
                out[b] = (loss.detach().double(), s.grad.double())
            torch.cuda.synchronize(dev)
            torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-3, atol=1e-6)
