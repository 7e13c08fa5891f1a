"""The divergence guard: a step whose loss or gradient norm is not finite, or whose loss spikes, is skipped.

The gradient norm is checked as well as the loss: an inf gradient can come with a finite loss (fp32
and bf16 have no loss scaler to catch it), and stepping on it would turn every weight into NaN.
After ``max_bad_steps`` skipped steps in a row the run stops with ``DivergenceError``, naming the last
good checkpoint (a verified, finite one: only finite state is ever saved).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional


class TrainingStopped(RuntimeError):
    """A run ended early with a message for the user; ``label`` heads it, ``exit_status`` is the CLI's."""

    label = "STOPPED"
    exit_status = 2


class DivergenceError(TrainingStopped):
    """Training stopped by the divergence guard (or state that stopped being finite)."""

    label = "DIVERGENCE"


class DivergenceGuard:
    """Decides, from one step's loss and gradient norm, whether the optimizer may step."""

    EMA_DECAY = 0.9  # the loss's moving average, against which a spike is measured

    def __init__(self, spike_factor: float, max_bad_steps: int):
        self.spike_factor, self.max_bad_steps = spike_factor, max_bad_steps
        self.ema: Optional[float] = None
        self.bad_streak = 0
        self.skipped = 0

    def problem(self, loss: float, grad_norm: Optional[float]) -> Optional[str]:
        """Why this step must be skipped, or None."""
        if not math.isfinite(loss):
            return f"loss {loss:.4g} is not finite"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm {grad_norm:.4g} is not finite (loss {loss:.4g})"
        if self.ema is not None and loss > self.spike_factor * self.ema:
            return f"loss {loss:.4g} > {self.spike_factor} x moving average {self.ema:.4g}"
        return None

    def skip(self, step: int, why: str, last_good: Optional[Path]) -> str:
        """Count a skipped step; the line to log, or DivergenceError after too many in a row."""
        self.bad_streak += 1
        self.skipped += 1
        if self.bad_streak >= self.max_bad_steps:
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
            raise DivergenceError(f"stopping at step {step}: {self.bad_streak} consecutive batches with a non-finite "
                                  f"or spiking loss or gradient (the last: {why}); {where}")
        return f"step {step + 1:6d} | skipped batch: {why} ({self.bad_streak} in a row)"

    def passed(self, loss: float) -> None:
        self.bad_streak = 0
        self.ema = loss if self.ema is None else self.EMA_DECAY * self.ema + (1 - self.EMA_DECAY) * loss

    def count_overflow(self) -> None:
        """An fp16 step the loss scaler skipped (it lowers the scale; not a divergence)."""
        self.skipped += 1

    def state_dict(self) -> dict:
        return {"ema": self.ema, "bad_streak": self.bad_streak, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.bad_streak, self.skipped = state["ema"], state["bad_streak"], state["skipped"]
