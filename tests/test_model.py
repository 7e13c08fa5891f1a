"""OPTForCausalLM against transformers' OPTForCausalLM; init, loss, generation, loading."""

from __future__ import annotations

import math

import pytest
import torch

from opt_core.kernels import dispatch
from opt_core.config import OPTConfig
from opt_core.kv_cache import KVCache
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
        greedy = model.generate(prompt, max_new_tokens=6)
        again = model.generate(prompt, max_new_tokens=6)
        sampled = [model.generate(prompt, max_new_tokens=6, top_k=5, generator=torch.Generator().manual_seed(7))
                   for _ in range(2)]
        manual = prompt
        for _ in range(6):
            manual = torch.cat([manual, model(manual).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert greedy.shape == (2, 11) and torch.equal(greedy, again) and torch.equal(greedy, manual)
    assert torch.equal(sampled[0], sampled[1]) and torch.equal(sampled[0][:, :5], prompt)
    assert model.training  # restored
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, max_new_tokens=2, top_k=0)


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
    ids = torch.zeros(2, 5, dtype=torch.long)
    typed = [
        (lambda: model(ids.float()), "input_ids must have dtype in \\(int64, int32\\)"),
        (lambda: model(ids.tolist()), "input_ids must be a torch.Tensor, got list"),
        (lambda: model(ids, labels=ids.float()), "labels must have dtype"),
        (lambda: model(ids, attention_mask=[[1] * 5] * 2), "attention_mask must be a tensor or None"),
        (lambda: model.generate(ids.float(), max_new_tokens=1), "input_ids must have dtype"),
    ]
    for call, message in typed:
        with pytest.raises(TypeError, match=message):
            call()
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        OPTForCausalLM.from_pretrained(tmp_path)


def test_int32_token_ids_and_labels_give_the_int64_loss():
    model = OPTForCausalLM(OPTConfig.from_preset("test", dropout=0.0)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        wide = model(ids, attention_mask=mask, labels=ids).loss
        narrow = model(ids.int(), attention_mask=mask, labels=ids.int()).loss
    assert torch.equal(wide, narrow)


def test_fused_qkv_rows_are_grouped_per_head_so_a_row_shard_is_whole_heads():
    from opt_core.layers import interleave_qkv, split_qkv

    heads, head_dim, d = 4, 3, 12
    q, k, v = (torch.randn(d, 5) for _ in range(3))
    fused = interleave_qkv(q, k, v, heads)
    rank1_of_2 = fused.chunk(2)[1]  # tensor parallel over 2 ranks: rank 1's rows
    assert torch.equal(rank1_of_2[:head_dim], q[2 * head_dim: 3 * head_dim])          # head 2's q
    assert torch.equal(rank1_of_2[head_dim: 2 * head_dim], k[2 * head_dim: 3 * head_dim])  # head 2's k
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads), (q, k, v)))


# --------------------------------------------------------------------------- compile, host syncs, generation
def _left_padded(config, lengths):
    """(ids, mask, prompts): random prompts of ``lengths`` left-padded with pad tokens to the longest."""
    prompts = [torch.randint(3, config.vocab_size, (n,)) for n in lengths]
    ids = torch.full((len(lengths), max(lengths)), config.pad_token_id)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, ids.shape[1] - len(p):] = p
        mask[i, ids.shape[1] - len(p):] = 1
    return ids, mask, prompts


def test_forward_compiles_fullgraph_with_and_without_a_mask_in_training_and_eval():
    """torch.compile(fullgraph=True): training (dropout everywhere, attention dropout included, with and without
    activation checkpointing) on a left-padded batch equals eager with the same torch.manual_seed, loss and
    gradients; eval logits equal eager with and without a mask."""
    torch._dynamo.reset()
    config = OPTConfig.from_preset("test", dropout=0.1, attention_dropout=0.1)
    model = OPTForCausalLM(config)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, mask, _ = _left_padded(config, (11, 6))
    with dispatch.reference_backend():
        for checkpointing in (False, True):
            model.activation_checkpointing = checkpointing
            runs = []
            for m in (compiled, model):
                model.zero_grad(set_to_none=True)
                torch.manual_seed(5)
                loss = m(ids, attention_mask=mask, labels=ids).loss
                loss.backward()
                runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-6, atol=0)
            for a, b in zip(runs[0][1], runs[1][1]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        model.eval()
        for padding in (mask, None):
            torch.testing.assert_close(compiled(ids, attention_mask=padding).logits,
                                       model(ids, attention_mask=padding).logits,
                                       rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_forward_reads_no_device_data_on_the_host(monkeypatch):
    """Training forward and backward with a padding mask, labels and dropout on the kernels: no bool() or
    .item() of a tensor (each would be a GPU sync every step); the padding decision is the mask's presence."""
    config = OPTConfig.from_preset("test", dropout=0.1, attention_dropout=0.1)
    model = OPTForCausalLM(config)
    ids, mask, _ = _left_padded(config, (9, 4))

    def host_read(*args):
        raise AssertionError("forward read device data on the host")

    monkeypatch.setattr(torch.Tensor, "__bool__", host_read)
    monkeypatch.setattr(torch.Tensor, "item", host_read)
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(out.loss) and model.decoder.layers[0].self_attn.qkv_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["test", "test-350m"])
def test_padded_batched_generate_equals_each_prompt_alone_and_transformers(name):
    """Greedy generate with a KV cache on a left-padded batch: each row equals its prompt generated alone
    (unpadded) and the batch equals transformers' greedy generate on the same weights, EOS handling included
    (a row stops at the EOS it produced and is padded after it)."""
    config = OPTConfig.from_preset(name, init_std=0.05)  # logits far apart: argmax ties cannot flip
    hf = transformers.OPTForCausalLM(config.to_hf()).eval()
    ours = OPTForCausalLM(config).eval()
    ours.load_hf_state_dict(hf.state_dict())
    ids, mask, prompts = _left_padded(config, (7, 4, 1))
    new = 8
    with dispatch.reference_backend():
        eos = int(ours.generate(ids, mask, max_new_tokens=new)[1, ids.shape[1] + 2])  # row 1 stops by step 3
        batched = ours.generate(ids, mask, max_new_tokens=new, eos_token_id=eos)
        alone = [ours.generate(p[None], max_new_tokens=new, eos_token_id=eos)[0] for p in prompts]
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                         pad_token_id=config.pad_token_id)
    assert torch.equal(batched, theirs)
    for row, prompt, solo in zip(batched, prompts, alone):
        real = row[ids.shape[1] - len(prompt):]
        assert torch.equal(real[:len(solo)], solo)
        assert (real[len(solo):] == config.pad_token_id).all()  # after its EOS
    generated = alone[1][len(prompts[1]):]
    assert len(generated) <= 3 and generated[-1] == eos and eos not in generated[:-1]


def test_kv_cache_decoding_on_the_kernels_equals_recomputing_the_prefix():
    """The attention kernel reading the cache (seqlen_q 1 against the strided cached keys, padding mask over
    them) gives each step the logits a full forward over the whole left-padded sequence gives."""
    config = OPTConfig.from_preset("test-350m", init_std=0.05)
    model = OPTForCausalLM(config).eval()
    ids, mask, _ = _left_padded(config, (5, 2))
    out = model.generate(ids, mask, max_new_tokens=3)
    cache = KVCache(config.num_layers, out.shape[1])
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        cached = [model(ids, attention_mask=mask, kv_cache=cache).logits[:, -1]]
        cached += [model(out[:, n - 1:n], attention_mask=full_mask[:, :n], kv_cache=cache).logits[:, -1]
                   for n in range(ids.shape[1] + 1, out.shape[1])]
        for step, logits in enumerate(cached):
            n = ids.shape[1] + step
            recomputed = model(out[:, :n], attention_mask=full_mask[:, :n]).logits[:, -1]
            torch.testing.assert_close(logits, recomputed, rtol=1e-4, atol=1e-5)
            assert torch.equal(logits.argmax(-1), out[:, n])


def test_generate_and_kv_cache_errors_name_the_argument():
    config = OPTConfig.from_preset("test")
    model = OPTForCausalLM(config)
    prompt = torch.randint(3, config.vocab_size, (2, 60))
    with pytest.raises(ValueError, match="max_new_tokens=5 after a prompt of 60 tokens exceeds"):
        model.generate(prompt, max_new_tokens=5)
    with pytest.raises(TypeError, match="attention_mask must be a tensor"):
        model.generate(prompt[:, :4], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be an int"):
        model.generate(prompt[:, :4], max_new_tokens=-1)
    cache = KVCache(config.num_layers, 8)
    with pytest.raises(ValueError, match="kv_cache is for inference"):
        model(prompt[:, :4], kv_cache=cache)
    with torch.no_grad(), dispatch.reference_backend():
        model(prompt[:, :4], kv_cache=cache)
        with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 6\)"):
            model(prompt[:, 4:6], attention_mask=torch.ones(2, 2), kv_cache=cache)
        with pytest.raises(ValueError, match="the KV cache holds 8 positions; 4 are filled and 5 more came"):
            model(prompt[:, 4:9], kv_cache=cache)


def test_save_pretrained_and_from_pretrained_methods_round_trip(tmp_path):
    config, hf, ours = _pair("test-350m")
    ours.save_pretrained(tmp_path)
    again = OPTForCausalLM.from_pretrained(tmp_path)
    assert again.config == config
    for (key, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key
    assert again.lm_head.weight is again.decoder.embed_tokens.weight
