"""OPTForCausalLM against transformers' OPTForCausalLM; init, loss, generation, loading."""

from __future__ import annotations

import math

import pytest
import torch

from opt_core.kernels import dispatch
from opt_core.config import OPTConfig
from opt_core.model import OPTForCausalLM

transformers = pytest.importorskip("transformers")

PRESETS = ["test", "test-350m", "test-2.7b"]  # pre-LN; post-LN with project_in/out; head_dim 80


def _pair(name):
    config = OPTConfig.from_preset(name)
    hf = transformers.OPTForCausalLM(config.to_hf()).eval()
    ours = OPTForCausalLM(config).eval()
    ours.load_hf_state_dict(hf.state_dict())
    return config, hf, ours


def _batch(config, padding):
    ids = torch.randint(3, config.vocab_size, (2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    if padding == "left":
        mask[0, :6] = 0
        mask[1, :1] = 0
    elif padding == "right":
        mask[0, -7:] = 0
        mask[1, -2:] = 0
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    return ids, (None if padding == "none" else mask)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", PRESETS)
def test_logits_and_loss_equal_transformers(name, padding):
    config, hf, ours = _pair(name)
    ids, mask = _batch(config, padding)
    labels = ids.masked_fill(mask == 0, -100) if mask is not None else ids
    with torch.no_grad(), dispatch.reference_backend():
        theirs = hf(ids, attention_mask=mask, labels=labels)
        mine = ours(ids, attention_mask=mask, labels=labels)
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    # Padded query positions are don't-care: HF attends them uniformly to masked keys, we give zeros.
    assert (mine.logits[real] - theirs.logits[real]).abs().max() < 1e-4
    assert abs(float(mine.loss) - float(theirs.loss)) < 1e-5


@pytest.mark.parametrize("name", PRESETS)
def test_hf_state_dict_round_trips(name):
    config, hf, ours = _pair(name)
    exported = ours.to_hf_state_dict()
    assert exported.keys() == hf.state_dict().keys()
    for key, value in hf.state_dict().items():
        assert torch.equal(exported[key], value), key
    again = OPTForCausalLM(config, init=False)
    again.load_hf_state_dict(exported)
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_kernel_backend_agrees_with_the_reference():
    # Under the CPU interpreter the model runs our Triton LayerNorm, attention and MLP kernels.
    config, _, ours = _pair("test")
    ids, mask = _batch(config, "left")
    with torch.no_grad():
        fused = ours(ids, attention_mask=mask).logits
        with dispatch.reference_backend():
            plain = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (fused[real] - plain[real]).abs().max() < 1e-4


def test_paper_initialisation():
    config = OPTConfig.from_preset("test", hidden_size=256, num_heads=4, ffn_dim=1024, num_layers=8)
    model = OPTForCausalLM(config)
    std, out_std = 0.006, 0.006 / math.sqrt(2 * 8)
    layer = model.decoder.layers[3]
    for w, expected in ((model.decoder.embed_tokens.weight[4:], std), (layer.self_attn.qkv_proj.weight, std),
                        (layer.mlp.fc1.weight, std), (layer.self_attn.out_proj.weight, out_std),
                        (layer.mlp.fc2.weight, out_std)):
        assert abs(w.std().item() / expected - 1) < 0.05
    assert not model.decoder.embed_tokens.weight[config.pad_token_id].any()
    assert not model.decoder.embed_positions.weight[1].any()
    assert not layer.mlp.fc1.bias.any() and not layer.self_attn.qkv_proj.bias.any()
    assert torch.equal(layer.final_layer_norm.weight, torch.ones(256))
    assert model.lm_head.weight is model.decoder.embed_tokens.weight


def test_loss_ignores_padding_and_minus_100():
    config = OPTConfig.from_preset("test", dropout=0.0)
    model = OPTForCausalLM(config).eval()
    ids, mask = _batch(config, "right")
    with dispatch.reference_backend():
        out = model(ids, attention_mask=mask, labels=ids)
        logits = out.logits[:, :-1].reshape(-1, config.vocab_size)
        target = ids.masked_fill(mask == 0, -100)[:, 1:].reshape(-1)
        expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
    assert torch.allclose(out.loss, expected)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    config = OPTConfig.from_preset("test", dropout=0.1)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = OPTForCausalLM(config).train()
        model.activation_checkpointing = ckpt
        ids = torch.randint(3, config.vocab_size, (2, 16))
        torch.manual_seed(1)  # same dropout draws in both runs
        with dispatch.reference_backend():
            loss = model(ids, labels=ids).loss
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_generate_greedy_and_top_k():
    config = OPTConfig.from_preset("test", dropout=0.0)
    model = OPTForCausalLM(config)
    prompt = torch.randint(3, config.vocab_size, (2, 5))
    with dispatch.reference_backend():
        greedy = model.generate(prompt, 6)
        again = model.generate(prompt, 6)
        sampled = [model.generate(prompt, 6, top_k=5, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
        manual = prompt
        for _ in range(6):
            manual = torch.cat([manual, model(manual).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert greedy.shape == (2, 11) and torch.equal(greedy, again) and torch.equal(greedy, manual)
    assert torch.equal(sampled[0], sampled[1]) and torch.equal(sampled[0][:, :5], prompt)
    assert model.training  # restored
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_reads_a_local_hugging_face_folder(tmp_path, fmt):
    config, hf, _ = _pair("test-350m")
    hf.save_pretrained(tmp_path, safe_serialization=fmt == "safetensors")
    model = OPTForCausalLM.from_pretrained(tmp_path)
    assert model.config == OPTConfig.from_hf(hf.config)
    ids, mask = _batch(config, "none")
    with torch.no_grad(), dispatch.reference_backend():
        assert (model(ids).logits - hf(ids).logits).abs().max() < 1e-4


def test_save_pretrained_is_read_by_transformers(tmp_path):
    from opt_core.hf import save_pretrained

    config, _, ours = _pair("test")
    save_pretrained(ours, tmp_path)
    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path).eval()
    ids, _ = _batch(config, "none")
    with torch.no_grad(), dispatch.reference_backend():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-4


def test_bad_inputs_raise_named_errors(tmp_path):
    model = OPTForCausalLM(OPTConfig.from_preset("test"))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        OPTForCausalLM.from_pretrained(tmp_path)


def test_fused_qkv_rows_are_grouped_per_head_so_a_row_shard_is_whole_heads():
    from opt_core.layers import interleave_qkv, split_qkv

    heads, head_dim, d = 4, 3, 12
    q, k, v = (torch.randn(d, 5) for _ in range(3))
    fused = interleave_qkv(q, k, v, heads)
    rank1_of_2 = fused.chunk(2)[1]  # tensor parallel over 2 ranks: rank 1's rows
    assert torch.equal(rank1_of_2[:head_dim], q[2 * head_dim: 3 * head_dim])          # head 2's q
    assert torch.equal(rank1_of_2[head_dim: 2 * head_dim], k[2 * head_dim: 3 * head_dim])  # head 2's k
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads), (q, k, v)))
