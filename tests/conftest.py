"""Test harness: interpreter switch, markers, seeding, output poisoning.

The interpreter switch must come before anything imports Triton (``kernels``
does): with no CUDA device, ``TRITON_INTERPRET=1`` makes every ``@triton.jit``
kernel an interpreted one, so the CPU suite tests the real kernels.  Importing
torch does not import Triton, so asking torch about CUDA first is safe.  The
interpreter's own defects (bf16 ``tl.dot``, bf16 rounding) are worked around
in ``kernels/interpreter_fixes.py``, which ``kernels.dispatch`` applies.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import filelock  # noqa: E402
import pytest  # noqa: E402
import triton  # noqa: E402

from opt_core.kernels import dispatch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "interpreter: only meaningful under TRITON_INTERPRET=1")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (the CPU interpreter)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(no_gpu)
        if "interpreter" in item.keywords and not dispatch.INTERPRET:
            item.add_marker(no_interp)


def pytest_report_header(config):
    mode = "CUDA: " + torch.cuda.get_device_name() if HAS_CUDA else "CPU"
    interp = "on" if dispatch.INTERPRET else "off"
    return f"opt-core: {mode}; torch {torch.__version__}; triton {triton.__version__}; interpreter {interp}"


@pytest.fixture(autouse=True)
def _fresh_seed_and_poison(request):
    """Each test draws its own inputs (seeded by its id, so a failure replays)
    and every buffer an op allocates starts as NaN."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    with dispatch.poison_outputs(True):
        yield


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def native_path():
    """Every op on its native path inside the test (kernels/native.py: what a CPU training run takes
    without TRITON_INTERPRET); the training tests use it, the interpreted kernels have their own."""
    with dispatch.native_backend():
        yield


@pytest.fixture
def gloo_threads():
    """A counter of gloo's threads in this process (each backend's workers and socket loop): they live as
    long as a process group's backend, so a count back where it started means the groups were freed.
    Read from Linux's /proc, like the rest of the suite (the project runs on Linux)."""
    tasks = Path("/proc/self/task")
    return lambda: sum("gloo" in (task / "comm").read_text() for task in tasks.iterdir())


_WORDS = ("the model trains on packed sequences of tokens with a learned position table and a tied head "
          "while the optimizer keeps fp32 moments and the scaler watches for overflow in every step").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small folder of text documents with learnable structure: the training tests' data."""
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):  # different documents (near duplicates would be deduplicated away)
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(80, 160)))
        (folder / f"doc{i:02d}.txt").write_text(text + "\n")
    return folder


def _compile_check(filter: str, out: Path) -> dict:
    """{(case, arch): result} of ``python -m opt_core.kernels.compile_check`` for the AOT cases whose name
    contains ``filter`` (written to ``out``), in a subprocess with the interpreter off: in this process every
    kernel is an interpreted function."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "opt_core.kernels.compile_check", "--filter", filter,
                           "--json", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"the AOT compile produced no results:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return _compiled(out)


def _compiled(results: Path) -> dict:
    return {(r["case"], r["arch"]): r for r in json.loads(results.read_text())}


@pytest.fixture(scope="session")
def aot_compile(tmp_path_factory, request):
    """``compile(filter="")``: {(case, arch): result} of the AOT cases whose name contains ``filter``.  Once
    every case has compiled (tests/test_aot.py), later calls read from that run.  Under pytest-xdist with
    tests/test_aot.py in the session, the first worker to ask compiles every case for all of them (the
    compile uses every core anyway) into the session's shared temporary folder, under a lock; the others
    read its file."""
    runs: dict[str, dict] = {}
    full_run_ahead = any(item.path.name == "test_aot.py" for item in request.session.items)
    on_a_worker = os.environ.get("PYTEST_XDIST_WORKER") is not None
    shared = tmp_path_factory.getbasetemp().parent if on_a_worker and full_run_ahead else None

    def compile(filter: str = "") -> dict:
        if shared is not None and "" not in runs:
            with filelock.FileLock(shared / "aot.lock"):
                done = shared / "aot.json"
                runs[""] = _compiled(done) if done.exists() else _compile_check("", done)
        if "" in runs:
            return {key: r for key, r in runs[""].items() if filter in key[0]}
        if filter not in runs:
            runs[filter] = _compile_check(filter, tmp_path_factory.mktemp("aot") / "results.json")
        return runs[filter]

    return compile
