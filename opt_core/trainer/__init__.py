"""The trainer behind ``python -m opt_core.train``: the paper's recipe, bit-exact resumes, nothing lost.

AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1, one parameter group as metaseq had), gradient
clipping at 1.0, linear warm-up from 0 then linear decay to 10% of the peak, dropout 0.1; fp32, bf16
(fp32 master weights) or fp16 (OPT's memory-efficient recipe: fp16 weights, fp32 Adam state inside
the fused step, DynamicLossScaler starting at 4 with metaseq's options).  FusedAdamW on a GPU and for
fp16/bf16, torch's fused AdamW for fp32 on the CPU.  One process computes the LM head and the loss
in chunks (``opt_core.kernels.native.linear_cross_entropy``), never materialising the logits.

Every step it logs loss, learning rate, gradient norm, tokens/s, TFLOP/s and MFU to the terminal and
to metrics.jsonl/metrics.csv; at each evaluation, validation loss and perplexity, and a loss-curve
PNG.  Checkpoints are atomic with checksums written last and ``--resume`` continues bit for bit from
the newest intact one: model, optimizer, scaler, schedule, data position and RNG states.  The
divergence guard skips a batch whose loss or gradient norm is non-finite or whose loss spikes, and
stops after ``--max-bad-steps`` in a row with the last good (verified, finite) checkpoint intact.

Under ``torchrun`` (or with ``--dp``/``--tp``) the run is distributed through ``opt_core.dist``: a
("dp", "tp") mesh, Megatron tensor parallelism with sequence parallelism over tp, FSDP2 over dp.
``--batch-size`` is the global batch; checkpoints are sharded DCP folders that resume at any other
layout; every collective times out after ``--timeout`` seconds, so a stalled rank fails the job.

The pieces, one job each:

- ``runtime``: device and dtype, the process group, rank helpers, RNG states;
- ``run_folder``: which folder a run may write to (never another run's);
- ``checkpoint``: atomic saves, checksums, pruning within the run, verified resumes with fallback;
- ``guard``: the divergence guard; ``metrics``: metrics files and the terminal; ``plot``: the loss plot;
- ``recipe``: optimizer, schedule, loss scaler, which flags a resume may change;
- ``trainer``: ``Trainer`` (build, resume, train step, evaluate, save, fit) and ``train(args)``.
"""

from opt_core.trainer.checkpoint import RunFolderError, checkpoint_paths, sharded_checkpoint_paths
from opt_core.trainer.guard import DivergenceError
from opt_core.trainer.trainer import StalledRankError, Trainer, train

__all__ = ["DivergenceError", "RunFolderError", "StalledRankError", "Trainer", "checkpoint_paths",
           "sharded_checkpoint_paths", "train"]
