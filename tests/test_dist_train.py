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
from opt_core import train as cli
from opt_core import trainer as train_mod

REPO = Path(__file__).resolve().parents[1]


def _argv(corpus, out, *extra):
    return ["--preset", "test", "--data", str(corpus), "--vocab-size", "320", "--data-cache",
            str(out.parent / "cache"), "--seq-len", "32", "--batch-size", "4", "--steps", "6", "--warmup", "2",
            "--lr", "3e-3", "--dropout", "0.0", "--eval-every", "3", "--eval-batches", "2", "--log-every", "1",
            "--ckpt-every", "3", "--keep", "1", "--sample-tokens", "4", "--out", str(out), *extra]


def _torchrun(nproc, argv, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU runs take the native ops
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
    with dispatch.native_backend():
        train_mod.train(cli.parse_args(_argv(corpus, out)))
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


def test_distributed_path_in_one_process_and_bad_layouts(corpus, tmp_path, single_process_run, gloo_threads):
    """--dp 1 --tp 1 without torchrun: the dist path in a world of one (FSDP2, DCP checkpoints), equal to the
    plain run; a layout larger than the world fails before anything runs."""
    import torch.distributed as c10d

    threads = gloo_threads()
    with dispatch.native_backend():
        out = tmp_path / "one"
        train_mod.train(cli.parse_args(_argv(corpus, out, "--dp", "1", "--tp", "1", "--sample-tokens", "0")))
        # The run's process group is gone with it, threads and all: none left to meet interpreter shutdown.
        assert not c10d.is_initialized() and gloo_threads() == threads
        _same_run(_losses(out), _losses(single_process_run))
        assert train_mod.sharded_checkpoint_paths(out) and not train_mod.checkpoint_paths(out)
        with pytest.raises(ValueError, match=r"world size 1 != dp x tp = 2 x 2"):
            train_mod.train(cli.parse_args(_argv(corpus, tmp_path / "bad", "--dp", "2", "--tp", "2")))
    with pytest.raises(SystemExit):
        cli.parse_args(_argv(corpus, tmp_path / "bad", "--tp", "0"))


# --------------------------------------------------------------------------- failures
def _rank_pid(out, rank):
    """The pid of the torchrun worker of ``rank`` whose command line names ``out``."""
    for proc in Path("/proc").iterdir():
        try:
            if str(out) in (proc / "cmdline").read_bytes().decode(errors="replace") and \
                    f"\0RANK={rank}\0".encode() in b"\0" + (proc / "environ").read_bytes():
                return int(proc.name)
        except (OSError, ValueError):
            continue
    raise AssertionError(f"no worker of rank {rank} found")


@pytest.mark.slow
def test_a_stalled_rank_fails_the_job_after_the_timeout(corpus, tmp_path):
    """SIGSTOP one rank mid-run: the other's next collective times out after --timeout and the job ends with a
    message, instead of blocking for torch's default 30 minutes."""
    import signal
    import time

    out = tmp_path / "stall"
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "opt_core.train", *_argv(corpus, out, "--dp", "2", "--steps", "50", "--timeout", "5")]
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stalled, seen, stopped_at = None, [], None
    try:
        for line in job.stdout:
            seen.append(line)
            if stalled is None and line.startswith("step      1 | loss"):
                stalled = _rank_pid(out, 1)
                os.kill(stalled, signal.SIGSTOP)
                stopped_at = time.monotonic()
            if "STALLED" in line:
                waited = time.monotonic() - stopped_at
                os.kill(stalled, signal.SIGCONT)  # let torchrun's SIGTERM reach it
                break
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
        if stalled is not None:
            try:
                os.kill(stalled, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = "".join(seen)
    assert stalled is not None and "STALLED: rank 0: a collective waited longer than --timeout 5 s" in text, text
    assert waited < 60 and job.returncode != 0


def test_single_process_resume_of_a_sharded_run_is_refused(corpus, tmp_path):
    out = tmp_path / "sharded"
    with dispatch.native_backend():
        train_mod.train(cli.parse_args(_argv(corpus, out, "--dp", "1", "--tp", "1", "--stop-at", "3")))
        before = (out / "metrics.jsonl").read_text()
        with pytest.raises(train_mod.RunFolderError, match=r"holds step-00000003 \(sharded checkpoints of a "
                                                           r"distributed run: resume under torchrun"):
            train_mod.train(cli.parse_args(_argv(corpus, out, "--resume")))
    assert (out / "metrics.jsonl").read_text() == before  # not started over


@pytest.fixture(scope="module")
def sharded_straight(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "run"
    with dispatch.native_backend():
        train_mod.train(cli.parse_args(_argv(corpus, out, "--dp", "1", "--tp", "1", "--keep", "2")))
    return out


@pytest.mark.parametrize("damage", ["flipped bit in a shard", "no extra.pt"])
def test_a_damaged_sharded_checkpoint_falls_back_to_the_intact_one(corpus, tmp_path, sharded_straight, capsys,
                                                                   damage):
    out = tmp_path / "run"
    argv = _argv(corpus, out, "--dp", "1", "--tp", "1", "--keep", "2")
    with dispatch.native_backend():
        train_mod.train(cli.parse_args(argv))
        newest = train_mod.sharded_checkpoint_paths(out)[-1]
        if damage == "no extra.pt":
            (newest / "extra.pt").unlink()
            why = f"{newest / 'extra.pt'}: missing"
        else:
            shard = next(newest.glob("*.distcp"))
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0x01
            shard.write_bytes(bytes(data))
            why = f"{shard}: its SHA-256 differs from the manifest's"
        capsys.readouterr()
        train_mod.train(cli.parse_args([*argv, "--resume"]))
    said = capsys.readouterr().out
    assert why in said and "resumed from step 3" in said and "starting from scratch" not in said
    assert _losses(out) == _losses(sharded_straight)


def test_a_sharded_checkpoint_missing_part_of_its_state_is_refused_not_half_loaded(corpus, tmp_path):
    out = tmp_path / "run"
    with dispatch.native_backend():
        train_mod.train(cli.parse_args(_argv(corpus, out, "--dp", "1", "--tp", "1", "--stop-at", "3")))
        (train_mod.sharded_checkpoint_paths(out)[-1] / "extra.pt").unlink()
        with pytest.raises(train_mod.RunFolderError, match=r"no intact checkpoint .*extra\.pt: missing"):
            train_mod.train(cli.parse_args(_argv(corpus, out, "--dp", "1", "--tp", "1", "--resume")))
