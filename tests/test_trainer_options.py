"""Flags: every numeric flag range-checked with a message naming it; --resume applies or refuses changed
flags and says which; a torn last metrics line does not block --resume."""

from __future__ import annotations

import json
import re

import pytest
import torch

from opt_core import train as cli
from opt_core import trainer as train_mod
from test_train import _args, _params_of

pytestmark = pytest.mark.usefixtures("native_path")


@pytest.mark.parametrize("flags, message", [
    (["--clip", "-1"], "--clip must be a finite number >= 0"),           # gradient ascent, exit 0 before
    (["--clip", "nan"], "--clip must be a finite number >= 0"),
    (["--loss-scale", "nan"], "--loss-scale must be a finite number > 0"),  # every step skipped before
    (["--loss-scale", "0"], "--loss-scale must be a finite number > 0"),
    (["--spike-factor", "nan"], "--spike-factor must be a finite number > 1"),  # the guard off before
    (["--spike-factor", "1"], "--spike-factor must be a finite number > 1"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--eps", "0"], "--eps must be a finite number > 0"),
    (["--stop-at", "-5"], "--stop-at must be an int >= 1"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--betas", "0.9", "1.5"], "--betas must both be in"),
    (["--dropout", "1"], r"--dropout must be in \[0, 1\)"),
    (["--timeout", "0"], "--timeout must be a finite number of seconds > 0"),
    (["--min-lr-ratio", "nan"], r"--min-lr-ratio must be in \[0, 1\]"),
    (["--vocab-size", "100"], "--vocab-size must be an int >= 260"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--device", "cpu:x" if torch.cuda.is_available() else "cuda:0"], r"--device (must be|cuda:0: no CUDA device)"),
])
def test_out_of_range_flags_fail_early_naming_the_flag(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


@pytest.mark.parametrize("flags, message", [
    (["--preset", "nope"], "--preset: unknown preset 'nope'"),
    (["--config", "/nonexistent.json"], "--config: .*No such file or directory: '/nonexistent.json'"),
    (["--data", "/nonexistent"], "--data '/nonexistent' does not exist"),
    (["--tokenizer", "/nonexistent"], "--tokenizer '/nonexistent' is not a folder"),
])
def test_missing_or_unknown_sources_fail_early_naming_the_flag(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(flags)
    assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_a_badly_typed_config_file_fails_early_naming_the_file_and_field(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"do_layer_norm_before": "no"}))
    with pytest.raises(SystemExit):
        cli.parse_args(["--config", str(path)])
    assert f"--config: {path}: field 'do_layer_norm_before' must be true or false, got 'no'" in capsys.readouterr().err


def test_resume_applies_a_new_learning_rate_and_says_so(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train_mod.train(_args(corpus, out, "--stop-at", "4"))
    capsys.readouterr()
    train_mod.train(_args(corpus, out, "--resume", "--lr", "1e-3", "--steps", "10"))
    said = capsys.readouterr().out
    assert "--resume: applying --lr 0.003 -> 0.001" in said and "--resume: applying --steps 8 -> 10" in said
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if r["lr"] is not None}
    schedule = train_mod.recipe.lr_lambda(2, 10, 0.1)
    for step in range(5, 11):  # the new peak and the new length, from the resumed step on
        assert lrs[step] == pytest.approx(1e-3 * schedule(step), rel=1e-12)
    assert lrs[4] == pytest.approx(3e-3 * train_mod.recipe.lr_lambda(2, 8, 0.1)(4), rel=1e-12)


@pytest.mark.parametrize("flag, value, said", [("--seq-len", "16", "--seq-len 32 -> 16"),
                                               ("--batch-size", "2", "--batch-size 4 -> 2"),
                                               ("--weight-decay", "0.0", "--weight-decay 0.1 -> 0.0")])
def test_resume_refuses_changes_that_would_train_something_else(corpus, tmp_path, flag, value, said):
    out = tmp_path / "run"
    train_mod.train(_args(corpus, out, "--stop-at", "4"))
    before = _params_of(train_mod.checkpoint_paths(out)[-1])
    with pytest.raises(train_mod.RunFolderError, match=f"{said} would train something else than this run"):
        train_mod.train(_args(corpus, out, "--resume", flag, value))
    assert [p.name for p in train_mod.checkpoint_paths(out)] == ["step-00000004.pt"]
    after = _params_of(train_mod.checkpoint_paths(out)[-1])
    assert all((before[k] == after[k]).all() for k in before)


def test_a_torn_last_metrics_line_does_not_block_resume(corpus, tmp_path):
    straight = tmp_path / "straight"
    train_mod.train(_args(corpus, straight))
    out = tmp_path / "run"
    train_mod.train(_args(corpus, out, "--stop-at", "4"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tokens": 6')  # killed mid-write
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:\d+: dropping a torn last line"):
        train_mod.train(_args(corpus, out, "--resume"))
    assert _trained(out) == _trained(straight)


def _trained(run):
    """What a run computed, row by row (the timing fields differ between any two runs)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["val_loss"], r["grad_norm"], r["lr"]) for r in rows]
