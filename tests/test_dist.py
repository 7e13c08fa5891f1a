"""dist/: tensor parallel + sequence parallel + FSDP2 on gloo, against the single-process model.

Each test spawns real processes (a gloo process group on a FileStore) that run
several checks in one launch: process start-up dominates on a 2-core CI
machine.  Every worker builds the single-process reference itself from the
same seed, and runs the ops on their ``kernels/reference.py`` path (ten
training steps at four layouts through the interpreted kernels would take
minutes); one tp2 forward and backward runs on the interpreted Triton kernels.

The tiny model is chosen to make mistakes visible: vocabulary 118 = 2 x 59
(a prime slice per tp rank), 4 heads of width 9, ffn 70 (35 per tp rank, then
18/17 rows per dp rank: uneven FSDP shards), 23 position rows (12/11), and 3
sequences of 7 tokens per dp rank (21 tokens: sequence parallelism pads one).
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as c10d
import torch.multiprocessing as mp
import torch.nn.functional as F

from opt_core.kernels import dispatch
from opt_core.kernels.testing import GRADIENT_FACTOR
from opt_core import DynamicLossScaler, FusedAdamW, OPTConfig, OPTForCausalLM

VOCAB, SEQ = 118, 7
IGNORE = -100


# --------------------------------------------------------------------------- harness
def _entry(rank, world, store, worker, args):
    c10d.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        with dispatch.reference_backend():
            worker(rank, world, *args)
        c10d.barrier()  # no rank closes its gloo sockets while another still waits on them
    except BaseException:
        # Say which rank failed; the traceback reaches pytest through mp's exception.
        raise RuntimeError(f"rank {rank} of {world} failed:\n{traceback.format_exc()}") from None
    finally:
        c10d.destroy_process_group()
    # A rank that passed leaves without the interpreter's teardown: there gloo's threads have aborted one
    # (SIGABRT, "terminate called without an active exception", once in a full CI-like run here, 2026-12),
    # which failed a test whose every check had passed.  A failure above still reaches pytest as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world: int, worker, tmp_path, *args, timeout: float = 150.0) -> None:
    """Run ``worker(rank, world, *args)`` in ``world`` processes; re-raise the first failure, never hang."""
    store = tmp_path / f"store-{worker.__name__}-{time.monotonic_ns()}"
    ctx = mp.start_processes(_entry, args=(world, str(store), worker, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{worker.__name__} on {world} processes did not finish in {timeout:.0f} s")


def _config(**overrides) -> OPTConfig:
    base = dict(vocab_size=VOCAB, hidden_size=36, num_layers=2, num_heads=4, ffn_dim=70, max_position_embeddings=21,
                dropout=0.0)
    return OPTConfig(**{**base, **overrides})


def _models(mesh, config=None, seed=0, **kw):
    """(dense reference, parallelized twin) built from the same seed."""
    from opt_core import dist
    config = config or _config()
    torch.manual_seed(seed)
    dense = OPTForCausalLM(config)
    torch.manual_seed(seed)
    return dense, dist.parallelize(OPTForCausalLM(config), mesh, **kw)


def _mesh(dp, tp):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))


def _batch(gen, dp, rows_per_rank=3, masked=False):
    """A global batch (ids, attention mask or None); with ``masked``, dp rank 0's rows are left-padded,
    so the dp ranks hold different numbers of target tokens."""
    ids = torch.randint(0, VOCAB, (dp * rows_per_rank, SEQ), generator=gen)
    if not masked:
        return ids, None
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids, mask


def _rows(t, model):
    """This dp rank's contiguous slice of a global batch."""
    if t is None:
        return None
    lay = model.parallelism.coords
    return t.view(lay.dp, -1, *t.shape[1:])[lay.dp_rank]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _close(actual, expected, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_loss_and_grads(dense, par, ids, mask, what):
    out = dense(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    pids = _rows(ids, par)
    pout = par(pids, attention_mask=_rows(mask, par), labels=pids)
    pout.loss.backward()
    _close(pout.loss, out.loss, f"{what}: loss")
    # The logits (vocabulary-split DTensor) of this dp rank's rows, gathered for the check only.
    _close(pout.logits.full_tensor(), _rows(out.logits, par), f"{what}: logits")
    dense_params = dict(dense.named_parameters())
    names = [n for n, _ in par.named_parameters()]
    assert names == list(dense_params), f"{what}: parameter names changed"
    for name, q in par.named_parameters():
        p = dense_params[name]
        assert tuple(q.shape) == tuple(p.shape), f"{what}: {name} global shape {tuple(q.shape)} != {tuple(p.shape)}"
        assert q.grad is not None, f"{what}: {name} has no gradient"
        _close(q.grad.full_tensor(), p.grad, f"{what}: grad of {name}")


def _k_bias_rows(config):
    """Rows of qkv_proj.bias that are k biases: softmax is invariant to them, so their exact gradient is 0
    and Adam turns rounding noise (1e-9) into +-lr steps that differ between any two summation orders."""
    per_head = torch.zeros(config.num_heads, 3, config.head_dim, dtype=torch.bool)
    per_head[:, 1] = True
    return per_head.reshape(-1)


def _train_together(dense, par, steps, gen, dp, what, lr=1e-3):
    """``steps`` FusedAdamW steps (clipping on) on both models; losses, norms and parameters stay together.

    lr 1e-3: Adam maps a gradient that is rounding noise (a ReLU gate within
    1e-7 of zero) to a step of about lr, and a different summation order is
    different noise, so the parameter tolerance is a small fraction of one lr."""
    hyper = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=0.5)
    opt_d, opt_p = FusedAdamW(dense.parameters(), **hyper), FusedAdamW(par.parameters(), **hyper)
    for step in range(steps):
        ids, _ = _batch(gen, dp)
        loss_d = dense(ids, labels=ids).loss
        loss_d.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=step % 2 == 0)
        pids = _rows(ids, par)
        loss_p = par(pids, labels=pids).loss
        loss_p.backward()
        opt_p.step()
        opt_p.zero_grad(set_to_none=step % 2 == 0)
        _close(loss_p, loss_d, f"{what}: loss at step {step}", atol=1e-5)
        # The clipping norm counts every element once over all ranks (not tp or dp times).
        _close(opt_p.grad_norm, opt_d.grad_norm, f"{what}: grad norm at step {step}")
    k_rows = _k_bias_rows(dense.config)
    for (name, p), (_, q) in zip(dense.named_parameters(), par.named_parameters()):
        full = q.full_tensor()
        if name.endswith("qkv_proj.bias"):
            full, p = full[~k_rows], p[~k_rows]
        _close(full, p.detach(), f"{what}: {name} after {steps} steps", rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- workers: collectives
def _per_rank(shape, rank, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * seed + rank), dtype=dtype)


def _check_mappings(rank, world):
    """Each mapping's forward and backward against the dense computation it stands for (tp group = world)."""
    from opt_core.dist import collectives as C

    group = c10d.group.WORLD
    rows, feat = 3 * world, 5
    xs = [_per_rank((rows, feat), r, seed=1) for r in range(world)]  # each rank's own input
    gs = [_per_rank((rows, feat), r, seed=2) for r in range(world)]  # each rank's own upstream gradient
    block = slice(rank * 3, rank * 3 + 3)

    # copy_to_tp: a replicated input used by every rank's partial computation; d/dx = sum of the partials.
    x = xs[0].clone().requires_grad_()
    y = C.copy_to_tp(x, group)
    assert torch.equal(y, xs[0])
    y.backward(gs[rank])
    _close(x.grad, sum(gs), "copy_to_tp backward")

    # reduce_from_tp: partial sums -> their total, replicated; the downstream gradient is the same everywhere.
    x = xs[rank].clone().requires_grad_()
    y = C.reduce_from_tp(x, group)
    _close(y, sum(xs), "reduce_from_tp forward")
    y.backward(gs[0])
    _close(x.grad, gs[0], "reduce_from_tp backward")

    # gather_from_sp: token blocks -> all tokens, feeding each rank's partial computation.
    x = xs[rank][block].clone().requires_grad_()
    y = C.gather_from_sp(x, group)
    _close(y, torch.cat([xs[r][r * 3:r * 3 + 3] for r in range(world)]), "gather_from_sp forward")
    y.backward(gs[rank])
    _close(x.grad, sum(gs)[block], "gather_from_sp backward")

    # scatter_to_sp: partial outputs over all tokens -> this rank's block of their sum.
    x = xs[rank].clone().requires_grad_()
    y = C.scatter_to_sp(x, group)
    _close(y, sum(xs)[block], "scatter_to_sp forward")
    y.backward(gs[rank][block])
    _close(x.grad, torch.cat([gs[r][r * 3:r * 3 + 3] for r in range(world)]), "scatter_to_sp backward")

    # reduce_grad_of: a replicated parameter used on local tokens; its gradient is the sum over ranks.
    w = xs[0].float().requires_grad_()
    (C.reduce_grad_of(w, group) * gs[rank].float()).sum().backward()
    _close(w.grad, sum(gs).float(), "reduce_grad_of backward")
    # bf16 gradients are summed in fp32 and rounded once: 1 + 3 x 2^-9 is 1 + 2^-7 in bf16, while adding
    # 2^-9 to 1 in bf16 three times leaves 1.
    w = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    g = torch.full((4,), 1.0 if rank == 0 else 3 * 2.0**-9 / (world - 1), dtype=torch.bfloat16)
    (C.reduce_grad_of(w, group) * g).sum().backward()
    expected = torch.full((4,), 1.0 + (3 * 2.0**-9 if world > 1 else 0.0)).to(torch.bfloat16)
    assert torch.equal(w.grad, expected), f"reduce_grad_of bf16: {w.grad} != {expected}"

    # global_mean_loss: sum over ranks / count on every rank; each rank's gradient is world / count.
    s = xs[rank][0, 0].clone().requires_grad_()
    count = torch.tensor(7.0, dtype=torch.float64)
    loss = C.global_mean_loss(s, count, group)
    _close(loss, sum(x[0, 0] for x in xs) / 7, "global_mean_loss forward")
    loss.backward()
    _close(s.grad, torch.tensor(world / 7.0, dtype=torch.float64), "global_mean_loss backward")


def _check_linears(rank, world):
    """Column- and row-parallel linears (with and without sequence parallelism) against F.linear on the full
    weight: outputs, and the gradients of input, weight and bias."""
    from opt_core.dist.mesh import RankCoordinates
    from opt_core.dist.tensor_parallel import TensorParallelism

    coords = RankCoordinates.of(_mesh(1, world))
    n, d_in, d_out = 3 * world, 4 * world, 2 * world
    x = _per_rank((n, d_in), 0, seed=3)
    w = _per_rank((d_out, d_in), 0, seed=4)
    b = _per_rank((d_out,), 0, seed=5)
    dy = _per_rank((n, d_out), 0, seed=6)
    xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, b))
    F.linear(xd, wd, bd).backward(dy)
    y_dense = F.linear(x, w, b)
    tokens = slice(rank * 3, rank * 3 + 3)
    outs = slice(rank * (d_out // world), (rank + 1) * (d_out // world))
    ins = slice(rank * (d_in // world), (rank + 1) * (d_in // world))
    for sp in (True, False):
        ctx = TensorParallelism(coords, sequence_parallel=sp)
        what = "sequence parallel" if sp else "all-reduce"
        # column parallel: this rank's output features for all tokens
        xl = (x[tokens] if sp else x).clone().requires_grad_()
        wl, bl = w[outs].clone().requires_grad_(), b[outs].clone().requires_grad_()
        y = ctx.column_linear(xl, wl, bl)
        _close(y, y_dense[:, outs], f"column parallel ({what}) forward")
        y.backward(dy[:, outs])
        _close(xl.grad, xd.grad[tokens] if sp else xd.grad, f"column parallel ({what}) input grad")
        _close(wl.grad, wd.grad[outs], f"column parallel ({what}) weight grad")
        _close(bl.grad, bd.grad[outs], f"column parallel ({what}) bias grad")
        # row parallel: this rank's input features -> the full output (its token block under SP)
        xl = x[:, ins].clone().requires_grad_()
        wl, bl = w[:, ins].clone().requires_grad_(), b.clone().requires_grad_()
        y = ctx.row_linear(xl, wl, bl)
        _close(y, y_dense[tokens] if sp else y_dense, f"row parallel ({what}) forward")
        y.backward(dy[tokens] if sp else dy)
        _close(xl.grad, xd.grad[:, ins], f"row parallel ({what}) input grad")
        _close(wl.grad, wd.grad[:, ins], f"row parallel ({what}) weight grad")
        # The bias is added on this rank's tokens only under SP: its gradient is summed over tp.
        _close(bl.grad, bd.grad, f"row parallel ({what}) bias grad")


def _check_vocab_parallel(rank, world, prime):
    """Embedding lookup and cross entropy with V = world x prime (a prime slice per rank) against
    nn.Embedding (padding_idx) and F.cross_entropy, forward and backward."""
    from opt_core.dist.collectives import reduce_from_tp, scatter_to_sp
    from opt_core.dist.vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_embedding, vocab_range

    group = c10d.group.WORLD
    vocab = world * prime
    start, end = vocab_range(vocab, rank, world)
    assert (start, end) == (rank * prime, (rank + 1) * prime)
    gen = torch.Generator().manual_seed(11)
    n = 4 * world
    # Ids at every slice edge, the pad id, and random ones.
    edges = [i for r in range(world) for i in (r * prime, r * prime + prime - 1)]
    ids = torch.cat([torch.tensor(edges + [1]), torch.randint(0, vocab, (n - len(edges) - 1,), generator=gen)])
    weight = torch.randn(vocab, 6, generator=gen, dtype=torch.float64)
    dy = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    wd = weight.clone().requires_grad_()
    F.embedding(ids, wd, padding_idx=1).backward(dy)
    for reduce in (reduce_from_tp, scatter_to_sp):
        wl = weight[start:end].clone().requires_grad_()
        y = reduce(vocab_parallel_embedding(ids, wl, start, padding_idx=1), group)
        block = slice(None) if reduce is reduce_from_tp else slice(rank * 4, rank * 4 + 4)
        _close(y, F.embedding(ids, weight)[block], f"vocab-parallel embedding ({reduce.__name__}) forward")
        y.backward(dy[block] if reduce is scatter_to_sp else dy)
        _close(wl.grad, wd.grad[start:end], f"vocab-parallel embedding ({reduce.__name__}) weight grad")

    for scale in (1.0, 1000.0):  # x1000: the max subtraction must hold when exp() would overflow
        logits = torch.randn(n, vocab, generator=gen) * scale
        target = torch.cat([torch.tensor(edges), torch.randint(0, vocab, (n - len(edges),), generator=gen)])
        target[3] = IGNORE
        g = torch.rand(n, generator=gen)
        ld = logits.clone().requires_grad_()
        ref = F.cross_entropy(ld, target, ignore_index=IGNORE, reduction="none")
        ref.backward(g)
        ll = logits[:, start:end].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(ll, target, start, group, ignore_index=IGNORE, vocab_size=vocab)
        _close(loss, ref, f"vocab-parallel cross entropy (x{scale:g}) forward", rtol=1e-5, atol=1e-5 * scale)
        loss.backward(g)
        _close(ll.grad, ld.grad[:, start:end], f"vocab-parallel cross entropy (x{scale:g}) grad")
        assert torch.isfinite(loss).all()


# --------------------------------------------------------------------------- workers: model parity
def _check_bad_layouts(rank, world):
    from opt_core import dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = _mesh(1, world)
    bad = {"num_heads": _config(num_heads=3), "vocab_size": _config(vocab_size=VOCAB - 1),
           "ffn_dim": _config(ffn_dim=71)}
    for key, config in bad.items():
        with pytest.raises(ValueError, match=f"{key} .* not divisible by tp={world}"):
            dist.parallelize(OPTForCausalLM(config), mesh)
    with pytest.raises(ValueError, match=rf"world size {world} != dp x tp = 3 x 1"):
        dist.init_mesh(dp=3, tp=1)
    with pytest.raises(ValueError, match="not divisible by tp=3"):
        dist.init_mesh(tp=3)
    with pytest.raises(ValueError, match="dimensions named"):
        dist.parallelize(OPTForCausalLM(_config()), init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
    torch.manual_seed(rank)  # a different init on every rank
    with pytest.raises(ValueError, match="different weights"):
        dist.parallelize(OPTForCausalLM(_config()), mesh)
    _, par = _models(mesh)
    with pytest.raises(TypeError, match="already parallelized"):
        dist.parallelize(par, mesh)


def _check_parity_2(rank, world):
    """World 2: tp2 (sequence parallel, padded tokens), tp2 without SP, dp2; a post-LN model with
    project_in/out at tp2; loss and every gradient, then 10 steps together."""
    assert world == 2
    _check_mappings(rank, world)
    _check_linears(rank, world)
    _check_vocab_parallel(rank, world, prime=59)
    _check_bad_layouts(rank, world)
    _check_layouts_init_grads_and_training(rank, world)
    _check_bf16_compute(rank, world)
    _check_tp2_on_the_kernels(rank, world)
    _check_post_ln_and_generate(rank, world)
    _check_dropout(rank, world)


def _check_layouts_init_grads_and_training(rank, world):
    """dp2 and tp2 (with and without sequence parallelism): sharded init, loss and gradients, 10 steps."""
    from opt_core import dist
    mesh = dist.init_mesh(tp=2)  # the default dp (world / tp), through init_mesh on an existing group
    assert mesh.shape == (1, 2) and mesh.mesh_dim_names == ("dp", "tp")
    for layout, kw in (((1, 2), {}), ((1, 2), {"sequence_parallel": False}), ((2, 1), {})):
        what = f"dp{layout[0]} x tp{layout[1]} {kw or ''}"
        mesh = _mesh(*layout)
        dense, par = _models(mesh, **kw)
        lay = par.parallelism.coords
        assert par.parallelism.sequence_parallel == (lay.tp > 1 and kw.get("sequence_parallel", True))
        # Sharded init equals the slices of the unsharded init (tp shards of FSDP-unsharded params).
        for (name, p), (_, q) in zip(dense.named_parameters(), par.named_parameters()):
            assert torch.equal(q.full_tensor(), p.detach()), f"{what}: init of {name}"
            if lay.dp == 1:
                placement = q.placements[1]
                local = q.to_local()
                if placement.is_shard():
                    expected = p.detach().chunk(lay.tp, dim=placement.dim)[lay.tp_rank]
                else:
                    expected = p.detach()
                assert torch.equal(local, expected), f"{what}: tp shard of {name}"
        gen = torch.Generator().manual_seed(5)
        ids, mask = _batch(gen, lay.dp, masked=True)
        _check_loss_and_grads(dense, par, ids, mask, what)
        dense.zero_grad(set_to_none=True)
        par.zero_grad(set_to_none=True)
        _train_together(dense, par, 10, gen, lay.dp, what)


def _check_bf16_compute(rank, world):
    """bf16 compute over fp32 master shards at tp2 and dp2."""
    # bf16 compute (FSDP's param_dtype over fp32 master shards, fp32 gradient reduction, the tp collectives'
    # fp32 sums): against the fp32 model, the loss and every gradient are within the gradient factor (3x) of
    # the error the same model makes run wholly in bf16 in one process, plus a floor of 1e-3 of the norm.
    for layout in ((1, 2), (2, 1)):
        what = f"bf16 at dp{layout[0]} x tp{layout[1]}"
        dense, par = _models(_mesh(*layout), param_dtype=torch.bfloat16)
        low = copy.deepcopy(dense).to(torch.bfloat16)
        ids, mask = _batch(torch.Generator().manual_seed(17), layout[0], masked=True)
        losses = [m(ids, attention_mask=mask, labels=ids).loss for m in (dense, low)]
        pids = _rows(ids, par)
        losses.append(par(pids, attention_mask=_rows(mask, par), labels=pids).loss)
        for loss in losses:
            loss.backward()
        exact, plain, ours = (float(x) for x in losses)
        assert abs(ours - exact) <= GRADIENT_FACTOR * abs(plain - exact) + 1e-3 * abs(exact), f"{what}: loss"
        for (name, p), (_, q), (_, r) in zip(dense.named_parameters(), par.named_parameters(),
                                             low.named_parameters()):
            assert q.dtype == q.grad.dtype == torch.float32, f"{what}: {name} master or gradient not fp32"
            err, err_plain = (q.grad.full_tensor() - p.grad).norm(), (r.grad.float() - p.grad).norm()
            assert err <= GRADIENT_FACTOR * err_plain + 1e-3 * p.grad.norm(), \
                f"{what}: grad of {name} off by {err:.3e} (bf16 in one process: {err_plain:.3e})"


def _check_tp2_on_the_kernels(rank, world):
    """tp2 through the Triton kernels (the interpreter only) against the dense reference model."""
    # The same tp2 model through the Triton kernels (the interpreter here, compiled on a GPU), on their
    # local shards: the strided q/k/v views of a head slice, the fc1/fc2 slices, the LayerNorms in the SP
    # region.  The dense model stays on the reference path, so this is kernel vs reference as well.
    if dispatch.INTERPRET:
        dense, par = _models(_mesh(1, 2))
        ids, mask = _batch(torch.Generator().manual_seed(14), 1, masked=True)
        dense(ids, attention_mask=mask, labels=ids).loss.backward()
        with dispatch.reference_backend(False), dispatch.poison_outputs(True):
            out = par(ids, attention_mask=mask, labels=ids)
            out.loss.backward()
        _close(out.loss, dense(ids, attention_mask=mask, labels=ids).loss, "tp2 on the kernels: loss")
        for (name, p), (_, q) in zip(dense.named_parameters(), par.named_parameters()):
            _close(q.grad.full_tensor(), p.grad, f"tp2 on the kernels: grad of {name}", rtol=1e-4, atol=1e-6)


def _check_post_ln_and_generate(rank, world):
    """350M's post-LN shape with project_in/out, and greedy generate at tp2."""
    # 350M's shape: post-LN, no final LayerNorm, project_in/out around a narrower embedding.
    config = _config(do_layer_norm_before=False, word_embed_proj_dim=20)
    dense, par = _models(_mesh(1, 2), config)
    dense.activation_checkpointing = par.activation_checkpointing = True  # and recomputed layers
    ids, mask = _batch(torch.Generator().manual_seed(6), 1, masked=True)
    _check_loss_and_grads(dense, par, ids, mask, "post-LN tp2")

    # generate on the parallel model (a KV cache of this rank's heads, the prompt's 21 tokens and each step's
    # 3 padded to a multiple of tp, the last position's logits gathered): the dense model's greedy tokens.
    dense, par = _models(_mesh(1, 2), _config(init_std=0.05))  # logits far apart: no argmax ties
    ids, mask = _batch(torch.Generator().manual_seed(18), 1, masked=True)
    expected = dense.generate(ids, mask, max_new_tokens=4)
    assert torch.equal(par.generate(ids, mask, max_new_tokens=4), expected), "tp2 generate"


def _check_dropout(rank, world):
    """Dropout at tp2: seeds, eval, recomputation under checkpointing, masks across ranks."""
    # Dropout > 0 (attention and residual): runs, repeats for the same seed, differs for another.
    dense, par = _models(_mesh(1, 2), _config(dropout=0.1, attention_dropout=0.1))
    ids, _ = _batch(torch.Generator().manual_seed(7), 1)
    losses = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        losses.append(par(ids, labels=ids).loss.detach())
    par.eval()
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    assert not torch.equal(par(ids, labels=ids).loss, losses[0])
    par.train()
    # Activation checkpointing recomputes the same masks (the seeds come from the restored RNG state).
    grads = []
    for checkpointing in (False, True):
        par.activation_checkpointing = checkpointing
        par.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        par(ids, labels=ids).loss.backward()
        grads.append([p.grad.full_tensor() for p in par.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads)), "recomputed dropout masks differ"

    # Masks across ranks: distinct where the ranks hold different data (sequence-parallel tokens, dp rows),
    # identical where tp ranks hold the same replicated activations (no SP), or the replicas would diverge.
    from opt_core.dist.mesh import RankCoordinates
    from opt_core.dist.tensor_parallel import TensorParallelism

    for layout, sp, distinct in (((1, 2), True, True), ((1, 2), False, False), ((2, 1), False, True)):
        ctx = TensorParallelism(RankCoordinates.of(_mesh(*layout)), sequence_parallel=sp)
        torch.manual_seed(21)  # the same generator state on every rank, as in training
        mask = ctx.dropout(torch.ones(64, 8), 0.5)
        masks = [torch.empty_like(mask) for _ in range(world)]
        c10d.all_gather(masks, mask)
        assert torch.equal(masks[0], masks[1]) != distinct, f"dropout masks at dp{layout[0]} x tp{layout[1]}, sp={sp}"


def _check_found_inf(rank, world):
    """An inf in one rank's gradient shard: every rank skips the step, optimizer state untouched, scale
    backed off everywhere; with FusedAdamW (fused unscale) and with torch's AdamW (found-inf all-reduce)."""
    for make in (lambda ps: FusedAdamW(ps, lr=1e-2, max_grad_norm=1.0),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False)):
        _, par = _models(_mesh(2, 2))
        opt = make(list(par.parameters()))
        scaler = DynamicLossScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        ids, _ = _batch(torch.Generator().manual_seed(8), 2)
        pids = _rows(ids, par)

        def backward():
            scaler.scale(par(pids, labels=pids).loss).backward()

        backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        backward()
        if rank == world - 1:  # only the last rank's local shard of one gradient
            par.decoder.layers[1].mlp.fc1.weight.grad.to_local()[0, 0] = float("inf")
        params = {n: p.detach().to_local().clone() for n, p in par.named_parameters()}
        states = {n: {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in opt.state[p].items()}
                  for n, p in par.named_parameters()}
        scaler.step(opt)
        scaler.update()
        kind = type(opt).__name__
        assert scaler.get_scale() == 2.0**9, f"{kind}: scale {scaler.get_scale()}, expected a back-off on every rank"
        assert scaler.skipped_steps == 1
        for n, p in par.named_parameters():
            assert torch.equal(p.detach().to_local(), params[n]), f"{kind}: rank {rank} stepped {n}"
            for k, v in opt.state[p].items():
                v = v.to_local() if hasattr(v, "to_local") else v
                assert torch.equal(v, states[n][k]), f"{kind}: rank {rank} changed {k} of {n}"
        opt.zero_grad()
        backward()  # and the next clean step goes through everywhere
        scaler.step(opt)
        scaler.update()
        assert scaler.skipped_steps == 1
        assert not torch.equal(par.decoder.layers[1].mlp.fc1.weight.detach().to_local(),
                               params["decoder.layers.1.mlp.fc1.weight"])


def _check_sharded_init(rank, world):
    """A model built on the meta device, parallelized, given empty shards and initialised by dist.init_weights
    is the unsharded model's init_weights (same generator) split: bit for bit, then the same loss and grads."""
    from opt_core import dist
    config = _config(word_embed_proj_dim=20)  # project_in/out too
    dense = OPTForCausalLM(config, init=False)
    dense.init_weights(torch.Generator().manual_seed(3))
    par = dist.parallelize(OPTForCausalLM(config, device="meta", init=False), _mesh(2, world // 2))
    par.to_empty(device="cpu")
    dist.init_weights(par, torch.Generator().manual_seed(3))
    assert par.lm_head.weight is par.decoder.embed_tokens.weight
    for (name, p), (_, q) in zip(dense.named_parameters(), par.named_parameters()):
        assert torch.equal(q.full_tensor(), p.detach()), f"sharded init of {name}"
    ids, _ = _batch(torch.Generator().manual_seed(13), 2)
    _check_loss_and_grads(dense, par, ids, None, "meta-built, sharded init")


def _opt_state(model, opt):
    """{param name: {state key: full tensor}} of any layout."""
    return {n: {k: _full(v).clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}


def _check_parity_4_and_save(rank, world, ckpt, ref_file):
    """World 4: mappings at tp4, cross entropy with a prime slice per rank at tp4; dp2 x tp2 loss, every
    gradient and 10 steps; found-inf agreement; then a run that saves at dp2 x tp2 and carries on."""
    assert world == 4
    _check_mappings(rank, world)
    _check_linears(rank, world)
    _check_vocab_parallel(rank, world, prime=31)
    # tp4: one head per rank, vocabulary 124 = 4 x 31 and ffn 76 = 4 x 19 (prime slices), 21 tokens padded to 24.
    dense, par = _models(_mesh(1, 4), _config(vocab_size=124, ffn_dim=76))
    ids, mask = _batch(torch.Generator().manual_seed(16), 1, masked=True)
    _check_loss_and_grads(dense, par, ids, mask, "tp4")
    mesh = _mesh(2, 2)
    dense, par = _models(mesh)
    gen = torch.Generator().manual_seed(9)
    ids, mask = _batch(gen, 2, masked=True)
    _check_loss_and_grads(dense, par, ids, mask, "dp2 x tp2")
    dense.zero_grad(set_to_none=True)
    par.zero_grad(set_to_none=True)
    _train_together(dense, par, 10, gen, 2, "dp2 x tp2")
    _check_found_inf(rank, world)
    _check_sharded_init(rank, world)

    from opt_core import dist
    _, model = _models(mesh, seed=1)
    opt = FusedAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=0.5)
    gen = torch.Generator().manual_seed(10)
    batches = [_batch(gen, 4)[0] for _ in range(4)]
    for ids in batches[:2]:
        model(_rows(ids, model), labels=_rows(ids, model)).loss.backward()
        opt.step()
        opt.zero_grad()
    dist.save_checkpoint(ckpt, model, opt, extra={"step": 2}, rank_state={"rank": rank})
    with pytest.raises(FileExistsError):  # never overwritten
        dist.save_checkpoint(ckpt, model, opt)
    ref = {"model": {n: _full(t).clone() for n, t in model.state_dict().items()}, "optimizer": _opt_state(model, opt)}
    model.eval()
    with torch.no_grad():
        ref["eval_loss"] = model(_rows(batches[2], model), labels=_rows(batches[2], model)).loss
    model.train()
    ids = _rows(batches[3], model)
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    ref["next_loss"] = loss.detach()
    ref["next_params"] = {n: p.full_tensor() for n, p in model.named_parameters()}
    ref["batches"] = batches
    if rank == 0:
        torch.save(ref, ref_file)


def _after_load_matches(model, opt, ref, what, rows=lambda t: t):
    """The loaded state equals the saved one exactly; outputs and one more step equal the run that never
    stopped (up to the summation order of another layout)."""
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.9, 0.95), 0.1), f"{what}: hyper-params"
    for name, t in model.state_dict().items():
        assert torch.equal(_full(t), ref["model"][name]), f"{what}: {name} not restored"
    state = _opt_state(model, opt)
    assert state.keys() == ref["optimizer"].keys()
    for name, entries in ref["optimizer"].items():
        for key, value in entries.items():
            assert torch.equal(state[name][key], value), f"{what}: optimizer {key} of {name} not restored"
    batches = ref["batches"]
    model.eval()
    with torch.no_grad():
        _close(model(rows(batches[2]), labels=rows(batches[2])).loss, ref["eval_loss"], f"{what}: output")
    model.train()
    ids = rows(batches[3])
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    _close(loss.detach(), ref["next_loss"], f"{what}: loss of the step after loading")
    k_rows = _k_bias_rows(model.config)
    for name, p in model.named_parameters():
        full, expected = _full(p.detach()), ref["next_params"][name]
        if name.endswith("qkv_proj.bias"):
            full, expected = full[~k_rows], expected[~k_rows]
        _close(full, expected, f"{what}: {name} after the step after loading", rtol=1e-4, atol=1e-5)


def _load_at_tp2(rank, world, ckpt, ref_file):
    from opt_core import dist
    ref = torch.load(ref_file, weights_only=False)
    _, model = _models(_mesh(1, 2), seed=321)
    opt = FusedAdamW(model.parameters(), lr=5e-3, betas=(0.8, 0.9), weight_decay=0.0, max_grad_norm=0.5)
    extra, rank_state = dist.load_checkpoint(ckpt, model, opt)
    assert extra == {"step": 2} and rank_state == {"rank": rank}
    _after_load_matches(model, opt, ref, "saved at dp2 x tp2, loaded at tp2")


def _load_at_dp4(rank, world, ckpt, ref_file):
    from opt_core import dist
    ref = torch.load(ref_file, weights_only=False)
    _, model = _models(_mesh(4, 1), seed=123)  # other weights and hyper-parameters: the load must replace them
    opt = FusedAdamW(model.parameters(), lr=5e-3, betas=(0.8, 0.9), weight_decay=0.0, max_grad_norm=0.5)
    extra, rank_state = dist.load_checkpoint(ckpt, model, opt)
    assert extra == {"step": 2} and rank_state == {"rank": rank}
    _after_load_matches(model, opt, ref, "saved at dp2 x tp2, loaded at dp4", rows=lambda t: _rows(t, model))


# --------------------------------------------------------------------------- tests
def test_tp2_and_dp2_equal_the_single_process_model(tmp_path):
    """Collectives, linears, vocab-parallel embedding/CE, bad layouts, and model parity on 2 processes."""
    spawn(2, _check_parity_2, tmp_path)


def test_dp2_x_tp2_parity_found_inf_and_a_checkpoint_that_reshards(tmp_path):
    """4 processes: tp4 and dp2 x tp2 parity, found-inf on one rank, save; load at dp4 (4 processes), at tp2
    (2 processes), and in one process without torch.distributed into a plain OPTForCausalLM."""
    from opt_core import dist
    ckpt, ref_file = tmp_path / "ckpt", tmp_path / "ref.pt"
    spawn(4, _check_parity_4_and_save, tmp_path, ckpt, ref_file)
    assert dist.checkpoint.is_checkpoint(ckpt) and not (tmp_path / ".ckpt.tmp").exists()
    spawn(4, _load_at_dp4, tmp_path, ckpt, ref_file)
    spawn(2, _load_at_tp2, tmp_path, ckpt, ref_file)

    ref = torch.load(ref_file, weights_only=False)
    with dispatch.reference_backend(), pytest.warns(UserWarning, match="single process"):
        torch.manual_seed(123)
        model = OPTForCausalLM(_config())
        opt = FusedAdamW(model.parameters(), lr=5e-3, betas=(0.8, 0.9), weight_decay=0.0, max_grad_norm=0.5)
        extra, rank_state = dist.load_checkpoint(ckpt, model, opt)
        assert extra == {"step": 2} and rank_state == {"rank": 0}
        assert model.lm_head.weight is model.decoder.embed_tokens.weight  # still tied
        _after_load_matches(model, opt, ref, "saved at dp2 x tp2, loaded in one process")


def test_a_world_of_one_and_layouts_that_cannot_start(tmp_path, gloo_threads):
    """init_mesh without torchrun gives a 1 x 1 mesh whose model equals the plain one; a layout that does not
    match the world fails before any process group exists; destroy_process_groups frees the groups once the
    model is dropped, although DTensor's caches still hold its mesh."""
    from opt_core import dist
    with pytest.raises(ValueError, match=r"world size 1 != dp x tp = 2 x 2"):
        dist.init_mesh(dp=2, tp=2)
    assert not c10d.is_initialized()
    threads = gloo_threads()
    try:
        mesh = dist.init_mesh()
        assert mesh.shape == (1, 1) and mesh.mesh_dim_names == ("dp", "tp")
        with dispatch.reference_backend():
            dense, par = _models(mesh)
            ids, mask = _batch(torch.Generator().manual_seed(12), 1, masked=True)
            _check_loss_and_grads(dense, par, ids, mask, "dp1 x tp1")
        assert gloo_threads() > threads
        del dense, par, mesh
        dist.destroy_process_groups()
        assert not c10d.is_initialized()
        assert gloo_threads() == threads, "a backend outlived destroy_process_groups: its threads still run"
    finally:
        if c10d.is_initialized():
            c10d.destroy_process_group()


@pytest.mark.gpu
def test_a_world_of_one_on_the_gpu_equals_the_plain_model():
    """The whole dist path on CUDA in one process (NCCL, FSDP2, the compiled kernels on DTensor shards,
    FusedAdamW on the shards): loss, gradients and three steps equal the plain model's on the same kernels."""
    from opt_core import dist
    try:
        mesh = dist.init_mesh(device_type="cuda")
        config = _config(hidden_size=128, num_heads=2, ffn_dim=320, vocab_size=512, max_position_embeddings=64)
        torch.manual_seed(0)
        dense = OPTForCausalLM(config).cuda()
        torch.manual_seed(0)
        par = dist.parallelize(OPTForCausalLM(config).cuda(), mesh)
        hyper = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=0.5)
        opt_d, opt_p = FusedAdamW(dense.parameters(), **hyper), FusedAdamW(par.parameters(), **hyper)
        gen = torch.Generator().manual_seed(15)
        for step in range(3):
            ids = torch.randint(0, config.vocab_size, (4, 48), generator=gen).cuda()
            loss_d, loss_p = dense(ids, labels=ids).loss, par(ids, labels=ids).loss
            loss_d.backward()
            loss_p.backward()
            _close(loss_p, loss_d, f"loss at step {step}", rtol=1e-4, atol=1e-5)
            for (name, p), (_, q) in zip(dense.named_parameters(), par.named_parameters()):
                _close(q.grad.full_tensor(), p.grad, f"grad of {name} at step {step}", rtol=1e-3, atol=1e-5)
            opt_d.step()
            opt_p.step()
            opt_d.zero_grad()
            opt_p.zero_grad()
    finally:
        if c10d.is_initialized():
            c10d.destroy_process_group()
