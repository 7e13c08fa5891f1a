"""``python -m bench.profile --preset P``: where a training step's time goes, by kernel family, and the MFU.

Builds ``OPTForCausalLM`` and ``FusedAdamW`` (clipping at 1.0, bench.mfu's
hyper-parameters) on the device: bf16 parameters with fp32 master weights on a
GPU, fp32 on the CPU (the plain-PyTorch reference paths there, or the Triton
kernels under the interpreter when ``TRITON_INTERPRET=1`` is set).  It runs
``--warmup`` steps (Triton's autotuning and compiles happen there), times
``--steps`` untraced steps (the tokens/s behind MFU and HFU), then traces
``--steps`` more with ``torch.profiler`` on a schedule (one warm-up step, then
the active ones, each step synchronised so the steps' windows hold their GPU
work) and writes the Chrome/Perfetto trace and a JSON summary to ``--out``
(``trace-<preset>-<device>.json``, ``profile-<preset>-<device>.json``; the
latter is what ``bench.plots`` draws its stacked bar from).

How the trace is read (``analyze``).  Host events (ops, ``record_function``
ranges, CUDA runtime/driver calls) are nested by time on each thread.  On a GPU
each kernel, memcpy and memset is charged its device time and takes the stack of
names above the runtime call that launched it (matched by the trace's
``correlation`` id); on the CPU each op is charged its self time (its duration
less its children's) and takes its own stack.  The stack, innermost name first,
decides the family: the first name naming one of communication (nccl, gloo,
c10d), optimizer (``Optimizer.step#...`` / ``zero_grad`` ranges, our
``adamw_kernel`` / ``grad_stats_kernel``), attention backward
(``opt_core::attention_bwd`` and its autograd node, SDPA/flash backward),
attention forward (``opt_core::attention_fwd``, SDPA/flash forward), MLP GEMMs
(``opt_core::relu_mlp_*``: the fused block's GEMMs with their bias, ReLU,
dropout and residual epilogues) or LayerNorm (``opt_core::layer_norm_*``,
``native_layer_norm``...) wins; otherwise a GEMM anywhere on the stack
(``aten::mm/addmm/bmm/linear``, their backward nodes, cuBLAS/CUTLASS kernel
names) makes it "other GEMMs" (QKV, out_proj, the LM head), and the rest is
"other" (embeddings, loss, dropout after attention, casts...).  Stacks matter
because our kernel names repeat across modules (``fwd_kernel`` is both the
attention and the LayerNorm forward).  Recomputed forwards (``--recompute``)
count as forward work.  What no kernel covers (a GPU idle between kernels) or
no op covers (Python between ops on the CPU) is its own line, so the shares sum
to 100% (more when kernels overlap on several streams).

Work per family, per step (T = batch x seqlen tokens, L layers, d width, f the
FFN width, h heads of width D, V the vocabulary, e its embedding width, P all
parameters, b the activation element size; with ``--recompute`` each layer's
forward terms count twice):

- attention forward: L x bench.attention.flops(B, h, S, D, "fwd"), i.e.
  2·B·h·S²·D per layer (4·B·h·S²·D halved for causal: the work the kernel does,
  as the microbenchmarks count it); backward: 2.5x that.
- MLP GEMMs: fc1 and fc2, 2 x 2·T·d·f forward and twice that backward: 12·T·d·f·L.
- other GEMMs: QKV and out_proj 6 x 4·T·d²·L, the LM head 6·T·V·e, 350M's
  project_in/out 6 x 2·T·d·e.
- LayerNorm bytes: plain LayerNorm 2·T·d·b forward (read x, write y) and 3·T·d·b
  backward (read x, dy, write dx); with the residual fused 4·T·d·b each way.
  Pre-LN: per layer one plain and one fused, plus the final plain one; post-LN
  (350M): two plain per layer.
- optimizer bytes: P x (28 B for fp32, 30 B for bf16 with master weights, 22 B
  for fp16's memory-efficient recipe, as bench/adamw.py counts them) + P x the
  gradient element size for the clipping statistics pass.
- communication, other: no rate.

MFU = model FLOPs per token (``opt_core.flops.flops_per_token``, 6N + 12·L·d·s,
the convention printed with it) x tokens/s / the device's dense bf16 peak;
HFU counts hardware FLOPs, ``opt_core.flops.hfu_flops_per_token``'s 8N + 16·L·d·s
with ``--recompute`` (one more forward of everything, the LM head included,
although only the decoder layers are recomputed) and the model FLOPs without it.  On the CPU there is no peak: the
rates are printed alone.  fp16 runs take OPT's memory-efficient recipe without
a loss scaler (its unscale is fused into the step; the timing is the same).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import re
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from bench.attention import flops as attention_flops
from bench import harness
from bench.adamw import BYTES_PER_PARAM
from bench.mfu import HYPER
from opt_core import flops
from opt_core.config import PRESETS, OPTConfig
from opt_core.model import OPTForCausalLM
from opt_core.optim import FusedAdamW

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("attention forward", "attention backward", "MLP GEMMs", "other GEMMs", "LayerNorm", "optimizer",
            "communication", "other")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_TOKENS_PER_STEP = 16384  # as bench.mfu: 8 sequences of 2048
HFU_CONVENTION = ("HFU: hardware FLOPs/token, 8N+16·L·d·s with activation recomputation (one more forward), "
                  "the model FLOPs without it")

# Families named by a stack entry, tried innermost entry first; attention backward before forward
# because the forward op's autograd node ("GeneratedBackwardFor_opt_core_attention_fwd...") names both.
# Our Triton kernels' own names (kernels/*.py) are there too, for a kernel whose launch the trace did not
# link to an op; only ``fwd_kernel`` is left out: attention and LayerNorm both have one.
_SCOPES = (
    ("communication", re.compile(r"nccl|gloo|c10d|record_param_comms", re.I)),
    ("optimizer", re.compile(r"^Optimizer\.|^adamw_kernel$|^grad_stats_kernel$")),
    ("attention backward", re.compile(r"opt_core::attention_bwd|opt_core_attention_fwd\w*Backward|"
                                      r"scaled_dot_product\w*backward|ScaledDotProduct\w*Backward|flash\w*bwd|"
                                      r"sdpa\w*bprop|^bwd_(preprocess|dkdv|dq)_kernel$", re.I)),
    ("attention forward", re.compile(r"opt_core::attention_fwd|opt_core_attention_fwd|scaled_dot_product|"
                                     r"flash\w*fwd|sdpa\w*fprop", re.I)),
    ("MLP GEMMs", re.compile(r"opt_core::relu_mlp_|opt_core_relu_mlp_|^(fc|dh|matmul|dropout_bwd)_kernel$")),
    ("LayerNorm", re.compile(r"layer_?norm|^bwd(_wide)?_kernel$", re.I)),
)
_GEMM = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|addbmm|matmul|linear)$|(Addmm|Mm|Bmm|Baddbmm)Backward|"
                   r"gemm|nvjet|xmma|cutlass|cublas", re.I)
_STEP = re.compile(r"^ProfilerStep#\d+$")
_BACKWARD_NODE = "autograd::engine::evaluate_function: "
_HOST = {"cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"}
_LAUNCH = {"cuda_runtime", "cuda_driver"}
_DEVICE = {"kernel", "gpu_memcpy", "gpu_memset"}


def classify(stack: Sequence[str]) -> str:
    """The family of an event from its stack of names, innermost first."""
    for name in stack:
        for family, pattern in _SCOPES:
            if pattern.search(name):
                return family
    return "other GEMMs" if any(_GEMM.search(name) for name in stack) else "other"


# --------------------------------------------------------------------------- reading a trace
@dataclasses.dataclass
class Breakdown:
    """Per-step averages over the traced steps, in milliseconds."""

    steps: int
    step_ms: float
    family_ms: dict[str, float]
    uncovered_ms: float      # GPU: no kernel running; CPU: Python outside any op
    uncovered_label: str
    clock: str               # what a family's time is


class _HostTree:
    """Host events nested by time on each thread: each one's parent and the duration of its children."""

    def __init__(self, events: list[dict]):
        self.events = events
        self.parent = [-1] * len(events)
        self.child_us = [0.0] * len(events)
        threads = defaultdict(list)
        for i, e in enumerate(events):
            threads[(e.get("pid"), e.get("tid"))].append(i)
        for order in threads.values():
            order.sort(key=lambda i: (events[i]["ts"], -events[i]["dur"]))
            open_ = []
            for i in order:
                while open_ and _end(events[open_[-1]]) <= events[i]["ts"]:
                    open_.pop()
                if open_:
                    self.parent[i] = open_[-1]
                    self.child_us[open_[-1]] += events[i]["dur"]
                open_.append(i)
        # Sequence number -> the outermost forward op carrying it (ops sorted by start, longest first).
        self.forward_op = {}
        for i in sorted(range(len(events)), key=lambda i: (events[i]["ts"], -events[i]["dur"])):
            seq = events[i].get("args", {}).get("Sequence number")
            if seq is not None and events[i].get("cat") == "cpu_op" and \
                    not events[i]["name"].startswith(_BACKWARD_NODE):
                self.forward_op.setdefault(seq, i)

    def stack(self, i: int, follow: bool = True) -> list[str]:
        """Names from event ``i`` outward, up to the profiler's step range; inside an autograd node, then
        the stack of the forward op that made the node (the one with its sequence number): the
        backward of a native-path MLP's linears (``AddmmBackward0``) is the MLP's."""
        names, forward = [], None
        while i >= 0 and not _STEP.match(self.events[i]["name"]):
            event = self.events[i]
            names.append(event["name"])
            if forward is None and event["name"].startswith(_BACKWARD_NODE):
                forward = self.forward_op.get(event.get("args", {}).get("Sequence number"))
            i = self.parent[i]
        return names + (self.stack(forward, follow=False) if follow and forward is not None else [])


def _end(e: dict) -> float:
    return e["ts"] + e["dur"]


class _Steps:
    """The ``ProfilerStep#N`` ranges among the host events: which one a host timestamp falls in."""

    def __init__(self, host: list[dict]):
        self.index = sorted((i for i, e in enumerate(host) if _STEP.match(e["name"])), key=lambda i: host[i]["ts"])
        if not self.index:
            raise ValueError("the trace has no ProfilerStep# ranges: was it recorded with a profiler schedule?")
        self.ranges = [host[i] for i in self.index]
        self.starts = [e["ts"] for e in self.ranges]

    def at(self, ts: float) -> Optional[int]:
        k = bisect.bisect_right(self.starts, ts) - 1
        return k if k >= 0 and ts < _end(self.ranges[k]) else None


def analyze(trace: dict, device_time: bool) -> Breakdown:
    """Each family's time per step in a Chrome trace from ``torch.profiler``: device time of kernels on a
    GPU (``device_time``), self time of ops on the CPU."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e and "ts" in e]
    host = [e for e in events if e.get("cat") in _HOST]
    tree, steps = _HostTree(host), _Steps(host)
    family_us = dict.fromkeys(FAMILIES, 0.0)
    if device_time:
        uncovered = _charge_kernels(events, tree, steps, family_us)
        label, clock = "GPU idle (no kernel running)", "GPU kernel time"
    else:
        uncovered = _charge_ops(tree, steps, family_us)
        label, clock = "Python (outside any op)", "CPU self time of each op"
    n = len(steps.ranges)
    step_ms = sum(e["dur"] for e in steps.ranges) / n / 1e3
    return Breakdown(n, step_ms, {f: us / n / 1e3 for f, us in family_us.items()}, uncovered / n / 1e3, label, clock)


def _charge_kernels(events: list[dict], tree: _HostTree, steps: _Steps, family_us: dict) -> float:
    """Add each device event's time to its family; return the step time no device event covers (us)."""
    launch = _index_by(tree.events, "correlation", _LAUNCH)
    # Without its launch call in the trace, a kernel's "External id" names the op it ran under.
    op = _index_by(tree.events, "External id", ("cpu_op", "user_annotation"))
    busy = defaultdict(list)
    for e in events:
        if e.get("cat") not in _DEVICE:
            continue
        args = e.get("args", {})
        i = launch.get(args.get("correlation"), op.get(args.get("External id"), -1))
        # The launch's host time places the kernel in the step that launched it.
        step = steps.at(tree.events[i]["ts"] if i >= 0 else e["ts"])
        if step is None:
            continue
        family_us[classify([e["name"]] + (tree.stack(i) if i >= 0 else []))] += e["dur"]
        busy[step].append((e["ts"], _end(e)))
    return sum(max(0.0, r["dur"] - _union(busy[k])) for k, r in enumerate(steps.ranges))


def _index_by(events: list[dict], arg: str, categories) -> dict:
    """Event index by one of its ``args`` (ids), for the events of the given categories that carry it."""
    ids = ((e.get("args", {}).get(arg), i) for i, e in enumerate(events) if e.get("cat") in categories)
    return {key: i for key, i in ids if key is not None}


def _union(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _charge_ops(tree: _HostTree, steps: _Steps, family_us: dict) -> float:
    """Add each op's self time to its family; return the steps' own self time (us)."""
    for i, e in enumerate(tree.events):
        if e.get("cat") not in ("cpu_op", "user_annotation") or _STEP.match(e["name"]) or steps.at(e["ts"]) is None:
            continue
        family_us[classify(tree.stack(i))] += max(0.0, e["dur"] - tree.child_us[i])
    return sum(max(0.0, tree.events[i]["dur"] - tree.child_us[i]) for i in steps.index)


# --------------------------------------------------------------------------- the work each family does
def family_work(config: OPTConfig, batch: int, seq: int, act_bytes: int, recompute: bool, n_params: int,
                adamw_bytes_per_param: int) -> dict[str, tuple[float, str]]:
    """(amount, "FLOP" or "B") per step for the families with a rate (the module docstring's counts)."""
    T, L, d, f = batch * seq, config.num_layers, config.hidden_size, config.ffn_dim
    again = 1 if recompute else 0  # one more forward per layer when recomputing
    attn_fwd = L * attention_flops(batch, config.num_heads, seq, config.head_dim, "fwd")
    mlp = 2 * d * f * L
    layer_other = 4 * d * d * L
    rest = flops.matmul_parameters(config) - mlp - layer_other  # LM head (+ 350M's projections)
    if config.do_layer_norm_before:
        ln_units = (L + 1) * (2 + 3) + L * (4 + 4) + again * L * (2 + 4)
    else:
        ln_units = 2 * L * (2 + 3) + again * 2 * L * 2
    return {
        "attention forward": ((1 + again) * attn_fwd, "FLOP"),
        "attention backward": (2.5 * attn_fwd, "FLOP"),
        "MLP GEMMs": (2 * T * mlp * (3 + again), "FLOP"),
        "other GEMMs": (2 * T * (layer_other * (3 + again) + 3 * rest), "FLOP"),
        "LayerNorm": (ln_units * T * d * act_bytes, "B"),
        "optimizer": (n_params * adamw_bytes_per_param, "B"),
    }


def rate(amount: float, unit: str, ms: float) -> str:
    """``amount`` of ``unit`` ("FLOP" or "B") in ``ms``, as TFLOP/s or GB/s (GFLOP/s or MB/s below one)."""
    if ms <= 0:
        return "-"
    per_s = amount / (ms * 1e-3)
    big, small = (("TFLOP/s", 1e12), ("GFLOP/s", 1e9)) if unit == "FLOP" else (("GB/s", 1e9), ("MB/s", 1e6))
    name, scale = big if per_s >= big[1] else small
    return f"{per_s / scale:.3g} {name}"


# --------------------------------------------------------------------------- running the steps
@dataclasses.dataclass
class Setup:
    config: OPTConfig
    preset: str
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    seq_len: int
    recompute: bool


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, Setup]:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=3, help="steps timed untraced, then as many traced (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--batch-size", type=int, help=f"sequences per step (default: {GPU_TOKENS_PER_STEP} tokens "
                                                        "on a GPU, 2 on the CPU)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: 2048 on a GPU, 128 on the CPU, "
                                                    "at most the preset's positions)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--layers", type=int,
                        help="override the preset's layer count (a big preset's shapes on one GPU)")
    parser.add_argument("--recompute", action="store_true", help="activation checkpointing (HFU counts the recompute)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "profile", help="folder for the trace and summary")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    config = OPTConfig.from_preset(args.preset, **({"num_layers": args.layers} if args.layers else {}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    seq = args.seq_len or min(2048 if gpu else 128, config.max_position_embeddings)
    if seq > config.max_position_embeddings:
        parser.error(f"--seq-len {seq} is over {args.preset}'s max_position_embeddings "
                     f"({config.max_position_embeddings})")
    batch = args.batch_size or (max(1, GPU_TOKENS_PER_STEP // seq) if gpu else 2)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if gpu else torch.float32)
    return args, Setup(config, args.preset, device, dtype, batch, seq, args.recompute)


def build_step(setup: Setup) -> tuple[Callable[[], None], dict[str, tuple[float, str]]]:
    """One training step on random tokens (forward, loss, backward, clipped AdamW step, zero_grad) and
    the work of each family in it."""
    model = OPTForCausalLM(setup.config, device=setup.device, dtype=setup.dtype)
    model.activation_checkpointing = setup.recompute
    model.train()
    master = setup.dtype == torch.bfloat16
    optimizer = FusedAdamW(model.parameters(), master_weights=master, max_grad_norm=1.0, **HYPER)
    batch = torch.randint(0, setup.config.vocab_size, (setup.batch_size, setup.seq_len + 1), device=setup.device)

    def step():
        loss = model(batch[:, :-1], labels=batch[:, 1:], shift_labels=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    recipe = "fp32" if setup.dtype == torch.float32 else "master-weights" if master else "memory-efficient"
    element = torch.finfo(setup.dtype).bits // 8
    n_params = sum(p.numel() for p in model.parameters())
    work = family_work(setup.config, setup.batch_size, setup.seq_len, element, setup.recompute, n_params,
                       BYTES_PER_PARAM[recipe] + element)  # + reading each gradient for the clipping norm
    return step, work


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed_step_ms(step: Callable[[], None], steps: int, device: torch.device) -> float:
    sync = _synchronizer(device)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) * 1e3 / steps


def trace_steps(step: Callable[[], None], steps: int, device: torch.device, path: Path) -> None:
    """``steps`` steps under ``torch.profiler`` after one profiled warm-up step, exported to ``path``."""
    from torch.profiler import ProfilerActivity, profile, schedule

    sync = _synchronizer(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Profiler clears events")  # one cycle: nothing to keep
        with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                     on_trace_ready=lambda p: p.export_chrome_trace(str(path))) as prof:
            for _ in range(1 + steps):
                step()
                sync()  # each step's window then holds its GPU work
                prof.step()


# --------------------------------------------------------------------------- the report
def utilisation(setup: Setup, step_ms: float, device_name: str) -> dict:
    """Tokens/s, model and hardware TFLOP/s of the untraced steps, and MFU/HFU where the device has a peak."""
    tokens_per_s = setup.batch_size * setup.seq_len / (step_ms * 1e-3)
    hardware = flops.hfu_flops_per_token if setup.recompute else flops.flops_per_token
    model_rate = flops.flops_per_token(setup.config, setup.seq_len) * tokens_per_s
    hardware_rate = hardware(setup.config, setup.seq_len) * tokens_per_s
    peak = flops.peak_flops(device_name) if setup.device.type == "cuda" else None
    return {"step_ms": step_ms, "tokens_per_s": tokens_per_s, "model_tflops": model_rate / 1e12,
            "hardware_tflops": hardware_rate / 1e12, "peak_tflops": peak / 1e12 if peak else None,
            "mfu": model_rate / peak if peak else None, "hfu": hardware_rate / peak if peak else None,
            "convention": flops.CONVENTION, "hfu_convention": HFU_CONVENTION}


def _table_row(name: str, ms: float, step_ms: float, achieved: str) -> str:
    share = f"{100 * ms / step_ms:.1f}%" if step_ms > 0 else "-"
    return f"{name:<30} {ms:>10.3f} {share:>7}  {achieved}"


def _utilisation_lines(use: dict, device_name: str, on_gpu: bool) -> list[str]:
    mfu_tag, hfu_tag = f"[{use['convention']}]", f"[{use['hfu_convention']}]"
    if use["peak_tflops"]:
        peak = f"of {use['peak_tflops']:.0f} TFLOP/s ({device_name}, dense bf16 peak)"
        return [f"MFU: {100 * use['mfu']:.1f}% {peak}   {mfu_tag}", f"HFU: {100 * use['hfu']:.1f}% {peak}   {hfu_tag}"]
    why = f"no dense peak known for {device_name} in opt_core.flops.PEAK_FLOPS" if on_gpu else "no peak on a CPU"
    return [f"MFU: none ({why}); model FLOPs at {use['model_tflops']:.3g} TFLOP/s   {mfu_tag}",
            f"HFU: none ({why}); hardware FLOPs at {use['hardware_tflops']:.3g} TFLOP/s   {hfu_tag}"]


def report(setup: Setup, device_name: str, breakdown: Breakdown, work: dict, use: dict, trace_path: Path) -> list[str]:
    c = setup.config
    tokens = setup.batch_size * setup.seq_len
    lines = [
        f"opt-core profile: {setup.preset} ({c.num_layers} layers, width {c.hidden_size}) on {device_name}, "
        f"{str(setup.dtype).replace('torch.', '')}, {setup.batch_size} x {setup.seq_len} = {tokens} tokens/step"
        f"{', activation recomputation' if setup.recompute else ''}",
        f"trace: {trace_path} ({breakdown.steps} step{'s' if breakdown.steps != 1 else ''}; open it in "
        "https://ui.perfetto.dev or chrome://tracing)",
        f"traced step: {breakdown.step_ms:.3f} ms; each family's time is {breakdown.clock}",
        "",
        f"{'family':<30} {'ms/step':>10} {'share':>7}  achieved",
    ]
    for family in FAMILIES:
        ms = breakdown.family_ms[family]
        lines.append(_table_row(family, ms, breakdown.step_ms, rate(*work[family], ms) if family in work else "-"))
    lines.append(_table_row(breakdown.uncovered_label, breakdown.uncovered_ms, breakdown.step_ms, ""))
    lines.append(_table_row("traced step", breakdown.step_ms, breakdown.step_ms, ""))
    lines += ["", f"untraced step: {use['step_ms']:.3f} ms, {use['tokens_per_s']:.0f} tokens/s, model FLOPs at "
              f"{use['model_tflops']:.3g} TFLOP/s, hardware FLOPs at {use['hardware_tflops']:.3g} TFLOP/s"]
    return lines + _utilisation_lines(use, device_name, setup.device.type == "cuda")


def summary(setup: Setup, device_name: str, breakdown: Breakdown, work: dict, use: dict, trace_path: Path) -> dict:
    """What ``bench.plots`` reads (the stacked bar) and a person compares across runs."""
    step = breakdown.step_ms

    def family(name: str) -> dict:
        ms = breakdown.family_ms[name]
        amount, unit = work.get(name, (None, None))
        per_s = amount / (ms * 1e-3) if amount is not None and ms > 0 else None
        return {"family": name, "ms": ms, "share": ms / step if step else None, "work": amount, "unit": unit,
                "per_s": per_s}

    return {
        "preset": setup.preset, "layers": setup.config.num_layers, "device": device_name,
        "dtype": str(setup.dtype).replace("torch.", ""), "batch_size": setup.batch_size, "seq_len": setup.seq_len,
        "recompute": setup.recompute, "torch": torch.__version__, "trace": str(trace_path),
        "steps": breakdown.steps, "clock": breakdown.clock, "traced_step_ms": step,
        "families": [family(name) for name in FAMILIES],
        "uncovered": {"label": breakdown.uncovered_label, "ms": breakdown.uncovered_ms,
                      "share": breakdown.uncovered_ms / step if step else None},
        **use,
    }


def main(argv: Optional[list[str]] = None) -> int:
    args, setup = parse_args(argv)
    name = harness.device_name(setup.device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    args.out.mkdir(parents=True, exist_ok=True)
    trace_path = args.out / f"trace-{setup.preset}-{slug}.json"
    step, work = build_step(setup)
    for _ in range(args.warmup):
        step()
    untraced_ms = timed_step_ms(step, args.steps, setup.device)
    trace_steps(step, args.steps, setup.device, trace_path)
    breakdown = analyze(json.loads(trace_path.read_text()), device_time=setup.device.type == "cuda")
    use = utilisation(setup, untraced_ms, name)
    print("\n".join(report(setup, name, breakdown, work, use, trace_path)))
    summary_path = args.out / f"profile-{setup.preset}-{slug}.json"
    summary_path.write_text(json.dumps(summary(setup, name, breakdown, work, use, trace_path), indent=1))
    print(f"summary: {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
