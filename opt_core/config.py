"""OPTConfig: the OPT paper's sizes as presets, plus tiny presets for tests and the CPU demo.

Sizes from the paper's Table 1 (../shared/OPT_SPEC.md §1): FFN = 4·d, head_dim =
d / heads, sequence length 2048, vocabulary 50272 (50265 tokens padded to a
multiple of 8).  350M is the odd one: post-LN (LayerNorm after each residual
add), no final LayerNorm, and 512-wide token embeddings projected in and out
of the 1024-wide model (``word_embed_proj_dim``).  The training recipe's
defaults (init std 0.006, dropout 0.1, no attention dropout in the released
configs) are here too; the optimizer's live in ``opt_core.train``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from opt_core.kernels.validation import check_dropout, check_float, check_positive_int


@dataclasses.dataclass
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    word_embed_proj_dim: Optional[int] = None  # None: hidden_size (every size but 350M)
    do_layer_norm_before: bool = True           # pre-LN; False only for 350M
    dropout: float = 0.1
    attention_dropout: float = 0.0
    init_std: float = 0.006
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_dim", "max_position_embeddings",
                     "word_embed_proj_dim"):
            check_positive_int(f"OPTConfig.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"OPTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if not isinstance(self.do_layer_norm_before, bool):
            raise TypeError(f"OPTConfig.do_layer_norm_before must be a bool, got {self.do_layer_norm_before!r}")
        for name in ("dropout", "attention_dropout"):
            check_dropout(f"OPTConfig.{name}", getattr(self, name))
        check_float("OPTConfig.init_std", self.init_std, min_value=0.0)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"OPTConfig.{name} must be an int token id, got {value!r}")
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"OPTConfig.{name} ({value}) must be a token id below vocab_size "
                                 f"({self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def has_final_layer_norm(self) -> bool:
        # Hugging Face builds the decoder-level LayerNorm only for pre-LN models (350M has none).
        return self.do_layer_norm_before

    # ----------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "OPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def num_parameters(self) -> int:
        """Parameters of OPTForCausalLM (the LM head is tied to the token embedding)."""
        d, f, e = self.hidden_size, self.ffn_dim, self.word_embed_proj_dim
        layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # attention, MLP, two LayerNorms
        total = self.vocab_size * e + (self.max_position_embeddings + 2) * d + self.num_layers * layer
        if e != d:
            total += 2 * d * e  # project_in and project_out, no biases
        if self.has_final_layer_norm:
            total += 2 * d
        return total

    # ----------------------------------------------------------------- files and Hugging Face
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OPTConfig":
        """From a dict of OPTConfig fields, strictly typed as JSON holds them: ints are integers, floats any
        number, booleans true or false (never "no" or 1), word_embed_proj_dim also null; ValueError naming
        an unknown or wrongly typed field."""
        if not isinstance(d, dict):
            raise ValueError(f"an OPTConfig dict must be a dict of fields, got {type(d).__name__}")
        kinds = {f.name: _FIELD_KINDS[f.type] for f in dataclasses.fields(cls)}
        unknown = set(d) - set(kinds)
        if unknown:
            raise ValueError(f"unknown OPTConfig fields: {sorted(unknown)}")
        values = {}
        for name, value in d.items():
            kind, nullable = kinds[name]
            if value is None and nullable:
                values[name] = None
                continue
            value = _checked_hf_field(name, value, kind)
            values[name] = float(value) if kind is float else value
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "OPTConfig":
        """A JSON file of OPTConfig fields, or a Hugging Face OPT config.json; errors name the file."""
        path = Path(path)
        data = read_json_object(path)
        try:
            return cls.from_hf(data) if data.get("model_type") == "opt" else cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_hf(cls, hf: Any) -> "OPTConfig":
        """From a ``transformers.OPTConfig`` or its config.json dict.

        The six size fields are required; the rest default as transformers' OPTConfig does (init_std: the
        paper's).  A missing size field or a wrongly typed field raises ValueError naming the field."""
        get = (lambda k, default=None: hf.get(k, default)) if isinstance(hf, dict) else \
            (lambda k, default=None: getattr(hf, k, default))
        if get("activation_function", "relu") != "relu":
            raise ValueError(f"only ReLU OPT models are supported, got activation_function="
                             f"{get('activation_function')!r}")
        if not _hf_field(get, "enable_bias", bool, True) or \
                not _hf_field(get, "layer_norm_elementwise_affine", bool, True):
            raise ValueError("OPT models without biases or LayerNorm affine parameters are not supported")
        if _hf_field(get, "_remove_final_layer_norm", bool, False):
            raise ValueError("OPT configs with _remove_final_layer_norm=True are not supported")
        hidden_size = _hf_field(get, "hidden_size", int)
        embed_dim = _hf_field(get, "word_embed_proj_dim", int, None)
        eos = get("eos_token_id", 2)
        return cls(
            vocab_size=_hf_field(get, "vocab_size", int), hidden_size=hidden_size,
            num_layers=_hf_field(get, "num_hidden_layers", int),
            num_heads=_hf_field(get, "num_attention_heads", int), ffn_dim=_hf_field(get, "ffn_dim", int),
            max_position_embeddings=_hf_field(get, "max_position_embeddings", int),
            word_embed_proj_dim=hidden_size if embed_dim is None else embed_dim,
            do_layer_norm_before=_hf_field(get, "do_layer_norm_before", bool, True),
            dropout=float(_hf_field(get, "dropout", float, 0.1)),
            attention_dropout=float(_hf_field(get, "attention_dropout", float, 0.0)),
            init_std=float(_hf_field(get, "init_std", float, cls.init_std)),
            pad_token_id=_hf_field(get, "pad_token_id", int, 1), bos_token_id=_hf_field(get, "bos_token_id", int, 2),
            eos_token_id=_checked_hf_field("eos_token_id", eos[0] if isinstance(eos, (list, tuple)) and eos else eos,
                                           int),
        )

    def to_hf(self):
        """A ``transformers.OPTConfig`` (needs transformers)."""
        from transformers import OPTConfig as HFOPTConfig

        return HFOPTConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, ffn_dim=self.ffn_dim,
            max_position_embeddings=self.max_position_embeddings, word_embed_proj_dim=self.word_embed_proj_dim,
            do_layer_norm_before=self.do_layer_norm_before, dropout=self.dropout,
            attention_dropout=self.attention_dropout, activation_function="relu", enable_bias=True,
            layer_norm_elementwise_affine=True, pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, tie_word_embeddings=True, init_std=self.init_std,
        )


# OPTConfig's annotations (strings, under `from __future__ import annotations`) -> (kind, None allowed).
_FIELD_KINDS = {"int": (int, False), "Optional[int]": (int, True), "bool": (bool, False), "float": (float, False)}
_REQUIRED = object()  # default of a config field that must be present
_KIND_NAMES = {int: "an int", float: "a number", bool: "true or false"}


def _hf_field(get, name: str, kind: type, default: Any = _REQUIRED) -> Any:
    """One field of a Hugging Face config: ``default`` when absent (ValueError if required), else type-checked."""
    value = get(name, default)
    if value is _REQUIRED:
        raise ValueError(f"required field {name!r} is missing")
    if value is None and default is None:
        return None
    return _checked_hf_field(name, value, kind)


def _checked_hf_field(name: str, value: Any, kind: type) -> Any:
    # JSON holds "768" as easily as 768, and bool is a subclass of int: keep bools and numbers apart.
    allowed = (int, float) if kind is float else kind
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, allowed):
        raise ValueError(f"field {name!r} must be {_KIND_NAMES[kind]}, got {value!r}")
    return value


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object; ValueError naming the file when it is empty, not JSON or not an object."""
    try:
        text = path.read_text()
        data = json.loads(text)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a JSON text file: {err}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is empty" if not text.strip() else f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data


def _size(d: int, layers: int, heads: int, **kw: Any) -> OPTConfig:
    return OPTConfig(hidden_size=d, num_layers=layers, num_heads=heads, ffn_dim=4 * d, **kw)


PRESETS: dict[str, OPTConfig] = {
    "opt-125m": _size(768, 12, 12),
    "opt-350m": _size(1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _size(2048, 24, 32),
    "opt-2.7b": _size(2560, 32, 32),
    "opt-6.7b": _size(4096, 32, 32),
    "opt-13b": _size(5120, 40, 40),
    "opt-30b": _size(7168, 48, 56),
    "opt-66b": _size(9216, 64, 72),
    "opt-175b": _size(12288, 96, 96),
    # Tiny shapes for tests and the CPU demo (their vocabulary follows the data's tokenizer).
    "tiny": _size(128, 4, 4, vocab_size=4096, max_position_embeddings=256),
    "test": _size(64, 2, 4, vocab_size=512, max_position_embeddings=64),
    "test-350m": _size(64, 2, 4, vocab_size=512, max_position_embeddings=64, word_embed_proj_dim=32,
                       do_layer_norm_before=False),
    "test-2.7b": _size(160, 2, 2, vocab_size=512, max_position_embeddings=64),  # head_dim 80, as 2.7B
}
