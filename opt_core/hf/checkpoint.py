"""Hugging Face OPT compatibility: state-dict conversion both ways, local folders in and out.

Our modules differ from transformers' OPTForCausalLM in two places: q/k/v are
one fused ``qkv_proj`` (rows grouped per head: (heads, 3, head_dim), see
``opt_core.layers.FusedSelfAttention``) and fc1/fc2 live in an ``mlp``
submodule.  Everything else keeps its name.  Keys are accepted with or without
the ``model.`` prefix (both exist among published OPT checkpoints); the tied
``lm_head.weight`` is optional on input and written on output.

Nothing here downloads: ``load_pretrained`` reads a local folder (config.json
plus model.safetensors, pytorch_model.bin, or their sharded index files).
Everything is checked before a model is built or a tensor copied: each field
of config.json, each weights file, each tensor's name, dtype and shape against
the config.  A bad folder raises ValueError (FileNotFoundError for a missing
file) naming the file and the tensor or field.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from opt_core.config import OPTConfig, read_json_object
from opt_core.files import fsync
from opt_core.layers import interleave_qkv, split_qkv

# (single file, sharded index) per format, in the order transformers prefers them.
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))
_LAYER_RENAMES = {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_QKV = ("q_proj", "k_proj", "v_proj")
_TIED = "lm_head.weight"
# Rows of embed_positions beyond max_position_embeddings: opt_core.model.POSITION_OFFSET, not imported
# because the model imports this module.
_POSITION_OFFSET = 2


def hf_tensor_shapes(config: OPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of transformers' OPTForCausalLM for ``config``, without the ``model.`` prefix."""
    d, e, f = config.hidden_size, config.word_embed_proj_dim, config.ffn_dim
    shapes = {"decoder.embed_tokens.weight": (config.vocab_size, e),
              "decoder.embed_positions.weight": (config.max_position_embeddings + _POSITION_OFFSET, d),
              _TIED: (config.vocab_size, e)}
    if e != d:
        shapes.update({"decoder.project_in.weight": (d, e), "decoder.project_out.weight": (e, d)})
    if config.has_final_layer_norm:
        shapes.update({"decoder.final_layer_norm.weight": (d,), "decoder.final_layer_norm.bias": (d,)})
    for i in range(config.num_layers):
        layer = {f"self_attn.{proj}.{kind}": (d, d) if kind == "weight" else (d,)
                 for proj in (*_QKV, "out_proj") for kind in ("weight", "bias")}
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            layer.update({f"{norm}.weight": (d,), f"{norm}.bias": (d,)})
        layer.update({"fc1.weight": (f, d), "fc1.bias": (f,), "fc2.weight": (d, f), "fc2.bias": (d,)})
        shapes.update({f"decoder.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def check_hf_state_dict(state_dict: Mapping[str, object], config: OPTConfig, *,
                        files: Optional[Mapping[str, str]] = None) -> None:
    """Raise ValueError unless ``state_dict`` is exactly a Hugging Face OPT state dict for ``config``.

    ``files`` maps each key to the file it was read from, so that the message names it."""
    def source(key: str) -> str:
        return files[key] if files else "state_dict"

    expected = hf_tensor_shapes(config)
    seen: dict[str, str] = {}  # name without the prefix -> key as given
    for key, value in state_dict.items():
        name = key.removeprefix("model.")
        if name in seen:
            raise ValueError(f"{source(key)}: tensor {key!r} is given twice (also as {seen[name]!r})")
        seen[name] = key
        if name not in expected:
            raise ValueError(f"{source(key)}: unexpected tensor {key!r}: not in an OPT model with "
                             f"{config.num_layers} layers and word_embed_proj_dim={config.word_embed_proj_dim}")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source(key)}: {key!r} holds a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            raise ValueError(f"{source(key)}: tensor {key!r} has dtype {value.dtype}; weights must be floating point")
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"{source(key)}: tensor {key!r} has shape {tuple(value.shape)}, but the config "
                             f"needs {expected[name]}")
    missing = sorted(expected.keys() - seen.keys() - {_TIED})
    if missing:
        where = ", ".join(sorted(set(files.values()))) if files else "state_dict"
        raise ValueError(f"{where}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    if _TIED in seen and not torch.equal(state_dict[seen[_TIED]], state_dict[seen["decoder.embed_tokens.weight"]]):
        raise ValueError(f"{source(seen[_TIED])}: tensor {seen[_TIED]!r} differs from "
                         "'decoder.embed_tokens.weight': OPT ties them")


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor], config: OPTConfig, *,
                       files: Optional[Mapping[str, str]] = None) -> dict[str, torch.Tensor]:
    """transformers OPTForCausalLM keys -> opt_core OPTForCausalLM keys, after ``check_hf_state_dict``."""
    check_hf_state_dict(state_dict, config, files=files)
    sd = {k.removeprefix("model."): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")  # decoder.layers.<i>.<module>[.<projection>].<kind>
        if key == _TIED or (parts[1] == "layers" and parts[4] in _QKV):
            continue  # re-tied / fused below
        if parts[1] == "layers":
            parts[3] = _LAYER_RENAMES.get(parts[3], parts[3])
        out[".".join(parts)] = value
    for i in range(config.num_layers):
        attn = f"decoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            q, k, v = (sd[f"{attn}{proj}.{kind}"] for proj in _QKV)
            out[f"{attn}qkv_proj.{kind}"] = interleave_qkv(q, k, v, config.num_heads)
    out[_TIED] = out["decoder.embed_tokens.weight"]
    return out


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: OPTConfig) -> dict[str, torch.Tensor]:
    """opt_core OPTForCausalLM keys -> transformers OPTForCausalLM keys (with the ``model.`` prefix)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == _TIED:
            out[key] = value
            continue
        parts = key.split(".")
        if parts[1] == "layers":
            rest = ".".join(parts[3:])
            prefix = f"model.decoder.layers.{parts[2]}."
            if rest.startswith("self_attn.qkv_proj."):
                kind = rest.split(".")[-1]
                for name, chunk in zip(_QKV, split_qkv(value, config.num_heads)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = chunk
                continue
            if rest.startswith("mlp."):
                rest = rest[len("mlp."):]
            out[prefix + rest] = value
        else:
            out["model." + key] = value
    return out


# ----------------------------------------------------------------- reading a folder
def read_hf_config(path: Path) -> OPTConfig:
    """An OPTConfig from a Hugging Face config.json; errors name the file and the field."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a local Hugging Face OPT folder (nothing is downloaded)")
    data = read_json_object(path)
    if data.get("model_type") != "opt":
        raise ValueError(f"{path}: field 'model_type' must be 'opt', got {data.get('model_type')!r}")
    try:
        return OPTConfig.from_hf(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _load_weights_file(path: Path) -> dict[str, object]:
    """The named tensors of one weights file (safetensors are memory-mapped: no data is read yet)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        data = load_file(str(path)) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}") from err
    except OSError:
        raise
    except Exception as err:  # a corrupt pickle or zip archive raises anything from EOFError to UnpicklingError
        raise ValueError(f"{path} is not a readable PyTorch weights file (truncated or corrupt, or it pickles "
                         f"more than tensors, which weights_only=True refuses): {err}") from err
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"{path} must hold a dict of named tensors, got a {type(data).__name__}")
    return data


def _read_sharded(index: Path) -> tuple[dict[str, object], dict[str, str]]:
    """(tensors, file of each tensor) of a sharded checkpoint, checked against its index's weight_map."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: field 'weight_map' must map tensor names to shard file names")
    tensors: dict[str, object] = {}
    files: dict[str, str] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index.parent / shard_name
        if Path(shard_name).name != shard_name:
            raise ValueError(f"{index}: shard {shard_name!r} in 'weight_map' is not a file name in its folder")
        if not shard.is_file():
            raise FileNotFoundError(f"{shard} not found (a shard listed in {index})")
        for key, value in _load_weights_file(shard).items():
            if weight_map.get(key) != shard_name:
                raise ValueError(f"{shard}: tensor {key!r} is not mapped to this shard by {index}")
            tensors[key], files[key] = value, str(shard)
    absent = sorted(weight_map.keys() - tensors.keys())
    if absent:
        raise ValueError(f"{index.parent / weight_map[absent[0]]}: tensor {absent[0]!r}, which {index.name} "
                         "maps to this shard, is not in it")
    return tensors, files


def read_hf_weights(folder: Path) -> tuple[dict[str, object], dict[str, str]]:
    """(tensors, file of each tensor) of a Hugging Face folder, from the first weights format it holds."""
    for single, index in WEIGHT_FILES:
        if (folder / single).is_file():
            tensors = _load_weights_file(folder / single)
            return tensors, dict.fromkeys(tensors, str(folder / single))
        if (folder / index).is_file():
            return _read_sharded(folder / index)
    names = ", ".join(name for pair in WEIGHT_FILES for name in pair)
    raise FileNotFoundError(f"{folder} holds no weights: none of {names}")


def load_pretrained(cls, path: str | Path, *, device=None, dtype: Optional[torch.dtype] = None):
    """A ``cls`` (OPTForCausalLM) built from a local Hugging Face OPT folder, validated before it is built."""
    folder = Path(path)
    config = read_hf_config(folder / "config.json")
    tensors, files = read_hf_weights(folder)
    state_dict = from_hf_state_dict(tensors, config, files=files)
    model = cls(config, device=device, dtype=dtype, init=False)
    model.load_state_dict(state_dict, strict=True)
    return model


# ----------------------------------------------------------------- writing a folder
def save_pretrained(model, path: str | Path) -> None:
    """Write config.json + model.safetensors that transformers' OPTForCausalLM.from_pretrained reads.

    The LM head is left out of the weights (transformers re-ties it to the embedding, as its own
    save does).  Both files are written under hidden temporary names and renamed into place,
    config.json last and only after any older one is removed: a folder without config.json does
    not load, so a crash at any point never leaves a half-written folder that loads."""
    from safetensors.torch import save_file

    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.to_hf_state_dict().items()}
    head = state_dict.pop(_TIED)
    if not torch.equal(head, state_dict["model.decoder.embed_tokens.weight"]):
        raise ValueError("model's lm_head.weight differs from decoder.embed_tokens.weight: OPT ties them, and "
                         "the Hugging Face format stores only the embedding")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    writers: dict[str, Callable[[str], None]] = {
        "model.safetensors": lambda tmp: save_file(state_dict, tmp, metadata={"format": "pt"}),
        "config.json": model.config.to_hf().to_json_file,
    }
    staged: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            staged[name] = Path(tmp)
            write(tmp)
            fsync(staged[name])
        (folder / "config.json").unlink(missing_ok=True)
        for name in writers:  # dicts keep their order: config.json is renamed last
            os.replace(staged[name], folder / name)
            del staged[name]
        fsync(folder)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


