"""OPTConfig presets against the paper, Hugging Face round trips, FLOP accounting by hand."""

from __future__ import annotations

import pytest

from opt_core import flops
from opt_core.config import OPTConfig

# Parameter counts derived from the paper's Table 1 (OPT_SPEC.md §1: 125.2M ... 174.6B).
PAPER_PARAMS = {
    "opt-125m": 125.2e6, "opt-350m": 331.2e6, "opt-1.3b": 1.316e9, "opt-2.7b": 2.652e9, "opt-6.7b": 6.658e9,
    "opt-13b": 12.85e9, "opt-30b": 29.97e9, "opt-66b": 65.72e9, "opt-175b": 174.6e9,
}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_preset_parameter_counts_match_the_paper(name):
    config = OPTConfig.from_preset(name)
    assert abs(config.num_parameters() / PAPER_PARAMS[name] - 1) < 5e-4
    assert config.ffn_dim == 4 * config.hidden_size and config.max_position_embeddings == 2048


@pytest.mark.parametrize("name", ["opt-125m", "opt-350m", "opt-175b", "test-350m"])
def test_built_model_has_the_counted_parameters(name):
    from opt_core.model import OPTForCausalLM

    config = OPTConfig.from_preset(name)
    model = OPTForCausalLM(config, device="meta", init=False)  # no memory, even for 175B
    assert model.num_parameters() == config.num_parameters()


def test_350m_quirks():
    c = OPTConfig.from_preset("opt-350m")
    assert not c.do_layer_norm_before and not c.has_final_layer_norm and c.word_embed_proj_dim == 512
    assert OPTConfig.from_preset("opt-2.7b").head_dim == 80 and OPTConfig.from_preset("opt-175b").head_dim == 128


@pytest.mark.parametrize("name", ["opt-125m", "opt-350m", "test-2.7b"])
def test_hugging_face_config_round_trip(name):
    pytest.importorskip("transformers")
    config = OPTConfig.from_preset(name)
    hf = config.to_hf()
    back = OPTConfig.from_hf(hf)
    assert back == config
    assert OPTConfig.from_hf(hf.to_dict()) == config


def test_invalid_configs_raise_named_errors():
    with pytest.raises(ValueError, match="hidden_size .* divisible by num_heads"):
        OPTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        OPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="num_layers"):
        OPTConfig(num_layers=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        OPTConfig(vocab_size=1)
    typed = [
        (dict(dropout="0.1"), TypeError, "OPTConfig.dropout must be a float"),
        (dict(attention_dropout=-0.5), ValueError, "OPTConfig.attention_dropout must be >= 0"),
        (dict(init_std=float("inf")), ValueError, "OPTConfig.init_std must be finite"),
        (dict(pad_token_id=1.0), TypeError, "OPTConfig.pad_token_id must be an int"),
        (dict(eos_token_id=True), TypeError, "OPTConfig.eos_token_id must be an int"),
        (dict(do_layer_norm_before="no"), TypeError, "OPTConfig.do_layer_norm_before must be a bool"),
        (dict(ffn_dim=3072.0), ValueError, "OPTConfig.ffn_dim must be a positive int"),
    ]
    for kwargs, error, message in typed:
        with pytest.raises(error, match=message):
            OPTConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown preset"):
        OPTConfig.from_preset("opt-7b")
    with pytest.raises(ValueError, match="ReLU"):
        OPTConfig.from_hf({"activation_function": "gelu"})


def test_flops_per_token_by_hand_for_opt_125m():
    c = OPTConfig.from_preset("opt-125m")
    d, L, f, V, s = 768, 12, 3072, 50272, 2048
    # matmul parameters: per layer Q, K, V, O (4 d^2) and fc1, fc2 (2 d f); the LM head V x d
    n = L * (4 * d * d + 2 * d * f) + V * d
    assert n == 123_543_552 == flops.matmul_parameters(c)
    assert flops.flops_per_token(c, s) == 6 * n + 12 * L * d * s == 967_753_728


def test_opt_175b_flops_match_the_papers_accounting():
    # OPT_SPEC §8: Megatron's no-recompute form gives 1.076e12 FLOPs/token, the recompute form 1.434e12.
    c = OPTConfig.from_preset("opt-175b")
    assert abs(flops.flops_per_token(c, 2048) / 1.076e12 - 1) < 2e-3
    assert abs(flops.hfu_flops_per_token(c, 2048) / 1.434e12 - 1) < 2e-3


def test_mfu_and_peaks():
    c = OPTConfig.from_preset("opt-125m")
    assert flops.peak_flops("NVIDIA H200") == 989e12 and flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops("cpu") is None and flops.mfu(1e5, c, 2048, None) is None
    assert flops.mfu(1e5, c, 2048, 312e12) == pytest.approx(1e5 * 967_753_728 / 312e12)


@pytest.mark.parametrize("field, value, message", [
    ("do_layer_norm_before", "no", r"'do_layer_norm_before' must be true or false, got 'no'"),
    ("do_layer_norm_before", 0, r"'do_layer_norm_before' must be true or false, got 0"),
    ("dropout", "0.1", r"'dropout' must be a number, got '0.1'"),
    ("dropout", True, r"'dropout' must be a number, got True"),
    ("hidden_size", 64.0, r"'hidden_size' must be an int, got 64.0"),
    ("num_layers", "2", r"'num_layers' must be an int, got '2'"),
    ("word_embed_proj_dim", "32", r"'word_embed_proj_dim' must be an int, got '32'"),
])
def test_config_files_are_strictly_typed(tmp_path, field, value, message):
    """JSON holds "no" or "0.1" as easily as false or 0.1: a config file's booleans must be JSON booleans and
    its numbers numbers, or the error names the file and the field (never a bare TypeError, never a "no"
    read as true)."""
    import json

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**OPTConfig.from_preset("test").to_dict(), field: value}))
    with pytest.raises(ValueError, match=rf"{path}: field {message}"):
        OPTConfig.from_file(path)


def test_config_dicts_round_trip_and_name_unknown_keys(tmp_path):
    import json

    config = OPTConfig.from_preset("test-350m")
    assert OPTConfig.from_dict(config.to_dict()) == config
    assert OPTConfig.from_dict({"dropout": 0, "word_embed_proj_dim": None}).dropout == 0.0  # an int is a number
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "num_heads": 4, "layers": 2}))
    with pytest.raises(ValueError, match=rf"{path}: unknown OPTConfig fields: \['layers'\]"):
        OPTConfig.from_file(path)
