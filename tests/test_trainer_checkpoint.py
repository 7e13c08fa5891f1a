"""Checkpoints: checksums written last, verified on --resume with a fall back to the newest intact one, errors
that name the file, stale temporaries removed, only finite state saved."""

from __future__ import annotations

import json
import re

import pytest
import torch

from opt_core import trainer as train_mod
from opt_core.kernels import dispatch
from opt_core.trainer.runtime import Runtime
from test_train import _args, _params_of

pytestmark = pytest.mark.usefixtures("native_path")


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    """The 8 steps without interruption, the run every resumed one must equal bit for bit."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with dispatch.native_backend():
        train_mod.train(_args(corpus, out))
    return out


def _same_params(a_path, b_path):
    a, b = _params_of(a_path), _params_of(b_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _damage(path, how):
    data = path.read_bytes()
    if how == "flipped bit":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"not a checkpoint at all" * 100)


WHY = {"flipped bit": "SHA-256 differs", "truncated": r"bytes, checkpoints.json says \d+ \(truncated\)",
       "empty": "empty", "garbage": r"bytes, checkpoints.json says"}


@pytest.mark.parametrize("how", list(WHY))
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(corpus, tmp_path, straight_run, capsys, how):
    out = tmp_path / "run"
    train_mod.train(_args(corpus, out))
    newest = train_mod.checkpoint_paths(out)[-1]
    assert newest.name == "step-00000008.pt"
    _damage(newest, how)
    capsys.readouterr()
    summary = train_mod.train(_args(corpus, out, "--resume"))
    said = capsys.readouterr().out
    assert f"skipping {newest}" in said and "resumed from step 4" in said
    assert re.search(WHY[how], said), said
    _same_params(train_mod.checkpoint_paths(out)[-1], train_mod.checkpoint_paths(straight_run)[-1])
    assert summary["checkpoint"] == str(newest) and newest.exists()  # rewritten whole, and listed again


def test_no_intact_checkpoint_is_an_error_naming_every_file(corpus, tmp_path):
    out = tmp_path / "run"
    train_mod.train(_args(corpus, out))
    paths = train_mod.checkpoint_paths(out)
    _damage(paths[0], "truncated")
    _damage(paths[1], "flipped bit")
    with pytest.raises(train_mod.RunFolderError, match="no intact checkpoint") as err:
        train_mod.train(_args(corpus, out, "--resume"))
    assert str(paths[0]) in str(err.value) and str(paths[1]) in str(err.value)


def test_a_checkpoint_missing_from_the_manifest_is_not_trusted(corpus, tmp_path, straight_run, capsys):
    """Killed between a checkpoint's rename and its manifest entry: the file is complete but unverified."""
    out = tmp_path / "run"
    train_mod.train(_args(corpus, out))
    manifest = out / "checkpoints.json"
    entries = json.loads(manifest.read_text())
    entries["checkpoints"] = entries["checkpoints"][:-1]
    manifest.write_text(json.dumps(entries))
    capsys.readouterr()
    train_mod.train(_args(corpus, out, "--resume"))
    said = capsys.readouterr().out
    assert "step-00000008.pt: not listed in" in said and "resumed from step 4" in said
    _same_params(train_mod.checkpoint_paths(out)[-1], train_mod.checkpoint_paths(straight_run)[-1])


def test_stale_temporaries_are_removed_at_start(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    train_mod.train(_args(corpus, out, "--stop-at", "4"))
    stale = [out / "checkpoints" / ".step-00000008.pt.tmp-4242", out / ".checkpoints.json.tmp-4242"]
    for path in stale:
        path.write_bytes(b"half a save")
    (out / "checkpoints" / ".step-00000008.tmp").mkdir()  # a sharded save's temporary folder
    train_mod.train(_args(corpus, out, "--resume"))
    said = capsys.readouterr().out
    for path in stale:
        assert not path.exists() and f"removed {path}" in said
    assert not (out / "checkpoints" / ".step-00000008.tmp").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004.pt", "step-00000008.pt"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_inf_gradient_with_a_finite_loss_is_skipped_and_never_saved(corpus, tmp_path, monkeypatch, dtype):
    """fp32 and bf16 have no loss scaler: the guard reads the gradient norm before the optimizer steps."""
    out = tmp_path / dtype
    backward = train_mod.Trainer._forward_backward
    calls = {"n": 0}

    def inf_gradient(self):
        loss = backward(self)
        calls["n"] += 1
        if calls["n"] == 3 or calls["n"] >= 6:  # one isolated inf gradient, then inf for good
            self.model.decoder.layers[0].mlp.fc1.weight.grad[0, 0] = float("inf")
        return loss

    monkeypatch.setattr(train_mod.Trainer, "_forward_backward", inf_gradient)
    with pytest.raises(train_mod.DivergenceError, match=r"gradient norm inf is not finite .* last good checkpoint: "
                                                        r".*step-00000004\.pt"):
        train_mod.train(_args(corpus, out, "--dtype", dtype, "--max-bad-steps", "3", "--sample-tokens", "0"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["skipped"] or 0 for r in rows) >= 1
    for path in train_mod.checkpoint_paths(out):
        state = torch.load(path, weights_only=False)
        for name, t in state["model"].items():
            assert torch.isfinite(t.float()).all(), name


def test_state_that_is_no_longer_finite_is_never_saved(corpus, tmp_path):
    args = _args(corpus, tmp_path / "run")
    rt = Runtime(device=torch.device("cpu"))
    out = tmp_path / "run"
    out.mkdir()
    trainer = train_mod.Trainer(args, rt, torch.float32, out, train_mod.trainer.prepare_data(args))
    trainer.fit(resumed=False)
    saved = train_mod.checkpoint_paths(out)
    with torch.no_grad():
        trainer.model.decoder.final_layer_norm.weight[3] = float("nan")
    with pytest.raises(train_mod.DivergenceError, match=r"no longer finite; not saving it; last good checkpoint: "
                                                        r".*step-00000008\.pt"):
        trainer.save()
    assert train_mod.checkpoint_paths(out) == saved
