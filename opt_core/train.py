"""``python -m opt_core.train``: train an OPT model with the paper's recipe (the CLI of ``opt_core.trainer``).

AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1, one parameter group as metaseq had), gradient
clipping at 1.0, linear warm-up from 0 then linear decay to 10% of the peak, dropout 0.1; fp32, bf16
(fp32 master weights) or fp16 (OPT's memory-efficient recipe with dynamic loss scaling).  The
defaults are the CPU demo's recipe for the ``tiny`` preset: 600 steps of 16 x 128 tokens (about 1.1 epochs
of the standard library's 1.06M training tokens), peak LR 3e-3 after 30 warm-up steps, evaluated every
100 steps, which on two CPU cores ends near validation loss 5.2 in less than the time the 250-step recipe
took before the native CPU path (5.84 then).

This module only parses and checks the arguments and hands them to ``opt_core.trainer.train``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable, Optional

import torch

from opt_core.config import OPTConfig
from opt_core.trainer import DivergenceError, RunFolderError, StalledRankError, train
from opt_core.trainer.runtime import DTYPES, keep_freed_memory_on_cpu, resolve_device_dtype


def _model_and_data_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", help="an OPTConfig preset (opt-125m ... opt-175b, tiny, test)")
    m.add_argument("--config", help="a JSON file of OPTConfig fields or a Hugging Face config.json (overrides --preset)")
    m.add_argument("--dropout", type=float, help="override the config's dropout")
    m.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in the backward")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="stdlib", help="'stdlib' (the default corpus), a folder of text files or a .jsonl file")
    d.add_argument("--tokenizer", help="a folder with GPT-2 vocab.json + merges.txt (default: train a BPE on the data)")
    d.add_argument("--vocab-size", type=int, default=4096, help="size of the BPE trained on the data")
    d.add_argument("--max-bytes", type=int, default=4_000_000, help="cap on raw text read (0: all)")
    d.add_argument("--data-cache", default="runs/data", help="where prepared datasets are cached")


def _training_flags(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--steps", type=int, default=600, help="optimizer steps")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--warmup", type=int, default=30, help="warm-up steps (linear from 0)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    t.add_argument("--eps", type=float, default=1e-8)
    t.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    t.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on a GPU, fp32 on the CPU")
    t.add_argument("--loss-scale", type=float, default=4.0, help="fp16: initial loss scale (OPT: 4)")
    t.add_argument("--master-weights", action="store_true", help="fp16: keep fp32 master weights")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--seed", type=int, default=1)


def _parallel_and_output_flags(p: argparse.ArgumentParser) -> None:
    par = p.add_argument_group("parallelism (under torchrun; see README 'Scaling out')")
    par.add_argument("--dp", type=int, help="data-parallel (FSDP2) size; default: world size / tp")
    par.add_argument("--tp", type=int, help="tensor-parallel size (default 1); keep it within a node")
    par.add_argument("--no-sequence-parallel", action="store_true",
                     help="with tp > 1: all-reduce instead of sequence-parallel all-gather/reduce-scatter")
    par.add_argument("--timeout", type=float, default=300.0,
                     help="seconds a collective may wait for the other ranks before the job fails (a stalled rank)")
    o = p.add_argument_group("output and robustness")
    o.add_argument("--out", help="run folder: metrics, plot, checkpoints (default: a fresh runs/demo-N; with "
                                 "--resume, the newest runs/demo-N)")
    o.add_argument("--resume", action="store_true", help="continue the run in --out from its newest intact checkpoint")
    o.add_argument("--stop-at", type=int, help="end this run after this step (with a checkpoint); --resume continues")
    o.add_argument("--ckpt-every", type=int, default=100)
    o.add_argument("--keep", type=int, default=2, help="checkpoints kept (the newest K of this run)")
    o.add_argument("--eval-every", type=int, default=100)
    o.add_argument("--eval-batches", type=int, default=8)
    o.add_argument("--log-every", type=int, default=10)
    o.add_argument("--sample-tokens", type=int, default=96, help="tokens generated at the end (0: none)")
    o.add_argument("--spike-factor", type=float, default=3.0, help="loss above this x its moving average is a spike")
    o.add_argument("--max-bad-steps", type=int, default=5, help="consecutive skipped batches before stopping")


def _finite(test: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and test(v)


# flag -> (the test its value must pass, what it must be); None values (an unset optional flag) pass.
_RANGES: dict[str, tuple[Callable, str]] = {
    **{name: (lambda v: v >= 1, "an int >= 1") for name in (
        "seq_len", "batch_size", "grad_accum", "steps", "ckpt_every", "keep", "eval_every", "eval_batches",
        "log_every", "max_bad_steps", "stop_at", "dp", "tp")},
    "vocab_size": (lambda v: v >= 260, "an int >= 260 (4 special tokens + 256 bytes)"),
    "max_bytes": (lambda v: v >= 0, "an int >= 0 (0: all)"),
    "sample_tokens": (lambda v: v >= 0, "an int >= 0 (0: none)"),
    "seed": (lambda v: v >= 0, "an int >= 0"),
    "lr": (_finite(lambda v: v > 0), "a finite number > 0"),
    "eps": (_finite(lambda v: v > 0), "a finite number > 0"),
    "loss_scale": (_finite(lambda v: v > 0), "a finite number > 0"),
    "timeout": (_finite(lambda v: v > 0), "a finite number of seconds > 0"),
    "clip": (_finite(lambda v: v >= 0), "a finite number >= 0 (0: off)"),
    "weight_decay": (_finite(lambda v: v >= 0), "a finite number >= 0"),
    "spike_factor": (_finite(lambda v: v > 1), "a finite number > 1"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def check_args(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    """``error(message)`` (argparse's: exit status 2) for the first flag whose value is out of range."""
    for name, (ok, what) in _RANGES.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            error(f"--{name.replace('_', '-')} must be {what}, got {value}")
    if not all(0 <= b < 1 for b in args.betas):
        error(f"--betas must both be in [0, 1), got {' '.join(map(str, args.betas))}")
    if not 0 <= args.warmup <= args.steps:
        error(f"--warmup must be in [0, --steps], got {args.warmup}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        error(f"--device {args.device}: no CUDA device is available here (use --device cpu or auto)")
    _check_sources(args, error)


def _check_sources(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    """The model config and the data and tokenizer paths, read or looked at before anything runs."""
    try:
        OPTConfig.from_file(args.config) if args.config else OPTConfig.from_preset(args.preset)
    except (OSError, ValueError, TypeError) as e:
        error(f"--{'config' if args.config else 'preset'}: {e}")
    if args.data != "stdlib" and not os.path.exists(args.data):
        error(f"--data {args.data!r} does not exist (expected 'stdlib', a folder of text files or a .jsonl file)")
    if args.tokenizer and not os.path.isdir(args.tokenizer):
        error(f"--tokenizer {args.tokenizer!r} is not a folder (expected one with GPT-2 vocab.json + merges.txt)")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m opt_core.train", description=__doc__.split("\n\n")[0])
    _model_and_data_flags(p)
    _training_flags(p)
    _parallel_and_output_flags(p)
    args = p.parse_args(argv)
    check_args(args, p.error)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    if resolve_device_dtype(args)[0].type == "cpu":
        keep_freed_memory_on_cpu()  # this process's allocator: about 10% of a CPU step
    try:
        summary = train(args)
    except (DivergenceError, RunFolderError, StalledRankError) as e:
        if main_rank or isinstance(e, StalledRankError):
            print(f"\n{e.label}: {e}", file=sys.stderr)
        return e.exit_status
    if not main_rank:
        return 0
    if summary["steps"] < args.steps:
        print(f"\nstopped at step {summary['steps']} of {args.steps}; continue with --resume --out {summary['out']} "
              f"(checkpoint: {summary['checkpoint']})")
        return 0
    print(f"\nvalidation loss {summary['initial_val_loss']:.3f} -> {summary['final_val_loss']:.3f} "
          f"after {summary['steps']} steps ({summary['skipped']} skipped)")
    if "sample" in summary:
        how = summary["sampling"]
        print(f"sample (top-k {how['top_k']}) at temperature {how['temperature']}:\n" + "-" * 60 + "\n"
              + summary["sample"] + "\n" + "-" * 60)
    print(f"loss curve: {summary['plot']}\nmetrics:    {summary['metrics']}\ncheckpoint: {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
