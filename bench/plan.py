"""``python -m bench --plan``: what the suite will compile and launch on a GPU, and about how long it takes,
computed here without one.

- Compiles come from ``opt_core.kernels.aot_cases`` (built from each kernel module's config lists and
  prune functions, as the launches are): for each op, the AOT cases its table cases launch (dtype, head
  dims and tiles, TMA or pointers, variants).  The AOT check compiles one variant where the table runs
  two (LayerNorm with and without the residual): those count twice.  With a tuned table for the GPU
  (``kernels/tuned/<gpu>.json``) only the chosen configs compile, one per distinct (kernel, flags,
  config) of the table, and nothing tunes.
- Compile seconds per kernel family were measured on this machine with the AOT compiler for sm_90 and
  committed in ``bench/compile_seconds.json``; regenerate it with ``python -m bench.plan --measure``
  (interpreter off).  A stage compiling on C cores takes the sum over C.
- Launches: every timed call (``do_bench``'s estimate, warm-up and repeats, at the time the case's FLOPs
  and bytes take at 60% of the GPU's measured ceilings, at least 20 us), one untimed call for the peak
  memory, and the autotuner's calls (each config of each key bucket the table meets for the first
  time: its own ``do_bench`` of ``tuning.TUNE_BUDGET_MS``).
- Fixed costs, leads until a GPU run measures them: a Python process with torch, Triton and a CUDA
  context (``PROCESS_START_S``), a kernel loaded from Triton's cache, building a model, the install.

The last line: ``plan: <N> compiles, <M> launches, about <S> s on <gpu> with <C> cores``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import importlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from bench import harness
from bench.harness import OPS

COMPILE_SECONDS = Path(__file__).with_name("compile_seconds.json")
MEASURE_COMMAND = "python -m bench.plan --measure"


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    gemm_tflops: float        # bf16 8192^3 on random data, measured (KINDS.md)
    copy_gbps: float          # device-to-device copy, read + written, measured (KINDS.md)
    memory_gib: float


GPUS = {"nvidia-h200": Gpu("NVIDIA H200", 790.0, 4300.0, 139.0)}
RATE_FRACTION = 0.6           # of the ceilings, for a case's call time
MIN_CALL_S = 20e-6
PROCESS_START_S = 6.0         # python + torch + Triton + a CUDA context on the device machine
CACHE_LOAD_S = 0.03           # a kernel loaded from Triton's on-disk cache
BUILD_S_PER_BILLION = 4.0     # building a model and its optimizer on the GPU, per billion parameters
SETUP_S = 25.0                # install, nvidia-smi, packing the results
PLOTS_S = 10.0
TESTS_FLOOR_S = 60.0          # the GPU tests get at least this, and whatever else is left
ESTIMATE_CALLS = 5            # do_bench times this many calls before it sizes the repeats
PROFILE_STEPS = 2 + 2 + 1 + 2  # bench.profile --steps 2: warm-up, timed, traced warm-up, traced


@dataclasses.dataclass
class StagePlan:
    name: str
    compiles: int = 0
    launches: int = 0
    seconds: float = 0.0
    per_op: dict = dataclasses.field(default_factory=dict)   # op -> seconds
    note: str = ""


# --------------------------------------------------------------------------- what each op compiles
_MODULES = ("attention_gluon_bwd", "attention_gluon", "attention", "layer_norm", "relu_mlp_gluon", "relu_mlp", "adamw",
            "grad_stats")  # longest prefix first


def _family(case) -> str:
    """"<module>.<kernel>" of an AOT case.  From its name: under the interpreter a case's ``module`` names
    Triton's interpreter, not the kernel's module."""
    module = next(m for m in _MODULES if case.name.startswith(m))
    return f"{'adamw' if module == 'grad_stats' else module}.{case.kernel}"


def _dtype_tag(case) -> str:
    for value in case.signature.values():
        for tag in ("bf16", "fp16", "fp32"):
            if value.endswith(tag) or f"<{tag}[" in value:
                return tag
    return ""


@functools.lru_cache(maxsize=None)
def _all_aot() -> tuple:
    from opt_core.kernels import aot_cases

    return tuple(aot_cases.all_cases())


def _aot(family: str) -> list:
    return [c for c in _all_aot() if _family(c) == family]


def _tag(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def attention_compiles(head_dim: int, dtype: torch.dtype, tma: bool, arch: int = 90) -> set:
    """AOT cases of the plain causal kernels (no mask, no dropout) at one head dim on sm_``arch`` (the
    pointer path compiles its loops per arch), and the delta pass."""
    names = {c.name for c in _all_aot()
             if _family(c) in ("attention.fwd_kernel", "attention.bwd_dkdv_kernel", "attention.bwd_dq_kernel")
             and arch in c.archs and c.constexprs.get("CAUSAL")
             and c.constexprs.get("HEAD_DIM") == head_dim and _dtype_tag(c) == _tag(dtype)
             and not c.constexprs.get("HAS_KPM") and not c.constexprs.get("HAS_DROPOUT")
             and not c.constexprs.get("FUSED_DQ") and bool(c.constexprs.get("TMA")) == tma}
    return names | {c.name for c in _aot("attention.bwd_preprocess_kernel") if c.constexprs["HEAD_DIM"] == head_dim}


def relu_mlp_compiles(dtype: torch.dtype, tma: bool, dropout: bool = True) -> set:
    """Every GEMM kernel and layout of the block (AOT compiles each once for every width), and the dropout
    backward."""
    names = {c.name for c in _all_aot() if _family(c).startswith("relu_mlp.") and _dtype_tag(c) == _tag(dtype)
             and c.kernel != "dropout_bwd_kernel" and bool(c.constexprs.get("TMA")) == tma}
    if dropout:
        names |= {c.name for c in _aot("relu_mlp.dropout_bwd_kernel") if _dtype_tag(c) == _tag(dtype)}
    return names


def layer_norm_compiles(width: int, dtype: torch.dtype) -> set:
    """The forward and backward of width's tile, each twice: AOT compiles the residual variant, the table
    also runs the plain one (same configs: the prune functions read the tile only)."""
    import triton

    def tile(c):  # each AOT case is named with the (widest OPT) width of its tile
        return triton.next_power_of_2(int(re.search(r"\[N=(\d+),", c.name).group(1)))

    names = set()
    for c in _all_aot():
        if _family(c).startswith("layer_norm.") and _dtype_tag(c) == _tag(dtype) and \
                tile(c) == triton.next_power_of_2(width):
            names |= {c.name, f"{c.name}#plain"}
    return names


def adamw_compiles(recipes) -> set:
    """recipes: AOT tags, "float32", "bfloat16", "bfloat16,master"; grad_stats with clipping ("clip")."""
    names = {c.name for c in _aot("adamw.adamw_kernel") if c.name.split("[")[1].rstrip("]") in recipes}
    if "clip" in recipes:
        names |= {c.name for c in _aot("adamw.grad_stats_kernel") if "bfloat16" in c.name}
    return names


# --------------------------------------------------------------------------- what each op tunes
@dataclasses.dataclass(frozen=True)
class Tune:
    """One key bucket's autotuning: its configs and the work of one launch (for its time)."""

    configs: int
    flops: float = 0.0
    bytes: float = 0.0


def _attention_tunes(shape, tma, backward) -> dict:
    import triton

    from bench.attention import attention_bytes, flops
    from opt_core.kernels import attention as at

    B, S, H, D = shape
    flags = dict(HEAD_DIM=D, BLOCK_D=at.block_d(D), CAUSAL=True, HAS_KPM=False, HAS_DROPOUT=False,
                 DOT_PRECISION=None, TMA=tma)
    bucket, n = triton.next_power_of_2(S), B * S * H * D * 2
    keys = {("attention.fwd", D, tma, bucket): Tune(len(at.prune_fwd_configs(at.FWD_CONFIGS, {}, **flags)),
                                                    flops(B, H, S, D, "fwd"), attention_bytes(B, H, S, D, 2, "fwd"))}
    if backward:
        half = flops(B, H, S, D, "bwd") / 2  # dK/dV and dQ share the backward's products
        keys[("attention.dkdv", D, tma, bucket)] = Tune(len(at.prune_bwd_dkdv_configs(at.BWD_DKDV_CONFIGS, {}, **flags)),
                                                       half, 6 * n)
        keys[("attention.dq", D, tma, bucket)] = Tune(len(at.prune_bwd_dq_configs(at.BWD_DQ_CONFIGS, {}, **flags)),
                                                     half, 6 * n)
        keys[("attention.pre", D)] = Tune(len(at.prune_bwd_pre_configs(at.BWD_PRE_CONFIGS, {}, **flags)), 0, 2 * n)
    return keys


def _relu_mlp_tunes(tokens, d, tma, backward, persistent: bool = True) -> dict:
    import triton

    from opt_core.kernels import relu_mlp as rm

    def tune(M, N, K):  # on the TMA path the persistent TMA-store configs are candidates (PERSISTENT "auto")
        configs = len(rm.prune_gemm_configs(rm.GEMM_CONFIGS, {"M": M, "N": N}, INPUT_PRECISION="tf32", TMA=tma,
                                            TMA_STORE=tma and persistent))
        return Tune(configs, 2 * M * N * K, 2 * (M * K + K * N + M * N))

    ffn, b = 4 * d, triton.next_power_of_2
    gemms = {"fc1": (tokens, ffn, d), "fc2": (tokens, d, ffn)}
    if backward:
        gemms.update(dh=(tokens, ffn, d), dw2=(d, ffn, tokens), dx=(tokens, d, ffn), dw1=(ffn, d, tokens))
    keys = {(f"relu_mlp.{role}", b(M), b(N), b(K), tma, tma and persistent): tune(M, N, K)
            for role, (M, N, K) in gemms.items()}
    if backward:
        keys[("relu_mlp.dropout_bwd", b(d))] = Tune(len(rm.prune_dropout_bwd_configs(rm.DROPOUT_BWD_CONFIGS,
                                                                                      {"N": d})), 0, 4 * tokens * d)
    return keys


def _layer_norm_tunes(rows, width, residual, backward) -> dict:
    import triton

    from bench.layer_norm import layer_norm_bytes
    from opt_core.kernels import layer_norm as ln

    tile = triton.next_power_of_2(width)
    fwd = Tune(len(ln.prune_fwd_configs(ln.FWD_CONFIGS, {}, BLOCK_N=tile)), 0,
               layer_norm_bytes(rows, width, 2, residual, "fwd"))
    keys = {("layer_norm.fwd", tile, residual): fwd}
    bwd_bytes = layer_norm_bytes(rows, width, 2, residual, "bwd")
    if backward and tile <= ln.MAX_REGISTER_ROW_BWD:
        keys[("layer_norm.bwd", tile, residual)] = Tune(len(ln.prune_bwd_configs(ln.BWD_CONFIGS, {}, BLOCK_N=tile)),
                                                        0, bwd_bytes)
    elif backward:
        keys[("layer_norm.bwd_wide", tile, residual)] = Tune(len(ln.prune_bwd_wide_configs(
            ln.BWD_WIDE_CONFIGS, {}, CHUNK=ln.WIDE_CHUNK)), 0, bwd_bytes)
    return keys


# --------------------------------------------------------------------------- per op: compiles and tunes of its specs
@dataclasses.dataclass
class OpWork:
    compiles: set = dataclasses.field(default_factory=set)
    tunes: dict = dataclasses.field(default_factory=dict)   # key bucket -> Tune


def op_work(op: str, specs: list, target: harness.Target, compiles: bool = True) -> OpWork:
    """What the op's ``specs`` compile (unless ``compiles`` is False: the AOT cases are not built) and tune."""
    work = OpWork()
    for spec in specs:
        backward = "bwd" in spec.mode
        if op == "attention":
            shape = spec.group[0]
            for tma in _tma_variants(spec, target):
                work.compiles |= attention_compiles(shape[3], spec.dtype, tma, target.arch) if compiles else set()
                work.tunes.update(_attention_tunes(shape, tma, backward))
        elif op == "relu_mlp":
            _, M, d, _, _ = spec.group
            for tma in _tma_variants(spec, target):
                work.compiles |= relu_mlp_compiles(spec.dtype, tma) if compiles else set()
                work.tunes.update(_relu_mlp_tunes(M, d, tma, backward or spec.op.startswith("relu_mlp gemm")))
        elif op == "layer_norm":
            residual, rows, N, _, _ = spec.group
            work.compiles |= layer_norm_compiles(N, spec.dtype) if compiles else set()
            work.tunes.update(_layer_norm_tunes(rows, N, residual, backward))
        elif op == "adamw" and compiles:
            work.compiles |= adamw_compiles({"float32", "bfloat16", "bfloat16,master"})
        elif op == "mfu":
            _mfu_work(work, spec, target, compiles)
        for name in spec.providers:
            if name in VARIANT_WORK and target.tma:
                tunes = VARIANT_WORK[name](spec)
                work.tunes.update(tunes)
                if compiles:
                    work.compiles |= _variant_compiles(name, tunes)
    return work


# --------------------------------------------------------------------------- what the A/B providers add
# A variant sets a switch that reaches its kernels as a constexpr or key argument (SPECIALIZE, FUSED_DQ,
# TMA_STORE, PIPELINE, another kernel): each of its key buckets tunes apart, and each config it tunes is
# a compile of its own.  "opt-core-no-tma" is counted by _tma_variants (the pointer kernels' AOT cases).
def _attention_variant_tunes(specialize: Optional[str] = None, deterministic: Optional[bool] = None):
    """The forward's tuning with SPECIALIZE=``specialize``, else the fused-dQ backward's (its dK/dV
    kernel, ``deterministic`` or not, and the store of dQ)."""
    def tunes(spec) -> dict:
        import triton

        from bench.attention import attention_bytes, flops
        from opt_core.kernels import attention as at

        B, S, H, D = spec.group[0]
        flags = dict(HEAD_DIM=D, BLOCK_D=at.block_d(D), CAUSAL=True, TMA=True)
        bucket, n = triton.next_power_of_2(S), B * S * H * D
        if specialize is not None:
            configs = len(at.prune_fwd_configs(at.FWD_CONFIGS, {}, **flags, SPECIALIZE=specialize))
            return {("attention.fwd_kernel", D, specialize, bucket):
                    Tune(configs, flops(B, H, S, D, "fwd"), attention_bytes(B, H, S, D, 2, "fwd"))}
        configs = len(at.prune_bwd_dkdv_configs(at.BWD_DKDV_CONFIGS, {}, **flags, FUSED_DQ=True))
        return {("attention.bwd_dkdv_kernel", D, "fused", deterministic, bucket):
                Tune(configs, flops(B, H, S, D, "bwd"), 20 * n),
                ("attention.bwd_dq_store_kernel", D): Tune(1, 0, 6 * n)}
    return tunes


def _gluon_tunes(persistent: bool):
    """Not autotuned: the Gluon forward's one config per head dim (and grid)."""
    def tunes(spec) -> dict:
        from bench.attention import attention_bytes, flops

        B, S, H, D = spec.group[0]
        return {("attention_gluon.fwd_kernel", D, persistent): Tune(1, flops(B, H, S, D, "fwd"),
                                                                    attention_bytes(B, H, S, D, 2, "fwd"))}
    return tunes


def _relu_mlp_gluon_tunes(spec) -> dict:
    """Not autotuned: one compile per GEMM role of the row (its epilogue and operand layout), bf16 or fp16."""
    from bench.relu_mlp import block_flops, gemm_bytes, gemm_dims

    _, M, d, _, _ = spec.group
    if spec.op == "relu_mlp":
        roles = ("fc1", "fc2") + (("dh", "dW2", "dx", "dW1") if spec.mode == "fwd+bwd" else ())
        share = block_flops(M, d, spec.mode) / len(roles)
        return {(f"relu_mlp_gluon.{'dh' if role == 'dh' else 'gemm'}_kernel", role, str(spec.dtype)): Tune(1, share)
                for role in roles}
    name = spec.op.removeprefix("relu_mlp gemm ")
    rows, cols, inner = gemm_dims(M, d)[name]
    role = name.split(" ")[0]
    return {(f"relu_mlp_gluon.{'dh' if role == 'dh' else 'gemm'}_kernel", role, str(spec.dtype)):
            Tune(1, 2 * rows * cols * inner, gemm_bytes(rows, cols, inner, 2))}


def _gluon_bwd_tunes(deterministic: bool):
    """Not autotuned: the Gluon forward and backward, one config each per head dim (and dQ order)."""
    def tunes(spec) -> dict:
        from bench.attention import flops

        B, S, H, D = spec.group[0]
        backward = {("attention_gluon_bwd.bwd_kernel", D, deterministic):
                    Tune(1, flops(B, H, S, D, "bwd"), 20 * B * S * H * D)}
        return {**_gluon_tunes(persistent=False)(spec), **backward}
    return tunes


def _gluon_variant_tunes(spec) -> dict:
    """"opt-core-gluon" names the Gluon kernels of each op: the attention forward, the MLP's GEMMs."""
    return (_gluon_tunes(persistent=False) if spec.op == "attention" else _relu_mlp_gluon_tunes)(spec)


def _no_persistent_tunes(spec) -> dict:
    _, M, d, _, _ = spec.group
    both = "bwd" in spec.mode or spec.op.startswith("relu_mlp gemm")
    return {("relu_mlp.matmul_kernel",) + k[1:]: t for k, t in _relu_mlp_tunes(M, d, True, both, False).items()
            if k[0] != "relu_mlp.dropout_bwd"}


def _layer_norm_variant_tunes(kind: str):
    def tunes(spec) -> dict:
        import triton

        from bench.layer_norm import layer_norm_bytes
        from opt_core.kernels import layer_norm as ln

        residual, rows, N, _, _ = spec.group
        work = layer_norm_bytes(rows, N, 2, residual, "bwd")
        if kind == "no-pipeline":
            tile = triton.next_power_of_2(N)
            configs = len(ln.prune_bwd_configs(ln.BWD_CONFIGS, {}, BLOCK_N=tile, PIPELINE=False))
            return {("layer_norm.bwd_kernel", tile, residual, False): Tune(configs, 0, work)}
        configs = len(ln.prune_bwd_two_pass_configs(ln.BWD_TWO_PASS_CONFIGS, {}, CHUNK=ln.WIDE_CHUNK))
        return {("layer_norm.bwd_two_pass_kernel", N, residual): Tune(configs, 0, work)}
    return tunes


def _scalar_adamw_tunes(spec) -> dict:
    """Not autotuned: the scalar class's kernel of the row's recipe, one compile."""
    recipe = "float32" if spec.dtype == torch.float32 else \
        "bfloat16,master" if spec.shape.endswith("master-weights") else "bfloat16"
    return {("adamw.adamw_kernel", "scalar", recipe): Tune(1, 0, spec.bytes)}


VARIANT_WORK = {
    "opt-core-ws": _attention_variant_tunes(specialize="on"),
    "opt-core-no-ws": _attention_variant_tunes(specialize="off"),
    "opt-core-fused-dq": _attention_variant_tunes(deterministic=True),
    "opt-core-fused-dq-atomic": _attention_variant_tunes(deterministic=False),
    "opt-core-gluon": _gluon_variant_tunes,
    "opt-core-gluon-persistent": _gluon_tunes(persistent=True),
    "opt-core-gluon-bwd": _gluon_bwd_tunes(deterministic=True),
    "opt-core-gluon-bwd-atomic": _gluon_bwd_tunes(deterministic=False),
    "opt-core-no-persistent": _no_persistent_tunes,
    "opt-core-no-pipeline": _layer_norm_variant_tunes("no-pipeline"),
    "opt-core-two-pass": _layer_norm_variant_tunes("two-pass"),
    "opt-core-scalar": _scalar_adamw_tunes,
}


def _variant_compiles(name: str, tunes: dict) -> set:
    """One compile per config of each key bucket, named "<family>#<variant>:<bucket>:<i>" (their
    seconds are the family's)."""
    return {f"{key[0]}#{name}:{key[1:]}:{i}" for key, tune in tunes.items() for i in range(tune.configs)}


def _tma_variants(spec, target) -> list[bool]:
    tma = target.tma and spec.dtype != torch.float32
    return [tma] + ([False] if tma and "opt-core-no-tma" in spec.providers else [])


def _mfu_work(work: OpWork, spec, target, compiles: bool) -> None:
    """One training step of a preset: its LayerNorms, attention, MLP blocks and the clipped AdamW step."""
    from opt_core.config import OPTConfig

    preset, batch, seq, _ = spec.group
    config = OPTConfig.from_preset(preset)
    d, heads, tokens = config.hidden_size, config.num_heads, batch * seq
    if compiles:
        work.compiles |= layer_norm_compiles(d, torch.bfloat16) | attention_compiles(d // heads, torch.bfloat16,
                                                                                     target.tma, target.arch)
        work.compiles |= relu_mlp_compiles(torch.bfloat16, target.tma) | adamw_compiles({"bfloat16,master", "clip"})
    for residual in (False, True):
        work.tunes.update(_layer_norm_tunes(tokens, d, residual, True))
    work.tunes.update(_attention_tunes((batch, seq, heads, d // heads), target.tma, True))
    work.tunes.update(_relu_mlp_tunes(tokens, d, target.tma, True))


# --------------------------------------------------------------------------- time
def compile_seconds() -> dict[str, float]:
    data = json.loads(COMPILE_SECONDS.read_text())
    return {family: entry["seconds"] for family, entry in data["families"].items()}


def _case_family(name: str) -> str:
    """The kernel family of an AOT case name (as compile_seconds.json keys them), or of a variant's
    compile (named by its family)."""
    base = name.split("#")[0]
    if "." in base:
        return base
    match = next((c for c in _all_aot() if c.name == base), None)
    return _family(match) if match is not None else ""


def compile_time(names, seconds: dict[str, float]) -> float:
    fallback = sum(seconds.values()) / len(seconds)
    return sum(seconds.get(_case_family(n), fallback) for n in names)


def call_seconds(work, gpu: Gpu) -> float:
    """The time of a call doing ``work.flops`` and moving ``work.bytes`` (a Spec or a Tune) at
    RATE_FRACTION of the ceilings."""
    compute = work.flops / (RATE_FRACTION * gpu.gemm_tflops * 1e12)
    memory = work.bytes / (RATE_FRACTION * gpu.copy_gbps * 1e9)
    return max(compute, memory, MIN_CALL_S)


def timing_cost(spec, gpu: Gpu) -> tuple[int, float]:
    """(calls, seconds) of timing one provider of ``spec`` with do_bench, its memory call included."""
    t = call_seconds(spec, gpu)
    calls = ESTIMATE_CALLS + max(1, math.ceil(spec.warmup_ms / 1e3 / t)) + max(1, math.ceil(spec.rep_ms / 1e3 / t)) + 1
    return calls, calls * t + 0.02


def autotune_cost(configs: int, kernel_s: float) -> tuple[int, float]:
    from opt_core.kernels import tuning

    warm, rep = (max(1, math.ceil(ms / 1e3 / kernel_s)) for ms in tuning.TUNE_BUDGET_MS)
    calls = configs * (ESTIMATE_CALLS + warm + rep)
    return calls, calls * kernel_s + 0.01 * configs


def _specs(op: str, target, quick: bool, dtypes, part: str) -> list:
    import importlib

    return importlib.import_module(f"bench.{op}").specs(target, quick, dtypes, part)


def _build_seconds(op: str, specs: list) -> float:
    if op != "mfu":
        return 0.0
    from opt_core import flops
    from opt_core.config import OPTConfig

    return sum(2 * BUILD_S_PER_BILLION * flops.matmul_parameters(OPTConfig.from_preset(s.group[0])) / 1e9 for s in specs)


# --------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class Settings:
    gpu: str = "nvidia-h200"
    cores: int = 16
    quick: bool = False
    dtypes: tuple = (torch.bfloat16,)
    ops: tuple = OPS
    tuned: Optional[dict] = None     # the GPU's tuned table, if there is one


def table_stage(name: str, settings: Settings, tuned_before: set) -> StagePlan:
    """The goal or rest pass: a process per op, its kernels loaded from the cache, its timings, the
    autotuning of key buckets no earlier process tuned (the run's table carries them across)."""
    gpu, target = GPUS[settings.gpu], harness.H200
    stage = StagePlan(name)
    for op in settings.ops:
        specs = _specs(op, target, settings.quick, settings.dtypes, name)
        if not specs:
            continue
        work = op_work(op, specs, target)
        seconds = PROCESS_START_S + CACHE_LOAD_S * len(work.compiles) + _build_seconds(op, specs)
        for spec in specs:
            calls, s = timing_cost(spec, gpu)
            stage.launches += calls * len(spec.providers)
            seconds += s * len(spec.providers)
        for key, tune in work.tunes.items():
            if settings.tuned is None and key not in tuned_before:
                calls, s = autotune_cost(tune.configs, call_seconds(tune, gpu))
                stage.launches += calls
                seconds += s
        tuned_before |= set(work.tunes)
        stage.per_op[op] = seconds
        stage.seconds += seconds
    return stage


def _tuned_compiles(table: dict) -> dict[str, int]:
    """family -> distinct (flags, config) entries of a tuned table: what compiles when nothing tunes."""
    counts: dict[str, set] = collections.defaultdict(set)
    for kernel, data in table.get("kernels", {}).items():
        buckets = [data["key"].index(b) for b in data.get("buckets", [])]
        for key, config in data.get("entries", {}).items():
            flags = tuple(v for i, v in enumerate(key.split("|")) if i not in buckets)
            counts[kernel].add((flags, json.dumps(config, sort_keys=True)))
    return {kernel: len(entries) for kernel, entries in counts.items()}


def warmup_stage(settings: Settings, table_compiles: set, seconds: dict) -> StagePlan:
    from bench import suite

    if settings.tuned is not None:
        counts = _tuned_compiles(settings.tuned)
        fallback = sum(seconds.values()) / len(seconds)
        work_s = sum(n * seconds.get(k, fallback) for k, n in counts.items())
        compiles = sum(counts.values()) + len(adamw_compiles({"float32", "bfloat16", "bfloat16,master", "clip"}))
        note = "a tuned table: only its chosen configs"
    else:
        compiles, work_s, note = len(table_compiles), compile_time(table_compiles, seconds), ""
    processes = sum(suite.warmup_slices(op, settings.cores) for op in settings.ops)
    wall = math.ceil(processes / settings.cores) * PROCESS_START_S + work_s / settings.cores
    return StagePlan("warmup", compiles, 0, wall, note=note)


def _proof_work(stage: StagePlan, op: str, settings: Settings, seconds: dict, fallback: float) -> None:
    """The proof processes of ``op``'s unproven variants, beside the smoke checks (one each)."""
    module = importlib.import_module(f"bench.{op}")
    for variant in harness.unproven_variants(module, harness.H200, settings.quick, settings.dtypes):
        counts = module.proof_compiles(variant)
        stage.compiles += sum(counts.values())
        stage.launches += sum(counts.values())
        stage.per_op[f"{op}~{variant}"] = PROCESS_START_S + sum(n * seconds.get(f, fallback)
                                                                for f, n in counts.items()) + 3.0


def smoke_stage(settings: Settings, seconds: dict) -> StagePlan:
    """Each op once at a small shape, its kernels on their first config: a compile per family, dtype
    (bf16, fp16) and path (TMA descriptors and pointers where a family has both); ops in parallel."""
    stage = StagePlan("smoke")
    fallback = sum(seconds.values()) / len(seconds)
    modules = {"layer_norm": "layer_norm", "attention": "attention", "relu_mlp": "relu_mlp", "adamw": "adamw"}
    for op in settings.ops:
        families = {(_family(c), c.tma) for c in _all_aot() if _family(c).split(".")[0] == modules.get(op)}
        if op == "mfu":  # the test model in fp32: LayerNorm, attention and MLP kernels, pointers only
            families = {(_family(c), False) for c in _all_aot() if _family(c).split(".")[0] in
                        ("layer_norm", "attention", "relu_mlp")}
            dtypes = 1
        else:
            dtypes = 2
        compiles = dtypes * len(families)
        s = PROCESS_START_S + sum(dtypes * seconds.get(f, fallback) for f, _ in families) + 3.0
        stage.compiles += compiles
        stage.launches += compiles
        stage.per_op[op] = s
        _proof_work(stage, op, settings, seconds, fallback)
    stage.seconds = max(stage.per_op.values()) * math.ceil(len(stage.per_op) / settings.cores)
    return stage


def profile_stage(settings: Settings) -> StagePlan:
    from bench import mfu
    from opt_core.config import OPTConfig

    config = OPTConfig.from_preset(mfu.GOAL_PRESET)
    step = mfu.step_flops(config, 8, mfu.SEQ_LEN) / (0.5 * GPUS[settings.gpu].gemm_tflops * 1e12)
    from opt_core import flops

    build = BUILD_S_PER_BILLION * flops.matmul_parameters(config) / 1e9
    return StagePlan("profile", 0, PROFILE_STEPS, PROCESS_START_S + build + PROFILE_STEPS * step + 10.0)


def plan(settings: Settings) -> list[StagePlan]:
    seconds = compile_seconds()
    tuned: set = set()
    goal = table_stage("goal", settings, tuned)
    rest = table_stage("rest", settings, tuned)
    everything: set = set()
    for op in settings.ops:
        specs = _specs(op, harness.H200, settings.quick, settings.dtypes, "all")
        everything |= op_work(op, specs, harness.H200).compiles
    return [smoke_stage(settings, seconds), warmup_stage(settings, everything, seconds), goal,
            profile_stage(settings), rest, StagePlan("plots", 0, 0, PLOTS_S),
            StagePlan("tests", 0, 0, TESTS_FLOOR_S, note="at least this: the tests get all that is left")]


def total(stages: list[StagePlan]) -> tuple[int, int, float]:
    return (sum(s.compiles for s in stages), sum(s.launches for s in stages),
            SETUP_S + sum(s.seconds for s in stages))


def report(stages: list[StagePlan], settings: Settings) -> list[str]:
    lines = [f"{'stage':<9} {'compiles':>8} {'launches':>9} {'seconds':>8}  notes"]
    for s in stages:
        ops = ", ".join(f"{op} {sec:.0f}" for op, sec in s.per_op.items())
        note = "; ".join(x for x in (s.note, f"per op: {ops}" if ops else "") if x)
        lines.append(f"{s.name:<9} {s.compiles:>8} {s.launches:>9} {s.seconds:>8.0f}  {note}")
    compiles, launches, seconds = total(stages)
    lines.append(f"{'setup':<9} {'':>8} {'':>9} {SETUP_S:>8.0f}  install, nvidia-smi, packing")
    lines.append(f"plan: {compiles} compiles, {launches} launches, about {seconds:.0f} s on {settings.gpu} "
                 f"with {settings.cores} cores")
    return lines


# --------------------------------------------------------------------------- measuring compile seconds
def measure(samples: int = 3, arch: int = 90) -> dict:
    """Seconds per cold compile of each kernel family: ``samples`` of its sm_``arch`` AOT cases (first,
    middle, last; bf16 where the family has bf16 cases, no dropout), one at a time, in an empty Triton
    cache."""
    import tempfile

    from opt_core.kernels import aot

    by_family = collections.defaultdict(list)
    for c in _all_aot():
        if arch in c.archs and not c.constexprs.get("HAS_DROPOUT"):
            by_family[_family(c)].append(c)
    families = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # read by triton.compile at each call: every compile is cold
        for family, cases in sorted(by_family.items()):
            cases = [c for c in cases if _dtype_tag(c) == "bf16"] or cases
            picked = [cases[i] for i in sorted({0, len(cases) // 2, len(cases) - 1})][:samples]
            ok = [r["seconds"] for r in (aot.compile_case(c, arch) for c in picked) if not r.get("error")]
            families[family] = {"seconds": round(sum(ok) / len(ok), 2) if ok else None, "samples": len(ok)}
            print(f"{family:<32} {families[family]['seconds']} s ({len(ok)} compiles)", flush=True)
    return {"command": MEASURE_COMMAND, "arch": f"sm_{arch}", "measured_on": f"{os.cpu_count()} CPU cores here",
            "note": "cold compiles, one at a time: triton.compile of kernels/aot_cases.py cases, ptxas included",
            "families": {f: v for f, v in families.items() if v["seconds"] is not None}}


def load_tuned(gpu: str) -> Optional[dict]:
    from opt_core.kernels import tuning

    table = tuning.read_table(tuning.TUNED_DIR / f"{gpu}.json")
    return table if table.get("kernels") else None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="nvidia-h200", choices=sorted(GPUS))
    parser.add_argument("--cores", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--measure", action="store_true", help=f"measure compile seconds into {COMPILE_SECONDS.name}")
    args = parser.parse_args(argv)
    if args.measure:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("bench.plan --measure: unset TRITON_INTERPRET; the interpreter compiles nothing", file=sys.stderr)
            return 2
        COMPILE_SECONDS.write_text(json.dumps(measure(), indent=1) + "\n")
        print(f"wrote {COMPILE_SECONDS}")
        return 0
    settings = Settings(args.gpu, args.cores, args.quick, tuned=load_tuned(args.gpu))
    print("\n".join(report(plan(settings), settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
