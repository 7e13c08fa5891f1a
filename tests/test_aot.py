"""Ahead-of-time compile of every kernel case for sm_80 and sm_90.

No GPU needed.  The compile runs in a subprocess with the interpreter off (the
``aot_compile`` fixture of tests/conftest.py); the cases
(``kernels/aot_cases.py``) are listed here, so each case and architecture is its
own test.
"""

from __future__ import annotations

import subprocess
import types

import pytest

from opt_core.kernels import aot, aot_cases

CASES = aot_cases.all_cases()


@pytest.fixture(scope="module")
def compiled(aot_compile):
    return aot_compile()


def test_every_kernel_module_registers_cases():
    kinds = {c.name.split("[")[0] for c in CASES}
    assert {"layer_norm_fwd", "layer_norm_bwd", "layer_norm_bwd_wide", "adamw_step", "grad_stats",
            "attention_fwd", "attention_dkdv", "attention_dq"} <= kinds
    assert any(c.name.startswith("layer_norm_fwd[N=12288") for c in CASES)
    assert any(c.name.startswith("layer_norm_bwd_wide[N=12288") for c in CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case, arch", [(c, a) for c in CASES for a in c.archs],
                         ids=[f"{c.name}-sm_{a}" for c in CASES for a in c.archs])
def test_compiles_without_spills(compiled, case, arch):
    result = compiled[(case.name, arch)]
    assert not aot.problems(result), aot.problems(result)


def test_wgmma_notes_are_ptxas_notes_on_the_wgmma_pipeline():
    """The codes of ptxas -v's notes on wgmma (as ptxas words them), not its other notes; PTX without wgmma
    is not sent to ptxas."""
    log = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
           "non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline "
           "stage in the function 'k'\n"
           "ptxas info    : (C7517) warpgroup.wait is injected in around line 2493 by compiler to allow use of "
           "registers defined by GMMA in function 'k'\n"
           "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized\n"
           "ptxas info    : (C2000) Used 168 registers\n")
    assert sorted(set(aot._PTXAS_NOTE.findall(log))) == ["C7515", "C7517"]
    assert aot.wgmma_notes("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};", 90) == []
    assert aot.wgmma_notes("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};", 80) == []


# wgmma PTX that would not assemble: ptxas raises where it runs
_NOT_PTX = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};"
_LOG = ("ptxas info    : (C7517) warpgroup.wait is injected in around line 9 by compiler to allow use of registers "
        "defined by GMMA in function 'k'\n"
        "ptxas info    : 11 bytes gmem\n"
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    24 bytes stack frame, 20 bytes spill stores, 20 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 3 barriers\n"
        "ptxas info    : Compile time = 412.592 ms\n")


def test_ptxas_log_gives_registers_stack_and_wgmma_notes():
    assert aot.facts_from_ptxas_log(_LOG) == {"registers": 168, "stack": 24, "wgmma_notes": ["C7517"]}
    assert aot.facts_from_ptxas_log("") is None
    assert aot.facts_from_ptxas_log(_LOG + _LOG.replace("'k'", "'k2'")) is None   # two kernels: not ours to pick


def test_ptxas_facts_are_kept_beside_the_kernel_in_tritons_cache(tmp_path, monkeypatch):
    """A fresh compile's facts (from its ptxas log) are stored under the kernel's cache key; a cache hit,
    which has no log, reads them back without running a tool; a hit with nothing stored asks the tools."""
    from triton import knobs

    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path))
    compiled = types.SimpleNamespace(hash="0" * 64, asm={"ptx": _NOT_PTX, "cubin": b"not a cubin"})
    facts = {"registers": 168, "stack": 24, "wgmma_notes": ["C7517"]}
    assert aot.ptxas_facts(compiled, 90, _LOG) == facts
    assert aot.ptxas_facts(compiled, 90, "") == facts          # the tools would fail on this kernel
    other = types.SimpleNamespace(hash="1" * 64, asm=compiled.asm)
    with pytest.raises(subprocess.CalledProcessError):
        aot.ptxas_facts(other, 90, "")


def test_code_facts_read_off_the_ptx():
    """The facts the Hopper issues assert on, from hand-written PTX/TTGIR snippets (one per fact)."""
    ptx = "\n".join([
        "ld.global.nc.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];",
        "ld.global.b16 %h1, [%rd2];",
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r5], [%rd3, {%r6, %r7}], [%r8];",
        "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd4, {%r9, %r10}], [%r11];",
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};",
        "wgmma.wait_group.sync.aligned 1;", "wgmma.wait_group.sync.aligned 0;",
        "mov.u32 %r12, %nctaid.x;", "setmaxnreg.inc.sync.aligned.u32 232;",
    ])
    facts = aot.code_facts(ptx, "%0 = tt.get_num_programs x : i32\nttg.warp_specialize(%a) ...")
    assert facts == {"wgmma": True, "mma": False, "tma": True, "tma_store": True, "wgmma_max_pending": 1,
                     "warp_specialized": True, "persistent": True, "max_load_bits": 128}
    plain = aot.code_facts("ld.global.b32 %r1, [%rd1];\ncp.async.cg.shared.global [%r2], [%rd2], 0x10, %r3;\n"
                           "mov.u32 %r4, %nctaid.x;\n"
                           "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};", "")
    assert plain == {"wgmma": False, "mma": True, "tma": False, "tma_store": False, "wgmma_max_pending": None,
                     "warp_specialized": False, "persistent": False, "max_load_bits": 128}
    # hex copy sizes as Triton writes them; %nctaid without tt.get_num_programs (descriptor scratch) is not
    # persistence; a warp_specialize op without register reallocation is not counted as specialised
    assert not aot.code_facts("setmaxnreg.dec.sync.aligned.u32 40;", "")["warp_specialized"]
