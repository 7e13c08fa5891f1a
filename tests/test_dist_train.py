"""The training CLI under torchrun: --dp/--tp runs equal the single-process run, log all-rank throughput and
per-rank memory, and resume from sharded checkpoints at another layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opt_core.kernels import dispatch
from opt_core import train as train_mod

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the model trains on packed sequences of tokens with a learned position table and a tied head "
         "while the optimizer keeps fp32 moments and the scaler watches for overflow in every step").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(80, 160)))
        (folder / f"doc{i:02d}.txt").write_text(text + "\n")
    return folder


def _argv(corpus, out, *extra):
    return ["--preset", "test", "--data", str(corpus), "--vocab-size", "320", "--data-cache",
            str(out.parent / "cache"), "--seq-len", "32", "--batch-size", "4", "--steps", "6", "--warmup", "2",
            "--lr", "3e-3", "--dropout", "0.0", "--eval-every", "3", "--eval-batches", "2", "--log-every", "1",
            "--ckpt-every", "3", "--keep", "1", "--sample-tokens", "4", "--out", str(out), *extra]


def _torchrun(nproc, argv, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU runs take the reference ops
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "opt_core.train", *argv]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(out) if r["loss"] is not None]


def _same_run(a, b):
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (step, loss_a, norm_a), (_, loss_b, norm_b) in zip(a, b):
        assert loss_a == pytest.approx(loss_b, rel=1e-5), f"loss at step {step}"
        assert norm_a == pytest.approx(norm_b, rel=1e-4), f"grad norm at step {step}"


@pytest.fixture(scope="module")
def single_process_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    with dispatch.reference_backend():
        train_mod.train(train_mod.parse_args(_argv(corpus, out)))
    return out


def test_tp2_run_equals_the_single_process_run(corpus, tmp_path, single_process_run):
    out = tmp_path / "tp2"
    stdout = _torchrun(2, _argv(corpus, out, "--tp", "2"))
    print(stdout)  # shown by pytest if an assertion below fails
    assert "dp 1 (FSDP2) x tp 2 (tensor parallel, sequence parallel)" in stdout
    assert stdout.count("validation loss 5.") >= 1 and "sample (top-k 20)" in stdout  # rank 0 reports once
    assert stdout.count("model: ") == 1
    _same_run(_losses(out), _losses(single_process_run))
    rows = [r for r in _rows(out) if r["loss"] is not None]
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["peak_mem_gib"] > 0 for r in rows)
    assert all(len(r["mem_gib_by_rank"].split()) == 2 for r in rows)
    assert "(all 2 ranks)" in stdout and "peak mem GiB by rank" in stdout
    assert [p.name for p in train_mod.sharded_checkpoint_paths(out)] == ["step-00000006"]


def test_sharded_checkpoint_resumes_at_another_layout(corpus, tmp_path, single_process_run):
    out = tmp_path / "mixed"
    _torchrun(4, _argv(corpus, out, "--dp", "2", "--tp", "2", "--stop-at", "3"))
    ckpts = train_mod.sharded_checkpoint_paths(out)
    assert [p.name for p in ckpts] == ["step-00000003"]
    assert sorted(p.name for p in ckpts[0].glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    stdout = _torchrun(2, _argv(corpus, out, "--dp", "2", "--resume"))
    print(stdout)  # shown by pytest if an assertion below fails
    assert "resumed from step 3" in stdout
    _same_run(_losses(out), _losses(single_process_run))
    assert [p.name for p in train_mod.sharded_checkpoint_paths(out)] == ["step-00000006"]  # --keep 1


def test_distributed_path_in_one_process_and_bad_layouts(corpus, tmp_path, single_process_run):
    """--dp 1 --tp 1 without torchrun: the dist path in a world of one (FSDP2, DCP checkpoints), equal to the
    plain run; a layout larger than the world fails before anything runs."""
    import torch.distributed as c10d

    with dispatch.reference_backend():
        out = tmp_path / "one"
        train_mod.train(train_mod.parse_args(_argv(corpus, out, "--dp", "1", "--tp", "1", "--sample-tokens", "0")))
        assert not c10d.is_initialized()  # the run's process group is gone with it
        _same_run(_losses(out), _losses(single_process_run))
        assert train_mod.sharded_checkpoint_paths(out) and not train_mod.checkpoint_paths(out)
        with pytest.raises(ValueError, match=r"world size 1 != dp x tp = 2 x 2"):
            train_mod.train(train_mod.parse_args(_argv(corpus, tmp_path / "bad", "--dp", "2", "--tp", "2")))
    with pytest.raises(SystemExit):
        train_mod.parse_args(_argv(corpus, tmp_path / "bad", "--tp", "0"))
