"""Hugging Face OPT folders: what we save transformers loads (and back), and every malformed folder is named.

Each malformed case asserts that the error names the file and the tensor or
field at fault.  Tiny configs only: hidden 32, 2 layers, odd vocabulary and FFN widths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch

from opt_core import hf
from opt_core.config import OPTConfig
from opt_core.kernels import dispatch
from opt_core.kernels.testing import assert_close_to_reference
from opt_core.model import OPTForCausalLM

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

PRE_LN = OPTConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=40, max_position_embeddings=24)
# 350M-style: post-LN, no final LayerNorm, narrower token embeddings projected in and out.
POST_LN = dataclasses.replace(PRE_LN, word_embed_proj_dim=16, do_layer_norm_before=False)
CONFIGS = pytest.mark.parametrize("config", [PRE_LN, POST_LN], ids=["pre-ln", "post-ln-350m"])

Q_PROJ = "model.decoder.layers.1.self_attn.q_proj.weight"
FC1 = "model.decoder.layers.0.fc1.weight"


def _random_model(config: OPTConfig) -> OPTForCausalLM:
    # Weights of order 1 (not the 0.006 init) so that a misplaced tensor shows in the logits.
    model = OPTForCausalLM(config, init=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def _saved_folder(tmp_path: Path, config: OPTConfig = PRE_LN) -> tuple[Path, OPTForCausalLM]:
    model = _random_model(config)
    folder = tmp_path / "opt"
    hf.save_pretrained(model, folder)
    return folder, model


def _load_error(folder: Path, *names: str, error: type = ValueError) -> str:
    """The message of loading ``folder``, asserting that it names each of ``names``."""
    with pytest.raises(error) as info:
        hf.load_pretrained(OPTForCausalLM, folder)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    return message


def _assert_same_parameters(a: OPTForCausalLM, b: OPTForCausalLM) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


# ----------------------------------------------------------------- round trips
@CONFIGS
def test_saved_folder_loads_in_transformers_with_equal_logits_and_back(tmp_path, config):
    folder, ours = _saved_folder(tmp_path, config)
    theirs = transformers.OPTForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    exported = ours.to_hf_state_dict()
    assert theirs.state_dict().keys() == exported.keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, exported[key]), key
    oracle = transformers.OPTForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    ids = torch.randint(3, config.vocab_size, (2, 13))
    with torch.no_grad(), dispatch.reference_backend():
        assert_close_to_reference("logits", ours(ids).logits, oracle(ids).logits, theirs(ids).logits)
    again = hf.load_pretrained(OPTForCausalLM, folder)
    assert again.config == config
    _assert_same_parameters(again, ours)
    assert again.lm_head.weight is again.decoder.embed_tokens.weight


def test_sharded_folder_from_transformers_loads(tmp_path):
    folder, ours = _sharded_folder(tmp_path)
    assert len(_shards(folder)) > 1
    _assert_same_parameters(hf.load_pretrained(OPTForCausalLM, folder), ours)


@pytest.mark.parametrize("crash", ["none", "writing weights", "renaming model.safetensors", "renaming config.json"])
def test_saving_over_a_folder_never_leaves_a_mix_that_loads(tmp_path, monkeypatch, crash):
    folder, old = _saved_folder(tmp_path)
    (folder / "tokenizer.json").write_text("{}")  # not ours: kept
    new = _random_model(PRE_LN)
    real_replace = os.replace

    def fail_writing(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # a partial file, then the disk fills
        raise OSError("no space left on device")

    def fail_renaming(src, dst):
        if crash == f"renaming {Path(dst).name}":
            raise OSError("killed")
        real_replace(src, dst)

    if crash == "writing weights":
        monkeypatch.setattr(safetensors_torch, "save_file", fail_writing)
    monkeypatch.setattr(os, "replace", fail_renaming)
    if crash == "none":
        hf.save_pretrained(new, folder)
    else:
        with pytest.raises(OSError):
            hf.save_pretrained(new, folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # temporaries removed
    assert (folder / "tokenizer.json").read_text() == "{}"
    if crash.startswith("renaming"):  # some new files may be in place, so the folder must not load
        _load_error(folder, str(folder / "config.json"), error=FileNotFoundError)
    else:  # the untouched old folder, or the complete new one
        _assert_same_parameters(hf.load_pretrained(OPTForCausalLM, folder), new if crash == "none" else old)


# ----------------------------------------------------------------- malformed tensors
@CONFIGS
def test_every_tensor_shape_is_checked_against_the_config(config):
    state_dict = OPTForCausalLM(config).to_hf_state_dict()
    for key, value in state_dict.items():
        bad = dict(state_dict)
        bad[key] = torch.zeros(*value.shape[:-1], value.shape[-1] + 1)
        with pytest.raises(ValueError, match=rf"state_dict: tensor {re.escape(repr(key))} has shape"):
            hf.from_hf_state_dict(bad, config)


def _resized_q_proj(sd):
    sd[Q_PROJ] = sd[Q_PROJ][:, :-1].contiguous()


def _int32_fc1(sd):
    sd[FC1] = sd[FC1].to(torch.int32)


def _dropped_fc2_bias(sd):
    del sd["model.decoder.layers.0.fc2.bias"]


def _third_layer(sd):
    sd["model.decoder.layers.2.fc1.weight"] = sd[FC1].clone()


def _untied_head(sd):
    sd["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"] + 1


def _unprefixed_twin(sd):
    sd["decoder.layers.0.fc1.weight"] = sd[FC1].clone()


WEIGHT_CASES = {  # corruption -> (what the message must name, what it must say)
    "q_proj of the wrong shape": (_resized_q_proj, Q_PROJ, "(32, 31)"),
    "int32 weights": (_int32_fc1, FC1, "torch.int32"),
    "missing tensor": (_dropped_fc2_bias, "decoder.layers.0.fc2.bias", "missing"),
    "unexpected tensor": (_third_layer, "model.decoder.layers.2.fc1.weight", "unexpected"),
    "untied lm_head": (_untied_head, "lm_head.weight", "ties"),
    "tensor given twice": (_unprefixed_twin, "decoder.layers.0.fc1.weight", "twice"),
}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_malformed_tensors_are_named_with_their_file(tmp_path, case, fmt):
    folder, _ = _saved_folder(tmp_path)
    corrupt, name, says = WEIGHT_CASES[case]
    tensors = {k: v.clone() for k, v in safetensors_torch.load_file(folder / "model.safetensors").items()}
    corrupt(tensors)
    (folder / "model.safetensors").unlink()
    path = folder / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    if fmt == "safetensors":
        safetensors_torch.save_file(tensors, path)
    else:
        torch.save(tensors, path)
    assert says in _load_error(folder, str(path), name)


# ----------------------------------------------------------------- malformed files
class _NotATensor:  # pickled into a .bin, which weights_only=True must refuse
    pass


def _truncated_safetensors(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _garbage_bin(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(torch.randint(0, 256, (500,), dtype=torch.uint8).numpy().tobytes())
    return folder / "pytorch_model.bin"


def _pickled_object_bin(folder):
    (folder / "model.safetensors").unlink()
    torch.save({"model.decoder.embed_tokens.weight": _NotATensor()}, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


@pytest.mark.parametrize("corrupt", [_truncated_safetensors, _garbage_bin, _pickled_object_bin],
                         ids=["truncated safetensors", "garbage bin", "bin pickling an object"])
def test_unreadable_weights_files_are_named(tmp_path, corrupt):
    folder, _ = _saved_folder(tmp_path)
    _load_error(folder, str(corrupt(folder)))


def test_a_folder_without_config_or_weights_is_named(tmp_path):
    folder, _ = _saved_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    message = _load_error(folder, str(folder), error=FileNotFoundError)
    assert "model.safetensors" in message and "pytorch_model.bin" in message
    (folder / "config.json").unlink()
    _load_error(folder, str(folder / "config.json"), "nothing is downloaded", error=FileNotFoundError)


CONFIG_CASES = {  # config.json text or edit -> what the message must name
    "empty": ("", "is empty"),
    "not JSON": ("{hidden_size: 32", "not valid JSON"),
    "not an object": ("[1, 2]", "JSON object"),
    "hidden_size as a string": ({"hidden_size": "768"}, "'hidden_size'"),
    "dropout as a string": ({"dropout": "0.1"}, "'dropout'"),
    "bool as a size": ({"num_hidden_layers": True}, "'num_hidden_layers'"),
    "missing ffn_dim": ({"ffn_dim": None}, "'ffn_dim'"),
    "model_type gpt2": ({"model_type": "gpt2"}, "'model_type'"),
    "no model_type": ({"model_type": None}, "'model_type'"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_malformed_config_json_is_named_with_its_field(tmp_path, case):
    folder, _ = _saved_folder(tmp_path)
    edit, name = CONFIG_CASES[case]
    path = folder / "config.json"
    if isinstance(edit, str):
        path.write_text(edit)
    else:
        data = json.loads(path.read_text())
        data.update(edit)
        path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    _load_error(folder, str(path), name)


# ----------------------------------------------------------------- malformed sharded folders
def _sharded_folder(tmp_path: Path) -> tuple[Path, OPTForCausalLM]:
    ours = _random_model(PRE_LN)
    theirs = transformers.OPTForCausalLM(PRE_LN.to_hf())
    theirs.load_state_dict(ours.to_hf_state_dict())
    folder = tmp_path / "sharded"
    theirs.save_pretrained(folder, max_shard_size="20KB")
    return folder, ours


def _shards(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def _edit_index(folder: Path, edit) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def _missing_shard(folder):
    shard = folder / _shards(folder)[-1]
    shard.unlink()
    return FileNotFoundError, (str(shard), "model.safetensors.index.json")


def _index_not_json(folder):
    (folder / "model.safetensors.index.json").write_text("{")
    return ValueError, (str(folder / "model.safetensors.index.json"),)


def _weight_map_not_a_dict(folder):
    _edit_index(folder, lambda index: index.update(weight_map=["x"]))
    return ValueError, (str(folder / "model.safetensors.index.json"), "'weight_map'")


def _tensor_mapped_to_another_shard(folder):
    holder = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][FC1]
    other = next(shard for shard in _shards(folder) if shard != holder)
    _edit_index(folder, lambda index: index["weight_map"].update({FC1: other}))
    return ValueError, (str(folder / holder), FC1)


def _listed_tensor_not_in_its_shard(folder):
    shard = _shards(folder)[0]
    _edit_index(folder, lambda index: index["weight_map"].update({"model.decoder.extra.weight": shard}))
    return ValueError, (str(folder / shard), "model.decoder.extra.weight")


@pytest.mark.parametrize("corrupt", [_missing_shard, _index_not_json, _weight_map_not_a_dict,
                                     _tensor_mapped_to_another_shard, _listed_tensor_not_in_its_shard],
                         ids=["missing shard", "index not JSON", "weight_map not a dict", "tensor in another shard",
                              "listed tensor not in its shard"])
def test_malformed_sharded_folders_are_named(tmp_path, corrupt):
    folder, _ = _sharded_folder(tmp_path)
    error, names = corrupt(folder)
    _load_error(folder, *names, error=error)
