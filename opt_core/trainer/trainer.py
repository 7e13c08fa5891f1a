"""``Trainer``: build, resume, train step, evaluate, save, the loop; ``train(args)`` runs it end to end."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import torch

from opt_core import dist, flops
from opt_core.config import OPTConfig
from opt_core.data import BatchIterator, DataConfig, PreparedData, load_tokenizer, prepare, wait_for_prepared
from opt_core.kernels.native import linear_cross_entropy
from opt_core.model import IGNORE_INDEX, OPTForCausalLM
from opt_core.trainer import recipe
from opt_core.trainer.checkpoint import CheckpointStore, RunFolderError, is_finite_state
from opt_core.trainer.guard import DivergenceError, DivergenceGuard, TrainingStopped
from opt_core.trainer.metrics import MetricsLog, Progress, TrainingClock, step_line
from opt_core.trainer.plot import plot_losses
from opt_core.trainer.run_folder import claim_run_folder
from opt_core.trainer.runtime import (Runtime, launched_rank, local_rank, peak_memory_gib,
                                      resolve_device_dtype, rng_state, seed_everything,
                                      set_rng_state, wants_distributed)

SAMPLE_PROMPT = "def "
SAMPLE_TOP_K, SAMPLE_TEMPERATURE = 20, 0.7  # reads as code; at temperature 1 the tiny model rambles


class StalledRankError(TrainingStopped):
    """A collective timed out: another rank stalled or died."""

    label = "STALLED"
    exit_status = 3


def model_config(args, data: PreparedData) -> OPTConfig:
    """The preset or config file, with the data's vocabulary and special tokens (and ``--dropout``)."""
    config = OPTConfig.from_file(args.config) if args.config else OPTConfig.from_preset(args.preset)
    overrides = dict(vocab_size=data.padded_vocab_size, pad_token_id=data.pad_id, eos_token_id=data.eos_id,
                     bos_token_id=data.eos_id)
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    return dataclasses.replace(config, **overrides)


def build_model(config: OPTConfig, args, rt: Runtime, dtype: torch.dtype) -> OPTForCausalLM:
    """Built on the meta device (no memory, no random draws) and initialised once, right after the seed:
    a distributed run draws the same numbers for its shards (dist.init_weights), so every layout starts
    from the single-process model's weights, and no rank ever holds the full model."""
    model = OPTForCausalLM(config, device="meta", init=False)
    model.activation_checkpointing = args.activation_checkpointing
    if rt.distributed:
        model = dist.parallelize(model, rt.coords.mesh, sequence_parallel=not args.no_sequence_parallel,
                                 param_dtype=None if dtype == torch.float32 else dtype)
        model.to_empty(device=rt.device)
        dist.init_weights(model)
    else:
        model.to_empty(device=rt.device)
        model.lm_head.weight = model.decoder.embed_tokens.weight  # to_empty gives each module its own tensor
        model.init_weights()
        model = model.to(dtype)
    return model.train()


def next_token_loss(model: OPTForCausalLM, block: torch.Tensor, distributed: bool) -> torch.Tensor:
    """The mean next-token cross entropy of a (batch, seq_len + 1) block.  One process computes the LM
    head and the loss in chunks (``linear_cross_entropy``: the logits are never materialised); a
    parallelized model runs its own forward, whose head and loss are vocabulary-parallel."""
    inputs, targets = block[:, :-1], block[:, 1:]
    if distributed:
        return model(inputs, labels=targets, shift_labels=False).loss
    model.check_inputs(inputs, None, targets, None)
    hidden = model.decoder(inputs)
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, targets.reshape(-1),
                                IGNORE_INDEX)


class Trainer:
    """One run: the model, its optimizer, schedule, loss scaler, data stream, guard and checkpoints.

    ``resume()`` restores the newest intact checkpoint, ``train_step()`` takes one optimizer step (or
    skips the batch), ``evaluate()`` gives the validation loss, ``save()`` writes a checkpoint and
    ``fit()`` loops until ``--steps`` (or ``--stop-at``) and returns the run's summary."""

    def __init__(self, args, rt: Runtime, dtype: torch.dtype, out: Path, data: PreparedData):
        self.args, self.rt, self.dtype, self.device, self.out, self.data = args, rt, dtype, rt.device, out, data
        self.config = model_config(args, data)
        # The same seed on every rank: every rank draws the same numbers in the same order (the initial
        # weights, of which each keeps its shards, and the dropout seeds, which each then offsets by rank).
        seed_everything(args.seed)
        self.model = build_model(self.config, args, rt, dtype)
        self.optimizer = recipe.build_optimizer(self.model, args, self.device, dtype, rt.distributed)
        self.scheduler = recipe.build_scheduler(self.optimizer, args)
        self.scaler = recipe.build_scaler(args, self.device, dtype)
        self.batches = BatchIterator(data.train, args.batch_size, args.seq_len, seed=args.seed)
        if data.train.num_sequences(args.seq_len) < args.batch_size:
            raise ValueError(f"the training split holds {data.train.num_sequences(args.seq_len)} sequences of "
                             f"{args.seq_len + 1} tokens, fewer than one batch of {args.batch_size}")
        self.guard = DivergenceGuard(args.spike_factor, args.max_bad_steps)
        self.store = CheckpointStore(out, sharded=rt.distributed, main=rt.main)
        self.step, self.tokens = 0, 0
        self.tokens_per_step = args.batch_size * args.grad_accum * args.seq_len  # over all ranks
        self.last_checkpoint: Optional[Path] = None
        self.log: Optional[MetricsLog] = None
        self.peak = flops.peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None

    # ----------------------------------------------------------------- state
    def train_state(self) -> dict:
        """Everything but the model and optimizer that a resumed run needs to continue bit for bit."""
        return {"step": self.step, "tokens": self.tokens, "guard": self.guard.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "data": self.batches.state_dict(), "rng": rng_state(self.device),
                "config": self.config.to_dict(), "args": vars(self.args)}

    def _load_train_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.guard.load_state_dict(state["guard"])
        set_rng_state(state["rng"], self.device)  # rank 0's: every rank draws the same numbers

    def _load_file(self, path: Path) -> dict:
        state = torch.load(path, map_location=self.device, weights_only=False)
        missing = {"model", "optimizer", "args", "step"} - set(state)
        if missing:
            raise ValueError(f"it holds no {sorted(missing)}")
        return state

    def _load_sharded(self, path: Path) -> dict:
        extra, _ = dist.load_checkpoint(path, self.model, self.optimizer, verify=False)  # just verified
        return extra

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint of this run (True), or start fresh when it has none."""
        other = self.store.other_kind()
        if other and not self.store.entries:
            hint = (" (single-process .pt checkpoints: resume without torchrun/--dp/--tp)" if self.rt.distributed
                    else " (sharded checkpoints of a distributed run: resume under torchrun, or with --dp 1 --tp 1 "
                         "in one process)")
            raise RunFolderError(f"--resume: {self.out / 'checkpoints'} holds {', '.join(other)}{hint}")
        found = self.store.newest_intact(self._load_sharded if self.rt.distributed else self._load_file, self.rt.say)
        if found is None:
            self.rt.say(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting from scratch")
            return False
        state, path = found
        applied, refused = recipe.resume_changes(state["args"], self.args)
        if refused:
            raise RunFolderError(f"--resume from {path}: {'; '.join(refused)} would train something else than "
                                 f"this run; resume with the run's own values, or start a new run elsewhere")
        if not self.rt.distributed:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self._load_train_state(state)
        if any(change.startswith("--lr ") for change in applied):
            recipe.apply_peak_lr(self.optimizer, self.scheduler, self.args.lr)
        for change in applied:
            self.rt.say(f"--resume: applying {change}")
        self.last_checkpoint = path
        self.rt.say(f"resumed from step {self.step} ({path})")
        return True

    # ----------------------------------------------------------------- one step
    def loss(self, block: torch.Tensor) -> torch.Tensor:
        return next_token_loss(self.model, block, self.rt.distributed)

    def _forward_backward(self) -> torch.Tensor:
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.args.grad_accum):
            block = self.rt.rows(next(self.batches).to(self.device, non_blocking=True))
            loss = self.loss(block) / self.args.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    def train_step(self, progress: Progress) -> Optional[dict]:
        """One optimizer step: its loss, learning rate and gradient norm, or None when the guard skipped
        the batch (or the fp16 loss scaler skipped the update)."""
        loss_sum = self._forward_backward()
        norm = None if self.scaler else recipe.clip_gradients(self.model, self.optimizer, self.args.clip)
        # One host sync per step, for the guard and the log.
        if norm is None:
            loss, grad_norm = float(loss_sum), None
        else:
            loss, grad_norm = torch.stack([loss_sum.float(), norm.float().to(loss_sum.device)]).tolist()
        why = self.guard.problem(loss, grad_norm)
        if why is not None:
            self.optimizer.zero_grad(set_to_none=True)
            progress.write(self.guard.skip(self.step, why, self.last_checkpoint))
            return None
        overflowed = self._optimizer_step()
        if grad_norm is None and getattr(self.optimizer, "grad_norm", None) is not None:
            grad_norm = float(self.optimizer.grad_norm)
        self.guard.passed(loss)
        if overflowed:  # the loss scaler skipped the update: the schedule does not advance (metaseq)
            self.guard.count_overflow()
        else:
            self.scheduler.step()
        self.step += 1
        self.tokens += self.tokens_per_step
        return {"loss": loss, "grad_norm": grad_norm}

    def _optimizer_step(self) -> bool:
        """Step (through the loss scaler in fp16); whether the scaler skipped the update."""
        overflowed = False
        if self.scaler is not None:
            before = self.scaler.skipped_steps
            self.scaler.step(self.optimizer)
            self.scaler.update()
            overflowed = self.scaler.skipped_steps > before
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return overflowed

    # ----------------------------------------------------------------- evaluation, checkpoints, sample
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``--eval-batches`` fixed batches (each rank its rows; the loss is global)."""
        args = self.args
        self.model.eval()
        batches = BatchIterator(self.data.val, args.batch_size, args.seq_len, seed=0, shuffle=False)
        n = min(args.eval_batches, max(1, self.data.val.num_sequences(args.seq_len) // args.batch_size))
        total = sum(float(self.loss(self.rt.rows(next(batches).to(self.device)))) for _ in range(n))
        self.model.train()
        return total / n

    def save(self) -> Path:
        """A checkpoint of this step; only finite state is ever saved (DivergenceError otherwise)."""
        finite = is_finite_state(self.model.state_dict()) and is_finite_state(self.optimizer.state_dict()["state"])
        if not self.rt.all_true(finite):
            where = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint yet"
            raise DivergenceError(f"stopping at step {self.step}: the model or optimizer state is no longer finite; "
                                  f"not saving it; {where}")
        if self.rt.distributed:
            extra = {**self.train_state(), "layout": {"dp": self.rt.coords.dp, "tp": self.rt.coords.tp}}
            path = self.store.save_sharded(self.step, self.model, self.optimizer, extra, self.args.keep,
                                           self.rt.barrier)
        else:
            payload = {**self.train_state(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            path = self.store.save(self.step, payload, self.args.keep)
        self.last_checkpoint = path
        return path

    def sample(self) -> str:
        """Text the model writes after ``SAMPLE_PROMPT`` (top-k sampling, the run's seed)."""
        tok = load_tokenizer(self.data.tokenizer_path)
        prompt = tok.encode(SAMPLE_PROMPT).ids
        gen = torch.Generator(device=self.device).manual_seed(self.args.seed)
        new = min(self.args.sample_tokens, self.config.max_position_embeddings - len(prompt))
        ids = self.model.generate(torch.tensor([prompt], device=self.device), max_new_tokens=new, top_k=SAMPLE_TOP_K,
                                  temperature=SAMPLE_TEMPERATURE, eos_token_id=self.data.eos_id, generator=gen)
        return tok.decode(ids[0].tolist())

    # ----------------------------------------------------------------- the loop
    def _announce(self) -> None:
        rt, config, args = self.rt, self.config, self.args
        rt.say(f"model: {self.model.num_parameters() / 1e6:.2f}M parameters ({config.num_layers} layers, "
               f"d={config.hidden_size}, {config.num_heads} heads), {self.dtype}, {self.device}; "
               f"{self.tokens_per_step} tokens/step; run folder {self.out}")
        if rt.distributed:
            lay = rt.coords
            rt.say(f"parallel: {rt.world} ranks = dp {lay.dp} (FSDP2) x tp {lay.tp} (tensor parallel"
                   + (", sequence parallel" if self.model.parallelism.sequence_parallel else "")
                   + f"); {args.batch_size // lay.dp} sequences per dp rank per micro-batch")
        rt.say(f"{flops.CONVENTION}: {flops.flops_per_token(config, args.seq_len) / 1e6:.1f} MFLOP/token"
               + ("" if self.peak else "; no MFU on this device (unknown peak)"))

    def _log_train(self, result: dict, seconds: float, tokens: int, progress: Progress) -> None:
        seconds = self.rt.max(seconds)  # the slowest rank's time: all-rank throughput
        tps = tokens / seconds
        per_device = tps / self.rt.world
        memory = self.rt.gather(peak_memory_gib(self.device))
        row = dict(step=self.step, tokens=self.tokens, loss=result["loss"], lr=self.scheduler.get_last_lr()[0],
                   grad_norm=result["grad_norm"], loss_scale=self.scaler.get_scale() if self.scaler else None,
                   skipped=self.guard.skipped, tokens_per_s=tps,
                   tflops=per_device * flops.flops_per_token(self.config, self.args.seq_len) / 1e12,
                   mfu=flops.mfu(per_device, self.config, self.args.seq_len, self.peak), seconds=seconds,
                   peak_mem_gib=max(memory), mem_gib_by_rank=" ".join(f"{m:.3f}" for m in memory))
        self.log.add(**row)
        progress.metrics(step_line(row, self.rt.world if self.rt.distributed else 0))

    def _log_validation(self, progress: Progress) -> None:
        val = self.evaluate()
        self.log.add(step=self.step, tokens=self.tokens, val_loss=val, val_ppl=math.exp(val))
        progress.write(f"step {self.step:6d} | validation loss {val:.3f} (ppl {math.exp(val):.1f})")
        if self.rt.main:
            plot_losses(self.log.rows, self.out / "loss.png")

    def fit(self, resumed: bool) -> dict:
        """Train to ``--steps`` (or ``--stop-at``), logging, evaluating and saving as asked; the summary."""
        args = self.args
        self._announce()
        self.log = MetricsLog(self.out, self.step if resumed else None, write=self.rt.main)
        if not resumed:
            val = self.evaluate()
            self.log.add(step=0, tokens=0, val_loss=val, val_ppl=math.exp(val))
            self.rt.say(f"step {0:6d} | validation loss {val:.3f} (ppl {math.exp(val):.1f})")
        stop_at = min(args.steps, args.stop_at) if args.stop_at else args.steps
        progress = Progress(args.steps, self.step, enabled=self.rt.main)
        clock = TrainingClock(self.device)
        while self.step < stop_at:
            result = self.train_step(progress)
            if result is None:
                continue
            clock.tokens += self.tokens_per_step
            progress.advance()
            if self.step % args.log_every == 0 or self.step == args.steps:
                self._log_train(result, *clock.lap(), progress)
            evaluate = self.step % args.eval_every == 0 or self.step == args.steps
            save = self.step % args.ckpt_every == 0 or self.step == stop_at
            if evaluate or save:
                clock.pause()
                if evaluate:
                    self._log_validation(progress)
                if save:
                    self.save()
                clock.resume()
        progress.close()
        return self.summary()

    def summary(self) -> dict:
        plot = self.out / "loss.png"
        summary = {"steps": self.step, "final_val_loss": self.log.last("val_loss"),
                   "initial_val_loss": self.log.first("val_loss"), "checkpoint": str(self.last_checkpoint),
                   "plot": str(plot) if plot.exists() else "not drawn (matplotlib is not installed)",
                   "metrics": str(self.log.jsonl), "skipped": self.guard.skipped, "out": str(self.out)}
        if self.args.sample_tokens and self.step == self.args.steps:
            summary["sample"] = self.sample()
            summary["sampling"] = {"top_k": SAMPLE_TOP_K, "temperature": SAMPLE_TEMPERATURE}
        return summary


def prepare_data(args) -> PreparedData:
    """The prepared data set, before any process group exists: one process per node builds the cache and
    the others wait for it (a build may take longer than ``--timeout``)."""
    config = DataConfig(source=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        max_bytes=args.max_bytes, seed=args.seed)
    if wants_distributed(args) and local_rank() != 0:
        return wait_for_prepared(config, args.data_cache)
    return prepare(config, args.data_cache, log=print if launched_rank() == 0 else None)


def _timed_out(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "timed out" in str(err).lower()


def _claim_build_fit(args, rt: Runtime, dtype: torch.dtype, data) -> dict:
    """The run in its own frame, so the trainer (the model, its optimizer and the process groups their
    sharded states hold) is gone when ``train`` closes the runtime."""
    out = claim_run_folder(args, rt)
    trainer = Trainer(args, rt, dtype, out, data)
    resumed = trainer.resume() if args.resume else False
    return trainer.fit(resumed)


def train(args) -> dict:
    """Prepare the data, start the runtime, claim the run folder, build, resume, fit; the run's summary."""
    device, dtype = resolve_device_dtype(args)
    data = prepare_data(args)
    rt = Runtime.start(args, device)
    try:
        summary = _claim_build_fit(args, rt, dtype, data)
    except Exception as err:
        if rt.distributed and _timed_out(err):
            rank = rt.rank
            rt.abandon()  # the other ranks may never reach another collective
            raise StalledRankError(
                f"rank {rank}: a collective waited longer than --timeout {args.timeout:g} s, so another rank "
                f"stalled or died ({str(err).splitlines()[0]}); the checkpoints written so far are intact: continue "
                f"with --resume") from err
        try:
            rt.close()
        except RuntimeError:  # a rank that failed elsewhere never reaches the closing barrier
            pass
        raise
    rt.close()
    return summary
