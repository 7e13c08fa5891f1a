"""Hugging Face OPT compatibility: state-dict conversion both ways and local checkpoint loading.

Our modules differ from transformers' OPTForCausalLM in two places: q/k/v are
one fused ``qkv_proj`` (rows grouped per head: (heads, 3, head_dim), see
``opt_core.layers.FusedSelfAttention``) and fc1/fc2 live in an ``mlp``
submodule.  Everything else keeps its name.  Keys are accepted with or without
the ``model.`` prefix (both exist among published OPT checkpoints); the tied
``lm_head.weight`` is optional on input and written on output.

Nothing here downloads: ``load_pretrained`` reads a local folder (config.json
plus model.safetensors, pytorch_model.bin, or their sharded index files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from opt_core.config import OPTConfig
from opt_core.layers import interleave_qkv, split_qkv

_LAYER_RENAMES = {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], config: OPTConfig) -> dict[str, torch.Tensor]:
    """transformers OPTForCausalLM keys -> opt_core OPTForCausalLM keys."""
    sd = {k.removeprefix("model."): v for k, v in state_dict.items()}
    head = sd.pop("lm_head.weight", None)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in sd.items():
        if not key.startswith("decoder."):
            raise KeyError(f"unexpected key in an OPT state dict: {key!r}")
        parts = key.split(".")
        if parts[1] == "layers":
            i, rest = int(parts[2]), ".".join(parts[3:])
            prefix = f"decoder.layers.{i}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(i, {}).setdefault(rest.split(".")[2], {})[rest.split(".")[1]] = value
                continue
            module = rest.split(".")[0]
            rest = _LAYER_RENAMES.get(module, module) + rest[len(module):]
            out[prefix + rest] = value
        else:
            out[key] = value
    for i, by_kind in qkv.items():
        for kind, parts in by_kind.items():  # kind: weight or bias
            missing = {"q_proj", "k_proj", "v_proj"} - parts.keys()
            if missing:
                raise KeyError(f"layer {i}: {kind} of {sorted(missing)} missing from the state dict")
            out[f"decoder.layers.{i}.self_attn.qkv_proj.{kind}"] = interleave_qkv(
                parts["q_proj"], parts["k_proj"], parts["v_proj"], config.num_heads)
    if head is not None and "decoder.embed_tokens.weight" in out:
        if not torch.equal(head, out["decoder.embed_tokens.weight"]):
            raise ValueError("lm_head.weight differs from decoder.embed_tokens.weight: OPT ties them")
    out["lm_head.weight"] = out.get("decoder.embed_tokens.weight", head)
    return out


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: OPTConfig) -> dict[str, torch.Tensor]:
    """opt_core OPTForCausalLM keys -> transformers OPTForCausalLM keys (with the ``model.`` prefix)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            out[key] = value
            continue
        parts = key.split(".")
        if parts[1] == "layers":
            rest = ".".join(parts[3:])
            prefix = f"model.decoder.layers.{parts[2]}."
            if rest.startswith("self_attn.qkv_proj."):
                kind = rest.split(".")[-1]
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), split_qkv(value, config.num_heads)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = chunk
                continue
            if rest.startswith("mlp."):
                rest = rest[len("mlp."):]
            out[prefix + rest] = value
        else:
            out["model." + key] = value
    return out


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    def load_file(path: Path) -> dict[str, torch.Tensor]:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as load_safetensors

            return load_safetensors(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).exists():
            return load_file(folder / single)
        if (folder / index).exists():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            weights: dict[str, torch.Tensor] = {}
            for shard in shards:
                weights.update(load_file(folder / shard))
            return weights
    raise FileNotFoundError(f"{folder} holds no model.safetensors, pytorch_model.bin or sharded index of either")


def load_pretrained(cls, path: str | Path, *, device=None, dtype: Optional[torch.dtype] = None):
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder / 'config.json'} not found: pass a local Hugging Face OPT folder "
                                "(nothing is downloaded)")
    config = OPTConfig.from_file(folder / "config.json")
    model = cls(config, device=device, dtype=dtype, init=False)
    model.load_hf_state_dict(_read_weights(folder))
    return model


def save_pretrained(model, path: str | Path) -> None:
    """Write config.json + model.safetensors that transformers' OPTForCausalLM.from_pretrained reads."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_hf().to_json_file(str(folder / "config.json"))
    sd = {k: v.detach().contiguous().cpu() for k, v in model.to_hf_state_dict().items()}
    sd.pop("lm_head.weight")  # tied: transformers re-ties it from the embedding
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
