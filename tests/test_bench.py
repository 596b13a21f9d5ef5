"""The benchmark command: tiny shapes in-process, in seconds.

Checks that its baselines compute what fastkd computes (or the speed-ups would compare different
things), that the table has a row per implementation, that --json writes the raw numbers with
device metadata, that a case can run in a child process, and that the pytest-benchmark suite imports.
"""
import importlib.util
import json
import os

import pytest
import torch

import fastkd
from fastkd.bench import DIVERGENCES, Case, cases, format_table, implementations, run
from fastkd.bench.__main__ import main
from fastkd.bench.divergences import EAGER, fastkd_backends, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_eager_baselines_match_fastkd(divergence):
    """The eager code the bench times computes kd_loss's value and gradient."""
    case = Case(divergence, "float32", 5, 37)
    s, t = make_inputs(case, "cpu", seed=3)  # float32, as the bench feeds them
    s64, t64 = s.detach().double().requires_grad_(), t.double()
    want = fastkd.kd_loss(s64, t64, divergence=divergence, temperature=case.temperature,
                          beta=case.beta, skew=case.skew, backend="torch")
    (g_want,) = torch.autograd.grad(want, s64)
    got = EAGER[divergence](s, t, case.temperature, case.beta, case.skew)  # float32 math
    (g_got,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-6)


def test_cpu_never_uses_the_triton_interpreter():
    assert "triton" not in fastkd_backends("cpu")  # even under TRITON_INTERPRET=1 (conftest)
    names = [i.name for i in implementations(Case("jsd", "float32", 4, 16), "cpu")]
    assert "triton" not in names and {"torch", "eager", "compile"} <= set(names)


def test_run_tiny_table_has_a_row_per_implementation():
    todo = cases(["forward_kl", "jsd"], ["float32", "bfloat16"], [(8, 64)])
    select = fastkd_backends("cpu") + ["eager"]
    report = run(todo, "cpu", select, min_time=0.0, max_reps=3, progress=False,
                 roofline_bytes=2**20)
    rows = report["results"]
    assert len(rows) == len(todo) * len(select)
    assert all(r["error"] is None and r["check"] in ("ok", "ref") for r in rows), rows
    table = format_table(report)
    lines = table.splitlines()
    for r in rows:
        hits = [ln for ln in lines if ln.split()[:4] == [r["divergence"], r["dtype"],
                                                         f"{r['n']}x{r['v']}", r["display"]]]
        assert len(hits) == 1, (r["display"], table)
    for r in rows:
        assert r["median_s"] > 0 and r["reps"] >= 1 and r["bytes"] == 3 * 8 * 64 * (
            4 if r["dtype"] == "float32" else 2)
        assert (r["speedup_vs_eager"] == 1.0) == (r["impl"] == "eager")


def test_main_writes_json_with_device_metadata(tmp_path, capsys):
    out = tmp_path / "res" / "bench.json"
    rc = main(["--tiny", "--divergence", "tvd", "--backend", "torch,eager", "--dtype", "fp32",
               "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "fastkd[torch]" in table and "eager" in table
    data = json.loads(out.read_text())
    meta = data["meta"]
    for key in ("device_name", "cpu_model", "torch", "triton", "python", "torch_threads", "date",
                "git_commit", "backends"):
        assert key in meta, key
    assert meta["device_type"] == "cpu" and meta["torch_threads"] >= 1
    assert [r["impl"] for r in data["results"]] == ["torch", "eager"]
    assert all(len(r["times_s"]) == r["reps"] for r in data["results"])


def test_case_in_a_child_process_measures_memory():
    report = run([Case("forward_kl", "float32", 64, 4096)], "cpu", ["torch", "eager"],
                 min_time=0.0, max_reps=2, isolate="case", progress=False, roofline_bytes=None)
    rows = report["results"]
    assert [r["impl"] for r in rows] == ["torch", "eager"]
    assert all(r["error"] is None for r in rows), rows
    if os.path.exists("/proc/self/clear_refs"):
        # eager holds several [64, 4096] float32 temporaries (1 MiB each) at its peak
        assert rows[1]["peak_bytes"] >= 2**20


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="unknown divergence"):
        main(["--tiny", "--divergence", "kl"])
    with pytest.raises(SystemExit, match="unknown backend"):
        main(["--tiny", "--backend", "fast"])


def test_pytest_benchmark_suite_imports():
    path = os.path.join(ROOT, "benchmarks", "test_kd_loss.py")
    spec = importlib.util.spec_from_file_location("fastkd_benchmarks_kd_loss", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert callable(mod.test_kd_loss)
    assert set(mod.IMPLS) >= {"cpp", "torch", "eager", "compile"}
