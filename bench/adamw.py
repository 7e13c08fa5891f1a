"""FusedAdamW: smoke check and step-time benchmark on OPT parameter lists.

Peers: ``torch.optim.AdamW`` with ``fused=True`` (the baseline) and with
``foreach=True``, and apex's ``FusedAdam(adam_w_mode=True)`` when importable.
Bytes per parameter (``BYTES_PER_PARAM``): an fp32 step reads param, grad,
exp_avg, exp_avg_sq (16 B) and writes param, exp_avg, exp_avg_sq (12 B) = 28 B.
The bf16 rows time our two mixed-precision recipes alone (their bytes differ
from torch's, whose bf16 moments are bf16): memory-efficient (bf16 param and
grad, fp32 moments: read 2 + 2 + 8, write 2 + 8) 22 B/param, master weights
(bf16 param and grad, fp32 master and moments: read 2 + 4 + 8, write 2 + 4 +
8) 30 B/param.  The goal (timed first): OPT-1.3B's parameter list.  An A/B
provider there (``VARIANTS``): ``opt-core-scalar``, ours with
``kernels.adamw.VECTOR_LOADS = "off"`` (every tensor in the scalar class, 32-bit
loads: what the 16-byte aligned class buys), stepping the same optimizer.
"""

from __future__ import annotations

import torch

from bench.harness import Spec, Target, Variant, add_variants, grouped, selected
from opt_core.kernels import adamw as _adamw_module
from opt_core.kernels.testing import FORWARD_FACTOR, Comparison, compare
from opt_core import FusedAdamW

# (d_model, layers) of the OPT sizes the issue names; vocab 50272, 2048 positions + 2.
OPT_SIZES = {"opt-125m": (768, 12), "opt-1.3b": (2048, 24)}
VOCAB, POSITIONS = 50272, 2050
GOAL_SIZE = "opt-1.3b"
# Bytes one parameter moves in a step, by recipe (this module's docstring); bench.profile reads them too.
BYTES_PER_PARAM = {"fp32": 28, "master-weights": 30, "memory-efficient": 22}
VARIANTS = {"opt-core-scalar": Variant("opt-core-scalar", (("VECTOR_LOADS", "off"),), why="32-bit loads only")}


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


# --------------------------------------------------------------------------- smoke
_HYPER = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def smoke(device: torch.device) -> list[Comparison]:
    """Two steps on a small OPT-shaped list against float64: fp32 (error <= 2x torch's fp32 AdamW's) and the
    bf16 and fp16 master-weight recipes (the low-precision parameters against torch's fp32 AdamW on the
    same rounded gradients, rounded as ours are)."""
    shapes = opt_param_shapes(32, 1, vocab=100, positions=34)
    results = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        results += _check_recipe(shapes, dtype, device)
    return results


def _check_recipe(shapes, dtype, device) -> list[Comparison]:
    ours_p = _param_list(shapes, dtype, device)
    torch_p = _param_list(shapes, torch.float32, device)
    oracle_p = _param_list(shapes, torch.float64, device)
    for a, b, c in zip(ours_p, torch_p, oracle_p):  # every list starts from ours, rounded
        b.data.copy_(a.data)
        c.data.copy_(a.data)
    opts = [FusedAdamW(ours_p, master_weights=dtype != torch.float32, **_HYPER),
            torch.optim.AdamW(torch_p, foreach=False, **_HYPER), torch.optim.AdamW(oracle_p, foreach=False, **_HYPER)]
    for step in range(2):
        gen = torch.Generator(device=device).manual_seed(100 + step)
        for a, b, c in zip(ours_p, torch_p, oracle_p):
            g = torch.randn(a.shape, generator=gen, device=device, dtype=torch.float64).to(dtype)
            a.grad, b.grad, c.grad = g, g.float(), g.double()
        for opt in opts:
            opt.step()
    tag = str(dtype).replace("torch.", "")
    return [compare(f"adamw {tag} param {i} {tuple(a.shape)}", a.detach(), c.detach(), b.detach().to(dtype),
                    factor=FORWARD_FACTOR)
            for i, (a, b, c) in enumerate(zip(ours_p, torch_p, oracle_p))]


# --------------------------------------------------------------------------- benchmark cases
def _apex(params, **hyper):
    try:
        from apex.optimizers import FusedAdam
    except Exception:
        return None
    return FusedAdam(params, adam_w_mode=True, **hyper)


TINY = {"tiny": (opt_param_shapes(32, 1, 100, 34), "goal")}  # interpreted on the CPU: small


def _sizes(target: Target) -> dict[str, tuple[list, str]]:
    """name -> (parameter shapes, part)."""
    if not target.gpu:
        return TINY
    return {name: (opt_param_shapes(d, layers), "goal" if name == GOAL_SIZE else "rest")
            for name, (d, layers) in OPT_SIZES.items()}


def specs(target: Target, quick: bool, dtypes=None, part: str = "all", sizes=None) -> list[Spec]:
    out = []
    for name, (shapes, p) in (sizes or _sizes(target)).items():
        n = sum(torch.Size(s).numel() for s in shapes)
        label = f"{name} ({n / 1e6:.1f}M params, {len(shapes)} tensors)"
        group = (name, p)
        ab = tuple(VARIANTS) if target.gpu and name == GOAL_SIZE else ()
        out.append(Spec("adamw_step", label, torch.float32, "step", BYTES_PER_PARAM["fp32"] * n, 0,
                        ("opt-core", "torch-fused", "torch-foreach") + ab, "torch-fused", p, group))
        out += [Spec("adamw_step", f"{label} {recipe}", torch.bfloat16, "step", BYTES_PER_PARAM[recipe] * n, 0,
                     ("opt-core",) + ab, "opt-core", p, group) for recipe in ("memory-efficient", "master-weights")]
    return selected(out, part)


def cases(device: torch.device, quick: bool, dtypes=None, part: str = "all", sizes=None):
    """Step time per OPT parameter list; built lazily (one list in memory at a time)."""
    hyper = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    sizes = sizes or _sizes(Target.of(device))
    for (name, _), group in grouped(specs(Target.of(device), quick, dtypes, part, sizes)):
        shapes = sizes[name][0]
        for spec in group:
            if spec.dtype == torch.float32:
                optimizers = {
                    "opt-core": FusedAdamW(_param_list(shapes, torch.float32, device), **hyper),
                    "torch-fused": torch.optim.AdamW(_param_list(shapes, torch.float32, device), fused=True, **hyper),
                    "torch-foreach": torch.optim.AdamW(_param_list(shapes, torch.float32, device), foreach=True,
                                                       **hyper),
                }
                apex = _apex(_param_list(shapes, torch.float32, device), **hyper) if device.type == "cuda" else None
                if apex is not None:
                    optimizers["apex"] = apex
            else:
                master = spec.shape.endswith("master-weights")
                optimizers = {"opt-core": FusedAdamW(_param_list(shapes, torch.bfloat16, device),
                                                     master_weights=master, **hyper)}
            ours = optimizers["opt-core"]
            yield spec.case(add_variants({k: opt.step for k, opt in optimizers.items()}, spec, VARIANTS,
                                         _adamw_module, lambda: ours.step))
            del optimizers


def warmup_cases(device: torch.device, quick: bool, dtypes=None):
    """The tiny list: the kernels take a table of chunks and specialise on no size, so its compiles are the
    OPT lists' compiles."""
    return cases(device, quick, dtypes, "all", TINY)
