"""benchmarks/gpu_report.py without a GPU: its plan, its refusal, its stage plumbing and its summary.

The GPU stages themselves run only on a GPU machine; what can break unnoticed before then (the
orchestration, timeouts, parsing, the summary a later session copies into benchmarks/results)
is checked here, cheaply.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_report.py")


@pytest.fixture(scope="module")
def gr():
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_dry_run_lists_the_stages_in_order(gr):
    r = _run("--dry-run")
    assert r.returncode == 0, r.stderr
    pos = [r.stdout.find(f"  {s} ") for s in gr.STAGES]
    assert all(p >= 0 for p in pos) and pos == sorted(pos), r.stdout
    assert "fastkd.bench --full --divergence forward_kl --json DIR/bench-targets.json" in r.stdout
    assert "--json DIR/bench-kd-rest.json" in r.stdout and "test_native_cuda.py" in r.stdout
    r = _run("--dry-run", "--stages", "env,bench", "--budget-s", "100")
    assert r.returncode == 0 and "  bench " in r.stdout and "  tests " not in r.stdout
    assert "cap  100s" in r.stdout  # no stage gets more than the budget
    assert _run("--dry-run", "--stages", "nope").returncode != 0


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_fails_fast_without_a_gpu(tmp_path):
    out = tmp_path / "report"
    t0 = time.monotonic()
    r = _run("--out", str(out))
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr
    assert time.monotonic() - t0 < 60 and not out.exists()


def test_a_stage_that_runs_over_is_killed(gr, tmp_path):
    runner = gr.Runner(str(tmp_path), budget_s=100)
    t0 = time.monotonic()
    rc, took, log = runner.run("sleepy", [sys.executable, "-c", "import time; print('started', flush=True); "
                                          "time.sleep(60)"], timeout=2)
    assert rc is None and took < 30 and time.monotonic() - t0 < 30
    assert "started" in open(log).read()
    raw = open(tmp_path / "raw.log").read()
    assert "sleepy: timed out" in raw and "TIMED OUT" in raw


def test_pytest_counts_survive_a_timeout(gr):
    text = ("tests/test_a.py::test_x[1] PASSED [ 10%]\ntests/test_a.py::test_x[2] FAILED [ 20%]\n"
            "tests/test_a.py::test_y SKIPPED (no gpu) [ 30%]\ntests/test_a.py::test_z ERROR [ 40%]\n")
    c = gr._pytest_counts(text, None)
    assert (c["passed"], c["failed"], c["skipped"], c["errors"]) == (1, 1, 1, 1)
    assert c["failed_ids"] == ["tests/test_a.py::test_x[2]", "tests/test_a.py::test_z"]


def test_pytest_counts_read_xdist_lines_and_group_by_file(gr):
    text = ("[gw0] [ 20%] SKIPPED tests/test_a.py::test_y \n[gw1] [ 40%] PASSED tests/test_a.py::test_x[1] \n"
            "[gw0] [ 60%] ERROR tests/test_b.py::test_z \n[gw1] [ 80%] FAILED tests/test_b.py::test_x[a b] \n"
            "[gw1] [100%] PASSED tests/test_b.py::test_w \n")
    c = gr._pytest_counts(text, None)
    assert (c["passed"], c["failed"], c["skipped"], c["errors"]) == (2, 1, 1, 1)
    assert c["failed_ids"] == ["tests/test_b.py::test_z", "tests/test_b.py::test_x[a"]
    assert c["by_file"]["tests/test_a.py"]["passed"] == 1 and c["by_file"]["tests/test_a.py"]["skipped"] == 1
    assert (c["by_file"]["tests/test_b.py"]["errors"], c["by_file"]["tests/test_b.py"]["failed"]) == (1, 1)


@pytest.mark.parametrize("xdist", [False, True], ids=["per-file", "xdist"])
def test_tests_stage_counts_per_file(gr, tmp_path, monkeypatch, xdist):
    """The tests stage on a throwaway suite: per-file processes, or one pytest-xdist run whose
    counts come back per file (from the junit xml, or from -v lines when it is cut short)."""
    if xdist and importlib.util.find_spec("xdist") is None:
        pytest.fail("pytest-xdist is in the test extras; install them (pip install -e '.[test]')")
    monkeypatch.setattr(gr, "_plugin_args", lambda: ["-n", "2"] if xdist else [])
    folder = os.path.join(ROOT, f".gpu-report-selftest-{os.getpid()}")
    os.makedirs(folder)
    try:
        names = []
        for name, body in (("test_one.py", "def test_a(): pass\ndef test_b(): assert 0\n"),
                           ("test_two.py", "import pytest\n@pytest.mark.parametrize('i', [1, 2, 3])\n"
                                           "def test_c(i): pass\ndef test_d(): pytest.skip('no')\n")):
            with open(os.path.join(folder, name), "w") as f:
                f.write(body)
            names.append(os.path.relpath(os.path.join(folder, name), ROOT))
        runner = gr.Runner(str(tmp_path), budget_s=300)
        res = gr.stage_tests(runner, names, "tests", timeout=240)
    finally:
        import shutil

        shutil.rmtree(folder)
    one, two = (res["files"][n] for n in names)
    assert (one["passed"], one["failed"], two["passed"], two["skipped"]) == (1, 1, 3, 1), res
    assert one["failed_ids"] == [names[0] + "::test_b"] and not two["failed_ids"]
    assert res["total"] == {"passed": 4, "failed": 1, "errors": 0, "skipped": 1} and res["not_run"] == []
    assert (res["run"] is not None) == xdist


def test_env_stage_runs_as_a_child(gr, tmp_path):
    runner = gr.Runner(str(tmp_path), budget_s=200)
    res = gr.stage_child(runner, "env", timeout=150)
    assert res["rc"] == 0, res
    env = res["result"]
    assert env["torch"] and env["python"] and "cuda_available" in env


def _fake_run(d, stages):
    os.makedirs(os.path.join(d, "stages"), exist_ok=True)
    for name, res in stages.items():
        with open(os.path.join(d, "stages", f"{name}.json"), "w") as f:
            json.dump(res, f)


def test_summary_merges_runs(gr, tmp_path):
    run1, run2, out = tmp_path / "run1", tmp_path / "run2", tmp_path / "out"
    env = {"result": {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_capability": "9.0", "torch": "2.11.0+cu130"}}
    _fake_run(run1, {
        "env": env,
        "build": {"rc": 0, "result": {"ok": True, "how": "jit", "seconds": 95.0, "kd_fwd_cuda_kernel": True,
                                      "chosen": {"kd": "cuda", "sparse_kd": "triton"}}},
        "roofline": {"rc": 0, "result": {"copy": {"gb_per_s": 3000.0}, "add": {"gb_per_s": 3100.0},
                                         "gemm_bf16": {"tflop_per_s": 700.0}}},
        "kd-target": {"rc": 0, "result": {"shape": [8192, 128256], "dtype": "bfloat16", "results": [
            {"case": "forward_kl", "impl": "cuda", "ms": 2.5, "bytes": 6303809536, "tb_per_s": 2.52},
            {"case": "forward_kl", "impl": "triton", "error": "RuntimeError: boom"}],
            "check": {"cuda": {"rows": [0, 1], "loss_max_abs_err": 1e-6, "loss_max_abs": 3.0,
                               "grad_max_abs_err": 1e-7, "grad_max_abs": 0.01}}}},
        "tests-cuda": {"files": {"own": {"timed_out": False, "by_file": {
                           "tests/test_native_cuda.py": dict(passed=40, failed=0, errors=0, skipped=0),
                           "tests/test_native_sparse_cuda.py": dict(passed=20, failed=0, errors=0, skipped=0)}},
                       "-k cuda": {"timed_out": False, "by_file": {
                           "tests/test_divergences.py": dict(passed=300, failed=0, errors=0, skipped=1),
                           "tests/test_sparse.py": dict(passed=50, failed=2, errors=0, skipped=0),
                           "tests/test_attention.py": dict(passed=80, failed=0, errors=0, skipped=0)}}}},
        "tests": {"files": {"tests/test_divergences.py": {"passed": 10, "failed": 1, "errors": 0, "skipped": 2,
                                                          "seconds": 50, "failed_ids": ["t::a"]}},
                  "not_run": ["tests/test_readme.py"], "rerun": "python benchmarks/gpu_report.py ..."},
    })
    _fake_run(run2, {
        "env": env,
        "tune": {"rc": 0, "result": {"device_key": "NVIDIA H100 80GB HBM3|fastkd 0.1.0", "seconds": 40.0,
                                     "classes": {"kd|bfloat16|131072": {"backend": "cuda",
                                                                        "ms": {"cuda": 0.61, "triton": 0.85}}}}},
        "bench": {"parts": [{"part": "targets", "rc": None, "seconds": 240, "timed_out": True, "complete": False,
                             "command": "fastkd.bench --full --json x", "json": "bench-targets.json",
                             "table": "bench-targets.txt"},
                            {"part": "kd-rest", "command": "fastkd.bench --loss kd", "skipped": "no time left"}]},
        "tests": {"files": {"tests/test_readme.py": {"passed": 3, "failed": 0, "errors": 0, "skipped": 0,
                                                     "seconds": 5}}},
    })
    (run2 / "bench-targets.txt").write_text("divergence  dtype  impl  median ms\nforward_kl bf16 fastkd[cuda] 2.6\n")
    kd = dict(family="kd", case="forward_kl", n=8192, v=128256, dtype="bfloat16", error=None)
    fl = dict(family="fused_linear", case="forward_kl", n=8192, hs=2048, ht=4096, v=128256,
              dtype="bfloat16", error=None)
    (run2 / "bench-targets.json").write_text(json.dumps({"results": [
        {**kd, "impl": "cuda", "median_s": 0.0025, "gb_per_s": 2520.0},
        {**kd, "impl": "triton", "median_s": 0.003, "gb_per_s": 2100.0},
        {**kd, "impl": "liger", "median_s": 0.02, "gb_per_s": 315.0},
        {**kd, "impl": "compile", "median_s": 0.006, "gb_per_s": 1050.0},
        {**fl, "impl": "triton", "median_s": 0.045, "peak_bytes": 1.6e9},
        {**fl, "case": "forward_kl/lean-acc", "impl": "triton", "median_s": 0.038, "peak_bytes": 0.7e9},
        {"family": "relational", "which": "rkd_distance", "n": 16384, "impl": "eager", "median_s": None,
         "error": "OutOfMemoryError: CUDA out of memory"},
        {"family": "relational", "which": "rkd_distance", "n": 16384, "impl": "cuda", "median_s": 0.05,
         "error": None},
        *({"family": "attention", "loss": "attention_relation_loss", "b": 8, "l": 4096, "ds": 768, "dt": 768,
           "a": 12, "dtype": "bfloat16", "impl": impl, "median_s": ms, "peak_bytes": peak, "error": None}
          for impl, ms, peak in (("eager", 0.30, 40e9), ("triton", 0.12, 2e9))),
    ]}))
    r = _run("--summarize", str(run1), str(run2), "--out", str(out))
    assert r.returncode == 0, r.stderr
    md = (out / "summary.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema"] == gr.SCHEMA and summary["device"] == "NVIDIA H100 80GB HBM3"
    assert summary["suggested_names"][0].startswith("benchmarks/results/h100-80gb-hbm3-")
    assert "| forward_kl | cuda | 2.500 | 2.52 | 84% | 81% |" in md  # of copy, of a+b->c
    assert "error: RuntimeError: boom" in md and "fastkd[cuda] 2.6" in md
    assert "(TIMED OUT); raw numbers: bench-targets.json (cut short: the cases it finished)" in md
    assert "## Benchmarks (kd-rest): `python -m fastkd.bench --loss kd`\nnot run: no time left" in md
    assert summary["stages"]["tests"]["total"] == {"passed": 13, "failed": 1, "errors": 0, "skipped": 2}
    assert "| kd|bfloat16|131072 | cuda | cuda 0.610, triton 0.850 |" in md
    # the targets table, from the bench JSON: the fastest fastkd backend against each target
    assert "| kd forward_kl N=8192 V=128256 bf16: >= 2.4 TB/s | 2.52 TB/s (cuda) | yes |" in md
    assert "| kd forward_kl: >= 10x Liger | 8.00x | NO |" in md
    assert "| kd forward_kl: >= 3x torch.compile | 2.40x | NO |" in md
    assert "| kd jsd N=8192 V=128256 bf16: >= 2.4 TB/s | not measured | - |" in md
    assert "< 40 ms | 45.0 ms (triton) | NO |" in md and "< 40 ms | 38.0 ms (triton) | yes |" in md
    assert "< 1 GB extra memory | 1.60 GB | NO |" in md and "< 1 GB extra memory | 0.70 GB | yes |" in md
    assert "| rkd_distance N=16384: eager out of memory or >= 5x slower | eager out of memory; fastkd ran | yes |" in md
    assert ("| attention_relation B=8 L=4096 D=768 A=12 bf16: faster than eager, <= 1/10 of its peak memory | "
            "2.50x faster, 0.050 of eager's memory (triton) | yes |") in md
    assert {"target", "measured", "met"} <= set(summary["targets"][0])
    # which CUDA kernels passed all their tests, ready for _backend.CUDA_VERIFIED
    assert summary["cuda_verified"] == ["attention_map", "kd"]
    assert "`frozenset({'attention_map', 'kd'})`" in md
    assert "- rkd_distance: not verified (tests/test_relational.py: no result)" in md
    assert "- sparse_kd: not verified (tests/test_sparse.py: 2 failing)" in md
    assert "## Not run" not in md  # every stage is in one run or the other


def test_bench_stage_runs_its_parts_and_keeps_their_json(gr, tmp_path, monkeypatch):
    tiny = ["--tiny", "--device", "cpu", "--backend", "torch,eager", "--dtype", "float32"]
    monkeypatch.setattr(gr, "BENCH_PARTS", (("one", tiny + ["--loss", "kd", "--divergence", "tvd"]),
                                            ("two", tiny + ["--loss", "similarity_preserving"],
                                             {"FASTKD_SP_FORM": "pairs"})))
    runner = gr.Runner(str(tmp_path), budget_s=400)
    res = gr.stage_bench(runner, timeout=300)
    assert [p["part"] for p in res["parts"]] == ["one", "two"] and res["timed_out"] is False, res
    for p in res["parts"]:
        assert p["rc"] == 0 and p["complete"] is True and p["command"].endswith(f"DIR/bench-{p['part']}.json --no-progress")
    # a part's environment reaches its run (the report records it) and labels its rows
    with open(tmp_path / "bench-two.json") as f:
        assert json.load(f)["meta"]["fastkd_env"]["FASTKD_SP_FORM"] == "pairs"
    rows = gr._bench_rows({"bench": dict(res, **{"from": str(tmp_path)})})
    assert {r["loss"] for r in rows} == {"kd_loss", "similarity_preserving_loss"}
    assert {r["impl"] for r in rows if r["loss"] == "kd_loss"} == {"torch", "eager"}
    assert {r["impl"] for r in rows if r["loss"] != "kd_loss"} == {"torch[two]", "eager[two]"}
    assert all(r["error"] is None for r in rows)
    late = gr.stage_bench(gr.Runner(str(tmp_path / "late"), budget_s=400), timeout=5)
    assert [p.get("skipped") for p in late["parts"]] == ["no time left"] * 2 and late["timed_out"]


def test_targets_take_the_best_fastkd_row_and_name_its_variant(gr):
    """A part's labelled rows (triton[tf32x3]) compete as fastkd rows; the eager baseline comes
    from the plain part; the label says which variant met the target."""
    case = dict(family="relational", which="rkd_distance", n=16384, error=None)
    rows = [dict(case, impl="eager", median_s=0.050), dict(case, impl="triton", median_s=0.030),
            dict(case, impl="triton[tf32x3]", median_s=0.008)]
    got = {name: (measured, met) for name, measured, met in gr.target_rows(rows)}
    assert got["rkd_distance N=16384: eager out of memory or >= 5x slower"] == ("6.25x faster (triton[tf32x3])", True)
    got = {name: (measured, met) for name, measured, met in gr.target_rows(rows[:2])}
    assert got["rkd_distance N=16384: eager out of memory or >= 5x slower"] == ("1.67x faster (triton)", False)


def test_deliver_hands_back_three_files_that_unpack_to_the_report(gr, tmp_path):
    """A GPU machine may hand back only a few files: deliver() packs the whole report folder
    into one archive beside summary.md and summary.json, and the archive summarizes again here."""
    import tarfile

    run, dest = tmp_path / "run", tmp_path / "out"
    env = {"result": {"gpu_name": "NVIDIA H100 80GB HBM3"}}
    _fake_run(run, {"env": env, "kd-target": {"rc": 0, "result": {"shape": [8192, 128256], "dtype": "bfloat16",
                                                                    "results": [], "check": {}}}})
    (run / "logs").mkdir()
    for i in range(12):  # more files than come back
        (run / "logs" / f"stage{i}.log").write_text(f"log {i}\n")
    gr.write_summary(str(run), [str(run)])
    gr.deliver(str(run), str(dest))
    gr.deliver(str(run), str(dest))  # again after the next stage: replaced, nothing left over
    assert sorted(p.name for p in dest.iterdir()) == sorted(["summary.md", "summary.json", gr.PACK])
    with tarfile.open(dest / gr.PACK) as tar:
        tar.extractall(tmp_path / "unpacked")
    report = tmp_path / "unpacked" / "report"
    assert (report / "logs" / "stage11.log").read_text() == "log 11\n"
    r = _run("--summarize", str(report), "--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / "summary.md").read_text() == (dest / "summary.md").read_text().replace(
        str(run), str(report))


def test_a_prebuilt_extension_is_used_only_with_its_sources(gr, tmp_path, monkeypatch):
    """--prebuild records the digest of fastkd/csrc beside fastkd/_C.so; a run uses the .so only
    while the sources still have that digest, else sets it aside so the stages compile them."""
    csrc = tmp_path / "fastkd" / "csrc"
    (csrc / "cuda").mkdir(parents=True)
    (csrc / "fastkd.cpp").write_text("// ops\n")
    (csrc / "cuda" / "kd.cu").write_text("// kernel v1\n")
    so = tmp_path / "fastkd" / "_C.so"
    monkeypatch.setattr(gr, "ROOT", str(tmp_path))
    monkeypatch.setattr(gr, "PREBUILT", str(so))
    assert gr.check_prebuilt() == ""  # none: nothing to say

    digest = gr.csrc_digest()
    (csrc / "notes.txt").write_text("not a source")
    assert gr.csrc_digest() == digest
    so.write_bytes(b"\x7fELF")
    (tmp_path / "fastkd" / "_C.so.digest").write_text(digest + "\n")
    assert gr.check_prebuilt() == "used" and so.exists()

    (csrc / "cuda" / "kd.cu").write_text("// kernel v2\n")  # edited after the build
    edited = gr.csrc_digest()
    assert edited != digest
    why = gr.check_prebuilt()
    assert why.startswith("set aside: built from other sources"), why
    assert not so.exists() and (tmp_path / "fastkd" / "_C.so.stale").exists()

    so.write_bytes(b"\x7fELF")  # a .so without its digest file
    (tmp_path / "fastkd" / "_C.so.digest").unlink()
    assert gr.check_prebuilt().startswith("set aside: no .digest") and not so.exists()

    (csrc / "cuda" / "kd.cu").rename(csrc / "cuda" / "kd2.cu")  # a renamed file changes it too
    assert gr.csrc_digest() != edited


@pytest.mark.skipif(bool(__import__("torch").version.cuda), reason="checks the refusal on a CPU build of torch")
def test_prebuild_needs_a_cuda_build_of_torch():
    r = _run("--prebuild")
    assert r.returncode == 2 and "needs a CUDA build of torch" in r.stderr
