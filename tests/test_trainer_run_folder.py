"""A run never destroys another run's files: an explicit --out holding a run is refused without --resume, the
default folder is a fresh runs/demo-N, pruning touches only the checkpoints of the current run."""

from __future__ import annotations

import argparse

import pytest

from opt_core import train as cli
from opt_core import trainer as train_mod
from opt_core.trainer import run_folder
from test_train import _args

pytestmark = pytest.mark.usefixtures("native_path")


def _snapshot(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_second_run_at_the_same_out_is_refused_and_the_first_keeps_its_files(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train_mod.train(_args(corpus, out))
    before = _snapshot(out)
    with pytest.raises(train_mod.RunFolderError, match=rf"--out {out} already holds a run .*continue it with "
                                                       rf"--resume --out {out}, or write this run elsewhere"):
        train_mod.train(_args(corpus, out))
    argv = ["--preset", "test", "--data", str(corpus), "--vocab-size", "320", "--data-cache", str(tmp_path / "cache"),
            "--seq-len", "32", "--batch-size", "4", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "REFUSED: --out" in capsys.readouterr().err
    assert _snapshot(out) == before  # checkpoints, metrics, plot: byte for byte the first run's


def test_without_out_each_run_gets_a_fresh_demo_folder(corpus, tmp_path, monkeypatch):
    """scripts/main.sh twice in a row: two folders, each with its own checkpoints and metrics."""
    monkeypatch.setattr(run_folder, "DEMO_ROOT", tmp_path / "runs")
    summaries = []
    for _ in range(2):
        args = _args(corpus, tmp_path / "unused", "--steps", "4")
        args.out = None
        summaries.append(train_mod.train(args))
    first, second = (tmp_path / "runs" / "demo-1"), (tmp_path / "runs" / "demo-2")
    assert [s["out"] for s in summaries] == [str(first), str(second)]
    for folder, summary in zip((first, second), summaries):
        assert (folder / "metrics.jsonl").stat().st_size > 0 and (folder / "checkpoints" / "step-00000004.pt").exists()
        assert summary["checkpoint"] == str(folder / "checkpoints" / "step-00000004.pt")
    resume = argparse.Namespace(out=None, resume=True)
    assert run_folder._claim(resume) == second  # --resume without --out: the newest
    monkeypatch.setattr(run_folder, "DEMO_ROOT", tmp_path / "none")
    with pytest.raises(train_mod.RunFolderError, match="no .*demo-N to continue"):
        run_folder._claim(resume)


def test_pruning_touches_only_the_checkpoints_of_this_run(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train_mod.train(_args(corpus, out, "--stop-at", "4", "--keep", "1"))
    foreign = out / "checkpoints" / "step-00000002.pt"  # not this run's (not in its manifest)
    foreign.write_bytes(b"someone else's checkpoint")
    summary = train_mod.train(_args(corpus, out, "--resume", "--keep", "1"))
    assert f"skipping {foreign}: not listed" in capsys.readouterr().out
    assert foreign.read_bytes() == b"someone else's checkpoint"
    assert sorted(p.name for p in train_mod.checkpoint_paths(out)) == ["step-00000002.pt", "step-00000008.pt"]
    assert summary["checkpoint"] == str(out / "checkpoints" / "step-00000008.pt")
