"""Every ```python block of README.md runs, each in a fresh interpreter, as a reader would paste it.

The blocks run on the CPU with ``TRITON_INTERPRET=0`` (what a reader's ``python`` has: the ops take
their plain-PyTorch paths), in a temporary working folder.  A block that cannot run on a CPU is
marked by the line right above its fence:

    <!-- readme-test: skip (the reason) -->

It is then only compiled (a syntax check) and reported as skipped with that reason.  Shell
commands are ```bash blocks, which are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")


def _blocks() -> list:
    """A pytest param (code, skip reason or None, line) for every ```python block, named by its section."""
    blocks, heading, fence, previous = [], "top", None, ""
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), start=1):
        if fence is None and line.startswith("```"):
            skip = SKIP.fullmatch(previous.strip())
            fence = {"lang": line[3:].strip(), "line": number, "code": [], "skip": skip["reason"] if skip else None}
        elif fence is not None and line.strip() == "```":
            if fence["lang"] == "python":
                blocks.append(pytest.param("\n".join(fence["code"]) + "\n", fence["skip"], fence["line"],
                                           id=f"line {fence['line']}: {heading}"))
            fence = None
        elif fence is not None:
            fence["code"].append(line)
        elif line.startswith("#"):
            heading = line.lstrip("# ")
        if fence is None and line.strip():
            previous = line
    return blocks


def test_the_readme_has_python_blocks():
    assert len(_blocks()) >= 4, "the README's python blocks were not found: has the fence syntax changed?"


@pytest.mark.parametrize("code, skip, line", _blocks())
def test_readme_python_block_runs(code, skip, line, tmp_path):
    compile(code, f"README.md, block at line {line}", "exec")
    if skip:
        pytest.skip(skip)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"README.md block at line {line} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
