"""One import namespace: what the wheel installs, what the names are, and the module switches.

The repository keeps its owner's folders (``kernels/``, ``dist/``) at the top; installed they are
``opt_core.kernels`` and ``opt_core.dist``.  Nothing else may be importable under the bare names
(PyPI has unrelated ``kernels``, ``dist`` and ``bench`` packages), and no function may shadow the
module that defines it.
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

import opt_core
from opt_core import functional
from opt_core.kernels import dispatch

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("kernels", "opt_core", "dist")
BARE_NAMES = ("kernels", "dist", "bench")


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_wheel_installs_exactly_one_top_level_package(tmp_path):
    """``python -m build --outdir build/`` on a copy of the checkout (offline: no build isolation):
    the wheel holds opt_core (kernels and dist inside it), no bench or tests, and dist/ is untouched."""
    pytest.importorskip("build")
    checkout = tmp_path / "checkout"
    for f in _tracked_files():
        (checkout / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, checkout / f)
    before = _snapshot(checkout / "dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", "build/"], cwd=checkout,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _snapshot(checkout / "dist") == before, "building wrote into dist/, the sharding package"
    wheels = list((checkout / "build").glob("*.whl"))
    assert len(wheels) == 1 and list((checkout / "build").glob("*.tar.gz")), sorted((checkout / "build").iterdir())

    names = zipfile.ZipFile(wheels[0]).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"opt_core"}, top
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    if top_level:
        assert zipfile.ZipFile(wheels[0]).read(top_level[0]).decode().split() == ["opt_core"]
    for module in ("opt_core/kernels/attention.py", "opt_core/kernels/reference.py", "opt_core/dist/mesh.py",
                   "opt_core/functional.py", "opt_core/model.py"):
        assert module in names, module
    assert not [n for n in names if "conftest" in n or "/bench/" in n or "test_" in n]


def _imports(path: Path) -> list[str]:
    """Absolute module names ``path`` imports (relative imports are not used in this code base)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; use absolute imports")
            found.append(node.module or "")
    return found


def test_no_source_imports_a_bare_folder_name():
    """Every import of our code goes through ``opt_core``: a bare ``kernels``/``dist``/``bench`` import
    would load a second copy of a module (or someone else's package of that name)."""
    offenders = []
    for folder in (*SOURCE_FOLDERS, "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in _imports(path):
                if name.split(".")[0] in ("kernels", "dist"):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
                if name.split(".")[0] == "bench" and folder in SOURCE_FOLDERS:
                    offenders.append(f"{path.relative_to(ROOT)}: {name} (bench is not installed)")
    assert not offenders, offenders


def test_importing_everything_leaves_no_bare_module_behind(tmp_path):
    """In a fresh interpreter outside the checkout: importing the whole installed package loads no
    module under a bare name, and ``import opt_core.kernels`` alone does not build the model stack."""
    code = (
        "import sys\n"
        "import opt_core.kernels, opt_core.functional\n"
        "assert 'opt_core.model' not in sys.modules and 'opt_core.layers' not in sys.modules, sorted(sys.modules)\n"
        "import opt_core.dist, opt_core.train, opt_core.hf\n"
        "from opt_core import OPTForCausalLM, FusedAdamW, DynamicLossScaler\n"
        f"bare = [m for m in {BARE_NAMES!r} if m in sys.modules]\n"
        "assert not bare, bare\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_from_the_checkout_root_installed_packages_come_before_its_folders():
    """``python -c`` at the root puts "" first on sys.path, so ``kernels/`` would shadow Hugging Face's
    ``kernels`` (which transformers >= 5.25 imports): importing opt_core moves the root behind
    site-packages, and ``bench`` still resolves to the checkout."""
    code = (
        "import importlib.metadata, importlib.util, sys\n"
        "assert sys.path[0] == '', sys.path\n"
        "import opt_core, bench\n"
        "assert sys.path[-1] == '' and sys.path.count('') == 1, sys.path\n"
        "assert bench.__file__.startswith(sys.argv[1] + '/bench/'), bench.__file__\n"
        "try:\n"
        "    importlib.metadata.distribution('kernels')\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    print('no installed kernels')\n"
        "else:\n"
        "    origin = importlib.util.find_spec('kernels').origin\n"
        "    assert not origin.startswith(sys.argv[1] + '/kernels/'), origin\n"
        "    print('installed kernels')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("kernels"), proc.stdout + proc.stderr


def test_functions_never_shadow_their_modules():
    from opt_core import kernels

    for op in ("attention", "layer_norm", "relu_mlp", "adamw"):
        module = importlib.import_module(f"opt_core.kernels.{op}")
        assert isinstance(module, types.ModuleType), f"opt_core.kernels.{op} is {module!r}"
        assert getattr(kernels, op) is module
    for name in functional.__all__:
        fn = getattr(functional, name)
        assert callable(fn) and not isinstance(fn, types.ModuleType), name
    assert functional.attention.__module__ == "opt_core.kernels.attention"
    assert set(opt_core.__all__) == {"DynamicLossScaler", "FusedAdamW", "FusedLayerNorm", "FusedSelfAttention",
                                     "OPTConfig", "OPTForCausalLM", "ReLUMLP", "replace_layer_norms"}
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        opt_core.Nope  # noqa: B018


# --------------------------------------------------------------------------- module switches
interpreter_only = pytest.mark.skipif(not dispatch.INTERPRET,
                                      reason="TMA = 'on' takes the descriptor path only under the interpreter "
                                             "or on an sm_90 GPU; the interpreter is where both paths run")


@interpreter_only
def test_attention_tma_switch_changes_the_path(monkeypatch):
    """Assigning the documented switch on the module changes what the kernel launch builds."""
    import opt_core.kernels.attention

    built = []
    make = opt_core.kernels.attention._descriptor
    monkeypatch.setattr(opt_core.kernels.attention, "_descriptor", lambda t: built.append(t) or make(t))
    q, k, v = (torch.randn(1, 40, 2, 64, dtype=torch.float16) for _ in range(3))
    saved = opt_core.kernels.attention.TMA
    try:
        opt_core.kernels.attention.TMA = "on"
        on = functional.attention(q, k, v, causal=True)
        assert len(built) == 2, "forward: K and V through descriptors"
        opt_core.kernels.attention.TMA = "off"
        off = functional.attention(q, k, v, causal=True)
        assert len(built) == 2, "TMA = 'off' still built descriptors"
    finally:
        opt_core.kernels.attention.TMA = saved
    torch.testing.assert_close(on, off, rtol=0, atol=0)


@interpreter_only
def test_relu_mlp_tma_switch_changes_the_path(monkeypatch):
    import opt_core.kernels.relu_mlp

    layouts = []
    operands = opt_core.kernels.relu_mlp._operands

    def recorded(a, b):
        A, B, layout = operands(a, b)
        layouts.append(layout["TMA"])
        return A, B, layout

    monkeypatch.setattr(opt_core.kernels.relu_mlp, "_operands", recorded)
    x = torch.randn(24, 32, dtype=torch.float16)
    w1, b1 = torch.randn(64, 32, dtype=torch.float16) / 8, torch.randn(64, dtype=torch.float16)
    w2, b2 = torch.randn(32, 64, dtype=torch.float16) / 8, torch.randn(32, dtype=torch.float16)
    saved = opt_core.kernels.relu_mlp.TMA
    try:
        opt_core.kernels.relu_mlp.TMA = "on"
        on = functional.relu_mlp(x, w1, b1, w2, b2)
        opt_core.kernels.relu_mlp.TMA = "off"
        off = functional.relu_mlp(x, w1, b1, w2, b2)
    finally:
        opt_core.kernels.relu_mlp.TMA = saved
    assert layouts == [True, True, False, False], layouts
    torch.testing.assert_close(on, off, rtol=0, atol=0)
