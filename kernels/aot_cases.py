"""What the ahead-of-time compile check compiles: every kernel at production shapes, once per autotune
config its module keeps there (``opt_core.kernels.aot`` compiles and judges them; run it with
``python -m opt_core.kernels.compile_check``).

Each case passes the arguments a launch passes, built from the kernel modules' config lists, prune
functions and launch helpers, so the compiled code is the code a launch gets.  Widths and head dims
are OPT's (125M ... 175B) at the benchmark shapes, 16k tokens; where several of them specialise to the
same code, that code is compiled once.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from opt_core.kernels import adamw, aot, attention, attention_gluon, layer_norm, relu_mlp


def all_cases() -> list[aot.Case]:
    cases = [*adamw_cases(), *attention_cases(), *attention_gluon_cases(), *attention_gluon_bwd_cases(),
             *layer_norm_cases(), *relu_mlp_cases(), *relu_mlp_gluon_cases()]
    names = [c.name for c in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"duplicate AOT case names: {sorted(duplicates)}")
    return cases


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- adamw
# What the memory-bound kernels' main configs must compile to: 16-byte loads.
_VECTOR_LOADS = {"max_load_bits": 128}
# The scalar (unaligned) class is the rare one (views at odd offsets, sizes not a multiple of 8): compiled
# for the two parameter layouts a model has, fp32 and bf16 with fp32 masters.
_ADAMW_UNALIGNED = {(torch.float32, False), (torch.bfloat16, True)}


def adamw_cases() -> list[aot.Case]:
    """Every (param dtype, master, amsgrad) in the aligned (16-byte vector) class, the main layouts in
    the scalar class; grad_stats per dtype in both."""
    cases = []
    table = dict(ADDRS=torch.int64, GRAD_ADDRS=torch.int64, NUMELS=torch.int64, CHUNKS=torch.int64)
    for p_dtype, g_dtype, master in ((torch.float32, torch.float32, False), (torch.bfloat16, torch.bfloat16, False),
                                     (torch.float16, torch.float16, False), (torch.bfloat16, torch.bfloat16, True),
                                     (torch.float16, torch.float16, True)):
        for aligned in (True, False):
            if not aligned and (p_dtype, master) not in _ADAMW_UNALIGNED:
                continue
            tag = f"{_dtype_name(p_dtype)}{',master' if master else ''}{'' if aligned else ',unaligned'}"
            for amsgrad in (False, True) if aligned else (False,):
                cases.append(aot.case(
                    f"adamw_step[{tag}{',amsgrad' if amsgrad else ''}]", adamw.adamw_kernel,
                    dict(**table, STEP_SIZE=torch.float32, BC2_SQRT=torch.float32, INV_SCALE=torch.float32,
                         CLIP_COEF=torch.float32, FOUND_INF=torch.float32, decay=0.99, beta1=0.9,
                         one_minus_beta1=0.1, beta2=0.95, one_minus_beta2=0.05, eps=1e-8),
                    dict(P_DTYPE=adamw.TL_DTYPES[p_dtype], G_DTYPE=adamw.TL_DTYPES[g_dtype], HAS_MASTER=master,
                         AMSGRAD=amsgrad, MAXIMIZE=False, HAS_INV_SCALE=True, HAS_CLIP=True, HAS_FOUND_INF=True,
                         ALIGNED=aligned, CHUNK_SIZE=65536, BLOCK_SIZE=2048),
                    num_warps=adamw.NUM_WARPS, expects=_VECTOR_LOADS if aligned else None,
                ))
    for g_dtype in adamw.KERNEL_DTYPES:
        for aligned in (True, False):
            cases.append(aot.case(
                f"grad_stats[{_dtype_name(g_dtype)}{'' if aligned else ',unaligned'}]", adamw.grad_stats_kernel,
                dict(GRAD_ADDRS=torch.int64, NUMELS=torch.int64, CHUNKS=torch.int64, INV_SCALE=torch.float32,
                     SUMSQ=torch.float32, NONFINITE=torch.int32),
                dict(G_DTYPE=adamw.TL_DTYPES[g_dtype], HAS_INV_SCALE=True, UNSCALE_IN_PLACE=True, ALIGNED=aligned,
                     CHUNK_SIZE=65536, BLOCK_SIZE=2048),
                num_warps=adamw.NUM_WARPS, expects=_VECTOR_LOADS if aligned else None,
            ))
    return cases


# --------------------------------------------------------------------------- attention
# OPT's head dims (64: 125M-1.3B, 80: 2.7B, 128: 6.7B-175B) and the largest accepted one, at the
# benchmark shape: 16k tokens per batch, seqlen 8192.
ATTENTION_HEADS = {64: 12, 80: 32, 128: 32, 256: 16}  # head_dim -> heads
ATTENTION_SEQLEN = 8192
# Seeds as a launch passes them (never specialised): an i32 one without dropout, an i64 one (drawn in
# [0, 2**63)) with dropout.
_ATTENTION_SEED = {False: 12345, True: 2 ** 40 + 12345}
_ATTENTION_KERNELS = {  # kind -> (kernel, its autotune configs, its prune function)
    "fwd": (attention.fwd_kernel, attention.FWD_CONFIGS, attention.prune_fwd_configs),
    "dkdv": (attention.bwd_dkdv_kernel, attention.BWD_DKDV_CONFIGS, attention.prune_bwd_dkdv_configs),
    "dq": (attention.bwd_dq_kernel, attention.BWD_DQ_CONFIGS, attention.prune_bwd_dq_configs),
    "pre": (attention.bwd_preprocess_kernel, attention.BWD_PRE_CONFIGS, attention.prune_bwd_pre_configs),
}


def _attention_args(dtype, head_dim, padding_mask, dropout):
    """Every runtime argument of the attention kernels at the benchmark shape (each kernel reads its
    own): (batch, seqlen, heads, head_dim) tensors in their natural layout."""
    S, heads = ATTENTION_SEQLEN, ATTENTION_HEADS[head_dim]
    args = dict(
        Q=dtype, K=dtype, V=dtype, KPM=torch.uint8 if padding_mask else dtype, O=dtype, DO=dtype, DQ=dtype,
        DK=dtype, DV=dtype, LSE=torch.float32, DELTA=torch.float32, DQ_ACC=None, LOCKS=None,
        heads=heads, seqlen_q=S, seqlen_k=S, seqlen_bucket=S, qk_scale=0.1, sm_scale=0.1,
        dropout_p=0.1 if dropout else 0.0, dropout_scale=1.0 / 0.9 if dropout else 1.0,
        seed=_ATTENTION_SEED[dropout], stride_mb=S if padding_mask else 0, stride_mn=1 if padding_mask else 0,
    )
    for tensor in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
        args.update({f"stride_{tensor}{axis}": s for axis, s in zip("bsh", (S * heads * head_dim, heads * head_dim,
                                                                            head_dim))})
    return args


def _attention_configs(kind, flags, variant):
    """The configs a launch with these flags keeps.  The padding-mask variant lists only the shapes not
    also kept with dropout: mask and dropout together compile a superset of the mask-only code."""
    _, configs, prune = _ATTENTION_KERNELS[kind]
    kept = prune(configs, {}, **flags)
    if variant == attention.PADDING_MASK:
        with_dropout = prune(configs, {}, **dict(flags, HAS_DROPOUT=True))
        kept = [c for c in kept if c not in with_dropout]
    return kept


def _attention_kernel_cases(kind, dtype, head_dim, variant=attention.PLAIN, *, tma=False, fused_dq=False,
                            deterministic=True, first_config=False, causal=True):
    """AOT cases of one kernel ("fwd", "dkdv", "dq", "pre"), causal unless not ``causal``, for the configs
    its prune function keeps (the first only with ``first_config``); with ``tma``, the streamed operands as
    descriptors, for sm_90 only; with ``fused_dq``, the dK/dV kernel that adds up dQ as well, in key-block
    order if ``deterministic``."""
    fn = _ATTENTION_KERNELS[kind][0]
    padding_mask, dropout = variant != attention.PLAIN, variant == attention.DROPOUT
    args = _attention_args(dtype, head_dim, padding_mask, dropout)
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=attention.block_d(head_dim))
    args.update(K_TAIL=None, V_TAIL=None, Q_TAIL=None, DO_TAIL=None)
    tag = f"D={head_dim},{_dtype_name(dtype)}"
    if kind != "pre":
        flags.update(CAUSAL=causal, HAS_KPM=padding_mask, HAS_DROPOUT=dropout,
                     DOT_PRECISION=attention.dot_precision(dtype), TMA=tma)
        tag += f",{'' if causal else 'non'}causal{',kpm' if padding_mask else ''}"
        tag += f"{',dropout' if dropout else ''}{',tma' if tma else ''}"
    if kind == "fwd":  # every loop the tuner may pick; a config's WARP_SPECIALIZE overrides the default
        flags.update(SPECIALIZE="auto" if tma else "off", WARP_SPECIALIZE=False)
    if kind == "dkdv":
        flags.update(FUSED_DQ=fused_dq, DETERMINISTIC=deterministic)
        if fused_dq:
            args.update(DQ_ACC=torch.float32, LOCKS=torch.int32)
            tag += ",fused_dq" if deterministic else ",fused_dq_unordered"
    cases = []
    loops = _attention_loops(kind, dtype, head_dim, tma)
    configs = _attention_configs(kind, flags, variant)[:1 if first_config else None]
    for cfg, (archs, per_arch) in [(c, each) for c in configs for each in loops]:
        # fp32 multiplies on the FMA units (exact fp32), not the tensor cores; wgmma takes 64 rows per
        # warpgroup, so a dot with 32 rows (the dK/dV kernel's key block at head_dim 256 with dropout)
        # is mma.sync on sm_90.
        rows = cfg.kwargs["BLOCK_N"] if kind == "dkdv" else cfg.kwargs["BLOCK_M"]
        tensor_cores = kind != "pre" and dtype != torch.float32 and rows >= 64
        launch = dict(args)
        constexprs = dict(flags, **per_arch, **cfg.kwargs)
        if tma:
            names, block = attention.STREAMED[kind]
            for name in names:
                width = constexprs["HEAD_TAIL"] if name.endswith("_TAIL") else constexprs["BLOCK_D"]
                if width:
                    launch[name] = aot.Descriptor(dtype, (1, cfg.kwargs[block], 1, width))
        meta = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items() if k != "WARP_SPECIALIZE")
        meta += ",specialized" if cfg.kwargs.get("WARP_SPECIALIZE") else ""
        if "SPLIT_MASKED" in per_arch:
            meta += "" if tma or per_arch["SPLIT_MASKED"] else ",one_loop"
        cases.append(aot.case(
            f"attention_{kind}[{tag},{meta},warps={cfg.num_warps},stages={cfg.num_stages}]",
            fn, launch, constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, tensor_cores=tensor_cores,
            archs=archs,
            # the compiler's pass gives up on a loop it cannot split without an error: check it did not
            expects={"warp_specialized": True} if cfg.kwargs.get("WARP_SPECIALIZE") else None,
        ))
    return cases


def _attention_loops(kind, dtype, head_dim, tma):
    """(archs, constexprs) of each compile a kernel gets, as a launch on each arch sets them: SPLIT_MASKED
    (attention.split_masked), the head-dim tiles BLOCK_D, HEAD_TAIL (attention.head_tiles) and SPLIT_MIN_ROWS
    (attention.split_min_rows: the fewest rows a config's tile needs to hold them); the TMA path on sm_90
    only; through pointers one compile where every arch agrees (fp32), else one per arch.  The delta pass
    has neither (no constexprs)."""
    if kind == "pre":
        return [(aot.ARCHS, {})]
    archs = (90,) if tma else aot.ARCHS
    per_arch = {}
    for arch in archs:
        tile, tail = attention.head_tiles(head_dim)
        per_arch[arch] = dict(SPLIT_MASKED=attention.split_masked(kind, tma, attention.uses_wgmma(dtype, arch)),
                              BLOCK_D=tile, HEAD_TAIL=tail, SPLIT_MIN_ROWS=attention.split_min_rows(dtype, arch))
    if all(each == per_arch[archs[0]] for each in per_arch.values()):
        return [(archs, per_arch[archs[0]])]
    return [((arch,), each) for arch, each in per_arch.items()]


# Every head dim compiles every variant (80's two tiles, attention.head_tiles, are code of their own).
_ATTENTION_VARIANTS = (attention.PLAIN, attention.PADDING_MASK, attention.DROPOUT)


def attention_cases() -> list[aot.Case]:
    """Every (shape, variant) the tables keep, bf16 and causal, at head_dim 64, 80, 128 and 256; the same for fp32
    inputs at 64, 128 and 256; fp16 once per kernel; bf16 not causal at 128, both paths; the TMA path (sm_90; bf16
    and fp16 share it) at OPT's head dims; the delta preprocess per tile; the dK/dV kernel with the fused dQ and
    dQ's store at OPT's head dims. The dropout variant is compiled with the padding mask too (dropout without a mask
    runs a subset of that code)."""
    cases = []
    for dtype, head_dims in ((torch.bfloat16, (64, 80, 128, 256)), (torch.float32, (64, 128, 256))):
        for head_dim in head_dims:
            for kind in ("fwd", "dkdv", "dq"):
                for variant in _ATTENTION_VARIANTS:
                    cases += _attention_kernel_cases(kind, dtype, head_dim, variant)
    for kind in ("fwd", "dkdv", "dq"):
        cases += _attention_kernel_cases(kind, torch.float16, 128, first_config=True)
        for tma in (False, True):  # not causal: the key blocks' loops end at the keys' end, not the diagonal
            cases += _attention_kernel_cases(kind, torch.bfloat16, 128, tma=tma, causal=False)
    for head_dim in (64, 80, 128):
        for kind in ("fwd", "dkdv", "dq"):
            for variant in _ATTENTION_VARIANTS:
                cases += _attention_kernel_cases(kind, torch.bfloat16, head_dim, variant, tma=True)
    for head_dim in (64, 80, 128, 256):
        cases += _attention_kernel_cases("pre", torch.bfloat16, head_dim)
    for head_dim in (64, 80, 128):  # the fused dQ runs where its table has shapes: the TMA path
        for variant in _ATTENTION_VARIANTS:
            if attention.fused_dq_shapes(head_dim, variant):
                cases += _attention_kernel_cases("dkdv", torch.bfloat16, head_dim, variant, tma=True, fused_dq=True)
        # In any order: the same loop without the turns (and with the other launch order).
        cases += _attention_kernel_cases("dkdv", torch.bfloat16, head_dim, tma=True, fused_dq=True,
                                         deterministic=False)
        cases.append(_attention_dq_store_case(head_dim))
    return cases


def attention_default_forward_cases(head_dims=(64, 80, 128)) -> list[aot.Case]:
    """The forward config sm_90 runs untuned at each head dim (bf16, causal, the TMA path): the first its
    prune function keeps."""
    return [_attention_kernel_cases("fwd", torch.bfloat16, head_dim, tma=True)[0] for head_dim in head_dims]


def _attention_dq_store_case(head_dim):
    """The fused dQ's store (fp32 sum -> dQ) as the launch runs it."""
    flags = dict(HEAD_DIM=head_dim, BLOCK_M=attention.DQ_STORE_ROWS, BLOCK_D=attention.block_d(head_dim),
                 ACC_WIDTH=attention.dq_acc_width(head_dim))
    return aot.case(f"attention_dq_store[D={head_dim},bfloat16,BLOCK_M={attention.DQ_STORE_ROWS}]",
                    attention.bwd_dq_store_kernel, dict(_attention_args(torch.bfloat16, head_dim, False, False),
                                                        DQ_ACC=torch.float32), flags, num_warps=4)


def _gluon_descriptor(rows, width):
    """A bf16 [1, rows, 1, width] descriptor of (batch, seqlen, heads, head_dim) with the layout the Gluon
    launch gives it (width: one head-dim chunk, ``attention_gluon.head_chunks``); None for no chunk."""
    if width is None:
        return None
    return aot.Descriptor(torch.bfloat16, (1, rows, 1, width),
                          attention_gluon.smem_layout(torch.bfloat16, rows, width))


def attention_gluon_cases() -> list[aot.Case]:
    """The Gluon forward (opt-in, ``attention.GLUON``) at its default config per head dim, bf16 (fp16 is the
    same code), at the benchmark shape: causal at head_dim 64, 80 (chunks 64 + 16) and 128, not causal at
    128.  Its schedule must show: a wgmma in flight across the softmax, producer/consumer partitions."""
    cases = []
    for head_dim, causal, persistent in ((64, True, False), (80, True, False), (128, True, False),
                                         (128, False, False), (80, True, True), (128, True, True)):
        block_n, num_stages = attention_gluon.CONFIGS[head_dim]
        main, *tail = attention_gluon.head_chunks(head_dim)
        tail = tail[0] if tail else None  # 64 and 128: one chunk
        heads = ATTENTION_HEADS[head_dim]
        # Persistent: the launch's head group at the benchmark's 16k tokens (batch 2) on an H200 (50 MB of L2);
        # not persistent: groups of one (batch, head), as the launch passes (and specialises) it.
        batch = 2
        group = attention_gluon.head_group(batch * heads, 2 * ATTENTION_SEQLEN * head_dim * 2, 50 * 2**20)
        args = dict(LSE=torch.float32, batch=batch, heads=heads, seqlen_q=ATTENTION_SEQLEN,
                    seqlen_k=ATTENTION_SEQLEN, qk_scale=0.1, head_group=group if persistent else 1)
        for tensor, rows in (("q", attention_gluon.ROWS_PER_CONSUMER), ("k", block_n), ("v", block_n),
                             ("o", attention_gluon.ROWS_PER_CONSUMER)):
            args[f"{tensor}_desc"] = _gluon_descriptor(rows, main)
            args[f"{tensor}_tail_desc"] = _gluon_descriptor(rows, tail)
        cases.append(aot.case(
            f"attention_gluon_fwd[D={head_dim},bfloat16{',causal' if causal else ''},BLOCK_N={block_n},"
            f"stages={num_stages}{',persistent' if persistent else ''}]", attention_gluon.fwd_kernel, args,
            dict(CAUSAL=causal, BLOCK_N=block_n, NUM_STAGES=num_stages, PERSISTENT=persistent),
            num_warps=4, tensor_cores=True, archs=(90,),
            # P V of every chunk stays in flight across the softmax (one wgmma group each)
            expects={"wgmma_max_pending": len(attention_gluon.head_chunks(head_dim)), "warp_specialized": True,
                     "tma_store": True, "persistent": persistent},
        ))
    return cases


def attention_gluon_bwd_cases() -> list[aot.Case]:
    """The Gluon backward (opt-in, ``attention.GLUON_BWD``), bf16 (fp16 is the same code), at the benchmark
    shape: deterministic (the default) causal at head_dim 64, 80 (chunks 64 + 16) and 128 and not causal
    at 128, and causal at 128 without the dQ ordering.  Its schedule must show: two wgmmas in flight past a
    wait (dV and dK across the dQ products' issue), producer/consumer partitions, TMA loads and stores."""
    from opt_core.kernels import attention_gluon_bwd as g  # here: a Triton without Gluon's Hopper modules imports us

    cases = []
    for head_dim, causal, deterministic in ((64, True, True), (80, True, True), (128, True, True),
                                            (128, False, True), (128, True, False)):
        main, *tail = attention_gluon.head_chunks(head_dim)
        tail = tail[0] if tail else None  # 64 and 128: one chunk, and K in halves for the dQ products
        args = dict(kh_desc=None if tail else _gluon_descriptor(g.KEYS_PER_CONSUMER, g.dq_columns(head_dim)[0]),
                    LSE=torch.float32, DELTA=torch.float32, DQ_ACC=torch.float32, LOCKS=torch.int32,
                    heads=ATTENTION_HEADS[head_dim], seqlen_q=ATTENTION_SEQLEN, seqlen_k=ATTENTION_SEQLEN,
                    dq_acc_rows=ATTENTION_SEQLEN, qk_scale=0.1, sm_scale=0.1)
        for tensor, rows in (("q", g.BLOCK_M), ("do", g.BLOCK_M), ("k", g.KEYS_PER_CONSUMER),
                             ("v", g.KEYS_PER_CONSUMER), ("dk", g.KEYS_PER_CONSUMER), ("dv", g.KEYS_PER_CONSUMER)):
            args[f"{tensor}_desc"] = _gluon_descriptor(rows, main)
            args[f"{tensor}_tail_desc"] = _gluon_descriptor(rows, tail)
        cases.append(aot.case(
            f"attention_gluon_bwd[D={head_dim},bfloat16{',causal' if causal else ''}"
            f"{'' if deterministic else ',nondeterministic'},stages={g.NUM_STAGES[head_dim]}]", g.bwd_kernel, args,
            dict(CAUSAL=causal, DETERMINISTIC=deterministic, NUM_STAGES=g.NUM_STAGES[head_dim],
                 DP_FROM_DELTA=g.DP_FROM_DELTA[head_dim]),
            num_warps=4, tensor_cores=True, archs=(90,),
            expects={"wgmma_max_pending": 2, "warp_specialized": True, "tma_store": True},
        ))
    return cases


# --------------------------------------------------------------------------- layer_norm
# Every OPT width; widths sharing a power-of-two tile compile the same code, so each tile is compiled
# once, at the widest such OPT width.
LAYER_NORM_WIDTHS = (768, 1024, 2048, 2560, 4096, 5120, 7168, 9216, 12288)
LAYER_NORM_ROWS = 16384
# The two-pass backward's grid on an H100/H200: two programs per SM.
_LAYER_NORM_BWD_PROGRAMS = 2 * 132
_LAYER_NORM_BWD = {  # kernel name -> (its configs, its prune function)
    "bwd_kernel": (layer_norm.BWD_CONFIGS, layer_norm.prune_bwd_configs),
    "bwd_wide_kernel": (layer_norm.BWD_WIDE_CONFIGS, layer_norm.prune_bwd_wide_configs),
    "bwd_two_pass_kernel": (layer_norm.BWD_TWO_PASS_CONFIGS, layer_norm.prune_bwd_two_pass_configs),
}


def _layer_norm_bwd_configs(name, tile, dtype):
    """The configs a backward keeps; fp16's pipelined (STAGES > 1) ones are bf16's code but for the
    conversions, and are compiled in bf16 only.  The first (what a launch runs untuned) must load 16-byte
    vectors."""
    configs, prune = _LAYER_NORM_BWD[name]
    kept = prune(configs, {}, **tile)
    return [c for c in kept if dtype != torch.float16 or c.kwargs.get("STAGES", 1) == 1]


def _layer_norm_bwd_cases(N, dtype, tag):
    """The backward sm_80 and sm_90 run for rows of width N (at 12288 in fp16/bf16 they differ)."""
    args = dict(
        X=dtype, W=dtype, DY=dtype, DH=dtype, DX=dtype, DW_PART=torch.float32, DB_PART=torch.float32,
        MEAN=torch.float32, RSTD=torch.float32, stride_xm=N, stride_xn=1, stride_dym=N, stride_dyn=1,
        stride_dhm=N, stride_dhn=1, M=LAYER_NORM_ROWS, N=N,
        rows_per_program=triton.cdiv(LAYER_NORM_ROWS, _LAYER_NORM_BWD_PROGRAMS),
    )
    by_variant: dict = {}
    for arch in aot.ARCHS:
        name, tile = layer_norm.bwd_variant(N, dtype, arch)
        by_variant.setdefault((name, tuple(tile.items())), []).append(arch)
    cases = []
    for (name, tile), archs in by_variant.items():
        for i, cfg in enumerate(_layer_norm_bwd_configs(name, dict(tile), dtype)):
            meta = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items() if k != "PROGRAMS_PER_SM")
            cases.append(aot.case(
                f"layer_norm_{name.removesuffix('_kernel')}[{tag}{',' + meta if meta else ''},warps={cfg.num_warps}]",
                getattr(layer_norm, name), args, dict(HAS_DH=True, HAS_W=True, HAS_B=True, **dict(tile), **cfg.kwargs),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, archs=tuple(archs),
                expects=_VECTOR_LOADS if i == 0 else None,
            ))
    return cases


def layer_norm_cases() -> list[aot.Case]:
    """Forward with residual, weight and bias; backward with the residual's gradient, weight and bias."""
    cases = []
    by_block = {triton.next_power_of_2(n): n for n in sorted(LAYER_NORM_WIDTHS)}
    for block_n, N in sorted(by_block.items()):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            tag = f"N={N},{_dtype_name(dtype)}"
            fwd_args = dict(
                X=dtype, RES=dtype, W=dtype, B=dtype, Y=dtype, H=dtype, MEAN=torch.float32, RSTD=torch.float32,
                stride_xm=N, stride_xn=1, stride_rm=N, stride_rn=1, M=LAYER_NORM_ROWS, N=N, eps=1e-5,
            )
            for i, cfg in enumerate(layer_norm.prune_fwd_configs(layer_norm.FWD_CONFIGS, {}, BLOCK_N=block_n)):
                cases.append(aot.case(
                    f"layer_norm_fwd[{tag},BLOCK_M={cfg.kwargs['BLOCK_M']},warps={cfg.num_warps}]",
                    layer_norm.fwd_kernel, fwd_args,
                    dict(HAS_RES=True, HAS_W=True, HAS_B=True, BLOCK_N=block_n, **cfg.kwargs),
                    num_warps=cfg.num_warps, expects=_VECTOR_LOADS if i == 0 else None,
                ))
            cases += _layer_norm_bwd_cases(N, dtype, tag)
    return cases


# --------------------------------------------------------------------------- relu_mlp
# OPT widths of 125M, 2.7B and 175B, ffn = 4d, 16k tokens.  All are multiples of 16, so each kernel
# specialises identically at every width and the compiled code is the same: a (kernel, layout, dtype,
# config) is compiled once and named with every width it covers, and dW1/dW2 share one kernel and
# layout.
RELU_MLP_WIDTHS = (768, 2560, 12288)
RELU_MLP_TOKENS = 16384
RELU_MLP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_RELU_MLP_SEED = 0x5DEECE66D  # odd and above 2^31: an unspecialised int64, as a drawn seed is


def _relu_mlp_gemms(d, dtype):
    """(role, kernel, args, flags) for every GEMM of the block at width d, on the pointer path."""
    M, ffn = RELU_MLP_TOKENS, 4 * d
    common = dict(INPUT_PRECISION=relu_mlp.input_precision(dtype), TMA=False, A_T=False, B_T=False, TMA_STORE=False)
    fc = dict(BIAS=dtype, OUT_DESC=None, seed=0, drop_threshold=0, drop_scale=1.0)
    return [
        ("fc1", relu_mlp.fc_kernel,
         dict(A=dtype, B=dtype, RES=None, C=dtype, M=M, N=ffn, K=d, stride_am=d, stride_ak=1,
              stride_bk=1, stride_bn=d, stride_rm=0, stride_rn=0, stride_cm=ffn, **fc),
         dict(HAS_BIAS=True, RELU=True, DROPOUT=False, HAS_RESIDUAL=False, **common)),
        ("fc2", relu_mlp.fc_kernel,
         dict(A=dtype, B=dtype, RES=dtype, C=dtype, M=M, N=d, K=ffn, stride_am=ffn, stride_ak=1,
              stride_bk=1, stride_bn=ffn, stride_rm=d, stride_rn=1, stride_cm=d,
              **dict(fc, seed=_RELU_MLP_SEED, drop_threshold=relu_mlp.dropout_threshold(0.1), drop_scale=1 / 0.9)),
         dict(HAS_BIAS=True, RELU=False, DROPOUT=True, HAS_RESIDUAL=True, **common)),
        ("dh", relu_mlp.dh_kernel,
         dict(A=dtype, B=dtype, H=dtype, DH=dtype, OUT_DESC=None, DB_PART=torch.float32, M=M, N=ffn, K=d,
              stride_am=d, stride_ak=1, stride_bk=ffn, stride_bn=1, stride_hm=ffn, stride_dhm=ffn),
         dict(HAS_DBIAS=True, **common)),
        ("dw2", relu_mlp.matmul_kernel,  # g^T @ h
         dict(A=dtype, B=dtype, C=dtype, OUT_DESC=None, M=d, N=ffn, K=M, stride_am=1, stride_ak=d, stride_bk=ffn,
              stride_bn=1, stride_cm=ffn), common),
        ("dx", relu_mlp.matmul_kernel,  # dh @ W1
         dict(A=dtype, B=dtype, C=dtype, OUT_DESC=None, M=M, N=d, K=ffn, stride_am=ffn, stride_ak=1, stride_bk=d,
              stride_bn=1, stride_cm=d), common),
        ("dw1", relu_mlp.matmul_kernel,  # dh^T @ x
         dict(A=dtype, B=dtype, C=dtype, OUT_DESC=None, M=ffn, N=d, K=M, stride_am=1, stride_ak=ffn, stride_bk=d,
              stride_bn=1, stride_cm=d), common),
    ]


# The paths a GEMM launch takes: (TMA loads, TMA stores).  The TMA path is sm_90's (bf16 compiled, fp16
# shares it); with TMA stores only the persistent configs differ from it (the others leave the output's
# descriptor unread), so those are what that path compiles.
_RELU_MLP_PATHS = {torch.bfloat16: ((False, False), (True, False), (True, True))}


def _relu_mlp_gemm_cases(d, dtype):
    """(role, tag, d, case) for every GEMM at width d and each config its prune function keeps, on each
    path: the operands (and on the persistent path the output) as descriptors in the orientation they
    are stored in."""
    named = []
    for role, kernel, args, flags in _relu_mlp_gemms(d, dtype):
        for tma, tma_store in _RELU_MLP_PATHS.get(dtype, ((False, False),)):
            layout = dict(TMA=tma, A_T=tma and args["stride_am"] == 1, B_T=tma and args["stride_bk"] == 1,
                          TMA_STORE=tma_store)
            configs = relu_mlp.prune_gemm_configs(relu_mlp.GEMM_CONFIGS, args, **dict(flags, **layout))
            for cfg in [c for c in configs if c.kwargs["PERSISTENT"] or not tma_store]:
                bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
                path = ",tma,persistent" if tma_store else ",tma" if tma else ""
                tag = f"{_dtype_name(dtype)}{path},{bm}x{bn}x{bk},w{cfg.num_warps},s{cfg.num_stages}"
                launch = dict(args)
                if tma:
                    launch["A"] = aot.Descriptor(dtype, (bk, bm) if layout["A_T"] else (bm, bk))
                    launch["B"] = aot.Descriptor(dtype, (bn, bk) if layout["B_T"] else (bk, bn))
                if tma_store:
                    launch["OUT_DESC"] = aot.Descriptor(dtype, (bm, relu_mlp.epilogue_slice_n(bn, persistent=True)))
                named.append((role, tag, d, aot.case(
                    role, kernel, launch, dict(flags, **layout, **cfg.kwargs), num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, tensor_cores=dtype != torch.float32,
                    archs=(90,) if tma else aot.ARCHS,
                    expects=dict(tma_store=True, persistent=True) if tma_store else None,
                )))
    return named


def _relu_mlp_dropout_bwd_cases(d, dtype):
    args = dict(DY=dtype, G=dtype, DB_PART=torch.float32, M=RELU_MLP_TOKENS, N=d, stride_dym=d, stride_dyn=1,
                rows_per_program=RELU_MLP_TOKENS // 8, seed=_RELU_MLP_SEED,
                drop_threshold=relu_mlp.dropout_threshold(0.1), drop_scale=1 / 0.9)
    named = []
    for cfg in relu_mlp.prune_dropout_bwd_configs(relu_mlp.DROPOUT_BWD_CONFIGS, args):
        k = cfg.kwargs
        named.append(("dropout_bwd", f"{_dtype_name(dtype)},{k['BLOCK_M']}x{k['BLOCK_N']},w{cfg.num_warps}", d,
                      aot.case("relu_mlp_dropout_bwd", relu_mlp.dropout_bwd_kernel, args,
                               dict(DROPOUT=True, WRITE_G=True, HAS_DBIAS=True, **k), num_warps=cfg.num_warps)))
    return named


def _compile_key(c):
    return (c.module, c.kernel, tuple(sorted(c.signature.items())), tuple(sorted(map(repr, c.constexprs.items()))),
            tuple(sorted(c.divisible_by_16)), c.num_warps, c.num_stages)


def _merge_widths(named):
    """One case per distinct compile, named with every role and width it covers."""
    merged = {}
    for role, tag, d, case in named:
        roles, widths, _, _ = merged.setdefault(_compile_key(case), ([], [], tag, case))
        if role not in roles:
            roles.append(role)
        if d not in widths:
            widths.append(d)
    return [
        dataclasses.replace(case, name=f"relu_mlp_{'+'.join(roles)}[d={'/'.join(map(str, widths))},{tag}]")
        for roles, widths, tag, case in merged.values()
    ]


def relu_mlp_cases() -> list[aot.Case]:
    named = []
    for dtype in RELU_MLP_DTYPES:
        for d in RELU_MLP_WIDTHS:
            named += _relu_mlp_gemm_cases(d, dtype)
            named += _relu_mlp_dropout_bwd_cases(d, dtype)
    return _merge_widths(named)


def relu_mlp_gluon_cases() -> list[aot.Case]:
    """The Gluon ping-pong GEMMs (opt-in, ``relu_mlp.GLUON``), bf16 (fp16 is the same code) at their one
    tile config, at OPT-125M's shapes: dW1 = dh^T @ x (the plain store; A stored transposed, B as is),
    GEMM 1 (bias + ReLU; A as is, B = W1^T stored transposed: both operands in both orientations, wgmma's
    transpose bits), GEMM 2 (bias, dropout's Philox and the residual: the epilogue with the most
    registers, in its narrower slices) and dh (the ReLU mask, db1's partial sums).  Their schedule must
    show: producer/consumer partitions, one wgmma in flight in the K loop, TMA loads and stores, the
    persistent tile loop."""
    from opt_core.kernels import relu_mlp_gluon as g  # here: a Triton without Gluon's Hopper modules imports us

    M, d = RELU_MLP_TOKENS, RELU_MLP_WIDTHS[0]
    dtype = torch.bfloat16

    def descriptor(rows, cols, transposed=False):
        block = g.operand_block(rows, cols, transposed)
        return aot.Descriptor(dtype, block, g.smem_layout(dtype, block))

    no_epilogue = dict(BIAS=None, RES=None, stride_rm=0, stride_rn=0, seed=0, drop_threshold=0, drop_scale=1.0)
    dropout = dict(seed=_RELU_MLP_SEED, drop_threshold=relu_mlp.dropout_threshold(0.1), drop_scale=1 / 0.9)
    fc_flags = dict(HAS_BIAS=False, RELU=False, DROPOUT=False, HAS_RESIDUAL=False)
    # role: (kernel, A stored transposed, B stored transposed, (M, N, K), epilogue arguments and flags)
    roles = {
        "dw1": (g.gemm_kernel, True, False, (4 * d, d, M), no_epilogue, fc_flags),
        "fc1": (g.gemm_kernel, False, True, (M, 4 * d, d), dict(no_epilogue, BIAS=dtype),
                dict(fc_flags, HAS_BIAS=True, RELU=True)),
        "fc2": (g.gemm_kernel, False, True, (M, d, 4 * d),
                dict(BIAS=dtype, RES=dtype, stride_rm=d, stride_rn=1, **dropout),
                dict(fc_flags, HAS_BIAS=True, DROPOUT=True, HAS_RESIDUAL=True)),
        "dh": (g.dh_kernel, False, False, (M, 4 * d, d), dict(H=dtype, DB_PART=torch.float32, stride_hm=4 * d),
               dict(HAS_DBIAS=True)),
    }
    cases = []
    for role, (kernel, a_t, b_t, (m, n, k), epilogue, flags) in roles.items():
        slice_n = g.slice_n(flags.get("DROPOUT", False))
        args = dict(a_desc=descriptor(g.BLOCK_M, g.BLOCK_K, a_t), b_desc=descriptor(g.BLOCK_K, g.BLOCK_N, b_t),
                    c_desc=descriptor(g.BLOCK_M, slice_n), M=m, N=n, K=k, **epilogue)
        layout = f"{',A_T' if a_t else ''}{',B_T' if b_t else ''}"
        cases.append(aot.case(
            f"relu_mlp_gluon_{role}[d={d},bfloat16{layout},{g.BLOCK_M}x{g.BLOCK_N}x{g.BLOCK_K},"
            f"slice={slice_n},stages={g.NUM_STAGES}]", kernel, args,
            dict(A_T=a_t, B_T=b_t, GROUP_M=g.GROUP_M, NUM_STAGES=g.NUM_STAGES, **flags),
            num_warps=g.NUM_WARPS, tensor_cores=True, archs=(90,),
            expects={"wgmma_max_pending": 1, "warp_specialized": True, "tma_store": True, "persistent": True},
        ))
    return cases
