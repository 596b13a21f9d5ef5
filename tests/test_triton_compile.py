"""Every Triton kernel compiles for an H100 (sm_90), at the block sizes its launcher picks on a GPU.

The rest of the suite runs the Triton kernels in the interpreter, which never calls the compiler:
a loop-carried value that changes type, a tl.dot shape the hardware lacks, or a global constexpr
that fails Triton's launch-time check (a NaN global did: NaN != NaN, so every launch raised) would
pass there and fail on the first GPU. tests/_triton_offline.py runs each family's launchers on fake
CUDA tensors with Triton's NVIDIA compiler (no GPU, no launch); each family in its own process,
since the interpreter setting is read when the kernels are defined.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = ("kd", "sparse", "attention", "relational")


@pytest.fixture(scope="module")
def compiled():
    """{family: [config results]}: the four families compiled in parallel processes."""
    from conftest import HAS_CUDA, require_triton

    if HAS_CUDA:
        pytest.skip("on a GPU the other tests compile and launch every kernel")
    require_triton("rkd_angle", "cuda")  # the family that needs the newest Triton
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(HERE), env.get("PYTHONPATH")) if p)
    procs = {f: subprocess.Popen([sys.executable, os.path.join(HERE, "_triton_offline.py"), f], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in FAMILIES}
    out = {}
    for f, p in procs.items():
        stdout, stderr = p.communicate(timeout=1800)
        assert p.returncode == 0, f"{f}: exit {p.returncode}\n{stderr[-3000:]}"
        out[f] = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_launch_compiles_for_sm90(compiled, family):
    rows = compiled[family]
    if rows and "unavailable" in rows[0]:
        pytest.skip(f"offline Triton compilation: {rows[0]['unavailable']}")
    assert rows, f"{family}: no configuration ran"
    errors = [f"{r['config']}: {r['error']}" for r in rows if r["error"]]
    assert not errors, f"{len(errors)} of {len(rows)} {family} configurations fail to compile:\n" + "\n".join(
        errors[:10])
    empty = [r["config"] for r in rows if not r["kernels"]]
    assert not empty, f"configurations that launched no kernel: {empty[:10]}"
    for r in rows:
        for k in r["kernels"]:
            assert k["num_warps"] >= 1 and (k["registers"] is None or 0 < k["registers"] <= 255), (r["config"], k)
