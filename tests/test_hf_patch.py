"""opt_core.hf.patch_opt and opt_core.replace_layer_norms: our kernels inside transformers models.

Numerics follow opt_core.kernels.testing: the patched model's logits and gradients against the
unpatched model run in float64, within 2x / 3x the error of the unpatched model in float32 (the
precision both run in).  Under the interpreter (the default here) the patched model runs our Triton
kernels; under ``reference_backend()`` their plain-PyTorch paths.  Padded query positions are not
compared: transformers gives a query that sees only padded keys a uniform average of them, our
kernel a 0, and no real position reads them (the cotangent is 0 there, so gradients compare).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.distributed as c10d
from torch import nn

import opt_core.layers
from opt_core import FusedAdamW, FusedLayerNorm, replace_layer_norms
from opt_core.kernels import dispatch
from opt_core.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_reference

transformers = pytest.importorskip("transformers")

from opt_core.hf import PatchReport, patch_opt, register_attention  # noqa: E402  (needs transformers)
from opt_core.hf import patch as hf_patch  # noqa: E402

LAYERS, VOCAB, SEQ = 2, 61, 9


def _config(post_ln: bool = False, **overrides) -> "transformers.OPTConfig":
    """A tiny random OPT: odd widths, 2 heads of 12; dropout on, so eval mode must switch it off.
    ``post_ln``: the 350M shape, LayerNorm after each residual and project_in/out (16 <-> 24)."""
    fields = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=LAYERS, ffn_dim=40, num_attention_heads=2,
                  max_position_embeddings=32, dropout=0.1, attention_dropout=0.1, pad_token_id=1)
    if post_ln:
        fields.update(word_embed_proj_dim=16, do_layer_norm_before=False)
    return transformers.OPTConfig(**{**fields, **overrides})


def _batch(left_padded: bool, rows: int = 2):
    """(input_ids, attention_mask or None, real-token mask)."""
    ids = torch.randint(3, VOCAB, (rows, SEQ))
    if not left_padded:
        return ids, None, torch.ones(rows, SEQ, dtype=torch.bool)
    mask = torch.ones(rows, SEQ, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 1), mask, mask.bool()


def _logits_and_grads(model: nn.Module, ids, mask, cotangent):
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask).logits
    (logits.double() * cotangent).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def _assert_matches(ours, reference, plain, real, what):
    """``ours`` = (logits, grads) within the numerics rule of the float64 ``reference``, scaled by ``plain``'s error."""
    assert_close_to_reference(f"{what} logits", ours[0][real], reference[0][real], plain[0][real],
                              factor=FORWARD_FACTOR)
    assert ours[1].keys() == reference[1].keys()
    for name, grad in reference[1].items():
        assert_close_to_reference(f"{what} d {name}", ours[1][name], grad, plain[1][name], factor=GRADIENT_FACTOR)


# --------------------------------------------------------------------------- patch_opt on an instance
@pytest.mark.parametrize("left_padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("post_ln", [False, True], ids=["pre-LN", "350M-post-LN"])
def test_patched_model_keeps_logits_and_gradients(post_ln, left_padded):
    hf = transformers.OPTForCausalLM(_config(post_ln)).eval()
    reference, patched = copy.deepcopy(hf).double(), copy.deepcopy(hf)
    report = patch_opt(patched)
    norms = 2 * LAYERS + (0 if post_ln else 1)  # two per layer, and the decoder's last one (pre-LN only)
    assert (report.attention, report.layer_norm, report.mlp) == (LAYERS, norms, LAYERS)
    assert patched.state_dict().keys() == hf.state_dict().keys()

    ids, mask, real = _batch(left_padded)
    cotangent = torch.randn(*ids.shape, VOCAB, dtype=torch.float64) * real[..., None]
    want = _logits_and_grads(reference, ids, mask, cotangent)
    plain = _logits_and_grads(hf, ids, mask, cotangent)
    for path, backend in (("kernels", contextlib.nullcontext()), ("reference path", dispatch.reference_backend())):
        with backend:
            _assert_matches(_logits_and_grads(patched, ids, mask, cotangent), want, plain, real, path)


def test_report_counts_each_piece_and_a_second_call_replaces_nothing():
    model = transformers.OPTForCausalLM(_config())
    report = patch_opt(model, mlp=False)
    assert report == PatchReport("OPTForCausalLM", attention=LAYERS, layer_norm=2 * LAYERS + 1, mlp=0)
    assert str(report) == ("patch_opt(OPTForCausalLM): attention: 2 modules -> the opt_core attention kernel; "
                           "layer_norm: 5 modules -> FusedLayerNorm")
    assert type(model.model.decoder.layers[0]) is transformers.models.opt.modeling_opt.OPTDecoderLayer
    again = patch_opt(model)
    assert (again.attention, again.layer_norm, again.mlp) == (0, 0, LAYERS)
    assert str(patch_opt(model)) == "patch_opt(OPTForCausalLM): nothing replaced"
    assert model._no_split_modules == {"OPTDecoderLayer"}  # FSDP auto-wrap and device maps find layers by name


def test_attn_implementation_opt_core_is_the_attention_piece():
    """``attn_implementation="opt_core"`` (after register_attention) and patch_opt(attention only) run the
    same code: equal bit for bit, padded batch included."""
    assert register_attention() == "opt_core"
    by_name = transformers.AutoModelForCausalLM.from_config(_config(), attn_implementation="opt_core").eval()
    patched = transformers.OPTForCausalLM(_config()).eval()
    patched.load_state_dict(by_name.state_dict())
    patch_opt(patched, layer_norm=False, mlp=False)
    assert by_name.config._attn_implementation == patched.config._attn_implementation == "opt_core"
    ids, mask, real = _batch(left_padded=True)
    cotangent = torch.randn(*ids.shape, VOCAB, dtype=torch.float64) * real[..., None]
    (a, grads_a), (b, grads_b) = (_logits_and_grads(m, ids, mask, cotangent) for m in (by_name, patched))
    assert torch.equal(a, b)
    assert all(torch.equal(grads_a[name], grads_b[name]) for name in grads_a)


def test_generate_with_a_kv_cache_matches_transformers():
    """Greedy decoding of a left-padded batch: one query at a time against the cached keys, the
    padding mask growing with them."""
    hf = transformers.OPTForCausalLM(_config()).eval()
    patched = copy.deepcopy(hf)
    patch_opt(patched)
    ids, mask, _ = _batch(left_padded=True)
    tokens = [m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
              for m in (hf, patched)]
    assert tokens[0].shape == (2, SEQ + 4) and torch.equal(tokens[0], tokens[1])


def test_padding_mask_reaches_the_kernel_as_a_key_padding_mask(monkeypatch):
    """The registered mask function hands the kernel transformers' 2-D mask (as bool), never a 4-D one."""
    seen = []
    kernel = hf_patch.attention
    monkeypatch.setattr(hf_patch, "attention", lambda *a, **kw: seen.append(kw["key_padding_mask"]) or kernel(*a, **kw))
    model = transformers.OPTForCausalLM(_config()).eval()
    patch_opt(model, layer_norm=False, mlp=False)
    ids, mask, _ = _batch(left_padded=True)
    with torch.no_grad(), dispatch.reference_backend():
        model(ids, attention_mask=mask)
        model(ids)
    assert len(seen) == 2 * LAYERS
    assert all(torch.equal(m, mask.bool()) for m in seen[:LAYERS])
    # Unpadded: None (transformers 5.24), or the all-ones mask that transformers 5.17's OPT builds.
    assert all(m is None or (m.dtype == torch.bool and m.shape == mask.shape and m.all()) for m in seen[LAYERS:])


# --------------------------------------------------------------------------- dropout
def test_mlp_dropout_has_the_layers_probability_and_only_in_training():
    """A decoder layer whose attention adds nothing: its output minus its input is dropout(MLP) alone.
    In training each element is 0 or the eval value / (1 - p), zero at rate p; in eval, the eval value."""
    p = 0.3
    model = transformers.OPTForCausalLM(_config(dropout=p, attention_dropout=0.0))
    patch_opt(model)
    layer = model.model.decoder.layers[0]
    with torch.no_grad():
        layer.self_attn.out_proj.weight.zero_()
        layer.self_attn.out_proj.bias.zero_()
        h = torch.randn(4, 16, 24)
        delta_eval = layer.eval()(h) - h
        deltas = [layer.train()(h) - h for _ in range(2)]
    kept = deltas[0] != 0
    assert not torch.equal(deltas[0], deltas[1]), "two training calls drew the same mask"
    torch.testing.assert_close(deltas[0][kept], delta_eval[kept] / (1 - p))
    n = kept.numel()
    assert abs((~kept).sum().item() / n - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_attention_dropout_is_passed_to_the_kernel():
    """With q = 0 the probabilities are uniform over the keys a query sees, and with v the identity the
    output is them: in each causal row, 1 / ((1 - p) * keys seen) where kept, 0 where dropped (rate p)."""
    p, batch, heads, seqlen = 0.3, 4, 2, 16
    q = torch.zeros(batch, heads, seqlen, seqlen)
    k = torch.randn(batch, heads, seqlen, seqlen)
    v = torch.eye(seqlen).expand(batch, heads, seqlen, seqlen)
    module = nn.Module()
    module.is_causal = True
    out, weights = hf_patch.opt_core_attention(module, q, k, v, None, scaling=1.0, dropout=p)
    assert weights is None and out.shape == (batch, seqlen, heads, seqlen)
    probs = out.transpose(1, 2)  # (batch, heads, query, key)
    seen = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    uniform = 1.0 / torch.arange(1, seqlen + 1, dtype=torch.float32)[:, None].expand(seqlen, seqlen)
    assert torch.equal(probs[..., ~seen], torch.zeros_like(probs[..., ~seen]))
    kept = probs[..., seen] != 0
    torch.testing.assert_close(probs[..., seen][kept], (uniform[seen] / (1 - p)).expand_as(kept)[kept])
    n = kept.numel()
    assert abs((~kept).sum().item() / n - p) < 5 * (p * (1 - p) / n) ** 0.5
    exact, _ = hf_patch.opt_core_attention(module, q, k, v, None, scaling=1.0, dropout=0.0)
    torch.testing.assert_close(exact.transpose(1, 2)[..., seen], uniform[seen].expand(batch, heads, -1))


# --------------------------------------------------------------------------- patch_opt by class
def test_patching_the_classes_patches_every_model_built_or_loaded(tmp_path):
    saved = transformers.OPTForCausalLM(_config(post_ln=True))
    saved.save_pretrained(tmp_path)
    try:
        report = patch_opt()
        assert str(report) == ("patch_opt(OPT models built or loaded from now on): attention: 1 class -> the opt_core "
                               "attention kernel; layer_norm: 1 class -> FusedLayerNorm; mlp: 1 class -> one "
                               "relu_mlp call")
        for model in (transformers.OPTForCausalLM(_config()),
                      transformers.OPTForCausalLM.from_pretrained(tmp_path),
                      transformers.OPTForSequenceClassification(_config())):
            decoder = model.base_model.decoder
            assert model.config._attn_implementation == "opt_core"
            assert all(type(layer) is hf_patch.OPTDecoderLayer for layer in decoder.layers)
            assert all(type(m) is FusedLayerNorm for m in model.modules() if isinstance(m, nn.LayerNorm))
        loaded = transformers.OPTForCausalLM.from_pretrained(tmp_path)
        assert loaded.state_dict().keys() == saved.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    finally:
        patch_opt(attention=False, layer_norm=False, mlp=False)
    after = transformers.OPTForCausalLM(_config())
    assert type(after.model.decoder.layers[0]) is transformers.models.opt.modeling_opt.OPTDecoderLayer
    assert after.config._attn_implementation != "opt_core"


# --------------------------------------------------------------------------- refusals
class _OwnLayer(transformers.models.opt.modeling_opt.OPTDecoderLayer):
    """A user's decoder layer with a forward of its own."""


def test_a_model_it_does_not_know_is_refused_before_anything_changes():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=24, n_layer=1, n_head=2, vocab_size=VOCAB,
                                                                n_positions=16))
    with pytest.raises(TypeError, match="does not know GPT2LMHeadModel"):
        patch_opt(gpt2)
    assert all(type(m) is not FusedLayerNorm for m in gpt2.modules())
    with pytest.raises(TypeError, match="does not know the class OPTForCausalLM"):
        patch_opt(transformers.OPTForCausalLM)
    with pytest.raises(TypeError, match="mlp must be a bool"):
        patch_opt(mlp=1)

    gelu = transformers.OPTForCausalLM(_config(activation_function="gelu"))
    with pytest.raises(ValueError, match=r"model\.decoder\.layers\.0: activation GELUActivation.*mlp=False"):
        patch_opt(gelu)
    # Checked first: the attention and LayerNorms, which could have been patched, were not.
    assert gelu.config._attn_implementation != "opt_core"
    assert all(type(m) is nn.LayerNorm for m in gelu.modules() if isinstance(m, nn.LayerNorm))
    assert patch_opt(gelu, mlp=False).mlp == 0

    own = transformers.OPTForCausalLM(_config())
    own.model.decoder.layers[1].__class__ = _OwnLayer
    with pytest.raises(TypeError, match=r"does not know _OwnLayer \(at 'model\.decoder\.layers\.1'"):
        patch_opt(own)
    assert type(own.model.decoder.layers[0]) is transformers.models.opt.modeling_opt.OPTDecoderLayer


def test_masks_the_kernel_cannot_represent_are_refused():
    q = torch.randn(1, 2, SEQ, 12)
    four_d = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).tril()  # what other models may hand an attention
    with pytest.raises(ValueError, match="a prepared 4-D mask"):
        hf_patch.opt_core_attention(nn.Module(), q, q, q, four_d)
    model = transformers.OPTForCausalLM(_config()).eval()
    patch_opt(model)
    ids = torch.randint(3, VOCAB, (1, SEQ))
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    # transformers 5.25 renamed forward's past_key_values to cache (5.17, the GPU machine's, has the old name)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with pytest.raises(ValueError, match="static and sliding-window caches"), torch.no_grad():
        model(ids, use_cache=True, **{name: cache})


# --------------------------------------------------------------------------- replace_layer_norms
def test_replace_layer_norms_keeps_gpt2_outputs_and_gradients():
    config = transformers.GPT2Config(n_embd=24, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    reference, fused = copy.deepcopy(gpt2).double(), copy.deepcopy(gpt2)
    assert replace_layer_norms(fused) == 2 * 2 + 1
    assert not [m for m in fused.modules() if type(m) is nn.LayerNorm]
    ids, mask, real = _batch(left_padded=True)
    cotangent = torch.randn(*ids.shape, VOCAB, dtype=torch.float64) * real[..., None]
    want, plain, ours = (_logits_and_grads(m, ids, mask, cotangent) for m in (reference, gpt2, fused))
    _assert_matches(ours, want, plain, real, "GPT-2")


def test_replace_layer_norms_keeps_every_variant_and_the_parameters_themselves():
    shared = nn.LayerNorm(6)

    class Kept(nn.LayerNorm):  # a subclass may compute something else: left alone
        pass

    model = nn.ModuleDict({
        "plain": nn.LayerNorm(6), "no_affine": nn.LayerNorm(6, elementwise_affine=False),
        "no_bias": nn.LayerNorm(6, bias=False), "two_dims": nn.LayerNorm((2, 3), dtype=torch.float64),
        "frozen": nn.LayerNorm(6).requires_grad_(False), "a": shared, "b": nn.Sequential(shared), "kept": Kept(6),
    }).eval()
    for norm in model.values():
        for p in norm.parameters():
            nn.init.normal_(p)
    before = {name: (m, list(m.parameters())) for name, m in model.items()}
    assert replace_layer_norms(model) == 6  # the shared one once
    assert type(model["kept"]) is Kept and model["b"][0] is model["a"]
    for name in ("plain", "no_affine", "no_bias", "two_dims", "frozen", "a"):
        old, params = before[name]
        new = model[name]
        assert type(new) is FusedLayerNorm and not new.training
        assert [p for p in new.parameters()] == params and all(a is b for a, b in zip(new.parameters(), params))
        assert (new.normalized_shape, new.eps, new.elementwise_affine) == (old.normalized_shape, old.eps,
                                                                          old.elementwise_affine)
        assert (new.bias is None) == (old.bias is None)
        x = torch.randn(5, *old.normalized_shape, dtype=old.weight.dtype if old.weight is not None else torch.float32)
        assert_close_to_reference(name, new(x), copy.deepcopy(old).double()(x.double()), old(x))
    assert not model["frozen"].weight.requires_grad and model["two_dims"].weight.dtype == torch.float64
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        replace_layer_norms("model")
    with pytest.raises(ValueError, match="is itself an nn.LayerNorm"):
        replace_layer_norms(nn.LayerNorm(4))


# --------------------------------------------------------------------------- where trainers train
def test_trainer_with_fused_adamw_trains_the_patched_model(tmp_path):
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    model = transformers.OPTForCausalLM(_config(dropout=0.0, attention_dropout=0.0))
    patch_opt(model)
    ids, _, _ = _batch(left_padded=False, rows=4)
    data = [{"input_ids": row, "labels": row} for row in ids]  # one batch of 4, learnt by heart
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=6,
                                          per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                                          lr_scheduler_type="constant", disable_tqdm=True)
    optimizer = FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    with dispatch.reference_backend():  # the integration, not the kernels (tested above), is under test
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses


def test_training_converges_as_transformers_does():
    """Liger-Kernel's convergence check: the same seed, dropout off, a few steps with and without the
    patch; each step's loss and the final weights of the patched run within the numerics rule of a
    float64 run.  SGD with momentum keeps the weights linear in the gradients, which the rule bounds;
    Adam divides each element by its own RMS, which magnifies rounding in elements whose gradient is
    about 0 by up to lr / eps (the softmax-invariant k_proj bias is all such elements), differently
    in every float32 run, so no per-tensor bound holds for its weights (FusedAdamW: the Trainer test)."""
    hf = transformers.OPTForCausalLM(_config(dropout=0.0, attention_dropout=0.0))
    reference, patched = copy.deepcopy(hf).double(), copy.deepcopy(hf)
    patch_opt(patched)
    models = {"reference": reference, "plain": hf, "patched": patched}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, foreach=False) for k, m in models.items()}
    ids, mask, real = _batch(left_padded=True)  # one batch, learnt by heart: the loss must fall
    labels = ids.masked_fill(~real, -100)
    first = None
    for step in range(4):
        losses = {}
        for name, model in models.items():
            loss = model(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            losses[name] = loss.detach()
        assert_close_to_reference(f"step {step} loss", losses["patched"], losses["reference"], losses["plain"])
        first = losses["reference"] if first is None else first
    assert losses["reference"] < 0.9 * first, "the run did not train: a comparison of nothing"
    weights = {name: dict(model.named_parameters()) for name, model in models.items()}
    for name, w in weights["reference"].items():
        assert_close_to_reference(name, weights["patched"][name], w, weights["plain"][name], factor=GRADIENT_FACTOR)


def test_gradient_checkpointing_recomputes_the_same_dropout(monkeypatch):
    """The recompute draws the same dropout seeds (torch's CPU generator, whose state checkpointing
    restores), so loss and gradients equal those without checkpointing, dropout on."""
    model = transformers.OPTForCausalLM(_config(dropout=0.3, attention_dropout=0.3)).train()
    patch_opt(model)
    checkpointed = copy.deepcopy(model)
    # transformers 5.24 renamed it; 5.17 has the old name only
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)
    (enable or checkpointed.gradient_checkpointing_enable)()
    calls = []
    fused_mlp = opt_core.layers.relu_mlp  # what the patched layers' feed-forward calls
    monkeypatch.setattr(opt_core.layers, "relu_mlp", lambda *a, **kw: calls.append(1) or fused_mlp(*a, **kw))
    ids, mask, real = _batch(left_padded=True)
    results = []
    with dispatch.reference_backend():  # the seeds, not the kernels, are under test
        for m in (model, checkpointed):
            torch.manual_seed(11)
            calls.clear()
            loss = m(ids, attention_mask=mask, labels=ids.masked_fill(~real, -100)).loss
            loss.backward()
            results.append((loss.detach(), [p.grad for p in m.parameters()], len(calls)))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results
    assert (calls_a, calls_b) == (LAYERS, 2 * LAYERS), "the checkpointed layers were not recomputed"
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_autocast_bf16_within_the_rule(device):
    """fp32 weights, bf16 compute: on the CPU through the interpreted kernels, on a GPU the compiled ones."""
    hf = transformers.OPTForCausalLM(_config()).eval().to(device)
    reference, patched = copy.deepcopy(hf).double(), copy.deepcopy(hf)
    patch_opt(patched)
    ids, mask, real = (t if t is None else t.to(device) for t in _batch(left_padded=True))
    cotangent = torch.randn(*ids.shape, VOCAB, dtype=torch.float64, device=device) * real[..., None]
    want = _logits_and_grads(reference, ids, mask, cotangent)
    with torch.autocast(device, dtype=torch.bfloat16):
        plain = _logits_and_grads(hf, ids, mask, cotangent)
        ours = _logits_and_grads(patched, ids, mask, cotangent)
    assert ours[0].dtype == plain[0].dtype and all(g.dtype == torch.float32 for g in ours[1].values())
    _assert_matches(ours, want, plain, real, "autocast bf16")


def test_fsdp2_one_process(tmp_path):
    """fully_shard per decoder layer, then the root, as torchtitan does; one gloo process on the CPU."""
    from torch.distributed.fsdp import fully_shard

    model = transformers.OPTForCausalLM(_config(dropout=0.0, attention_dropout=0.0))
    patch_opt(model)
    dense = copy.deepcopy(model)
    ids, mask, real = _batch(left_padded=True)
    labels = ids.masked_fill(~real, -100)
    c10d.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for layer in model.model.decoder.layers:
            fully_shard(layer)
        fully_shard(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sharded_loss = model(ids, attention_mask=mask, labels=labels).loss
        # The layers return the fused ops' outputs: fresh tensors, not views (FSDP2 warns about those).
        assert not [w for w in caught if "returned a view tensor" in str(w.message)]
        sharded_loss.backward()
        dense_loss = dense(ids, attention_mask=mask, labels=labels).loss
        dense_loss.backward()
        torch.testing.assert_close(sharded_loss, dense_loss, rtol=0, atol=0)
        for (name, p), q in zip(model.named_parameters(), dense.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=0, atol=0, msg=name)
    finally:
        c10d.destroy_process_group()


_COMPILE_CHECK = textwrap.dedent("""
    import torch, transformers
    from torch._dynamo.testing import CompileCounterWithBackend
    from opt_core.hf import patch_opt
    from opt_core.kernels import dispatch

    def loss_and_grads(model, forward, batch, seed):
        torch.manual_seed(seed)  # the dropout seeds are drawn from torch's CPU generator
        model.zero_grad(set_to_none=True)
        loss = forward(**batch, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    def patched_model(dropout):
        config = transformers.OPTConfig(vocab_size=61, hidden_size=24, num_hidden_layers=2, ffn_dim=40,
                                        num_attention_heads=2, max_position_embeddings=32, pad_token_id=1,
                                        dropout=dropout, attention_dropout=dropout)
        model = transformers.OPTForCausalLM(config)
        patch_opt(model)
        return model

    torch.manual_seed(0)
    ids = torch.randint(3, 61, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    # fullgraph: a graph break raises.  aot_eager traces forward and backward through AOTAutograd
    # (fake tensors, our ops' registrations) without inductor's C++ build, which adds nothing here;
    # the counters show the compiled frames ran.
    # The whole model, padding mask function included, on both CPU paths (the native one, plain
    # PyTorch; the reference one, through our custom ops).  Eval mode (dropout off): transformers 5.17's
    # OPT decoder draws LayerDrop with a data-dependent branch in training, a graph break of its own.
    for reference in (False, True):
        whole = CompileCounterWithBackend("aot_eager")
        with dispatch.reference_backend(reference):
            model = patched_model(0.0).eval()
            compiled = torch.compile(model, fullgraph=True, backend=whole)
            got, want = (loss_and_grads(model, forward, batch, 1) for forward in (compiled, model))
        assert whole.frame_count == 1, (reference, whole.frame_count)
        torch.testing.assert_close(got[0], want[0])
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b)
    # Training with dropout, each decoder layer compiled (as torchtitan compiles per block), on the
    # reference path: its dropout regenerates the kernels' bits from the seed, so compiled and eager
    # drop the same elements (the native path draws from torch's generator, differently when compiled).
    per_layer = CompileCounterWithBackend("aot_eager")
    with dispatch.reference_backend():
        model = patched_model(0.1).train()
        want = loss_and_grads(model, model, batch, 2)
        for layer in model.model.decoder.layers:
            layer.compile(fullgraph=True, backend=per_layer)
        got = loss_and_grads(model, model, batch, 2)
    assert per_layer.frame_count >= 1, per_layer.frame_count
    torch.testing.assert_close(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b)
    print("ok")
""")


def test_torch_compile_fullgraph_forward_and_backward():
    """In a fresh interpreter with TRITON_INTERPRET=0 (tracing an interpreted Triton launch with fake
    tensors fails), on the native and the reference CPU paths: compiled and eager give the same loss
    and gradients, dropout off (both paths) and on (the reference path, the same seeds)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-5000:]
