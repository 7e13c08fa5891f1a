"""The training recipe's pieces: the optimizer, the learning-rate schedule, the fp16 loss scaler, and which
flags a resumed run may change."""

from __future__ import annotations

import math
from typing import Callable

import torch

from opt_core.amp import DynamicLossScaler
from opt_core.optim import FusedAdamW


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up from 0 to the peak, then linear decay to ``min_ratio`` of it (metaseq's polynomial, power 1)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 1.0 - (1.0 - min_ratio) * progress
    return f


def build_optimizer(model, args, device: torch.device, dtype: torch.dtype, distributed: bool = False):
    """FusedAdamW on a GPU, under dist and for the low-precision recipes anywhere; torch's fused CPU AdamW
    for fp32 on the CPU.  FusedAdamW clips inside its step (``--clip``) only with a loss scaler, which
    unscales there too; otherwise the trainer clips at the call site (``clip_gradients``), where the
    guard reads the norm before anything steps."""
    hyper = dict(lr=args.lr, betas=tuple(args.betas), eps=args.eps, weight_decay=args.weight_decay)
    params = list(model.parameters())  # one group: metaseq decayed everything, biases and LayerNorms included
    clip_in_step = (args.clip or None) if dtype == torch.float16 else None
    if distributed:
        # FSDP keeps the sharded parameters in fp32 (they are the master copy) and computes in
        # `dtype`; FusedAdamW steps the DTensor shards with the norm and inf check over all ranks.
        return FusedAdamW(params, max_grad_norm=clip_in_step, **hyper)
    if device.type == "cuda" or dtype != torch.float32:
        return FusedAdamW(params, master_weights=dtype == torch.bfloat16 or args.master_weights,
                          max_grad_norm=clip_in_step, **hyper)
    return torch.optim.AdamW(params, fused=True, **hyper)


def clip_gradients(model, optimizer, clip: float) -> torch.Tensor:
    """The global gradient norm before clipping (a tensor: no host sync), clipping to ``clip`` (0: off)."""
    if isinstance(optimizer, FusedAdamW):  # applied inside its next step; the norm is over every rank
        return optimizer.clip_grad_norm_(clip or math.inf)
    if clip:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None], foreach=True)


def build_scheduler(optimizer, args) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps, args.min_lr_ratio))


def build_scaler(args, device: torch.device, dtype: torch.dtype):
    """OPT's fp16 recipe: dynamic loss scaling from ``--loss-scale`` with metaseq's options; None otherwise."""
    if dtype != torch.float16:
        return None
    return DynamicLossScaler(device.type, init_scale=args.loss_scale, growth_interval=256,
                             growth_interval_follows_scale=True, min_scale=2.0**-5)


def apply_peak_lr(optimizer, scheduler, lr: float) -> None:
    """A new peak learning rate for a resumed schedule, from its current step on."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, f in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * f(scheduler.last_epoch)


# Flags a resumed run may change: the schedule (applied from the resumed step on), the gradient clip,
# the layout, and what the loop does around the training math.  A change to any other flag would train
# something else than the checkpoint's run and is refused.
APPLIED_ON_RESUME = frozenset({
    "lr", "warmup", "min_lr_ratio", "steps", "clip", "stop_at", "ckpt_every", "keep", "eval_every", "eval_batches",
    "log_every", "sample_tokens", "spike_factor", "max_bad_steps", "timeout", "data_cache", "device", "dp", "tp",
    "no_sequence_parallel", "activation_checkpointing",
})
_NOT_COMPARED = frozenset({"resume", "out"})  # how this invocation found the run, not how it trains


def resume_changes(saved: dict, args) -> tuple[list[str], list[str]]:
    """(flags changed and applied, flags changed and refused) between a checkpoint's arguments and ``args``,
    each as ``--flag OLD -> NEW``."""
    applied, refused = [], []
    for name, new in sorted(vars(args).items()):
        if name not in saved or name in _NOT_COMPARED:
            continue
        old = saved[name]
        if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
            old, new = list(old), list(new)
        if old != new:
            change = f"--{name.replace('_', '-')} {old} -> {new}"
            (applied if name in APPLIED_ON_RESUME else refused).append(change)
    return applied, refused
