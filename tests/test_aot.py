"""Ahead-of-time compile of every kernel case for sm_80 and sm_90.

No GPU needed.  The compile runs in a subprocess with the interpreter off (in
this process every kernel is an interpreted function); the cases
(``kernels/aot_cases.py``) are listed here, so each case and architecture is its
own test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opt_core.kernels import aot, aot_cases

ROOT = Path(__file__).resolve().parents[1]
CASES = aot_cases.all_cases()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "opt_core.kernels.compile_check", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"the AOT compile produced no results:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return {(r["case"], r["arch"]): r for r in json.loads(out.read_text())}


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
