"""``python -m opt_core.train``: train an OPT model with the paper's recipe.

AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1, one parameter group as
metaseq had), gradient clipping at 1.0, linear warm-up from 0 then linear
decay to 10% of the peak, dropout 0.1; fp32, bf16 (fp32 master weights) or
fp16 (OPT's memory-efficient recipe: fp16 weights, fp32 Adam state inside the
fused step, DynamicLossScaler starting at 4 with metaseq's options).
FusedAdamW on a GPU and for fp16/bf16, torch.optim.AdamW for fp32 on the CPU.

Every step it logs loss, learning rate, gradient norm, tokens/s, TFLOP/s and MFU
(the FLOP convention is printed with it) to the terminal and to
metrics.jsonl/metrics.csv; at each evaluation, validation loss and perplexity,
and a loss-curve PNG.  Checkpoints are written atomically (temporary file, then
rename), the last K kept; ``--resume`` continues bit for bit: model, optimizer,
scaler, schedule, data position and RNG states.  A divergence guard skips a
batch whose loss is non-finite or spikes above ``--spike-factor`` x its moving
average, and stops with a clear message after ``--max-bad-steps`` in a row,
leaving the last good checkpoint intact.

Under ``torchrun`` (or with ``--dp``/``--tp``) the run is distributed through
``dist``: a ("dp", "tp") mesh, Megatron tensor parallelism with sequence
parallelism over tp, FSDP2 over dp (fp32 sharded parameters, bf16/fp16
compute, fp32 gradient reduction), FusedAdamW with the norm and inf check
reduced over all ranks.  ``--batch-size`` is then the global batch: dp rank r
trains on rows [r*B/dp, (r+1)*B/dp) of the same batch a single process would
draw, and every tp rank of a dp group on the same rows.  Rank 0 logs the
all-rank tokens/s, TFLOP/s and MFU per GPU and every rank's peak memory;
checkpoints are sharded (``torch.distributed.checkpoint`` folders) and resume
at any other dp x tp layout.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from opt_core import dist, flops
from opt_core.amp import DynamicLossScaler
from opt_core.config import OPTConfig
from opt_core.model import OPTForCausalLM
from opt_core.optim import FusedAdamW

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DivergenceError(RuntimeError):
    """Training stopped by the divergence guard."""


# --------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m opt_core.train", description=__doc__.split("\n\n")[0])
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
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--steps", type=int, default=250, help="optimizer steps")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--warmup", type=int, default=20, help="warm-up steps (linear from 0)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    t.add_argument("--eps", type=float, default=1e-8)
    t.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    t.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on a GPU, fp32 on the CPU")
    t.add_argument("--loss-scale", type=float, default=4.0, help="fp16: initial loss scale (OPT: 4)")
    t.add_argument("--master-weights", action="store_true", help="fp16: keep fp32 master weights")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=1)
    par = p.add_argument_group("parallelism (under torchrun; see README 'Scaling out')")
    par.add_argument("--dp", type=int, help="data-parallel (FSDP2) size; default: world size / tp")
    par.add_argument("--tp", type=int, help="tensor-parallel size (default 1); keep it within a node")
    par.add_argument("--no-sequence-parallel", action="store_true",
                     help="with tp > 1: all-reduce instead of sequence-parallel all-gather/reduce-scatter")
    o = p.add_argument_group("output and robustness")
    o.add_argument("--out", default="runs/demo", help="run folder: metrics, plot, checkpoints")
    o.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    o.add_argument("--stop-at", type=int, help="end this run after this step (with a checkpoint); --resume continues")
    o.add_argument("--ckpt-every", type=int, default=100)
    o.add_argument("--keep", type=int, default=2, help="checkpoints kept (the newest K)")
    o.add_argument("--eval-every", type=int, default=50)
    o.add_argument("--eval-batches", type=int, default=8)
    o.add_argument("--log-every", type=int, default=10)
    o.add_argument("--sample-tokens", type=int, default=64, help="tokens generated at the end (0: none)")
    o.add_argument("--spike-factor", type=float, default=3.0, help="loss above this x its moving average is a spike")
    o.add_argument("--max-bad-steps", type=int, default=5, help="consecutive skipped batches before stopping")
    args = p.parse_args(argv)
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "ckpt_every", "keep", "eval_every",
                 "eval_batches", "log_every", "max_bad_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.min_lr_ratio <= 1:
        p.error("--min-lr-ratio must be in [0, 1]")
    if args.warmup < 0 or args.warmup >= args.steps + 1:
        p.error("--warmup must be in [0, --steps]")
    for name in ("dp", "tp"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


# --------------------------------------------------------------------------- pieces
def resolve_device_dtype(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    return device, dtype


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up from 0 to the peak, then linear decay to ``min_ratio`` of it (metaseq's polynomial, power 1)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 1.0 - (1.0 - min_ratio) * progress
    return f


def build_optimizer(model, args, device, dtype, distributed: bool = False):
    hyper = dict(lr=args.lr, betas=tuple(args.betas), eps=args.eps, weight_decay=args.weight_decay)
    params = list(model.parameters())  # one group: metaseq decayed everything, biases and LayerNorms included
    if distributed:
        # FSDP keeps the sharded parameters in fp32 (they are the master copy) and computes in
        # `dtype`; FusedAdamW steps the DTensor shards with the norm and inf check over all ranks.
        return FusedAdamW(params, max_grad_norm=args.clip or None, **hyper)
    # FusedAdamW on a GPU, and for the low-precision recipes anywhere (fp32 moments, masters,
    # the loss scale unscaled inside the step); torch's AdamW for fp32 on the CPU.
    if device.type == "cuda" or dtype != torch.float32:
        return FusedAdamW(params, master_weights=dtype == torch.bfloat16 or args.master_weights,
                          max_grad_norm=args.clip or None, **hyper)
    return torch.optim.AdamW(params, foreach=True, **hyper)


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- distributed runs
def wants_distributed(args) -> bool:
    """Launched by torchrun, or asked for a layout: the dist path (sharded model and checkpoints)."""
    return "WORLD_SIZE" in os.environ or args.dp is not None or args.tp is not None


def peak_memory_gib(device) -> float:
    """This process's peak: CUDA memory allocated on a GPU, the resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclasses.dataclass
class Runtime:
    """One process, or one rank of a dp x tp job (every rank runs the same loop on its own rows)."""

    device: torch.device
    distributed: bool = False
    coords: Any = None  # dist.RankCoordinates
    owns_process_group: bool = False

    @classmethod
    def start(cls, args, device) -> "Runtime":
        if not wants_distributed(args):
            return cls(device=device)
        import torch.distributed as c10d

        owns = not c10d.is_initialized()
        mesh = dist.init_mesh(dp=args.dp, tp=args.tp or 1, device_type=device.type)
        coords = dist.RankCoordinates.of(mesh)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        rt = cls(device=device, distributed=True, coords=coords, owns_process_group=owns)
        if args.batch_size % coords.dp:
            rt.close()
            raise ValueError(f"--batch-size {args.batch_size} (the global batch) is not divisible by dp={coords.dp}")
        return rt

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank() if self.distributed else 0

    @property
    def world(self) -> int:
        return torch.distributed.get_world_size() if self.distributed else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, block: torch.Tensor) -> torch.Tensor:
        """This dp rank's contiguous slice of a global batch."""
        if not self.distributed or self.coords.dp == 1:
            return block
        return block.view(self.coords.dp, -1, *block.shape[1:])[self.coords.dp_rank]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def max(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=dist.mesh.object_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    def gather(self, value: float) -> list[float]:
        if not self.distributed:
            return [value]
        device = dist.mesh.object_device()
        out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(self.world)]
        torch.distributed.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
        return [float(t) for t in out]

    def close(self) -> None:
        if self.distributed and self.owns_process_group and torch.distributed.is_initialized():
            # Every rank done with its last collective before any rank tears its sockets down: a gloo
            # peer closing under another's pending receive aborts that process at exit.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- checkpoints
def checkpoint_paths(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*.pt"))


def save_checkpoint(out: Path, step: int, payload: dict, keep: int) -> Path:
    """Write atomically (temporary file in the same folder, fsync, rename), then prune to the newest ``keep``."""
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for old in checkpoint_paths(out)[:-keep]:
        old.unlink()
    return path


def load_latest_checkpoint(out: Path, device) -> Optional[dict]:
    paths = checkpoint_paths(out)
    if not paths:
        return None
    return torch.load(paths[-1], map_location=device, weights_only=False)


def sharded_checkpoint_paths(out: Path) -> list[Path]:
    """Complete sharded (DCP) checkpoint folders of a distributed run, oldest first."""
    return sorted(p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and dist.checkpoint.is_checkpoint(p))


def save_sharded_checkpoint(out: Path, step: int, model, optimizer, extra: dict, keep: int, rt: Runtime) -> Path:
    """Every rank writes its shards (atomically, see dist.checkpoint); rank 0 prunes to the newest ``keep``."""
    path = dist.save_checkpoint(out / "checkpoints" / f"step-{step:08d}", model, optimizer, extra=extra)
    if rt.main:
        for old in sharded_checkpoint_paths(out)[:-keep]:
            shutil.rmtree(old)
    rt.barrier()
    return path


# --------------------------------------------------------------------------- logging
class MetricsLog:
    """metrics.jsonl and metrics.csv, appended row by row (rows past a resumed step are dropped first)."""

    # tokens_per_s: all ranks together; tflops and mfu: per device; peak_mem_gib: the largest rank's,
    # mem_gib_by_rank: every rank's (space-separated, rank order).
    FIELDS = ["step", "tokens", "loss", "val_loss", "val_ppl", "lr", "grad_norm", "loss_scale", "skipped",
              "tokens_per_s", "tflops", "mfu", "seconds", "peak_mem_gib", "mem_gib_by_rank"]

    def __init__(self, out: Path, resume_step: Optional[int], write: bool = True):
        self.jsonl, self.csv = out / "metrics.jsonl", out / "metrics.csv"
        self.write = write  # rank 0 writes; the other ranks of a distributed run only keep the rows
        rows = []
        if resume_step is not None and self.jsonl.exists():
            rows = [r for r in map(json.loads, self.jsonl.read_text().splitlines()) if r["step"] <= resume_step]
        self.rows = rows
        if not write:
            return
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS)
            w.writeheader()
            w.writerows(rows)

    def add(self, **row: Any) -> None:
        row = {k: row.get(k) for k in self.FIELDS}
        self.rows.append(row)
        if not self.write:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writerow(row)


def plot_losses(rows: list[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class Progress:
    """A tqdm bar with the latest metrics when attached to a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.bar = None
        self.enabled = enabled  # False on the ranks of a distributed run other than 0
        if enabled and sys.stdout.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def metrics(self, line: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(line.split(" | ", 1)[1])
        elif self.enabled:
            print(line)

    def write(self, line: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def evaluate(model, split, args, device, rows=lambda block: block) -> float:
    """Mean validation loss; ``rows`` picks this rank's slice of each batch (the model's loss is global)."""
    from opt_core.data import BatchIterator

    model.eval()
    batches = BatchIterator(split, args.batch_size, args.seq_len, seed=0, shuffle=False)
    total = 0.0
    n = min(args.eval_batches, max(1, split.num_sequences(args.seq_len) // args.batch_size))
    for _ in range(n):
        block = rows(next(batches).to(device))
        total += float(model(block[:, :-1], labels=block[:, 1:], shift_labels=False).loss)
    model.train()
    return total / n


# --------------------------------------------------------------------------- main loop
def train(args: argparse.Namespace) -> dict:
    device, dtype = resolve_device_dtype(args)
    rt = Runtime.start(args, device)
    try:
        return _train(args, rt, dtype)
    finally:
        rt.close()


def _train(args: argparse.Namespace, rt: Runtime, dtype: torch.dtype) -> dict:
    from opt_core.data import BatchIterator, DataConfig, load_tokenizer, prepare

    device = rt.device
    say = print if rt.main else (lambda *a, **k: None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The same seed on every rank: every rank draws the same numbers in the same order (the initial
    # weights, of which each keeps its shards, and the dropout seeds, which each then offsets by rank).
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    data_config = DataConfig(source=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                             max_bytes=args.max_bytes, seed=args.seed)
    if rt.main:  # rank 0 builds the cache; the others then find it
        data = prepare(data_config, args.data_cache)
    rt.barrier()
    if not rt.main:
        data = prepare(data_config, args.data_cache, log=None)

    config = OPTConfig.from_file(args.config) if args.config else OPTConfig.from_preset(args.preset)
    overrides = dict(vocab_size=data.padded_vocab_size, pad_token_id=data.pad_id, eos_token_id=data.eos_id,
                     bos_token_id=data.eos_id)
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    config = dataclasses.replace(config, **overrides)
    # Built on the meta device (no memory, no random draws) and initialised once, right after the seed:
    # a distributed run draws the same numbers for its shards (dist.init_weights), so every layout
    # starts from the single-process model's weights, and no rank ever holds the full model.
    model = OPTForCausalLM(config, device="meta", init=False)
    model.activation_checkpointing = args.activation_checkpointing
    if rt.distributed:
        model = dist.parallelize(model, rt.coords.mesh, sequence_parallel=not args.no_sequence_parallel,
                                 param_dtype=None if dtype == torch.float32 else dtype)
        model.to_empty(device=device)
        dist.init_weights(model)
    else:
        model.to_empty(device=device)
        model.lm_head.weight = model.decoder.embed_tokens.weight  # to_empty gives each module its own tensor
        model.init_weights()
        model = model.to(dtype)
    model.train()
    optimizer = build_optimizer(model, args, device, dtype, distributed=rt.distributed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps, args.min_lr_ratio))
    scaler = None
    if dtype == torch.float16:
        scaler = DynamicLossScaler(device.type, init_scale=args.loss_scale, growth_interval=256,
                                   growth_interval_follows_scale=True, min_scale=2.0**-5)
    train_batches = BatchIterator(data.train, args.batch_size, args.seq_len, seed=args.seed)
    if data.train.num_sequences(args.seq_len) < args.batch_size:
        raise ValueError(f"the training split holds {data.train.num_sequences(args.seq_len)} sequences of "
                         f"{args.seq_len + 1} tokens, fewer than one batch of {args.batch_size}")

    step, tokens, ema, bad_streak, skipped = 0, 0, None, 0, 0
    resumed = None
    if args.resume and rt.distributed:
        found = sharded_checkpoint_paths(out)
        if found:  # any layout's checkpoint: the shards are resharded to this one
            resumed, _ = dist.load_checkpoint(found[-1], model, optimizer)
    elif args.resume:
        resumed = load_latest_checkpoint(out, device)
    if args.resume and resumed is None:
        other = checkpoint_paths(out) if rt.distributed else sharded_checkpoint_paths(out)
        hint = ""
        if other:  # a checkpoint of the other kind: say how to use it instead of silently ignoring it
            hint = (" (it holds single-process .pt checkpoints: resume without torchrun/--dp/--tp)" if rt.distributed
                    else " (it holds sharded checkpoints of a distributed run: resume with torchrun or --dp/--tp, "
                         "e.g. --dp 1 --tp 1 in one process)")
        say(f"--resume: no checkpoint in {out / 'checkpoints'}{hint}; starting from scratch")
    if resumed is not None:
        if not rt.distributed:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        train_batches.load_state_dict(resumed["data"])
        step, tokens, ema = resumed["step"], resumed["tokens"], resumed["ema"]
        bad_streak, skipped = resumed["bad_streak"], resumed["skipped"]
        set_rng_state(resumed["rng"], device)  # rank 0's: every rank draws the same numbers
        say(f"resumed from step {step}")
    log = MetricsLog(out, step if resumed is not None else None, write=rt.main)

    n_params = model.num_parameters()
    fpt = flops.flops_per_token(config, args.seq_len)
    peak = flops.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len  # over all ranks
    say(f"model: {n_params / 1e6:.2f}M parameters ({config.num_layers} layers, d={config.hidden_size}, "
        f"{config.num_heads} heads), {dtype}, {device}; {tokens_per_step} tokens/step")
    if rt.distributed:
        lay = rt.coords
        say(f"parallel: {rt.world} ranks = dp {lay.dp} (FSDP2) x tp {lay.tp} (tensor parallel"
            + (", sequence parallel" if model.parallelism.sequence_parallel else "")
            + f"); {args.batch_size // lay.dp} sequences per dp rank per micro-batch")
    say(f"{flops.CONVENTION}: {fpt / 1e6:.1f} MFLOP/token"
        + ("" if peak else "; no MFU on this device (unknown peak)"))

    def train_state() -> dict:
        return {"step": step, "tokens": tokens, "ema": ema, "bad_streak": bad_streak, "skipped": skipped,
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "data": train_batches.state_dict(), "rng": rng_state(device),
                "config": config.to_dict(), "args": vars(args)}

    def save(at: int) -> Path:
        if not rt.distributed:
            payload = {**train_state(), "model": model.state_dict(), "optimizer": optimizer.state_dict()}
            return save_checkpoint(out, at, payload, args.keep)
        extra = {**train_state(), "layout": {"dp": rt.coords.dp, "tp": rt.coords.tp}}  # rank 0's copy is kept
        return save_sharded_checkpoint(out, at, model, optimizer, extra, args.keep, rt)

    if resumed is None:
        val = evaluate(model, data.val, args, device, rt.rows)
        log.add(step=0, tokens=0, val_loss=val, val_ppl=math.exp(val))
        say(f"step {0:6d} | validation loss {val:.3f} (ppl {math.exp(val):.1f})")
    existing = sharded_checkpoint_paths(out) if rt.distributed else checkpoint_paths(out)
    last_ckpt = existing[-1] if existing else None
    window_t, window_tokens = time.perf_counter(), 0

    stop_at = min(args.steps, args.stop_at) if args.stop_at else args.steps
    progress = Progress(args.steps, step, enabled=rt.main)
    while step < stop_at:
        loss_sum = torch.zeros((), device=device)
        for _ in range(args.grad_accum):
            block = rt.rows(next(train_batches).to(device, non_blocking=True))
            loss = model(block[:, :-1], labels=block[:, 1:], shift_labels=False).loss / args.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.detach()
        loss_value = float(loss_sum)  # one host sync per step, for the guard and the log

        spike = ema is not None and loss_value > args.spike_factor * ema
        if not math.isfinite(loss_value) or spike:
            bad_streak += 1
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            progress.write(f"step {step + 1:6d} | skipped batch: loss {loss_value:.4g}"
                  + (f" > {args.spike_factor} x moving average {ema:.4g}" if spike else " is not finite")
                  + f" ({bad_streak} in a row)")
            if bad_streak >= args.max_bad_steps:
                where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise DivergenceError(f"stopping at step {step}: {bad_streak} consecutive batches with a non-finite "
                                      f"or spiking loss; {where}")
            continue

        grad_norm = None
        if scaler is not None:
            before = scaler.skipped_steps
            scaler.step(optimizer)
            scaler.update()
            overflowed = scaler.skipped_steps > before
            grad_norm = optimizer.grad_norm if isinstance(optimizer, FusedAdamW) else None
        else:
            if args.clip and not isinstance(optimizer, FusedAdamW):
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            if isinstance(optimizer, FusedAdamW):
                grad_norm = optimizer.grad_norm
            overflowed = False
        optimizer.zero_grad(set_to_none=True)
        bad_streak = 0
        if overflowed:  # the loss scaler skipped the update: the schedule does not advance (metaseq)
            skipped += 1
        else:
            scheduler.step()
        ema = loss_value if ema is None else 0.9 * ema + 0.1 * loss_value
        step += 1
        tokens += tokens_per_step
        window_tokens += tokens_per_step
        progress.advance()

        if step % args.log_every == 0 or step == args.steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = rt.max(time.perf_counter() - window_t)  # the slowest rank's time: all-rank throughput
            tps = window_tokens / seconds
            window_t, window_tokens = time.perf_counter(), 0
            per_device = tps / rt.world
            util = flops.mfu(per_device, config, args.seq_len, peak)
            memory = rt.gather(peak_memory_gib(device))
            row = dict(step=step, tokens=tokens, loss=loss_value, lr=scheduler.get_last_lr()[0],
                       grad_norm=float(grad_norm) if grad_norm is not None else None,
                       loss_scale=scaler.get_scale() if scaler else None, skipped=skipped, tokens_per_s=tps,
                       tflops=per_device * fpt / 1e12, mfu=util, seconds=seconds, peak_mem_gib=max(memory),
                       mem_gib_by_rank=" ".join(f"{m:.3f}" for m in memory))
            log.add(**row)
            progress.metrics(f"step {step:6d} | loss {loss_value:.3f} | lr {row['lr']:.2e}"
                  + (f" | gnorm {row['grad_norm']:.2f}" if row["grad_norm"] is not None else "")
                  + (f" | scale {row['loss_scale']:g}" if scaler else "")
                  + f" | {tps:,.0f} tok/s" + (f" (all {rt.world} ranks)" if rt.distributed else "")
                  + f" | {row['tflops']:.3f} TFLOP/s" + ("/GPU" if rt.distributed else "")
                  + (f" | MFU {100 * util:.1f}%" if util is not None else "")
                  + (f" | peak mem GiB by rank {row['mem_gib_by_rank']}" if rt.distributed else ""))
        if step % args.eval_every == 0 or step == args.steps:
            val = evaluate(model, data.val, args, device, rt.rows)
            log.add(step=step, tokens=tokens, val_loss=val, val_ppl=math.exp(val))
            progress.write(f"step {step:6d} | validation loss {val:.3f} (ppl {math.exp(val):.1f})")
            if rt.main:
                plot_losses(log.rows, out / "loss.png")
        if step % args.ckpt_every == 0 or step == stop_at:
            last_ckpt = save(step)
    progress.close()

    plot = out / "loss.png"
    summary = {"steps": step, "final_val_loss": log.rows[-1].get("val_loss"), "checkpoint": str(last_ckpt),
               "plot": str(plot) if plot.exists() else "not drawn (matplotlib is not installed)",
               "metrics": str(log.jsonl), "skipped": skipped}
    first_val = next((r["val_loss"] for r in log.rows if r.get("val_loss") is not None), None)
    summary["initial_val_loss"] = first_val
    if args.sample_tokens and step == args.steps:
        tok = load_tokenizer(data.tokenizer_path)
        prompt = tok.encode("def ").ids
        gen = torch.Generator(device=device).manual_seed(args.seed)
        new = min(args.sample_tokens, config.max_position_embeddings - len(prompt))  # the last learned position
        ids = model.generate(torch.tensor([prompt], device=device), max_new_tokens=new, top_k=20,
                             eos_token_id=data.eos_id, generator=gen)
        summary["sample"] = tok.decode(ids[0].tolist())
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    try:
        summary = train(args)
    except DivergenceError as e:
        if main_rank:
            print(f"\nDIVERGENCE: {e}", file=sys.stderr)
        return 2
    if not main_rank:
        return 0
    if summary["steps"] < args.steps:
        print(f"\nstopped at step {summary['steps']} of {args.steps}; continue with --resume "
              f"(checkpoint: {summary['checkpoint']})")
        return 0
    print(f"\nvalidation loss {summary['initial_val_loss']:.3f} -> {summary['final_val_loss']:.3f} "
          f"after {summary['steps']} steps ({summary['skipped']} skipped)")
    if "sample" in summary:
        print("sample (top-k 20):\n" + "-" * 60 + "\n" + summary["sample"] + "\n" + "-" * 60)
    print(f"loss curve: {summary['plot']}\nmetrics:    {summary['metrics']}\ncheckpoint: {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
