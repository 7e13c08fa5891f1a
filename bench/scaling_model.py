"""Step time and MFU of OPT training at scale, on paper: an analytic model.

``python -m bench.scaling_model`` prints (a) the check against the OPT paper's
175B run on 992 A100s, (b) the table for opt-125m ... opt-175b at 8, 64 and
1024 GPUs, (c) what a single-GPU speed-up of our kernels means end to end at
1024 GPUs.  No cluster is here: every number below is a formula over a
measured (or stated) single-GPU rate and link bandwidths.

The model, per optimizer step and per GPU (tp = tensor-parallel degree, dp =
FSDP degree, b = micro-batch in sequences, s = sequence length, d = d_model,
L = layers, N = parameters):

- compute = hardware FLOPs / achieved single-GPU rate.  Model FLOPs per token
  are ``opt_core.flops.flops_per_token`` (6N + 12·L·d·s); with activation
  checkpointing the forward runs twice, ``hfu_flops_per_token`` (8N + 16·L·d·s).
  Tensor parallelism splits every matmul, so a GPU does 1/tp of its group's work.
- TP collectives (Megatron-LM, Shoeybi et al. 2019, arXiv 1909.08053 §3): two
  all-reduces of the b·s·d activations per layer in the forward (after the
  attention output projection and after fc2), two in the backward (the input
  gradients of qkv and fc1), two more in the recomputed forward, plus one each
  for the vocab-parallel embedding (forward) and LM head (backward).  On the
  critical path: nothing computes while they run.  Sequence parallelism
  (Korthikanti et al. 2022, arXiv 2205.05198 §4.2.2) turns each all-reduce into
  a reduce-scatter + all-gather of the same ring volume; its extra backward
  all-gathers are overlapped with compute there and not counted here.
- FSDP collectives (fairscale / PyTorch FSDP, Zhao et al. 2023, arXiv
  2304.11277 §3): per micro-batch an all-gather of the (TP-sharded) parameters
  before the forward, again before the backward when parameters are resharded
  after the forward (FULL_SHARD / ZeRO-3; OPT ran ``--no-reshard-after-forward``,
  ZeRO-2, and skipped it), and a reduce-scatter of the gradients in the
  reduction dtype.  Each layer is one FSDP unit, prefetched one unit ahead, so
  the traffic hides behind the phase's compute; what shows is the first unit's
  all-gather (the embedding: nothing runs before it), the last unit's
  reduce-scatter (the embedding again: its gradient completes last) and any
  traffic beyond the phase's compute.
- optimizer = the AdamW step over this GPU's 1/(tp·dp) shard, memory-bound:
  bytes per parameter / achieved HBM bandwidth.  Not overlapped.
- memory = FSDP-sharded parameters, gradients and optimizer state, the
  gathered parameters in use, activations (Korthikanti et al. 2022 §4) and the
  fp32 logits; "fits" when under 90% of HBM.

Ring collectives (the nccl-tests convention, S = the full gathered or reduced
buffer): all-gather and reduce-scatter move S·(n-1)/n bytes per GPU, an
all-reduce (= reduce-scatter + all-gather) 2·S·(n-1)/n, at the group's bus
bandwidth per GPU, plus NCCL's own latency model for the ring/Simple protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Optional

from opt_core import flops
from opt_core.config import OPTConfig

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9

# NCCL's cost model for ring / Simple (src/graph/tuning.cc, NCCL 2.x): a base latency per
# collective plus one hop latency per ring step; steps that cross nodes pay the network's.
NCCL_BASE_LATENCY_S = 8.4e-6
NCCL_HOP_NVLINK_S = 3.4e-6
NCCL_HOP_NET_S = 9.6e-6

USABLE_HBM_FRACTION = 0.9  # assumption: ~10% goes to the CUDA context, NCCL buffers and allocator fragmentation

# Paper batch sizes (OPT_SPEC.md §1: paper Table 1; "M" = 2^20 tokens; 2048 tokens per sequence).
PAPER_BATCH_SEQS = {
    "opt-125m": 256, "opt-350m": 256, "opt-1.3b": 512, "opt-2.7b": 512, "opt-6.7b": 1024,
    "opt-13b": 2048, "opt-30b": 2048, "opt-66b": 1024, "opt-175b": 1024,
}
SEQ_LEN = 2048


# --------------------------------------------------------------------------- hardware
@dataclasses.dataclass(frozen=True)
class Hardware:
    """One GPU type in its node.  Bandwidths are per GPU and per direction, as the ring formula wants."""

    name: str
    key: str                     # the name in opt_core.flops.PEAK_FLOPS and in a bench result's device name
    peak_flops: float            # dense fp16/bf16 tensor-core peak, FLOP/s
    achieved_flops: float        # whole-training-step rate on one GPU, FLOP/s (measured, or stated with a why)
    achieved_source: str
    hbm_bytes: float
    hbm_bw: float                # data-sheet B/s
    nvlink_bw: float             # intra-node, per GPU per direction, B/s
    ib_bw: float                 # inter-node NIC bandwidth per GPU per direction, B/s (one NIC per GPU)
    gpus_per_node: int = 8
    nvlink_efficiency: float = 0.78   # NCCL bus bandwidth / wire speed, large messages
    ib_efficiency: float = 0.86
    hbm_efficiency: float = 0.85      # a streaming kernel's share of HBM bandwidth (PERF_ANCHORS §3a uses 85%)

    def with_(self, **kw) -> "Hardware":
        return dataclasses.replace(self, **kw)


# A100-80GB nodes as OPT's: 8 GPUs on NVLink3 (600 GB/s both directions = 300 per direction) and
# one 200 Gb/s HDR InfiniBand NIC per GPU (8 per node, as in DGX A100 and Azure's NDm A100 v4; the
# paper names no network, so this is an assumption).  NVLink efficiency 235/300: the measured
# 8-GPU all-reduce bus bandwidth (PERF_ANCHORS §6) and the cap NCCL's tuning model puts on A100s.
# IB efficiency 0.86: two-node A100 all-reduces reach 85-91 GB/s of a 100 GB/s NIC budget
# (nccl-tests issues #119, #100, #175).  Achieved rate 200 TFLOP/s (64% of peak): the best
# whole-model rate measured on A100s in PERF_ANCHORS §4c (MPT-7B, 8 GPUs, FSDP, FlashAttention),
# between the ~60% whole-model ceiling and the 271 TFLOP/s GEMM ceiling (MAMF, §5).
A100_80GB = Hardware(
    name="A100-SXM4-80GB", key="A100", peak_flops=flops.PEAK_FLOPS["A100"], achieved_flops=200e12,
    achieved_source="assumed: MPT-7B's measured 200 TFLOP/s per A100 (PERF_ANCHORS §4c)",
    hbm_bytes=80 * GB, hbm_bw=2039 * GB, nvlink_bw=300 * GB, ib_bw=200e9 / 8,
    nvlink_efficiency=235 / 300, ib_efficiency=0.86,
)
# H100/H200 SXM nodes: NVLink4 900 GB/s both directions (450 per direction), 8 GPUs, one 400 Gb/s
# NDR NIC per GPU (the typical pod of PERF_ANCHORS §6).  NVLink efficiency 0.80: 8-GPU ring
# all-gather / reduce-scatter at ~361 GB/s bus bandwidth (§6).  Achieved rate 459 TFLOP/s: MPT-7B
# on 8 H100s (§4c); the H200 has the same compute die and clocks (MAMF "H200 is the same", §5).
H100_SXM = Hardware(
    name="H100-SXM-80GB", key="H100", peak_flops=flops.PEAK_FLOPS["H100"], achieved_flops=459e12,
    achieved_source="assumed: MPT-7B's measured 459 TFLOP/s per H100 (PERF_ANCHORS §4c)",
    hbm_bytes=80 * GB, hbm_bw=3350 * GB, nvlink_bw=450 * GB, ib_bw=400e9 / 8,
    nvlink_efficiency=0.80, ib_efficiency=0.86,
)
H200_SXM = H100_SXM.with_(name="H200-SXM-141GB", key="H200", peak_flops=flops.PEAK_FLOPS["H200"],
                          achieved_source="assumed: as the H100 (same die; PERF_ANCHORS §4c, §5)",
                          hbm_bytes=141 * GB, hbm_bw=4800 * GB)
HARDWARE = {"a100": A100_80GB, "h100": H100_SXM, "h200": H200_SXM}


# --------------------------------------------------------------------------- precision recipes
@dataclasses.dataclass(frozen=True)
class Recipe:
    """Bytes per parameter (or activation element) of a precision recipe."""

    name: str
    param: int          # the parameters FSDP gathers (and the all-gather's dtype)
    grad: int
    state: int          # optimizer state kept per parameter, sharded
    step: int           # HBM bytes one AdamW step moves per parameter
    activation: int


RECIPES = {
    # OPT's "memory-efficient fp16" (OPT_SPEC §3): fp16 params and grads, fp32 m and v, no master
    # copy.  Step: read p g m v (2+2+4+4), write p m v (2+4+4) = 22 B (bench/adamw.py), plus the
    # gradient-norm statistics pass for clipping, which reads the fp16 grads once more (+2).
    "fp16": Recipe("fp16", param=2, grad=2, state=8, step=22 + 2, activation=2),
    # bf16 weights with fp32 master weights: state = master + m + v; our kernel moves 30 B/param
    # (bench/adamw.py), +2 for the gradient-norm pass.
    "bf16": Recipe("bf16", param=2, grad=2, state=12, step=30 + 2, activation=2),
    # plain fp32: read p g m v, write p m v = 28 B (PERF_ANCHORS §3a), +4 for the norm pass.
    "fp32": Recipe("fp32", param=4, grad=4, state=8, step=28 + 4, activation=4),
}


# --------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class Layout:
    """One training step over tp x dp GPUs (TP ranks adjacent: inside a node when tp <= GPUs per node)."""

    tp: int
    dp: int
    micro_batch: int                      # sequences per GPU per forward/backward
    global_batch: int                     # sequences per optimizer step
    seq_len: int = SEQ_LEN
    activation_checkpointing: bool = True
    sequence_parallel: bool = False
    reshard_after_forward: bool = True    # FSDP FULL_SHARD; False = ZeRO-2 (OPT's --no-reshard-after-forward)
    distribute_checkpoints: bool = False  # OPT's --distribute-checkpointed-activations: saved inputs split over TP
    flash_attention: bool = True          # the s x s scores are never stored (our attention kernel)
    recipe: str = "fp16"
    reduce_bytes: Optional[int] = None    # gradient reduce-scatter dtype; None = the gradients' own

    def __post_init__(self):
        if min(self.tp, self.dp, self.micro_batch, self.global_batch) < 1:
            raise ValueError(f"tp, dp, micro_batch and global_batch must be >= 1: {self}")
        if self.global_batch % (self.dp * self.micro_batch):
            raise ValueError(f"global batch {self.global_batch} is not a multiple of dp x micro_batch "
                             f"= {self.dp} x {self.micro_batch}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {sorted(RECIPES)}")

    @property
    def gpus(self) -> int:
        return self.tp * self.dp

    @property
    def grad_accumulation(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)


# --------------------------------------------------------------------------- collectives
def ring_time(nbytes: float, n: int, bus_bw: float, op: str, nodes: int = 1) -> float:
    """Seconds for a ring collective on a buffer of ``nbytes`` (the full gathered/reduced size) over n GPUs.

    all-gather / reduce-scatter: every GPU sends and receives nbytes·(n-1)/n over n-1 steps;
    all-reduce = reduce-scatter + all-gather: 2·nbytes·(n-1)/n over 2(n-1) steps.  Latency: NCCL's
    base + one hop per step, network hops for the steps that cross nodes (nodes-1 per pass).
    """
    if n <= 1:
        return 0.0
    passes = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2}[op]
    steps, net_steps = passes * (n - 1), passes * (nodes - 1)
    latency = NCCL_BASE_LATENCY_S + (steps - net_steps) * NCCL_HOP_NVLINK_S + net_steps * NCCL_HOP_NET_S
    return passes * nbytes * (n - 1) / n / bus_bw + latency


def group_bus_bw(hw: Hardware, members_per_node: int, nodes: int) -> float:
    """Achieved bus bandwidth per GPU of a ring group with ``members_per_node`` GPUs in each of ``nodes`` nodes.

    Inside one node: NVLink.  Across nodes NCCL runs one ring per NIC; a group with k members per
    node leaves each node through k NICs (one per GPU, the other NICs serve the node's other
    groups), so its bottleneck per GPU is min(NVLink, k x NIC bandwidth per GPU).
    """
    nvlink = hw.nvlink_bw * hw.nvlink_efficiency
    if nodes <= 1:
        return nvlink
    return min(nvlink, members_per_node * hw.ib_bw * hw.ib_efficiency)


def tp_group(hw: Hardware, layout: Layout) -> tuple[int, int]:
    """(members per node, nodes) of a TP group: adjacent ranks, so inside a node when tp <= GPUs per node."""
    per_node = min(layout.tp, hw.gpus_per_node)
    return per_node, math.ceil(layout.tp / per_node)


def dp_group(hw: Hardware, layout: Layout) -> tuple[int, int]:
    """(members per node, nodes) of an FSDP group: every tp-th rank, so gpus_per_node / tp of it per node."""
    per_node = max(1, hw.gpus_per_node // layout.tp)
    return min(per_node, layout.dp), math.ceil(layout.dp / per_node)


# --------------------------------------------------------------------------- memory
def embedding_parameters(config: OPTConfig) -> int:
    """The root FSDP unit: token embedding (tied LM head), positions, 350M's projections, final LayerNorm."""
    d, e = config.hidden_size, config.word_embed_proj_dim
    n = config.vocab_size * e + (config.max_position_embeddings + 2) * d
    if e != d:
        n += 2 * d * e
    return n + (2 * d if config.has_final_layer_norm else 0)


def layer_parameters(config: OPTConfig) -> float:
    return (config.num_parameters() - embedding_parameters(config)) / config.num_layers


def activation_bytes_per_layer(config: OPTConfig, layout: Layout) -> float:
    """Activations one layer stores for its backward (Korthikanti et al. 2022, arXiv 2205.05198, §4.1-4.2.2).

    16-bit activations, 1-byte dropout masks: s·b·h·(34 + 5·a·s/h) bytes without parallelism, of
    which the 5·a·s/h term is the s x s softmax, its dropout mask and output (gone with a flash
    kernel).  TP splits 24 of the 34 (the 10 left are LayerNorm inputs, dropout masks and the
    inputs of qkv and fc1, replicated); sequence parallelism splits them all.
    """
    s, b, h, a, t = layout.seq_len, layout.micro_batch, config.hidden_size, config.num_heads, layout.tp
    scores = 0.0 if layout.flash_attention else 5 * a * s / (h * t)
    per_token = (34 / t if layout.sequence_parallel else 10 + 24 / t) + scores
    return s * b * h * per_token * RECIPES[layout.recipe].activation / 2


def memory_bytes(config: OPTConfig, layout: Layout) -> dict[str, float]:
    """Peak memory per GPU, by part."""
    r = RECIPES[layout.recipe]
    t, shards = layout.tp, layout.tp * layout.dp
    n = config.num_parameters()                     # TP splits it (replicated biases/LayerNorms: ignored)
    emb, layer = embedding_parameters(config) / t, layer_parameters(config) / t
    if layout.dp == 1:                              # nothing to gather: the shards are the whole (TP) model
        gathered = unit_grads = 0.0
    elif layout.reshard_after_forward:              # the root unit stays gathered, + the unit in use + prefetched
        gathered, unit_grads = emb + 2 * layer, 2 * layer
    else:                                           # ZeRO-2: every unit stays gathered from forward to backward
        gathered, unit_grads = n / t, 2 * layer
    s, b = layout.seq_len, layout.micro_batch
    layer_act = activation_bytes_per_layer(config, layout)
    if layout.activation_checkpointing:
        # each layer keeps its input; the layer being recomputed holds all of its activations
        split = t if (layout.sequence_parallel or layout.distribute_checkpoints) else 1
        acts = config.num_layers * s * b * config.hidden_size * r.activation / split + layer_act
    else:
        acts = config.num_layers * layer_act
    return {
        "sharded params+grads+optimizer": n / shards * (r.param + r.grad + r.state),
        "gathered params": gathered * r.param,
        "unsharded grads (2 units)": unit_grads * r.grad,
        "activations": acts,
        # fp32 logits for the loss, vocab-parallel (Korthikanti et al. 2022 §4.3: 4·s·b·v/t)
        "logits": 4 * s * b * config.vocab_size / t,
    }


# --------------------------------------------------------------------------- the step
@dataclasses.dataclass
class StepResult:
    config_name: str
    hardware: Hardware
    layout: Layout
    compute_s: float
    tp_comm_s: float
    fsdp_comm_s: float          # total FSDP traffic time (mostly hidden)
    fsdp_exposed_s: float
    optimizer_s: float
    tp_bytes: float             # sent per GPU per step
    fsdp_bytes: float
    model_flops_per_gpu: float  # per step
    hw_flops_per_gpu: float
    memory: dict[str, float]

    @property
    def step_s(self) -> float:
        return self.compute_s + self.tp_comm_s + self.fsdp_exposed_s + self.optimizer_s

    @property
    def tokens_per_s(self) -> float:
        return self.layout.global_batch * self.layout.seq_len / self.step_s

    @property
    def model_tflops_per_gpu(self) -> float:
        return self.model_flops_per_gpu / self.step_s / 1e12

    @property
    def hw_tflops_per_gpu(self) -> float:
        return self.hw_flops_per_gpu / self.step_s / 1e12

    @property
    def mfu(self) -> float:
        return self.model_flops_per_gpu / self.step_s / self.hardware.peak_flops

    @property
    def hfu(self) -> float:
        return self.hw_flops_per_gpu / self.step_s / self.hardware.peak_flops

    @property
    def memory_gb(self) -> float:
        return sum(self.memory.values()) / GB

    @property
    def fits(self) -> bool:
        return sum(self.memory.values()) <= USABLE_HBM_FRACTION * self.hardware.hbm_bytes

    @property
    def terms(self) -> dict[str, float]:
        return {"compute": self.compute_s, "TP comm": self.tp_comm_s, "FSDP exposed": self.fsdp_exposed_s,
                "optimizer": self.optimizer_s}

    @property
    def dominant(self) -> str:
        """The busiest resource.  FSDP traffic runs beside the compute, so it counts in full here: it
        dominates when it outlasts the compute (and TP time) that hides it."""
        busy = {"compute": self.compute_s, "TP comm": self.tp_comm_s, "FSDP traffic": self.fsdp_comm_s,
                "optimizer": self.optimizer_s}
        return max(busy.items(), key=lambda kv: kv[1])[0]


def step(config: OPTConfig, hw: Hardware, layout: Layout, name: str = "") -> StepResult:
    r = RECIPES[layout.recipe]
    t, dp, s, b = layout.tp, layout.dp, layout.seq_len, layout.micro_batch
    micro_batches = layout.grad_accumulation

    # Compute.  Each TP group trains on global_batch/dp sequences per step; each GPU does 1/tp of it.
    tokens_per_gpu = layout.global_batch * s / dp / t
    model_flops = flops.flops_per_token(config, s) * tokens_per_gpu
    hw_flops = (flops.hfu_flops_per_token(config, s) if layout.activation_checkpointing
                else flops.flops_per_token(config, s)) * tokens_per_gpu
    compute = hw_flops / hw.achieved_flops
    forward = model_flops / 3 / hw.achieved_flops    # forward 2 of the 6 FLOPs per parameter and token
    backward = compute - forward                       # backward 4 of 6, plus the recomputed forward

    # TP: all-reduces (or RS + AG with sequence parallelism: the same ring volume) of the b·s·d
    # activations of one micro-batch: 2 per layer forward, 2 backward, 2 in the recomputed forward;
    # 1 for the embedding (forward) and 1 for the LM head's input gradient (backward).
    act = b * s * config.hidden_size * r.activation
    per_node, nodes = tp_group(hw, layout)
    one_ar = ring_time(act, t, group_bus_bw(hw, per_node, nodes), "all_reduce", nodes)
    L = config.num_layers
    n_fwd, n_bwd = 2 * L + 1, 2 * L + 1 + (2 * L if layout.activation_checkpointing else 0)
    tp_fwd, tp_bwd = n_fwd * one_ar, n_bwd * one_ar
    tp_bytes = (n_fwd + n_bwd) * 2 * act * (t - 1) / t     # all-reduce: 2·S·(t-1)/t sent per GPU

    # FSDP over the dp group, per micro-batch: all-gather of the parameters (again in the backward
    # when resharded after the forward), reduce-scatter of the gradients.  One unit per layer plus
    # the root (embedding) unit; the TP shard of each is what a GPU gathers.
    per_node, nodes = dp_group(hw, layout)
    bw = group_bus_bw(hw, per_node, nodes)
    grad_bytes = layout.reduce_bytes or r.grad
    emb, layer = embedding_parameters(config) / t, layer_parameters(config) / t

    def ag(params):
        return ring_time(params * r.param, dp, bw, "all_gather", nodes)

    def rs(params):
        return ring_time(params * grad_bytes, dp, bw, "reduce_scatter", nodes)

    ag_all, rs_all = ag(emb) + L * ag(layer), rs(emb) + L * rs(layer)
    fsdp_fwd = ag_all
    fsdp_bwd = rs_all + (ag_all if layout.reshard_after_forward else 0.0)
    # The first all-gather (root unit) and the last reduce-scatter (root unit) have nothing to hide
    # behind; the rest hides behind its phase's compute and TP time (TP runs on NVLink, FSDP on its own
    # ring: IB once dp spans nodes; when both are inside one node they share NVLink, not modelled).
    fwd_window = forward / micro_batches + tp_fwd
    bwd_window = backward / micro_batches + tp_bwd
    exposed = ag(emb) + rs(emb) + max(0.0, fsdp_fwd - ag(emb) - fwd_window) \
        + max(0.0, fsdp_bwd - rs(emb) - bwd_window)
    gathers = 2 if layout.reshard_after_forward else 1
    fsdp_bytes = (gathers * r.param + grad_bytes) * (emb + L * layer) * (dp - 1) / dp
    if dp == 1:
        fsdp_fwd = fsdp_bwd = exposed = 0.0

    optimizer = config.num_parameters() / (t * dp) * r.step / (hw.hbm_bw * hw.hbm_efficiency)

    return StepResult(
        config_name=name, hardware=hw, layout=layout, compute_s=compute,
        tp_comm_s=micro_batches * (tp_fwd + tp_bwd), fsdp_comm_s=micro_batches * (fsdp_fwd + fsdp_bwd),
        fsdp_exposed_s=micro_batches * exposed, optimizer_s=optimizer, tp_bytes=micro_batches * tp_bytes,
        fsdp_bytes=micro_batches * fsdp_bytes, model_flops_per_gpu=model_flops,
        hw_flops_per_gpu=hw_flops, memory=memory_bytes(config, layout),
    )


# --------------------------------------------------------------------------- layout choice
def candidate_layouts(config: OPTConfig, hw: Hardware, gpus: int, global_batch: int,
                      recipe: str = "fp16") -> list[Layout]:
    """tp in 1, 2, 4, 8 inside a node (heads divisible), dp the rest (dividing the global batch: a GPU
    holds whole sequences), every power-of-two micro-batch, checkpointing on/off, FULL_SHARD or ZeRO-2;
    sequence parallelism whenever tp > 1 (the same ring volume, less memory)."""
    out = []
    for tp in (1, 2, 4, 8):
        if tp > hw.gpus_per_node or gpus % tp or config.num_heads % tp:
            continue
        dp = gpus // tp
        if global_batch % dp:
            continue
        per_rank = global_batch // dp
        micro = [m for m in (2 ** i for i in range(per_rank.bit_length())) if per_rank % m == 0]
        for mb in micro:
            for ckpt in (False, True):
                for reshard in (True, False):
                    out.append(Layout(tp=tp, dp=dp, micro_batch=mb, global_batch=global_batch,
                                      activation_checkpointing=ckpt, sequence_parallel=tp > 1,
                                      reshard_after_forward=reshard, recipe=recipe))
    return out


def best_step(config: OPTConfig, hw: Hardware, gpus: int, global_batch: int, recipe: str = "fp16",
              name: str = "") -> Optional[StepResult]:
    """The fastest layout that fits in memory; if none fits, the one that needs the least memory."""
    results = [step(config, hw, lay, name) for lay in candidate_layouts(config, hw, gpus, global_batch, recipe)]
    if not results:
        return None
    fitting = [r for r in results if r.fits]
    if fitting:
        return min(fitting, key=lambda r: r.step_s)
    return min(results, key=lambda r: r.memory_gb)


# --------------------------------------------------------------------------- the paper check
# OPT-175B as trained (OPT_SPEC §3): 992 A100-80GB, TP 8 (Megatron), FSDP over DP 124 with
# --no-reshard-after-forward, 8 sequences of 2048 per GPU and no gradient accumulation (global
# batch 992 sequences = 2,031,616 tokens, not 2^21), activation checkpointing on every layer with
# --distribute-checkpointed-activations, fp16 "memory-efficient" recipe, Megatron's fused softmax
# (the s x s scores are stored: no flash attention in 2021), no sequence parallelism, and fp16
# gradient reduction (metaseq's default fp32_reduce_scatter=False; assumed).
PAPER_LAYOUT = Layout(tp=8, dp=124, micro_batch=8, global_batch=124 * 8, activation_checkpointing=True,
                      sequence_parallel=False, reshard_after_forward=False, distribute_checkpoints=True,
                      flash_attention=False, recipe="fp16")
PAPER_HFU_TFLOPS = 147.0    # P §2.4 "up to 147 TFLOP/s per GPU": recompute-inclusive (OPT_SPEC §8)
PAPER_MFU = 0.35            # the same run under 6N + 12·L·d·s (OPT_SPEC §8, derived: ~110 TFLOP/s)
PAPER_DAYS_1024 = 33        # CF: ~33 days on 1024 A100s for 300B tokens, assuming no failures


def paper_check(hw: Hardware = A100_80GB) -> StepResult:
    return step(OPTConfig.from_preset("opt-175b"), hw, PAPER_LAYOUT, "opt-175b")


# --------------------------------------------------------------------------- measured rates
@dataclasses.dataclass
class Measured:
    flops: float            # achieved FLOP/s
    source: str
    gain: Optional[float]   # our stack's single-GPU speed-up over its PyTorch peer, when the file has it


def measured_rate(path: Path, provider: str = "opt-core") -> Measured:
    """The achieved single-GPU rate from a ``python -m bench`` results JSON.

    Preference: the whole training step (bench/mfu.py, op ``train_step``: model FLOPs / step time,
    the fastest size), then the ReLU-MLP block forward+backward, then the run's bf16 GEMM ceiling.
    """
    data = json.loads(Path(path).read_text())
    env, rows = data.get("environment", {}), data.get("rows", [])
    ok = [r for r in rows if r.get("provider") == provider and not r.get("error")
          and isinstance(r.get("tflops"), (int, float)) and math.isfinite(r["tflops"]) and r["tflops"] > 0]
    device = env.get("device", "?")
    for op, mode in (("train_step", None), ("relu_mlp", "fwd+bwd")):
        hits = [r for r in ok if r["op"] == op and (mode is None or r.get("mode") == mode)]
        if hits:
            best = max(hits, key=lambda r: r["tflops"])
            gain = best.get("speedup_vs_baseline")
            return Measured(best["tflops"] * 1e12,
                            f"{Path(path).name}: {op} {best['shape']} {provider} on {device}",
                            gain if isinstance(gain, (int, float)) and math.isfinite(gain) else None)
    if env.get("gemm_tflops"):
        return Measured(env["gemm_tflops"] * 1e12, f"{Path(path).name}: GEMM ceiling on {device}", None)
    raise ValueError(f"{path}: no usable rate (no {provider} train_step/relu_mlp row, no gemm_tflops)")


def find_results(hw: Hardware, folder: Path = ROOT / "bench" / "results") -> Optional[Path]:
    """The newest results JSON measured on this GPU type, if any (file names start with the date)."""
    for path in sorted(folder.glob("*.json"), reverse=True):
        try:
            device = json.loads(path.read_text()).get("environment", {}).get("device", "")
        except (OSError, ValueError):
            continue
        if hw.key.upper() in device.upper():
            return path
    return None


# --------------------------------------------------------------------------- printing
def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def print_paper_check(hw: Hardware) -> StepResult:
    r = paper_check(hw)
    lay = r.layout
    print("== (a) OPT-175B on 992 A100s: the model against the paper")
    print(f"layout: tp {lay.tp} (NVLink) x dp {lay.dp} (FSDP over IB, no reshard after forward), "
          f"{lay.micro_batch} seqs x {lay.seq_len} per GPU, global batch {lay.global_batch * lay.seq_len:,} "
          f"tokens, activation checkpointing, fp16 (memory-efficient), Megatron softmax (no flash attention)")
    print(f"hardware: {hw.name}: peak {hw.peak_flops / 1e12:.0f} TFLOP/s, achieved {hw.achieved_flops / 1e12:.0f} "
          f"({hw.achieved_source}); NVLink {hw.nvlink_bw / GB:.0f} GB/s/dir x {hw.nvlink_efficiency:.2f}, "
          f"IB {hw.ib_bw * 8 / GB:.0f} Gb/s per GPU x {hw.ib_efficiency:.2f}, HBM {hw.hbm_bw / GB:.0f} GB/s "
          f"x {hw.hbm_efficiency:.2f}")
    d = OPTConfig.from_preset("opt-175b").hidden_size
    act = lay.micro_batch * lay.seq_len * d * RECIPES[lay.recipe].activation
    print(f"per GPU per step: TP {r.tp_bytes / GB:.0f} GB sent (6 all-reduces per layer + 2, of b·s·d·2 B = "
          f"{act / 1e6:.0f} MB, 2·S·(t-1)/t each); FSDP {r.fsdp_bytes / GB:.0f} GB sent (all-gather of N/tp "
          f"fp16 params + reduce-scatter of fp16 grads, S·(dp-1)/dp each)")
    print(f"step {r.step_s:.2f} s = compute {r.compute_s:.2f} + TP {r.tp_comm_s:.2f} + FSDP exposed "
          f"{r.fsdp_exposed_s:.3f} (of {r.fsdp_comm_s:.2f} moved) + optimizer {r.optimizer_s:.4f}")
    print(f"memory per GPU {r.memory_gb:.1f} GB of {hw.hbm_bytes / GB:.0f} ("
          + ", ".join(f"{k} {_gb(v)}" for k, v in r.memory.items()) + f"): fits={r.fits}")
    days = 300e9 / r.tokens_per_s / 86400
    print("| quantity | model | paper | model / paper |")
    print("|---|---|---|---|")
    print(f"| TFLOP/s per GPU, recompute included (HFU count) | {r.hw_tflops_per_gpu:.0f} | {PAPER_HFU_TFLOPS:.0f} "
          f"(P §2.4) | {r.hw_tflops_per_gpu / PAPER_HFU_TFLOPS:.2f} |")
    print(f"| MFU, 6N + 12·L·d·s | {100 * r.mfu:.1f}% | ~{100 * PAPER_MFU:.0f}% (OPT_SPEC §8, derived) | "
          f"{r.mfu / PAPER_MFU:.2f} |")
    print(f"| days for 300B tokens (992 GPUs; paper: 1024) | {days:.1f} | ~{PAPER_DAYS_1024} (CF, no failures) | "
          f"{days / (PAPER_DAYS_1024 * 1024 / 992):.2f} (per GPU) |")
    # The rate that reproduces the paper: its step time minus what the model adds beyond compute.
    implied = r.hw_flops_per_gpu / (r.hw_flops_per_gpu / (PAPER_HFU_TFLOPS * 1e12) - (r.step_s - r.compute_s))
    print("sensitivity to the achieved single-GPU rate (the one input the paper does not give):")
    for rate, why in ((implied, "what the paper's 147 implies"), (A100_80GB.achieved_flops, "the preset"),
                      (271e12, "GEMM ceiling, MAMF")):
        x = paper_check(hw.with_(achieved_flops=rate))
        print(f"  {rate / 1e12:.0f} TFLOP/s ({why}): step {x.step_s:.1f} s, {x.hw_tflops_per_gpu:.0f} TFLOP/s "
              f"HFU-count ({x.hw_tflops_per_gpu / PAPER_HFU_TFLOPS:.2f}x paper), MFU {100 * x.mfu:.1f}%")
    print("not modelled (why the model runs faster than the paper): collectives slowing the compute they "
          "overlap (SMs, HBM), stragglers and step-to-step jitter over 992 GPUs, kernel-launch and Python "
          "overhead, the loss-scaler's skipped steps, data loading, TP's small messages below the bus rate.")
    return r


def print_table(hw: Hardware, gpu_counts: list[int], recipe: str) -> dict[tuple[str, int], StepResult]:
    print(f"\n== (b) opt-125m ... opt-175b on {hw.name} ({hw.achieved_flops / 1e12:.0f} TFLOP/s achieved, "
          f"{recipe} recipe, paper batch sizes, seq {SEQ_LEN}; fastest layout that fits)")
    print("shares: of the step time, FSDP = its exposed part; dominant: the busiest resource, FSDP traffic "
          "counted in full (it runs beside the compute and dominates once it outlasts it)")
    print("| model | GPUs | tp x dp | mb x accum | ckpt | reshard | step s | tokens/s | TFLOP/s/GPU | MFU | HFU | "
          "compute/TP/FSDP/opt % | GB/GPU | fits | dominant |")
    print("|" + "---|" * 15)
    out = {}
    for name, seqs in PAPER_BATCH_SEQS.items():
        config = OPTConfig.from_preset(name)
        for gpus in gpu_counts:
            r = best_step(config, hw, gpus, seqs, recipe, name)
            if r is None:
                print(f"| {name} | {gpus} | no layout: batch {seqs} seqs < GPUs/8 or heads not divisible | "
                      + "| " * 12)
                continue
            out[(name, gpus)] = r
            lay = r.layout
            shares = "/".join(f"{100 * v / r.step_s:.0f}" for v in r.terms.values())
            print(f"| {name} | {gpus} | {lay.tp} x {lay.dp} | {lay.micro_batch} x {lay.grad_accumulation} | "
                  f"{'on' if lay.activation_checkpointing else 'off'} | "
                  f"{'yes' if lay.reshard_after_forward else 'no'} | {r.step_s:.3f} | {r.tokens_per_s:,.0f} | "
                  f"{r.model_tflops_per_gpu:.0f} | {100 * r.mfu:.1f}% | {100 * r.hfu:.1f}% | {shares} | "
                  f"{r.memory_gb:.1f} | {'yes' if r.fits else 'NO'} | {r.dominant} |")
    return out


def print_gains(table: dict[tuple[str, int], StepResult], gpus: int, gains: list[float],
                measured: Optional[Measured], paper: Optional[StepResult]) -> None:
    if measured is not None and measured.gain and measured.gain not in gains:
        gains = sorted(gains + [round(measured.gain, 3)])
    print(f"\n== (c) a single-GPU speed-up g of the whole layer compute, end to end at {gpus} GPUs")
    print("Amdahl through what does not speed up: TP collectives, exposed FSDP traffic (which grows as the "
          "compute hiding it shrinks), the optimizer.  Columns g=...: the best layout re-chosen at the faster "
          "rate; 'held': the layout of table (b) kept.  The as-trained 175B run keeps its layout.")
    cols = " | ".join(f"g={g:g}" for g in gains)
    print(f"| model | compute share | {cols} | g=1.2 held |")
    print("|" + "---|" * (3 + len(gains)))
    rows = [(name, r) for (name, n), r in table.items() if n == gpus]
    if paper is not None:
        rows.append(("opt-175b as trained (992 A100)", paper))
    for name, r in rows:
        config = OPTConfig.from_preset("opt-175b" if r is paper else name)
        lay, base_hw = r.layout, r.hardware
        cells = []
        for g in gains:
            fast = base_hw.with_(achieved_flops=base_hw.achieved_flops * g)
            best = step(config, fast, lay) if r is paper else \
                best_step(config, fast, lay.gpus, lay.global_batch, lay.recipe)
            cells.append(f"{r.step_s / best.step_s:.3f}x")
        held = step(config, base_hw.with_(achieved_flops=base_hw.achieved_flops * 1.2), lay)
        print(f"| {name} | {100 * r.compute_s / r.step_s:.0f}% | " + " | ".join(cells)
              + f" | {r.step_s / held.step_s:.3f}x |")
    if measured is not None and measured.gain:
        print(f"g={measured.gain:.3g} is measured: our kernels vs PyTorch on one GPU ({measured.source}).")
    else:
        print("no measured gain: a `python -m bench` results JSON (bench/results/ or --results) with the "
              "train_step case gives ours-vs-PyTorch on one GPU, added here as a column.")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(HARDWARE), default="a100", help="node preset for the table")
    parser.add_argument("--achieved-tflops", type=float,
                        help="single-GPU achieved rate, TFLOP/s (overrides the preset and any results file)")
    parser.add_argument("--results", type=Path,
                        help="bench results JSON for the achieved rate (default: the newest in bench/results "
                             "measured on this GPU type, if any)")
    parser.add_argument("--provider", default="opt-core", help="the results row to read (opt-core or torch-sdpa)")
    parser.add_argument("--nvlink-gbs", type=float, help="NVLink GB/s per GPU per direction (A100 300, H100 450)")
    parser.add_argument("--ib-gbits", type=float, help="InfiniBand Gb/s per GPU (A100 era 200, NDR 400)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 1024], help="GPU counts of the table")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="fp16")
    parser.add_argument("--gains", type=float, nargs="+", default=[1.1, 1.2, 1.5, 2.0],
                        help="single-GPU speed-ups to carry to the largest GPU count")
    args = parser.parse_args(argv)

    hw = HARDWARE[args.gpu]
    measured = None
    results = args.results or find_results(hw)
    if results is not None:
        measured = measured_rate(results, args.provider)
        hw = hw.with_(achieved_flops=measured.flops, achieved_source=f"measured: {measured.source}")
    if args.achieved_tflops:
        hw = hw.with_(achieved_flops=args.achieved_tflops * 1e12, achieved_source="given on the command line")
    if args.nvlink_gbs:
        hw = hw.with_(nvlink_bw=args.nvlink_gbs * GB)
    if args.ib_gbits:
        hw = hw.with_(ib_bw=args.ib_gbits * 1e9 / 8)

    print(f"FLOPs: {flops.CONVENTION}; HFU adds the recomputed forward (8N + 16·L·d·s).")
    paper = print_paper_check(hw if hw.key == "A100" else A100_80GB)
    table = print_table(hw, args.gpus, args.recipe)
    print_gains(table, max(args.gpus), args.gains, measured, paper)
    return 0


if __name__ == "__main__":
    sys.exit(main())
