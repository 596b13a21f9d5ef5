"""The benchmark command: every family on tiny shapes, in seconds.

Checks that its baselines compute what fastkd computes (or the speed-ups would compare different
things), that the table has a row per implementation with finite positive numbers, that --json
writes the raw numbers with device metadata, that --loss / --backend filter, that --plot draws
time and memory against size, that a case can run in a child process, that progress never needs
a terminal, and that the pytest-benchmark suites collect and run.
"""
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd.bench import DIVERGENCES, FAMILIES, LOSSES, Case, format_table, run
from fastkd.bench.__main__ import main
from fastkd.bench.attention import MapCase, RelationCase, TransferCase
from fastkd.bench.divergences import EAGER, fastkd_backends, make_inputs
from fastkd.bench.families import case_from_dict, preset_cases, resolve
from fastkd.bench.fused_linear import FusedLinearCase
from fastkd.bench.progress import Progress
from fastkd.bench.relational import RelationalCase
from fastkd.bench.sparse import SparseCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = preset_cases("tiny", "cpu")
NATIVE = [b for b in fastkd_backends("cpu") if b != "torch"]


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


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


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.label)
def test_every_family_eager_matches_fastkd(case):
    """Every case's eager baseline and fastkd's reference backend agree on loss and gradients."""
    (eager,) = case.implementations("cpu", ["eager"])
    (ours,) = case.implementations("cpu", ["torch"])
    args, leaves = case.make_inputs("cpu", seed=1)
    got = [eager.fn(*args)]
    got += list(torch.autograd.grad(got[0], leaves))
    want = [ours.fn(*args)]
    want += list(torch.autograd.grad(want[0], leaves))
    assert got[0].dim() == 0 and torch.isfinite(got[0]) and got[0] > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=1e-6)


def test_tiny_preset_covers_every_loss():
    assert {c.family for c in TINY} == set(FAMILIES)
    assert {c.loss for c in TINY} == set(LOSSES)
    assert {c.name for c in TINY if c.loss == "attention_map_loss"} == {"map_kl", "map_mse"}
    for c in TINY:  # the child process rebuilds cases from their dicts
        assert case_from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_byte_and_flop_counts():
    """The counts behind GB/s and TFLOP/s, as the family modules document them."""
    assert Case("jsd", "bfloat16", 8, 100).bytes == 3 * 8 * 100 * 2
    assert SparseCase("float32", 8, 100, 5).bytes == 2 * 8 * 100 * 4 + 8 * 5 * (8 + 4)
    f = FusedLinearCase("forward_kl", "float32", 8, 16, 24, 100)
    assert f.flops == 2 * 8 * 100 * (3 * 16 + 24) and f.bytes is None
    assert TransferCase("float32", 2, 3, 5, 4, 4).bytes == (2 * 3 + 5) * 2 * 16 * 4
    assert MapCase("kl", "float32", 2, 3, 8).bytes == 3 * 2 * 3 * 64 * 4
    assert RelationCase("float32", 2, 8, 16, 24, 2).flops == 6 * 2 * 64 * (3 * 16 + 24)
    assert RelationalCase("rkd_distance", "float32", 10, 4).flops == 2 * 100 * 3 * 4
    assert RelationalCase("rkd_angle", "float32", 10, 4).flops is None
    assert Case("tvd", "float32", 8, 100).scaled(0.5) == Case("tvd", "float32", 4, 100)
    assert TransferCase("float32", 2, 3, 5, 4, 4).scaled(0.25).b == 1  # never 0


def test_cpu_never_uses_the_triton_interpreter():
    assert "triton" not in fastkd_backends("cpu")  # even under TRITON_INTERPRET=1 (conftest)
    names = [i.name for i in Case("jsd", "float32", 4, 16).implementations("cpu")]
    assert "triton" not in names and {"torch", "eager", "compile"} <= set(names)


def _table_lines(table, r):
    return [ln for ln in table.splitlines()
            if ln.split()[:4] == [r["case"], r["dtype"], r["shape"], r["display"]]]


def test_run_every_family_has_a_row_per_implementation():
    select = fastkd_backends("cpu") + ["eager"]
    report = run(TINY, "cpu", select, min_time=0.0, max_reps=3, progress=False,
                 roofline_bytes=2**20)
    rows = report["results"]
    assert len(rows) == len(TINY) * len(select)
    assert all(r["error"] is None and r["check"] in ("ok", "ref") for r in rows), rows
    table = format_table(report)
    for family in FAMILIES:
        assert f"== {family}: " in table
    for r in rows:
        assert len(_table_lines(table, r)) == 1, (r["label"], r["display"], table)
        assert _finite_positive(r["median_s"]) and r["reps"] == len(r["times_s"]) >= 1
        assert math.isfinite(r["loss_value"]) and _finite_positive(r["grad_norm"])
        assert (r["speedup_vs_eager"] == 1.0) == (r["impl"] == "eager")
        if r["bytes"]:
            assert _finite_positive(r["gb_per_s"])
        if r["flops"]:
            assert _finite_positive(r["tflop_per_s"])
        assert r["bytes"] or r["flops"] or r["loss"] == "rkd_angle_loss"
    counts = report["settings"]["counts"]
    assert "3*N*V*itemsize" in counts["kd"]["bytes"]["kd_loss"]
    assert "rkd_angle_loss" not in counts["relational"]["flops"]


def test_a_checkpoint_after_every_case_keeps_a_run_cut_short():
    """run() hands the report so far to ``checkpoint`` after each case (what --json writes), so
    a bench stopped by a time limit still leaves every case it finished."""
    cases = TINY[:3]
    seen = []
    report = run(cases, "cpu", ["eager", "cpp"], min_time=0.0, max_reps=2, progress=False,
                 roofline_bytes=2**20, checkpoint=lambda partial: seen.append(json.loads(json.dumps(partial,
                                                                                                  default=str))))
    assert len(seen) == len(cases) and report["meta"]["complete"] is True
    for i, partial in enumerate(seen):
        assert partial["meta"]["complete"] is False
        labels = [r["label"] for r in partial["results"]]
        assert labels == [r["label"] for r in report["results"]][:len(labels)]
        assert sorted(set(labels), key=labels.index) == [c.label for c in cases[:i + 1]]
        assert all(r["check"] in ("ok", "ref") for r in partial["results"])  # derived, like the end


def test_write_json_replaces_the_file_whole(tmp_path):
    from fastkd.bench import write_json

    path = tmp_path / "r.json"
    write_json({"results": [1]}, str(path))
    write_json({"results": [1, 2]}, str(path))
    assert json.loads(path.read_text()) == {"results": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind


def test_metadata_records_fastkd_switches(monkeypatch):
    """FASTKD_* variables change what runs (FASTKD_SP_FORM picks an algorithm): the report
    keeps them and its table says them; none set, no line."""
    from fastkd.bench.harness import metadata

    for k in [k for k in os.environ if k.startswith("FASTKD_")]:
        monkeypatch.delenv(k)
    report = {"meta": metadata("cpu"), "settings": {"timing": "t", "memory": "m"}, "results": []}
    assert report["meta"]["fastkd_env"] == {}
    assert "environment:" not in format_table(report)
    monkeypatch.setenv("FASTKD_SP_FORM", "features")
    report["meta"] = metadata("cpu")
    assert report["meta"]["fastkd_env"] == {"FASTKD_SP_FORM": "features"}
    assert "environment: FASTKD_SP_FORM=features" in format_table(report)


def test_main_writes_json_with_device_metadata(tmp_path, capsys):
    out = tmp_path / "res" / "bench.json"
    rc = main(["--tiny", "--divergence", "tvd", "--backend", "torch,eager", "--dtype", "fp32",
               "--json", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "fastkd[torch]" in table and "eager" in table
    data = json.loads(out.read_text())
    meta = data["meta"]
    for key in ("device_name", "cpu_model", "torch", "triton", "python", "torch_threads", "date",
                "git_commit", "backends", "copy_gb_per_s", "wall_s"):
        assert key in meta, key
    assert meta["device_type"] == "cpu" and meta["torch_threads"] >= 1
    assert meta["complete"] is True  # the last checkpoint is the whole run
    # the matmul roofline, in the dtype of every FLOP-counting case, and its %mm column
    assert set(meta["matmul_tflop_per_s"]) == {"float32"}
    assert _finite_positive(meta["matmul_tflop_per_s"]["float32"])
    assert "matmul roofline (%mm): float32 " in table and "%mm" in table
    rows = data["results"]
    assert {r["loss"] for r in rows} == set(LOSSES)  # every family, one kd divergence
    assert {r["case"] for r in rows if r["family"] == "kd"} == {"tvd"}
    assert all(r["impl"] in ("torch", "eager") and r["dtype"] == "float32" for r in rows)
    assert len(rows) == 2 * len(preset_cases("tiny", "cpu", divergences_=["tvd"]))
    for r in rows:
        assert r["error"] is None and r["check"] in ("ok", "ref"), r
        assert len(r["times_s"]) == r["reps"] and all(_finite_positive(t) for t in r["times_s"])
        for key in ("label", "shape", "size", "size_name", "bytes", "flops", "peak_bytes",
                    "first_call_s", "loss_value", "grad_norm", "speedup_vs_eager", "mem_ratio_vs_eager"):
            assert key in r, key
    # progress went to stderr, one counted line per implementation (stderr is no terminal here)
    n = len(rows)
    assert f"[{n}/{n}] " in captured.err and "\r" not in captured.err


def test_loss_and_backend_filters(tmp_path, capsys):
    assert resolve(["lm"]) == ["sparse_kd", "fused_linear"]
    assert resolve(["rkd_angle", "attention_map_loss"]) == ["rkd_angle_loss", "attention_map_loss"]
    assert main(["--tiny", "--loss", "relational,attention_map", "--list"]) == 0
    listed = capsys.readouterr().out.split("\n")
    assert sorted(x.split()[0] for x in listed if x) == sorted(
        ["attention_map_loss"] * 2 + ["rkd_distance_loss", "rkd_angle_loss",
                                      "similarity_preserving_loss"])
    # one real run with torch.compile: only the angle loss, only the two baselines
    out = tmp_path / "angle.json"
    assert main(["--tiny", "--loss", "rkd_angle", "--backend", "eager,compile",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["loss"], r["impl"]) for r in rows] == [("rkd_angle_loss", "eager"),
                                                      ("rkd_angle_loss", "compile")]
    assert rows[1]["check"] == "ok" and _finite_positive(rows[1]["speedup_vs_eager"])


def test_plot_draws_time_and_memory_against_size(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    png, out = tmp_path / "bench.png", tmp_path / "bench.json"
    rc = main(["--tiny", "--loss", "kd,similarity_preserving", "--divergence", "tvd",
               "--backend", "eager," + ",".join(NATIVE or ["torch"]), "--plot", str(png),
               "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    sizes = {}
    for r in data["results"]:
        sizes.setdefault(r["series"], set()).add(r["size"])
    assert sizes == {"kd_loss tvd float32 *x128": {4, 8},
                     "similarity_preserving_loss similarity_preserving float32 N*,D4": {4, 8}}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(png))
    assert img.shape[0] == 2 * 280 and img.shape[1] == 1100  # a row of 2 panels per series
    assert img[..., :3].std() > 0.05  # not blank


def test_plot_without_matplotlib_fails_before_running(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match=r"--plot needs matplotlib.*pip install"):
        main(["--tiny", "--plot", str(tmp_path / "x.png")])


def test_case_in_a_child_process_measures_memory():
    todo = [Case("forward_kl", "float32", 64, 4096), RelationalCase("rkd_distance", "float32", 64, 8)]
    report = run(todo, "cpu", ["torch", "eager"], min_time=0.0, max_reps=2, isolate="case",
                 progress=False, roofline_bytes=None)
    rows = report["results"]
    assert [(r["family"], r["impl"]) for r in rows] == [
        ("kd", "torch"), ("kd", "eager"), ("relational", "torch"), ("relational", "eager")]
    assert all(r["error"] is None and r["check"] in ("ok", "ref") for r in rows), rows
    if os.path.exists("/proc/self/clear_refs"):
        # eager holds several [64, 4096] float32 temporaries (1 MiB each) at its peak
        assert rows[1]["peak_bytes"] >= 2**20


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_without_a_terminal_or_tqdm(monkeypatch):
    plain = io.StringIO()
    p = Progress(2, stream=plain)
    p.start("a")
    p.finish("a done")
    p.finish("b done")
    p.close()
    assert plain.getvalue() == "[1/2] a done\n[2/2] b done\n"
    monkeypatch.setitem(sys.modules, "tqdm", None)  # a terminal but no tqdm: a redrawn counter
    tty = _Tty()
    p = Progress(1, stream=tty)
    p.start("case x")
    p.finish("case x done")
    p.close()
    assert "\r" in tty.getvalue() and "running case x" in tty.getvalue()
    assert "[1/1] case x done\n" in tty.getvalue()
    quiet = io.StringIO()
    Progress(1, stream=quiet, enabled=False).finish("x")
    assert quiet.getvalue() == ""


def test_progress_bar_with_tqdm_on_a_terminal():
    pytest.importorskip("tqdm")
    tty = _Tty()
    p = Progress(2, stream=tty)
    assert p.bar is not None
    p.start("case y")
    p.finish("case y done")
    p.close()
    assert "case y done" in tty.getvalue()


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="unknown divergence"):
        main(["--tiny", "--divergence", "kl"])
    with pytest.raises(SystemExit, match="unknown backend"):
        main(["--tiny", "--backend", "fast"])
    with pytest.raises(SystemExit, match="unknown loss 'rkd'"):
        main(["--tiny", "--loss", "rkd"])


def _python(*args, env=None):
    # a child pytest must not see this one's xdist worker variables (under `pytest -n`,
    # pytest-benchmark would take itself for an xdist run and refuse --benchmark-only)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=600)


def test_pytest_benchmark_suites_collect_and_run():
    """Every family has a suite in benchmarks/; they collect, and one runs under pytest-benchmark."""
    tiny = {"FASTKD_BENCH_PRESET": "tiny"}
    col = _python("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                  "benchmarks/", env=tiny)
    assert col.returncode == 0, col.stdout + col.stderr
    ids = [ln for ln in col.stdout.splitlines() if "::" in ln]
    n_impls = 4 + 3  # fastkd backends + eager, compile, liger
    for suite, family in (("test_kd_loss.py", "kd"), ("test_sparse_kd_loss.py", "sparse_kd"),
                          ("test_fused_linear_kd_loss.py", "fused_linear"),
                          ("test_attention.py", "attention"), ("test_relational.py", "relational")):
        found = [i for i in ids if i.startswith(f"benchmarks/{suite}::")]
        assert len(found) == n_impls * len([c for c in TINY if c.family == family]), suite
    res = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_relational.py",
                  "--benchmark-only", "-k", "similarity_preserving and eager", env=tiny)
    assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout + res.stderr
    assert "similarity_preserving_loss similarity_preserving float32 N8,D4" in res.stdout


def test_cpu_scripts_run_the_bench_command():
    res = _python("benchmarks/bench_relational_cpu.py", "--tiny", "--list")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["rkd_distance_loss", "rkd_distance", "float32", "N8,D4",
                                  "rkd_angle_loss", "rkd_angle", "float32", "N6,D4",
                                  "similarity_preserving_loss", "similarity_preserving",
                                  "float32", "N8,D4"]


@pytest.mark.parametrize("preset", ["quick", "default", "full"])
def test_attention_presets_have_shapes_the_loss_accepts(preset):
    """Each attention case at its preset's widths and head counts, batch and length cut down so
    that it runs here: the GPU preset once had relation heads (12) that did not divide D_t (1024),
    so every implementation of that case would have failed on the GPU."""
    import dataclasses

    for case in preset_cases(preset, "cuda"):
        if case.family != "attention":
            continue
        small = {"b": 1}
        if isinstance(case, (MapCase, RelationCase)):
            small["l"] = 16
        small_case = dataclasses.replace(case, **small)
        inputs, leaves = small_case.make_inputs(torch.device("cpu"))
        ours = [i for i in small_case.implementations(torch.device("cpu"), ["torch"])]
        assert ours, case.label
        out = ours[0].fn(*inputs)
        assert torch.isfinite(out.float()).all(), case.label
    if preset == "full":
        rel = [c for c in preset_cases(preset, "cuda") if isinstance(c, RelationCase)]
        assert [(c.b, c.l, c.ds, c.a, c.dtype) for c in rel] == [(8, 4096, 768, 12, "bfloat16")]  # issue 4's


@pytest.mark.parametrize("which", ["kd-forward_kl", "kd-jsd-0.5", "kd-jsd-0.1", "fused_linear-jsd"])
def test_liger_baselines_match_eager(which):
    """The bench's Liger-Kernel baselines (GPU-only there) compute the eager loss and a gradient:
    here on CPU tensors through Triton's interpreter, on a GPU natively. Liger's own signatures
    change between releases (LigerFusedLinearJSD's shift_labels became required), and a baseline
    that raises would leave a GPU bench without its comparison."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is in the test extras")
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # e.g. liger-kernel 0.8 on Python 3.9: `X | None` annotations
        pytest.skip(f"liger_kernel.transformers does not import here: {type(e).__name__}: {e}")
    from conftest import HAS_CUDA
    from fastkd.bench.divergences import _liger as liger_kd
    from fastkd.bench.fused_linear import _liger as liger_fused

    if which == "kd-forward_kl" and not HAS_CUDA:
        pytest.skip("Liger's KL kernel does not run in Triton's interpreter (it calls .to on a float)")
    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    family, divergence, *beta = which.split("-")
    beta = float(beta[0]) if beta else 0.5
    if family == "kd":
        case = Case(divergence, "float32", 6, 301, beta=beta)
        inputs, leaves = case.make_inputs(dev)
        fn, eager = liger_kd(case), EAGER[divergence]
        ref = eager(*inputs, case.temperature, case.beta, case.skew)
    else:
        case = FusedLinearCase(divergence, "float32", 16, 32, 48, 301, beta=beta)
        inputs, leaves = case.make_inputs(dev)
        fn = liger_fused(case)
        ref = [i for i in case.implementations(dev, ["eager"])][0].fn(*inputs)
    assert fn is not None, "the adapter found no Liger loss"
    out = fn(*inputs)
    out.backward()
    assert torch.allclose(out.double(), ref.double(), rtol=1e-5, atol=1e-7), (float(out), float(ref))
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)
