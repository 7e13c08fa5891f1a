"""The training CLI: it learns, resumes bit for bit, survives a killed checkpoint write, guards divergence."""

from __future__ import annotations

import json

import pytest
import torch

from opt_core import train as cli
from opt_core import trainer as train_mod
from opt_core.trainer.recipe import lr_lambda

# A CPU training run without TRITON_INTERPRET takes the native path (kernels/native.py); the kernels
# (interpreted, slow) are tested in their own files.
pytestmark = pytest.mark.usefixtures("native_path")


def _args(corpus, out, *extra):
    return cli.parse_args([
        "--preset", "test", "--data", str(corpus), "--vocab-size", "320", "--data-cache", str(out.parent / "cache"),
        "--seq-len", "32", "--batch-size", "4", "--steps", "8", "--warmup", "2", "--lr", "3e-3",
        "--eval-every", "4", "--eval-batches", "2", "--log-every", "1", "--ckpt-every", "4", "--keep", "2",
        "--sample-tokens", "8", "--out", str(out), *extra,
    ])


def _params_of(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_training_reduces_validation_loss_and_writes_its_outputs(corpus, tmp_path):
    out = tmp_path / "run"
    summary = train_mod.train(_args(corpus, out, "--steps", "30", "--eval-every", "15", "--ckpt-every", "10"))
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["loss"] is not None]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["lr"] > 0 for r in train_rows)
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("step,tokens,loss")
    assert (out / "loss.png").stat().st_size > 0
    assert [p.name for p in train_mod.checkpoint_paths(out)] == ["step-00000020.pt", "step-00000030.pt"]
    assert isinstance(summary["sample"], str) and summary["sample"].startswith("def")


def test_resume_continues_bit_for_bit(corpus, tmp_path):
    straight = tmp_path / "straight"
    train_mod.train(_args(corpus, straight))
    halves = tmp_path / "halves"
    train_mod.train(_args(corpus, halves, "--stop-at", "4"))
    assert [p.name for p in train_mod.checkpoint_paths(halves)] == ["step-00000004.pt"]
    train_mod.train(_args(corpus, halves, "--resume"))

    a = _params_of(train_mod.checkpoint_paths(straight)[-1])
    b = _params_of(train_mod.checkpoint_paths(halves)[-1])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (straight, halves)]
    assert losses[0] == losses[1]


def test_a_killed_checkpoint_write_leaves_the_previous_checkpoint_loadable(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def dying_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: write half of it, then die
            f.write(b"\x00" * 1000)
            raise KeyboardInterrupt("killed mid-write")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(_args(corpus, out))
    paths = train_mod.checkpoint_paths(out)
    assert [p.name for p in paths] == ["step-00000004.pt"]
    assert list((out / "checkpoints").iterdir()) == paths  # no half-written file left behind
    monkeypatch.setattr(torch, "save", real_save)
    assert _params_of(paths[0]).keys()
    train_mod.train(_args(corpus, out, "--resume"))  # and a resumed run finishes from it
    assert train_mod.checkpoint_paths(out)[-1].name == "step-00000008.pt"


def test_divergence_guard_skips_bad_batches_then_stops_with_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    loss_of = train_mod.Trainer.loss
    calls = {"n": 0}

    def poisoned_loss(self, block):
        loss = loss_of(self, block)
        if self.model.training:
            calls["n"] += 1
            if calls["n"] == 3 or calls["n"] >= 6:  # one isolated bad batch, then bad for good
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(train_mod.Trainer, "loss", poisoned_loss)
    with pytest.raises(train_mod.DivergenceError, match=r"3 consecutive batches .* last good checkpoint: .*step-00000004\.pt"):
        train_mod.train(_args(corpus, out, "--max-bad-steps", "3"))
    assert train_mod.checkpoint_paths(out)[-1].name == "step-00000004.pt"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["skipped"] or 0 for r in rows) >= 1  # the isolated NaN batch was skipped, training went on


def test_learning_rate_schedule():
    f = lr_lambda(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_bad_arguments_fail_early(corpus, tmp_path):
    with pytest.raises(SystemExit):
        cli.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--warmup", "500", "--steps", "10"])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        train_mod.train(_args(corpus, tmp_path / "run", "--seq-len", "100"))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_recipes_run(corpus, tmp_path, dtype):
    out = tmp_path / dtype
    summary = train_mod.train(_args(corpus, out, "--dtype", dtype, "--steps", "6", "--sample-tokens", "0"))
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    ckpt = torch.load(train_mod.checkpoint_paths(out)[-1], map_location="cpu", weights_only=False)
    assert all(v.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
               for k, v in ckpt["model"].items() if v.is_floating_point())
    if dtype == "fp16":  # OPT's recipe: dynamic loss scaling from 4, metaseq's window and floor
        assert ckpt["scaler"]["min_scale"] == 2.0**-5 and ckpt["scaler"]["growth_interval_follows_scale"]
    else:
        assert ckpt["scaler"] is None


def test_gradient_accumulation_equals_one_big_batch(corpus, tmp_path):
    common = ("--dropout", "0.0", "--steps", "3", "--sample-tokens", "0", "--eval-every", "3")
    train_mod.train(_args(corpus, tmp_path / "big", "--batch-size", "8", *common))
    train_mod.train(_args(corpus, tmp_path / "accum", "--batch-size", "4", "--grad-accum", "2", *common))

    def trained(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["loss"], r["grad_norm"]) for r in rows if r["loss"] is not None]

    # Same data, same loss and the same gradient norm each step (a missing 1/grad_accum would
    # double the norm; Adam itself is blind to a gradient's scale).
    for (loss_a, norm_a), (loss_b, norm_b) in zip(trained(tmp_path / "big"), trained(tmp_path / "accum")):
        assert loss_a == pytest.approx(loss_b, rel=1e-6) and norm_a == pytest.approx(norm_b, rel=1e-5)
    a = _params_of(train_mod.checkpoint_paths(tmp_path / "big")[-1])
    b = _params_of(train_mod.checkpoint_paths(tmp_path / "accum")[-1])
    for key in a:  # summation order differs; far below one update of lr 3e-3
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
