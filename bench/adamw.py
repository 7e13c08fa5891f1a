"""FusedAdamW: correctness check and step-time benchmark on OPT parameter lists.

Peers: ``torch.optim.AdamW`` with ``fused=True`` (the baseline) and with
``foreach=True``, and apex's ``FusedAdam(adam_w_mode=True)`` when importable.
Bytes per parameter for an fp32 step: read param, grad, exp_avg, exp_avg_sq
(16 B), write param, exp_avg, exp_avg_sq (12 B) = 28 B.  The bf16 rows time our
two mixed-precision recipes alone (their bytes differ from torch's, whose bf16
moments are bf16): memory-efficient 22 B/param, master weights 30 B/param.
"""

from __future__ import annotations

import torch

from bench.harness import Case
from opt_core.kernels.testing import FORWARD_FACTOR, Comparison, compare
from opt_core import FusedAdamW

# (d_model, layers) of the OPT sizes the issue names; vocab 50272, 2048 positions + 2.
OPT_SIZES = {"opt-125m": (768, 12), "opt-1.3b": (2048, 24)}
VOCAB, POSITIONS = 50272, 2050


def opt_param_shapes(d: int, layers: int, vocab: int = VOCAB, positions: int = POSITIONS) -> list[tuple[int, ...]]:
    """Shapes of an OPT decoder's parameters (fused QKV; the LM head is tied to the embedding)."""
    shapes = [(vocab, d), (positions, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,),       # qkv, out_proj, attention LayerNorm
                   (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]   # fc1, fc2, final LayerNorm
    return shapes + [(d,), (d,)]                                         # decoder's final LayerNorm


def _param_list(shapes, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(dtype))
              for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(1e-3).to(dtype)
    return params


# --------------------------------------------------------------------------- correctness
def check(device: torch.device, quick: bool) -> list[Comparison]:
    """Five steps on a small OPT-shaped list: fp32 error vs float64 <= 2x torch's fp32 AdamW's."""
    shapes = opt_param_shapes(64, 2, vocab=1000, positions=130)
    ours_p = _param_list(shapes, torch.float32, device)
    torch_p = _param_list(shapes, torch.float32, device)
    oracle_p = _param_list(shapes, torch.float64, device)
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opts = [FusedAdamW(ours_p, **hyper), torch.optim.AdamW(torch_p, foreach=False, **hyper),
            torch.optim.AdamW(oracle_p, foreach=False, **hyper)]
    for step in range(5):
        gen = torch.Generator(device=device).manual_seed(100 + step)
        for a, b, c in zip(ours_p, torch_p, oracle_p):
            g = torch.randn(a.shape, generator=gen, device=device, dtype=torch.float64)
            a.grad, b.grad, c.grad = g.float(), g.float(), g
        for opt in opts:
            opt.step()
    return [compare(f"adamw fp32 param {i} {tuple(a.shape)}", a.detach(), c.detach(), b.detach(), factor=FORWARD_FACTOR)
            for i, (a, b, c) in enumerate(zip(ours_p, torch_p, oracle_p))]


# --------------------------------------------------------------------------- benchmark cases
def _apex(params, **hyper):
    try:
        from apex.optimizers import FusedAdam
    except Exception:
        return None
    return FusedAdam(params, adam_w_mode=True, **hyper)


def cases(device: torch.device, quick: bool, dtypes=None):
    """Step time per OPT parameter list; built lazily (one list in memory at a time)."""
    sizes = OPT_SIZES if device.type == "cuda" else {"tiny": (64, 2)}
    hyper = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for name, (d, layers) in sizes.items():
        shapes = opt_param_shapes(d, layers) if device.type == "cuda" else opt_param_shapes(d, layers, 1000, 130)
        n = sum(torch.Size(s).numel() for s in shapes)
        label = f"{name} ({n / 1e6:.1f}M params, {len(shapes)} tensors)"

        optimizers = {
            "opt-core": FusedAdamW(_param_list(shapes, torch.float32, device), **hyper),
            "torch-fused": torch.optim.AdamW(_param_list(shapes, torch.float32, device), fused=True, **hyper),
            "torch-foreach": torch.optim.AdamW(_param_list(shapes, torch.float32, device), foreach=True, **hyper),
        }
        apex = _apex(_param_list(shapes, torch.float32, device), **hyper) if device.type == "cuda" else None
        if apex is not None:
            optimizers["apex"] = apex
        yield Case("adamw_step", label, torch.float32, "step", 28 * n,
                   {k: opt.step for k, opt in optimizers.items()}, "torch-fused")
        del optimizers, apex

        for recipe, master, per_param in (("memory-efficient", False, 22), ("master-weights", True, 30)):
            opt = FusedAdamW(_param_list(shapes, torch.bfloat16, device), master_weights=master, **hyper)
            yield Case("adamw_step", f"{label} {recipe}", torch.bfloat16, "step", per_param * n,
                       {"opt-core": opt.step}, "opt-core")
            del opt
