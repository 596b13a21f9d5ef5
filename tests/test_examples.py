"""The examples users copy run, on tiny shapes, and show what they claim."""
import importlib.util
import pathlib
import re

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hf_fused_linear_distillation_loss_falls():
    """Two random-config Llama models: a few steps of FusedLinearKDLoss lower the loss, and
    the fused value equals kd_loss on the materialized logits."""
    pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]')")
    ex = load_example("hf_fused_linear_distill")
    losses, fused, dense = ex.distill(steps=8, log=lambda *_: None)
    assert losses[-1] < 0.95 * losses[0], losses
    assert torch.allclose(fused, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_trl_generalized_jsd(beta, temperature):
    """fastkd's jsd (scale_temperature=False) is TRL's generalized JSD on the same inputs."""
    ex = load_example("trl_jsd_parity")
    ours, theirs = ex.compare(beta, temperature, seed=int(10 * beta))
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12), (ours, theirs)


def _digits_rows(out: str):
    """(teacher, labels-only, KD) accuracies from each 'seed N: ...' line the example prints."""
    rows = re.findall(r"seed \d+: teacher ([\d.]+)\s+student labels-only ([\d.]+)\s+"
                      r"student KD ([\d.]+)", out)
    return [tuple(float(v) for v in row) for row in rows]


def test_digits_classic_kd_smoke(capsys):
    """Tiny run: one seed, a few epochs; the printed accuracies are the returned ones, in [0, 1]."""
    ex = load_example("digits_classic_kd")
    res = ex.main(["--seeds", "0", "--epochs", "5", "--teacher-epochs", "2"])
    rows = _digits_rows(capsys.readouterr().out)
    assert len(rows) == 1
    for got, want in zip(rows[0], (res["teacher"][0], res["labels"][0], res["kd"][0])):
        assert 0.0 <= got <= 1.0 and abs(got - want) < 1e-4
    assert rows[0][0] > 0.5   # even two epochs of the teacher are far above chance (0.1)


def test_digits_classic_kd_beats_labels_alone(capsys):
    """The example's claim at its default settings (a few seconds): the distilled student's
    mean test accuracy is higher than the labels-only student's, and on most seeds."""
    ex = load_example("digits_classic_kd")
    res = ex.main([])
    rows = _digits_rows(capsys.readouterr().out)
    assert len(rows) == len(res["seed"]) == 5
    wins = sum(kd > lab for _, lab, kd in rows)
    assert sum(res["kd"]) > sum(res["labels"]) and wins >= 3, rows


def test_compile_train_step_matches_eager(capsys):
    """The fullgraph-compiled distillation step (KDLoss + RKDLoss + SimilarityPreservingLoss)
    gives the eager loss and gradients, and training with it lowers the loss. aot_eager keeps
    the test fast (inductor, the example's default, spends its time generating code)."""
    ex = load_example("compile_train_step")
    torch._dynamo.reset()
    try:
        out = ex.main(["--steps", "8", "--batch", "16", "--compile-backend", "aot_eager"])
    finally:
        torch._dynamo.reset()
    assert abs(out["compiled"] - out["eager"]) <= 1e-5 * abs(out["eager"]) + 1e-6, out
    assert out["grad_diff"] < 1e-4, out
    assert out["losses"][-1] < out["losses"][0], out["losses"]
    assert "compiled == eager: True" in capsys.readouterr().out
