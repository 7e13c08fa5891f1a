"""FusedAdamW: ``torch.optim.AdamW`` with a multi-tensor Triton step.

Interchangeable with ``torch.optim.AdamW``: the same constructor arguments
and checks, param groups with the same keys and their own hyper-parameters,
closures, LR schedulers, and a state dict with the same per-parameter keys
(``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) that loads into
``torch.optim.AdamW`` and back.  ``lr`` and ``betas`` may be 1-element tensors
(read on the device by the kernel; keep them on the parameters' device, as a
CUDA graph needs).  ``foreach`` and ``fused`` are recorded and otherwise
ignored: the step is always the fused kernel.  The step never synchronises
with the host, so it is CUDA-graph capturable whatever ``capturable`` says
(the flag is recorded).  ``differentiable=True`` is refused.  ``load_state_dict``
checks every saved state tensor against its parameter (shape, floating dtype)
before it changes anything.

What it adds:

- Mixed precision.  Moments are always fp32 (fp64 for fp64 parameters).  With
  ``master_weights=True`` fp16/bf16 parameters get an fp32 master copy (state
  key ``master_param``) that the step updates, writing the rounded copy into the
  parameter in the same pass.  Without (the default), fp16/bf16 parameters are
  upcast, stepped in fp32 and rounded back inside the kernel: OPT's
  "memory-efficient fp16", the recipe OPT-175B trained with.
- PyTorch's AMP protocol, as ``torch.optim.AdamW(fused=True)``:
  ``_step_supports_amp_scaling = True``; a ``GradScaler`` (or
  ``opt_core.DynamicLossScaler``) sets ``grad_scale`` and ``found_inf``; the
  kernel unscales, and skips everything (moments, parameters, ``step``) when
  ``found_inf`` is set.  No ``.item()`` inside ``step()``.
- Fused gradient handling, optional: ``max_grad_norm`` clips by the global L2
  norm (computed in a statistics pass over the gradients, pre-clip norm kept in
  ``grad_norm``), ``skip_nonfinite=True`` skips the whole step when any gradient
  is inf/NaN; ``clip_grad_norm_(max_norm)`` is the call-site equivalent of
  ``torch.nn.utils.clip_grad_norm_`` whose clipping is applied inside the next
  ``step()`` (the ``.grad`` tensors are left as they are).
- ``DTensor`` parameters (FSDP2, tensor parallel) step on their local shards.
- Under ``torch.distributed`` (initialized, world size > 1) the gradient
  statistics are global: the sum of squares behind ``max_grad_norm`` /
  ``clip_grad_norm_`` is summed over every rank with each element counted once
  (a DTensor shard once, a shard replicated over a mesh dimension or a plain
  tensor -- a replica on every rank -- divided by its number of copies), and
  the inf/NaN count is summed too, so every rank clips by the same norm and
  skips the same steps.  Every rank must then call the gradient passes
  (``step`` with clipping or ``skip_nonfinite``, ``clip_grad_norm_``, a loss
  scaler's unscale) together.  Single-process behaviour is unchanged.
"""

from __future__ import annotations

import numbers
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch

from opt_core.kernels import adamw as triton_adamw
from opt_core.process_group import is_dtensor, local_tensor, world_size

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Per-parameter state tensors: each has its parameter's shape and a floating-point dtype.
_STATE_TENSORS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
# Group keys of ours that a torch.optim.AdamW state dict does not carry: loading one keeps ours.
_OWN_GROUP_KEYS = ("master_weights",)


def _copies(t: torch.Tensor, world: int) -> float:
    """How many ranks hold each element of ``t``'s local data: the world over its number of distinct shards.

    A DTensor is split by every non-Replicate placement of its mesh (Shard, and
    FSDP's strided shard); a plain tensor is a replica on every rank."""
    shards = 1
    if is_dtensor(t):
        for i, placement in enumerate(t.placements):
            if placement.is_partial():
                raise ValueError("FusedAdamW: a gradient with a Partial placement is not reduced yet; "
                                 "redistribute it (or let FSDP reduce it) before the optimizer runs")
            if not placement.is_replicate():
                shards *= t.device_mesh.size(i)
    return world / shards


def _refuse_differentiable(group: dict[str, Any], where: str) -> None:
    if group.get("differentiable", False):
        raise ValueError(f"FusedAdamW does not support differentiable=True ({where}): its step runs in a Triton "
                         "kernel outside autograd; use torch.optim.AdamW(differentiable=True) to differentiate "
                         "through the step")


def _check_hyperparameters(group: dict[str, Any], where: str) -> None:
    """torch.optim.AdamW's checks, on every group; a tensor lr or betas as AdamW takes them (1 element)."""
    lr, betas, eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element ({where}), got shape {tuple(lr.shape)}")
    if not isinstance(lr, torch.Tensor) and (isinstance(lr, bool) or not isinstance(lr, numbers.Real)):
        raise TypeError(f"lr must be a float or a 1-element tensor ({where}), got {type(lr).__name__}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    for name, value in (("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float ({where}), got {type(value).__name__}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a pair ({where}), got {type(betas).__name__}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair ({where}), got {len(betas)} values")
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    if tensors[0] != tensors[1] or not all(t or isinstance(b, numbers.Real) for t, b in zip(tensors, betas)):
        raise ValueError(f"betas must be either both floats or both Tensors ({where})")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element ({where}), got shape {tuple(beta.shape)}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _check_flags(group: dict[str, Any], where: str) -> None:
    """AdamW's implementation switches: recorded as given (the step is always the fused kernel)."""
    _refuse_differentiable(group, where)
    if group["fused"] and group["foreach"]:
        raise ValueError(f"`fused` and `foreach` cannot be `True` together ({where})")
    if not group["decoupled_weight_decay"]:
        raise ValueError(f"FusedAdamW decays weights as AdamW does: decoupled_weight_decay must be True ({where})")


def _check_param_state(where: str, state: Optional[dict[str, Any]], param: torch.Tensor) -> None:
    """A saved per-parameter state fits ``param``: the keys a step reads, 1-element step, tensors of its shape."""
    if not state:
        return
    for key in ("step", "exp_avg", "exp_avg_sq"):
        if key not in state:
            raise ValueError(f"{where}: the saved state has no {key!r} (it has {sorted(map(str, state))})")
    step = state["step"]
    if isinstance(step, torch.Tensor) and (step.numel() != 1 or step.is_complex()):
        raise ValueError(f"{where}: step has shape {tuple(step.shape)} and dtype {step.dtype}, a 1-element real "
                         "tensor is needed")
    if not isinstance(step, (torch.Tensor, numbers.Real)):
        raise ValueError(f"{where}: step is a {type(step).__name__}, a number or a 1-element tensor is needed")
    for key in _STATE_TENSORS:
        if key not in state:
            continue
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: {key} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            raise ValueError(f"{where}: {key} has dtype {value.dtype}, a floating-point dtype is needed")
        if value.shape != param.shape:
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, the parameter has {tuple(param.shape)}")


def _check_state_dict(groups: list[dict[str, Any]], state_dict: dict[str, Any]) -> None:
    """Refuse, before anything changes, a state dict whose groups or per-parameter state do not fit ours."""
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(groups):
        raise ValueError(f"loaded state dict has a different number of parameter groups: {len(saved_groups)}, "
                         f"this optimizer has {len(groups)}")
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"loaded state dict contains a parameter group that doesn't match the size of "
                             f"optimizer's group: param_groups[{gi}] has {len(saved['params'])} parameters there, "
                             f"{len(group['params'])} here")
        _refuse_differentiable(saved, f"the loaded param_groups[{gi}]")
        for pos, (pid, param) in enumerate(zip(saved["params"], group["params"])):
            _check_param_state(f"param_groups[{gi}]['params'][{pos}]", saved_state.get(pid), param)


BACKENDS = ("triton", "cuda")


def _backend(name: str):
    """The module whose ``adamw_step`` / ``grad_stats`` run the step: the Triton kernels, or the hand-written
    CUDA C++ ones (``opt_core.kernels.cuda_backend``: the CMake-built library through ctypes, or CuPy compiling
    the same sources at run time).  Asking for "cuda" where neither loader is available fails here, naming what
    is missing, not at the first step."""
    if name == "triton":
        return triton_adamw
    if name == "cuda":
        from opt_core.kernels import cuda_backend

        cuda_backend.loader()  # raises BackendUnavailable with the build command and the CuPy package
        return cuda_backend
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


class FusedAdamW(torch.optim.Optimizer):
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        master_weights: Optional[bool] = None,
        max_grad_norm: Optional[float] = None,
        skip_nonfinite: bool = False,
        backend: str = "triton",
    ) -> None:
        self._kernels = _backend(backend)
        self.backend = backend
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm} (must be > 0 or None)")
        # betas as AdamW keeps them: a 1-element tensor as its 0-d view.
        if isinstance(betas, (tuple, list)):  # anything else is refused, naming betas, with the other checks
            betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=True, master_weights=bool(master_weights))
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = bool(skip_nonfinite)
        self.grad_norm: Optional[torch.Tensor] = None
        self._pending_clip: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param_groups[{len(self.param_groups) - 1}]"
        try:
            _check_hyperparameters(group, where)
            _check_flags(group, where)
            self._check_params(group)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

    @staticmethod
    def _check_params(group: dict[str, Any]) -> None:
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"FusedAdamW: a param group must hold parameters of one device, got {sorted(map(str, devices))}")
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise TypeError(f"FusedAdamW does not support complex parameters (params[{i}] is {p.dtype}); "
                                "step torch.view_as_real(param) instead")
            if not p.is_floating_point():
                raise TypeError(f"FusedAdamW requires floating-point parameters, params[{i}] is {p.dtype}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None), ("capturable", False),
                               ("differentiable", False), ("fused", None), ("master_weights", False)):
                group.setdefault(key, value)
            group["decoupled_weight_decay"] = True  # as torch.optim.AdamW loads any state
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("backend", "triton")
        self.__dict__.setdefault("_kernels", _backend(self.backend))
        self.__dict__.setdefault("skip_nonfinite", False)
        self.__dict__.setdefault("grad_norm", None)
        self.__dict__.setdefault("_pending_clip", None)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            moment = torch.float64 if p.dtype == torch.float64 else torch.float32
            state["step"] = torch.zeros((), dtype=torch.float32, device=local_tensor(p).device)
            state["exp_avg"] = torch.zeros_like(p, dtype=moment, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"], memory_format=torch.preserve_format)
        if group["master_weights"] and p.dtype in _LOW_PRECISION and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_state_dict(self.param_groups, state_dict)
        # A torch.optim.AdamW state dict has no group keys of ours: they keep this optimizer's values.
        state_dict = dict(state_dict, param_groups=[
            {**{k: group[k] for k in _OWN_GROUP_KEYS}, **saved}
            for group, saved in zip(self.param_groups, state_dict["param_groups"])])
        # torch's loader casts every floating state tensor to its parameter's
        # dtype, which would squeeze fp32 moments and masters through fp16/bf16.
        # Keep the saved values and put them where and how the kernel wants them.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        groups = {p: g for g in self.param_groups for p in g["params"]}
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            state, saved = self.state[p], saved_state[pid]
            moment = torch.float64 if p.dtype == torch.float64 else torch.float32
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=moment, copy=True)
            if "master_param" in saved:
                state["master_param"] = saved["master_param"].to(device=p.device, dtype=torch.float32, copy=True)
            step = saved.get("step", 0)
            step = step.detach().clone() if isinstance(step, torch.Tensor) else torch.tensor(float(step))
            # The kernel reads step on the parameter's (local shard's) device, wherever it was saved.
            state["step"] = step.to(device=local_tensor(p).device, dtype=torch.float32).reshape(())
            self._init_state(p, groups[p])

    # ----------------------------------------------------------------- gradient passes
    def _grads(self) -> list[torch.Tensor]:
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("FusedAdamW does not support sparse gradients")
                    grads.append(local_tensor(p.grad))
        return grads

    def _grad_stats_by_device(self, inv_scale: Optional[torch.Tensor] = None, *, unscale_in_place: bool = False
                              ) -> dict[torch.device, tuple[torch.Tensor, torch.Tensor]]:
        """{device: (sum of squares, non-finite count)} over every gradient, in one pass family.

        Distributed (world size > 1): one entry holding the statistics of the
        whole model over every rank (see the module docstring)."""
        world = world_size()
        if world > 1:
            return self._global_grad_stats(world, inv_scale, unscale_in_place)
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for g in self._grads():
            by_device[g.device].append(g)
        out = {}
        for device, grads in by_device.items():
            inv = inv_scale.to(device, non_blocking=True) if inv_scale is not None else None
            out[device] = self._kernels.grad_stats(grads, inv_scale=inv, unscale_in_place=unscale_in_place)
        return out

    def _global_grad_stats(self, world: int, inv_scale: Optional[torch.Tensor], unscale_in_place: bool
                           ) -> dict[torch.device, tuple[torch.Tensor, torch.Tensor]]:
        self._grads()  # rejects sparse gradients
        # Grouped by (device, copies): a group's sum of squares is divided by its
        # number of copies, so summing over the world counts every element once.
        groups: dict[tuple[torch.device, float], list[torch.Tensor]] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    local = local_tensor(p.grad)
                    groups[(local.device, _copies(p.grad, world))].append(local)
        if not groups:
            return {}
        device = next(iter(groups))[0]
        parts = []
        for (dev, copies), grads in groups.items():
            inv = inv_scale.to(dev, non_blocking=True) if inv_scale is not None else None
            sumsq, bad = self._kernels.grad_stats(grads, inv_scale=inv, unscale_in_place=unscale_in_place)
            parts.append(torch.stack([sumsq / copies, bad]).to(device))
        total = torch.stack(parts).sum(dim=0)
        torch.distributed.all_reduce(total)  # one collective for both: SUM of squares and of inf/NaN counts
        return {device: (total[0], total[1])}

    @staticmethod
    def _total(stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        sums = [s for s, _ in stats.values()]
        bads = [b for _, b in stats.values()]
        device = sums[0].device
        total = torch.stack([s.to(device, non_blocking=True) for s in sums]).sum()
        bad = torch.stack([b.to(device, non_blocking=True) for b in bads]).sum()
        return total.sqrt(), bad

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
        """Total L2 norm of the gradients, as ``torch.nn.utils.clip_grad_norm_`` returns it.

        The clipping itself (by ``max_norm / (norm + 1e-6)``, at most 1) is
        applied inside the next ``step()``: the gradients are read once more by
        the update instead of being rewritten here.
        """
        if float(norm_type) != 2.0:
            raise ValueError(f"FusedAdamW.clip_grad_norm_ supports norm_type=2 only, got {norm_type}")
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        stats = self._grad_stats_by_device()
        if not stats:
            return torch.zeros(())
        norm, bad = self._total(stats)
        if error_if_nonfinite and not bool(torch.isfinite(norm)):
            raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be "
                               "clipped. To disable this error and scale the gradients by the non-finite norm "
                               "anyway, set `error_if_nonfinite=False`")
        self._pending_clip = ((max_norm / (norm + 1e-6)).clamp(max=1.0), norm)
        return norm

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                work.append((group, params, [self._init_state(p, group) for p in params]))
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        pending, self._pending_clip = self._pending_clip, None
        scaler_stats = self.__dict__.pop("_scaler_stats", None)
        if not work:
            return loss
        self._grads()  # rejects sparse gradients before anything is touched

        inv_scale = grad_scale.double().reciprocal().float() if grad_scale is not None else None
        if isinstance(found_inf, torch.Tensor):
            found_inf = found_inf.to(torch.float32)
        elif found_inf is not None:  # GradScaler hands a plain 0 when it saw no gradients
            found_inf = None if not found_inf else torch.ones(())
        clip_coef = pending[0] if pending is not None else None
        if self.max_grad_norm is not None or self.skip_nonfinite:
            stats = scaler_stats if scaler_stats is not None else self._grad_stats_by_device(inv_scale)
            norm, bad = self._total(stats)
            self.grad_norm = norm
            if self.max_grad_norm is not None and clip_coef is None:
                clip_coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            if self.skip_nonfinite:
                skip = (bad > 0).to(torch.float32)
                found_inf = skip if found_inf is None else found_inf.to(skip.device) + skip
        elif pending is not None:
            self.grad_norm = pending[1]

        for group, params, states in work:
            device = local_tensor(params[0]).device
            on_device = (lambda t: t.to(device, non_blocking=True) if t is not None else None)  # noqa: E731
            beta1, beta2 = group["betas"]  # floats, or tensors the kernel reads on the device
            self._kernels.adamw_step(
                [local_tensor(p) for p in params],
                [local_tensor(p.grad) for p in params],
                [local_tensor(s["exp_avg"]) for s in states],
                [local_tensor(s["exp_avg_sq"]) for s in states],
                [s["step"] for s in states],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                max_exp_avg_sqs=[local_tensor(s["max_exp_avg_sq"]) for s in states] if group["amsgrad"] else None,
                masters=[local_tensor(s["master_param"]) if "master_param" in s else None for s in states],
                maximize=group["maximize"],
                inv_scale=on_device(inv_scale), clip_coef=on_device(clip_coef), found_inf=on_device(found_inf),
            )
        return loss
