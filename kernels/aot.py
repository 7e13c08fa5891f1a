"""Ahead-of-time compile check: every kernel, every autotune config, sm_80 and sm_90.

No GPU is needed.  ``kernels/aot_cases.py`` lists the cases (a kernel, the
argument values it runs with at production shapes, and one autotune config);
this module compiles them with ``triton.compile`` for an explicit ``GPUTarget``
and reads off what matters:

- spills: ptxas's ``-v`` log of the compile gives registers and the stack frame
  (``cuobjdump --dump-resource-usage`` on the cubin where no log is at hand); a
  non-zero stack means local memory, i.e. spills;
- shared memory: ``metadata.shared`` against the target's per-block limit;
- tensor cores: ``wgmma`` (sm_90) or ``mma`` (sm_80) in the PTX of kernels that
  do matrix products;
- TMA: ``cp.async.bulk.tensor`` in the PTX of kernels that take tensor
  descriptors (sm_90 only);
- wgmma serialisation: ptxas's own notes in the same log, e.g. C7515 (wgmmas
  serialised: a non-wgmma instruction defines an accumulator inside the
  pipeline) and C7517 (a ``warpgroup.wait`` injected before a wgmma whose
  registers it cannot prove free).

What the log gives is kept beside the kernel in Triton's cache, since a cache
hit runs no ptxas.

Arguments are specialised the way Triton's launcher specialises them at run
time (integers equal to 1 become constants, pointers and integers divisible by
16 get the divisibility hint), so the compiled code is the code a launch gets.

The compile must run with the interpreter off: ``python -m opt_core.kernels.compile_check``
(the test suite starts it in a subprocess without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

ARCHS = (80, 90)
# Largest dynamic shared memory a block may opt into, bytes (CUDA's limit per compute capability).
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}

_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel at one production shape and one autotune config."""

    name: str
    module: str               # where the @triton.jit function lives
    kernel: str               # its attribute name
    signature: dict           # argument -> Triton type, or "constexpr"
    constexprs: dict          # argument -> value
    divisible_by_16: tuple    # arguments given the divisibility hint
    num_warps: int
    num_stages: int = 1
    tensor_cores: bool = False
    archs: tuple = ARCHS      # the targets this config is used on (a Hopper-only tile lists only 90)
    tma: bool = False         # takes tensor descriptors: the PTX must load through TMA
    expects: tuple = ()       # (fact, value) pairs of code_facts the compiled code must show


@dataclasses.dataclass(frozen=True)
class Descriptor:
    """A TMA tensor descriptor argument: element dtype and block shape (what the launch's pre-hook sets);
    for a Gluon kernel also its shared-memory layout (Gluon's descriptors carry one)."""

    dtype: torch.dtype
    block_shape: tuple
    layout: Any = None


def case(name: str, fn: Any, args: dict, constexprs: dict, *, num_warps: int, num_stages: int = 1,
         tensor_cores: bool = False, archs: tuple = ARCHS, expects: dict | None = None) -> Case:
    """Build a case from the values a launch passes.

    ``args`` maps each runtime argument to what would be passed: a torch dtype
    for a tensor of that dtype, a ``Descriptor`` for a tensor descriptor, None
    for an absent tensor, an int or a float.  ``expects`` maps code_facts keys to the values the
    compiled code must show (e.g. ``{"tma_store": True, "persistent": True}``, ``{"max_load_bits": 128}``).
    """
    signature, consts, div16 = {}, dict(constexprs), []
    tma = False
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        if arg not in args:
            raise ValueError(f"AOT case {name}: no value for argument {arg!r} of {fn.__name__}")
        value = args[arg]
        if isinstance(value, Descriptor):
            layout = "" if value.layout is None else f",{value.layout!r}"
            signature[arg] = f"tensordesc<{_TYPES[value.dtype]}[{', '.join(map(str, value.block_shape))}]{layout}>"
            tma = True
        elif value is None:
            signature[arg], consts[arg] = "constexpr", None
        elif isinstance(value, torch.dtype):
            signature[arg] = "*" + _TYPES[value]
            div16.append(arg)
        elif isinstance(value, bool):
            raise TypeError(f"AOT case {name}: pass the bool {arg!r} as a constexpr")
        elif isinstance(value, int):
            if value == 1:
                signature[arg], consts[arg] = "constexpr", 1
            else:
                signature[arg] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    div16.append(arg)
        elif isinstance(value, float):
            signature[arg] = "fp32"
        else:
            raise TypeError(f"AOT case {name}: cannot specialise {arg!r}={value!r}")
    if tma and any(a < 90 for a in archs):
        raise ValueError(f"AOT case {name}: tensor descriptors (TMA) need sm_90 or newer, got archs {archs}")
    # The defining module of the Python function: under the interpreter ``fn`` is an InterpretedFunction,
    # whose own __module__ is Triton's.
    return Case(name, fn.fn.__module__, fn.__name__, signature, consts, tuple(div16), num_warps, num_stages,
                tensor_cores, tuple(archs), tma, tuple(sorted((expects or {}).items())))


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _ptxas() -> str:
    return os.path.join(os.path.dirname(_cuobjdump()), "ptxas")


# ptxas -v's notes on the wgmma pipeline: "(C7515) Potential Performance Loss: wgmma.mma_async instructions are
# serialized ...", "(C7517) warpgroup.wait is injected in around line N ...".
_PTXAS_NOTE = re.compile(r"\((C\d+)\)[^\n]*(?:wgmma|warpgroup)")


def _note_codes(ptxas_log: str) -> list[str]:
    """The codes of the wgmma notes in a ``ptxas -v`` log, sorted, each once."""
    return sorted(set(_PTXAS_NOTE.findall(ptxas_log)))


def wgmma_notes(ptx: str, arch: int) -> list[str]:
    """The codes of ptxas's notes on the wgmma pipeline of ``ptx`` (sorted, each once): empty where it
    kept every product asynchronous as written; ptxas runs again with ``-v`` (sm_90a: wgmma's target)."""
    if arch < 90 or not re.search(r"\bwgmma\.", ptx):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), f"-arch=sm_{arch}a", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    return _note_codes(out.stdout + out.stderr)


def resource_usage(binary: str, cuobjdump: str | None = None) -> dict[tuple[str | None, str], dict[str, int]]:
    """{(arch, function): {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}} of a cubin, fatbin or
    shared library, from ``cuobjdump --dump-resource-usage`` (Triton's bundled one unless named); arch is
    None for a bare cubin, which prints no arch line."""
    out = subprocess.run([cuobjdump or _cuobjdump(), "--dump-resource-usage", binary],
                         capture_output=True, text=True, check=True).stdout
    usage, arch = {}, None
    lines = iter(out.splitlines())
    for line in lines:
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\w+):", line):
            usage[(arch, m.group(1))] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", next(lines, ""))}
    return usage


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """Registers and stack bytes of the one kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = list(resource_usage(f.name).values())
    if len(usage) != 1 or not {"REG", "STACK"} <= usage[0].keys():
        raise RuntimeError(f"cuobjdump described {len(usage)} kernels, not one with REG and STACK: {usage}")
    return usage[0]["REG"], usage[0]["STACK"]


# ptxas -v's resource lines: "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", then
# "ptxas info    : Used 168 registers, used 3 barriers".
_PTXAS_USAGE = re.compile(r"(\d+) bytes stack frame.*?Used (\d+) registers", re.S)


def facts_from_ptxas_log(log: str) -> dict | None:
    """Registers, stack bytes and wgmma notes from the ``ptxas -v`` log of one kernel; None where the log
    does not describe exactly one kernel."""
    usage = _PTXAS_USAGE.findall(log)
    if len(usage) != 1:
        return None
    stack, registers = map(int, usage[0])
    return {"registers": registers, "stack": stack, "wgmma_notes": _note_codes(log)}


def _compile_logged(src: Any, arch: int, options: dict) -> tuple[Any, str]:
    """``triton.compile`` for sm_``arch`` and the ``ptxas -v`` log of that compile: Triton always runs ptxas
    with ``-v`` and prints the log when asked (a knob outside the cache key).  The log is empty where the
    kernel came from Triton's cache, since then ptxas did not run."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    text = log.getvalue()
    return compiled, text if "ptxas info" in text else ""


_PTXAS_FACTS_FILE = "ptxas_facts.json"


def ptxas_facts(compiled: Any, arch: int, ptxas_log: str) -> dict:
    """Registers, stack bytes and wgmma notes of a compiled kernel, read off its compile's ptxas log and kept
    in Triton's cache beside its cubin: a cache hit (no ptxas run, no log) reads them back.  A hit with
    nothing kept (a cache from before) asks cuobjdump and ptxas again: 0.2-0.8 CPU-seconds a kernel, and
    the check has about a thousand kernels."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(compiled.hash)
    kept = None if ptxas_log else cache.get_file(_PTXAS_FACTS_FILE)
    if kept is not None:
        with open(kept) as f:
            return json.load(f)
    facts = facts_from_ptxas_log(ptxas_log)
    if facts is None:
        registers, stack = _resource_usage(compiled.asm["cubin"])
        facts = {"registers": registers, "stack": stack, "wgmma_notes": wgmma_notes(compiled.asm["ptx"], arch)}
    cache.put(json.dumps(facts), _PTXAS_FACTS_FILE, binary=False)
    return facts


_GLOBAL_LOAD = re.compile(r"\bld\.global[\w.:]*")
# Triton's PTX writes the copy size in hex ("..., 0x10, %r3;"), hand-written PTX often in decimal.
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global[\w.:]*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_WGMMA_WAIT = re.compile(r"\bwgmma\.wait_group\.sync\.aligned\s+(\d+)")


def _load_bits(mnemonic: str) -> int:
    """Bits one ``ld.global[...][.vN].<type><bits>`` moves per thread."""
    parts = mnemonic.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    width = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bufs]\d+", p)), 0)
    return lanes * width


def code_facts(ptx: str, ttgir: str) -> dict:
    """What the compiled code does, read off its PTX (and TTGIR):

    - ``wgmma`` / ``mma``: tensor-core instructions (sm_90 / sm_80);
    - ``tma``: TMA loads (``cp.async.bulk.tensor`` global -> shared); ``tma_store``: TMA stores (shared -> global);
    - ``wgmma_max_pending``: the largest ``wgmma.wait_group N``: N > 0 means a matrix product stays in flight
      while the warpgroup does other work (softmax, the next tile's loads);
    - ``warp_specialized``: producer/consumer partitions (``ttg.warp_specialize``) with register reallocation
      (``setmaxnreg``);
    - ``persistent``: the kernel's own code reads the grid size (``tt.get_num_programs`` in the TTGIR): a tile
      loop strided by the program count (``%nctaid`` in the PTX alone is not enough: the lowering of a
      device-side tensor descriptor reads it to find its scratch slot);
    - ``max_load_bits``: the widest per-thread global load (``ld.global`` vectors, ``cp.async`` copies).
    """
    waits = [int(n) for n in _WGMMA_WAIT.findall(ptx)]
    loads = [_load_bits(m) for m in _GLOBAL_LOAD.findall(ptx)] + [8 * int(n, 0) for n in _CP_ASYNC.findall(ptx)]
    return {
        "wgmma": bool(re.search(r"\bwgmma\.", ptx)),
        "mma": bool(re.search(r"\bmma\.sync\.", ptx)),
        "tma": bool(re.search(r"\bcp\.async\.bulk\.tensor\.\d+d\.shared::\w+\.global", ptx)),
        "tma_store": bool(re.search(r"\bcp\.async\.bulk\.tensor\.\d+d\.global\.shared", ptx)),
        "wgmma_max_pending": max(waits, default=None),
        "warp_specialized": "ttg.warp_specialize" in ttgir and "setmaxnreg" in ptx,
        "persistent": "tt.get_num_programs" in ttgir,
        "max_load_bits": max(loads, default=0),
    }


def compile_case(c: Case, arch: int) -> dict:
    """Compile ``c`` for sm_``arch``; the facts the checks need, or the error."""
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    result = {"case": c.name, "arch": arch, "tensor_cores_required": c.tensor_cores, "tma_required": c.tma,
              "expects": dict(c.expects)}
    start = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(c.module), c.kernel)
        constexprs = {(fn.arg_names.index(k),): v for k, v in c.constexprs.items()}
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in c.divisible_by_16}
        source = GluonASTSource if fn.is_gluon() else ASTSource
        src = source(fn, dict(c.signature), constexprs, attrs)
        compiled, ptxas_log = _compile_logged(src, arch, {"num_warps": c.num_warps, "num_stages": c.num_stages})
        facts = ptxas_facts(compiled, arch, ptxas_log)
        result.update(**facts, shared=compiled.metadata.shared, max_shared=MAX_SHARED[arch],
                      **code_facts(compiled.asm["ptx"], compiled.asm["ttgir"]),
                      wgmma_serialized=bool(facts["wgmma_notes"]), error=None)
    except Exception as e:  # reported per case; one failure must not hide the others
        result["error"] = f"{type(e).__name__}: {e}"
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def problems(result: dict) -> list[str]:
    """What is wrong with one compile result; empty when it passes."""
    if result.get("error"):
        return [f"did not compile: {result['error']}"]
    found = []
    if result["stack"] != 0:
        found.append(f"spills: STACK={result['stack']} bytes (REG={result['registers']})")
    if result["shared"] > result["max_shared"]:
        found.append(f"shared memory {result['shared']} B > limit {result['max_shared']} B")
    if result["tensor_cores_required"]:
        if result["arch"] >= 90 and not result["wgmma"]:
            found.append("no wgmma in the sm_90 PTX")
        if result["arch"] < 90 and not result["mma"]:
            found.append("no mma in the sm_80 PTX")
    if result.get("tma_required") and not result["tma"]:
        found.append("no TMA load (cp.async.bulk.tensor) in the PTX")
    for fact, wanted in result.get("expects", {}).items():
        if result[fact] != wanted:
            found.append(f"{fact} is {result[fact]}, expected {wanted}")
    return found


def _compile_star(job: tuple[Case, int]) -> dict:
    return compile_case(*job)


def compile_all(cases: list[Case], archs=ARCHS, workers: int | None = None) -> list[dict]:
    jobs = [(c, a) for c in cases for a in archs if a in c.archs]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [compile_case(c, a) for c, a in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_star, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
