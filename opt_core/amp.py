"""DynamicLossScaler: ``torch.amp.GradScaler``'s interface and behaviour, plus metaseq's options.

Code written for ``torch.amp.GradScaler`` runs unchanged: the same
constructor (device, init 2**16, growth 2, backoff 0.5, interval 2000,
enabled), ``scale``, ``unscale_``, ``step``, ``update``, ``get_scale``,
``is_enabled``, the same per-optimizer state machine and error messages, the
same ``state_dict`` keys; with the default options the scale trajectory is
GradScaler's exactly (it calls the same update).  Where GradScaler takes a
value that can only break training (an init_scale <= 0, NaN or past float32, a
NaN or infinite growth factor, a backoff factor <= 0 or NaN), this raises.

On top, the options OPT's training code (metaseq) used, all off by default:

- ``min_scale``: a floor.  ``on_min_scale="clamp"`` keeps the scale at the
  floor and keeps skipping overflowed steps (metaseq, floor 2**-5);
  ``on_min_scale="raise"`` raises ``FloatingPointError("Minimum loss scale
  reached ...")`` as fairseq did at 1e-4 (this mode reads the scale on the host
  in ``update()``; the others never synchronise).
- ``max_scale``: a ceiling on growth.
- ``growth_interval_follows_scale=True``: the growth interval doubles when the
  scale grows and halves (at least 1) when it backs off: metaseq's fix for a
  scale creeping up to 8-16 at 175B.
- counters for monitoring: ``skipped_steps`` (total) and ``skip_streak``
  (consecutive skipped steps now).

With ``opt_core.FusedAdamW`` the scale goes to the fused step (the kernel
unscales; the inf check is one fused statistics pass that also feeds the
optimizer's ``max_grad_norm``).  Any other optimizer is unscaled with
``torch._amp_foreach_non_finite_check_and_unscale_``, as GradScaler does.

Distributed (``torch.distributed`` initialized, world size > 1; FSDP, tensor
parallel): an inf/NaN in any rank's gradient shard makes every rank skip the
step and back off the scale.  FusedAdamW's statistics pass is already reduced
over the world; for other optimizers the found-inf flag is all-reduced with
MAX (DTensor gradients are checked and unscaled on their local shards).  Every
rank must call ``unscale_``/``step`` together.
"""

from __future__ import annotations

import enum
import numbers
import warnings
from collections import abc, defaultdict
from typing import Any, Optional

import torch

from opt_core.process_group import distributed, local_tensor

_FP32_MAX = torch.finfo(torch.float32).max


class _Stage(enum.Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


def _fresh_optimizer_state() -> dict[str, Any]:
    return {"stage": _Stage.READY, "found_inf_per_device": {}}


def _is_fused_adamw(optimizer) -> bool:
    return hasattr(optimizer, "_grad_stats_by_device")


def _agree_across_ranks(found: dict[torch.device, torch.Tensor]) -> dict[torch.device, torch.Tensor]:
    """Every device entry set to the MAX over all devices of all ranks, so every rank skips together."""
    if not found or not distributed():
        return found
    first = next(iter(found))
    flag = torch.stack([f.to(first) for f in found.values()]).amax()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return {d: flag.to(d) for d in found}


class DynamicLossScaler:
    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        min_scale: Optional[float] = None,
        on_min_scale: str = "clamp",
        max_scale: Optional[float] = None,
        growth_interval_follows_scale: bool = False,
    ) -> None:
        self._device = device
        self._enabled = enabled
        if device == "cuda" and enabled and not torch.cuda.is_available():
            warnings.warn("DynamicLossScaler is enabled, but CUDA is not available.  Disabling.", stacklevel=2)
            self._enabled = False
        if on_min_scale not in ("clamp", "raise"):
            raise ValueError(f"on_min_scale must be 'clamp' or 'raise', got {on_min_scale!r}")
        if min_scale is not None and not min_scale > 0:
            raise ValueError(f"min_scale must be > 0 or None, got {min_scale}")
        if max_scale is not None and not (max_scale > 0 and (min_scale is None or max_scale >= min_scale)):
            raise ValueError(f"max_scale must be > 0 and >= min_scale, got {max_scale}")
        if not isinstance(growth_interval, int) or isinstance(growth_interval, bool) or growth_interval < 1:
            raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
        self._min_scale = min_scale
        self._on_min_scale = on_min_scale
        self._max_scale = max_scale
        self._interval_follows_scale = bool(growth_interval_follows_scale)
        if not (isinstance(init_scale, numbers.Real) and not isinstance(init_scale, bool)
                and 0.0 < init_scale <= _FP32_MAX):
            # 0 or NaN would skip every step (0 * inf gradients), inf the same from the first one.
            raise ValueError(f"init_scale must be a number > 0 that fits in float32, got {init_scale!r}")
        if self._enabled:
            # GradScaler's checks and messages, written so that NaN fails them too; then what GradScaler
            # lets through: an infinite growth factor, a backoff factor <= 0 (a zero or negative scale).
            if not growth_factor > 1.0:
                raise AssertionError("The growth factor must be > 1.0.")
            if not backoff_factor < 1.0:
                raise AssertionError("The backoff factor must be < 1.0.")
            if not growth_factor <= _FP32_MAX:
                raise ValueError(f"growth_factor must be finite, got {growth_factor!r}")
            if not backoff_factor > 0.0:
                raise ValueError(f"backoff_factor must be > 0, got {backoff_factor!r}")
        self._init_scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._init_growth_tracker = 0
        self._init_skipped = 0
        self._init_streak = 0
        # Device tensors, created by the first scale() on the loss's device.
        self._scale: Optional[torch.Tensor] = None
        self._growth_tracker: Optional[torch.Tensor] = None
        self._interval_t: Optional[torch.Tensor] = None
        self._skipped: Optional[torch.Tensor] = None
        self._streak: Optional[torch.Tensor] = None
        self._per_optimizer_states: dict[int, dict[str, Any]] = defaultdict(_fresh_optimizer_state)

    # ----------------------------------------------------------------- scale
    def _lazy_init(self, device: torch.device) -> None:
        self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=device)
        self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32, device=device)
        self._interval_t = torch.full((), self._growth_interval, dtype=torch.int32, device=device)
        self._skipped = torch.full((), self._init_skipped, dtype=torch.int64, device=device)
        self._streak = torch.full((), self._init_streak, dtype=torch.int64, device=device)

    def _check_scale_growth_tracker(self, funcname: str) -> tuple[torch.Tensor, torch.Tensor]:
        fix = "This may indicate your script did not use scaler.scale(loss or outputs) earlier in the iteration."
        if self._scale is None:
            raise AssertionError(f"Attempted {funcname} but _scale is None.  " + fix)
        if self._growth_tracker is None:
            raise AssertionError(f"Attempted {funcname} but _growth_tracker is None.  " + fix)
        return self._scale, self._growth_tracker

    def scale(self, outputs):
        """Multiply a tensor, or (nested) lists/tuples of tensors, by the scale."""
        if not self._enabled:
            return outputs
        per_device: dict[torch.device, torch.Tensor] = {}

        def apply(val):
            if isinstance(val, torch.Tensor):
                if self._scale is None:
                    self._lazy_init(val.device)
                if val.device not in per_device:
                    per_device[val.device] = self._scale.to(device=val.device, non_blocking=True)
                return val * per_device[val.device]
            if isinstance(val, abc.Iterable):
                iterable = map(apply, val)
                return type(val)(iterable) if isinstance(val, (list, tuple)) else iterable
            raise ValueError("outputs must be a Tensor or an iterable of Tensors")

        return apply(outputs)

    # ----------------------------------------------------------------- unscale
    def _unscale_grads_(self, optimizer, inv_scale: torch.Tensor, allow_fp16: bool, in_place: bool
                        ) -> dict[torch.device, torch.Tensor]:
        """Check (and with ``in_place`` unscale) every gradient; {device: found_inf}."""
        grads = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not allow_fp16 and param.grad.dtype == torch.float16:
                    raise ValueError("Attempting to unscale FP16 gradients.")
                grads.append(param)
        if _is_fused_adamw(optimizer):
            # One fused pass: inf/NaN count and the sum of squares of the unscaled gradients.
            stats = optimizer._grad_stats_by_device(inv_scale, unscale_in_place=in_place)
            if not in_place:
                # The step that follows at once (scaler.step) reuses them for max_grad_norm.
                optimizer._scaler_stats = stats
            return {d: (b > 0).to(torch.float32) for d, (_, b) in stats.items()}

        found: dict[torch.device, torch.Tensor] = {}
        by_device_dtype: dict[torch.device, dict[torch.dtype, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        with torch.no_grad():
            for param in grads:
                grad = local_tensor(param.grad)
                if grad.is_sparse:
                    # Coalescing first: duplicates that overflow only when summed are caught.
                    if grad.dtype is torch.float16:
                        param.grad = grad = grad.coalesce()
                    grad = grad._values()
                by_device_dtype[grad.device][grad.dtype].append(grad)
            for device, per_dtype in by_device_dtype.items():
                found[device] = torch.zeros((), dtype=torch.float32, device=device)
                inv = inv_scale.to(device, non_blocking=True) if in_place else torch.ones((), device=device)
                for grads_ in per_dtype.values():
                    torch._amp_foreach_non_finite_check_and_unscale_(grads_, found[device], inv)
        return _agree_across_ranks(found)

    def unscale_(self, optimizer) -> None:
        """Divide the optimizer's gradients by the scale, in place, and look for inf/NaN."""
        if not self._enabled:
            return
        self._check_scale_growth_tracker("unscale_")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is _Stage.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        inv_scale = self._scale.double().reciprocal().float()
        state["found_inf_per_device"] = self._unscale_grads_(optimizer, inv_scale, allow_fp16=False, in_place=True)
        state["stage"] = _Stage.UNSCALED

    # ----------------------------------------------------------------- step
    def step(self, optimizer, *args: Any, **kwargs: Any):
        """Unscale (unless ``unscale_`` ran) and step, skipping the step on inf/NaN gradients."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # The optimizer unscales inside its own step and skips on found_inf: no host sync.
            if state["stage"] is _Stage.READY:
                inv_scale = self._scale.double().reciprocal().float()
                state["found_inf_per_device"] = self._unscale_grads_(optimizer, inv_scale, allow_fp16=True,
                                                                     in_place=False)
            found_inf = sum(t.to(self._scale.device, non_blocking=True)
                            for t in state["found_inf_per_device"].values())
            optimizer.grad_scale = (getattr(optimizer, "grad_scale", None) if state["stage"] is _Stage.UNSCALED
                                    else self._scale * getattr(optimizer, "grad_scale", 1))
            optimizer.found_inf = found_inf
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                del optimizer.grad_scale
                del optimizer.found_inf
                optimizer.__dict__.pop("_scaler_stats", None)
            state["stage"] = _Stage.STEPPED
            return retval

        if state["stage"] is _Stage.READY:
            self.unscale_(optimizer)
        if len(state["found_inf_per_device"]) == 0:
            raise AssertionError("No inf checks were recorded for this optimizer.")
        retval = None
        if not sum(v.item() for v in state["found_inf_per_device"].values()):
            retval = optimizer.step(*args, **kwargs)
        state["stage"] = _Stage.STEPPED
        return retval

    # ----------------------------------------------------------------- update
    def update(self, new_scale: Optional[float | torch.Tensor] = None) -> None:
        """Back off after an overflow, grow after ``growth_interval`` clean steps."""
        if not self._enabled:
            return
        scale, tracker = self._check_scale_growth_tracker("update")
        if new_scale is not None:
            if isinstance(new_scale, float):
                scale.fill_(new_scale)
            else:
                reason = ("new_scale should be a float or a 1-element torch.cuda.FloatTensor or "
                          "torch.FloatTensor with requires_grad=False.")
                if new_scale.device.type != self._device or new_scale.numel() != 1 or new_scale.requires_grad:
                    raise AssertionError(reason)
                scale.copy_(new_scale)
        else:
            found_infs = [f.to(device=scale.device, non_blocking=True)
                          for state in self._per_optimizer_states.values()
                          for f in state["found_inf_per_device"].values()]
            if len(found_infs) == 0:
                raise AssertionError("No inf checks were recorded prior to update.")
            found = found_infs[0]
            for f in found_infs[1:]:
                found = found + f
            self._update_scale(found)
        self._per_optimizer_states = defaultdict(_fresh_optimizer_state)

    def _update_scale(self, found: torch.Tensor) -> None:
        scale, tracker = self._scale, self._growth_tracker
        overflow = found > 0
        self._skipped += overflow.to(torch.int64)
        self._streak.copy_(torch.where(overflow, self._streak + 1, torch.zeros_like(self._streak)))
        plain = self._min_scale is None and self._max_scale is None and not self._interval_follows_scale
        if plain:  # GradScaler's own update, so the trajectory is its trajectory
            torch._amp_update_scale_(scale, tracker, found.to(torch.float32), self._growth_factor,
                                     self._backoff_factor, self._growth_interval)
            return

        backed_off = scale * self._backoff_factor
        if self._min_scale is not None:
            if self._on_min_scale == "raise":
                if bool((overflow & (backed_off <= self._min_scale)).item()):
                    raise FloatingPointError(
                        f"Minimum loss scale reached ({self._min_scale}). Your loss is probably exploding. "
                        "Try lowering the learning rate, using gradient clipping or increasing the batch size.")
            else:
                backed_off = backed_off.clamp(min=self._min_scale)
        successful = tracker + 1
        grow = ~overflow & (successful >= self._interval_t)
        grown = scale * self._growth_factor
        if self._max_scale is not None:
            grown = grown.clamp(max=self._max_scale)
        grown = torch.where(torch.isfinite(grown), grown, scale)  # never grow past fp32 to inf
        new_scale = torch.where(overflow, backed_off, torch.where(grow, grown, scale))
        if self._interval_follows_scale:
            doubled = torch.where(new_scale > scale, self._interval_t * 2, self._interval_t)
            halved = torch.clamp(self._interval_t // 2, min=1)
            self._interval_t.copy_(torch.where(overflow, halved, torch.where(grow, doubled, self._interval_t)))
        tracker.copy_(torch.where(overflow | grow, torch.zeros_like(tracker), successful))
        scale.copy_(new_scale)

    # ----------------------------------------------------------------- queries
    def _get_scale_async(self) -> Optional[torch.Tensor]:
        return self._scale

    def get_scale(self) -> float:
        """The current scale as a Python float (1.0 when disabled); synchronises."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale.item())

    def is_enabled(self) -> bool:
        return self._enabled

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        self._growth_factor = new_factor

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        self._backoff_factor = new_factor

    def get_growth_interval(self) -> int:
        if self._interval_t is not None and self._interval_follows_scale:
            return int(self._interval_t.item())
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        self._growth_interval = new_interval
        if self._interval_t is not None:
            self._interval_t.fill_(new_interval)

    def _get_growth_tracker(self) -> int:
        if not self._enabled:
            return 0
        return self._init_growth_tracker if self._growth_tracker is None else int(self._growth_tracker.item())

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for inf/NaN gradients since the start (synchronises)."""
        return self._init_skipped if self._skipped is None else int(self._skipped.item())

    @property
    def skip_streak(self) -> int:
        """Consecutive skipped steps up to the last update (synchronises)."""
        return self._init_streak if self._streak is None else int(self._streak.item())

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """GradScaler's five entries, plus this scaler's options and counters; {} when disabled."""
        if not self._enabled:
            return {}
        return {
            "scale": self.get_scale(),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self.get_growth_interval(),
            "_growth_tracker": self._get_growth_tracker(),
            "min_scale": self._min_scale,
            "on_min_scale": self._on_min_scale,
            "max_scale": self._max_scale,
            "growth_interval_follows_scale": self._interval_follows_scale,
            "skipped_steps": self.skipped_steps,
            "skip_streak": self.skip_streak,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a DynamicLossScaler's or a torch.amp.GradScaler's state dict."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        self._init_scale = float(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        self._min_scale = state_dict.get("min_scale", self._min_scale)
        self._on_min_scale = state_dict.get("on_min_scale", self._on_min_scale)
        self._max_scale = state_dict.get("max_scale", self._max_scale)
        self._interval_follows_scale = state_dict.get("growth_interval_follows_scale", self._interval_follows_scale)
        self._init_skipped = int(state_dict.get("skipped_steps", 0))
        self._init_streak = int(state_dict.get("skip_streak", 0))
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
            self._growth_tracker.fill_(self._init_growth_tracker)
            self._interval_t.fill_(self._growth_interval)
            self._skipped.fill_(self._init_skipped)
            self._streak.fill_(self._init_streak)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._enabled:
            if len(self._per_optimizer_states) != 0:
                raise AssertionError("A GradScaler instance may only be pickled at the beginning "
                                     "of an iteration, or at the end after scaler.update().")
            # Device tensors are re-created lazily from these Python values.
            state["_init_scale"] = self.get_scale()
            state["_init_growth_tracker"] = self._get_growth_tracker()
            state["_growth_interval"] = self.get_growth_interval()
            state["_init_skipped"] = self.skipped_steps
            state["_init_streak"] = self.skip_streak
            for key in ("_scale", "_growth_tracker", "_interval_t", "_skipped", "_streak"):
                state[key] = None
        state["_per_optimizer_states"] = dict(state["_per_optimizer_states"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._per_optimizer_states = defaultdict(_fresh_optimizer_state, state["_per_optimizer_states"])
