"""SIGKILL mid-step or mid-save, then --resume: the run ends bit for bit where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opt_core import trainer as train_mod
from test_train import _params_of

REPO = Path(__file__).resolve().parents[1]


def _command(corpus, out, *extra):
    return [sys.executable, "-m", "opt_core.train", "--preset", "test", "--data", str(corpus), "--vocab-size", "320",
            "--data-cache", str(out.parent / "cache"), "--seq-len", "32", "--batch-size", "4", "--steps", "8",
            "--warmup", "2", "--eval-every", "4", "--eval-batches", "2", "--log-every", "1", "--ckpt-every", "2",
            "--keep", "2", "--sample-tokens", "0", "--out", str(out), *extra]


def _env():
    # A plain CPU run (the native path, not the interpreter), its output unbuffered so the kill lands on cue.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["val_loss"]) for r in rows]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(corpus, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_command(corpus, straight), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=300)
    # Killed just after a step's log line (mid-step), and just after step 4's evaluation (in its save).
    for cue in ("step      3 | loss", "step      4 | validation"):
        out = tmp_path / f"killed-{cue.split()[1]}"
        run = subprocess.Popen(_command(corpus, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
        for line in run.stdout:
            if line.startswith(cue):
                run.kill()
                break
        run.wait(timeout=60)
        run.stdout.close()
        assert run.returncode == -9, f"the run ended before {cue!r}"
        done = subprocess.run(_command(corpus, out, "--resume"), cwd=REPO, env=_env(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        a = _params_of(train_mod.checkpoint_paths(out)[-1])
        b = _params_of(train_mod.checkpoint_paths(straight)[-1])
        assert all((a[k] == b[k]).all() for k in b), cue
        assert _losses(out) == _losses(straight), cue
