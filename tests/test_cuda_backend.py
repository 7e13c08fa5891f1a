"""The CUDA C++ path: kernels/cuda/ (built by CMakeLists.txt, or compiled by CuPy) and the host side in
opt_core.kernels.cuda_backend.

On the CPU: the CMake build for sm_80/sm_90 with no spills and 128-bit vector accesses, the C ABI and
launch table against the sources, and the host-side tables (rows, chunks, cache).  On a GPU (marked
``gpu``): the kernels step by step against torch.optim.AdamW and the Triton path, for each loader
there (CuPy when installed; the library when nvcc and cmake can build it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import triton

from opt_core.kernels import adamw as triton_adamw
from opt_core.kernels import aot
from opt_core.kernels import cuda_backend as cb
from opt_core.kernels import reference
from opt_core.kernels.testing import FORWARD_FACTOR, assert_close_to_reference

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "kernels" / "cuda"
ARCHS = ("sm_80", "sm_90")


def _cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return shutil.which("cuobjdump") or (str(bundled) if bundled.is_file() else None)


def _run(cmd: list) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="session")
def built_library(tmp_path_factory) -> Path:
    """libopt_core_cuda.so configured and built from this checkout into a fresh folder."""
    nvcc, cmake = shutil.which("nvcc"), shutil.which("cmake")
    if nvcc is None or cmake is None:
        pytest.skip(f"building kernels/cuda needs nvcc and cmake on PATH (nvcc: {nvcc}, cmake: {cmake})")
    build = tmp_path_factory.mktemp("cuda_build")
    _run([cmake, "-S", ROOT, "-B", build])
    _run([cmake, "--build", build, "-j2"])
    return build / "libopt_core_cuda.so"


# --------------------------------------------------------------------------- the build
def test_library_builds_for_sm80_and_sm90_without_spills(built_library):
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump on PATH or in Triton's bundle")
    usage = aot.resource_usage(str(built_library), _cuobjdump())
    for arch in ARCHS:
        for kernel in cb.KERNELS:
            assert (arch, kernel) in usage, f"{kernel} has no {arch} code: {sorted(usage)}"
            u = usage[(arch, kernel)]
            assert u["STACK"] == 0 and u["LOCAL"] == 0, f"{kernel} spills on {arch}: {u}"
            assert u["REG"] <= 65536 // cb.THREADS, f"{kernel} on {arch} cannot run {cb.THREADS} threads: {u}"
            assert u["SHARED"] <= 48 * 1024, f"{kernel} on {arch}: {u}"
    ptx = _run([_cuobjdump(), "-lptx", built_library])
    assert re.search(r"sm_90\.ptx", ptx), f"no compute_90 PTX for newer GPUs:\n{ptx}"


@pytest.mark.parametrize("kernel", ["opt_core_adamw_step", "opt_core_grad_stats_partials"])
def test_streamed_kernels_move_128_bit_vectors(built_library, kernel):
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump on PATH or in Triton's bundle")
    for arch in ARCHS:
        sass = _run([_cuobjdump(), "-sass", "-arch", arch, "-fun", kernel, built_library])
        # LDG.E.EF.128 / STG.E.EF.128: 128-bit global accesses with the streaming (evict-first) hint
        assert re.search(r"\bLDG\.E(\.\w+)*\.128\b", sass), f"{kernel} on {arch} has no 128-bit global load"
        assert re.search(r"\bSTG\.E(\.\w+)*\.128\b", sass), f"{kernel} on {arch} has no 128-bit global store"


def test_ctypes_loader_loads_the_library_and_reports_cuda_errors(built_library):
    lib = cb._LibraryLoader(built_library)  # checks the table layout and declares every launcher
    assert lib.path == built_library
    if torch.cuda.is_available():
        return
    # No GPU here: the launcher must hand back the runtime's error, not crash.
    with pytest.raises(RuntimeError, match=r"opt_core_grad_stats_finish failed to launch: CUDA error \d+"):
        lib.launch(cb.Launch("opt_core_grad_stats_finish", 1, (0, 0, 0, 0, 0)), 0, 0)


# --------------------------------------------------------------------------- the C ABI against the sources
_C_KINDS = {"long long": "i64", "int": "i32", "double": "f64"}


def _parameters(signature: str) -> list[str]:
    return [" ".join(p.split()) for p in signature.split(",")]


def _kind(parameter: str) -> str:
    ctype = parameter.rsplit(" ", 1)[0]
    return "ptr" if ctype.endswith("*") else _C_KINDS[ctype]


@pytest.mark.parametrize("kernel", sorted(cb.KERNELS))
def test_kernel_and_launcher_signatures_match_the_loaders(kernel):
    source, kinds = cb.KERNELS[kernel]
    text = (CUDA_DIR / source).read_text()
    found = re.search(rf'extern "C" __global__ void __launch_bounds__\(kThreads\) {kernel}\((.*?)\) \{{', text, re.S)
    assert found, f"{kernel} is not an extern \"C\" kernel of {source}"
    parameters = _parameters(found.group(1))
    assert [_kind(p) for p in parameters] == list(kinds), parameters
    launcher = re.search(rf"OPT_CORE_EXPORT int {kernel}_launch\((.*?)\) \{{", text, re.S)
    assert launcher, f"{source} has no {kernel}_launch"
    assert _parameters(launcher.group(1)) == ["int device", "cudaStream_t stream", "unsigned int grid", *parameters]


def _struct_fields(text: str, name: str) -> list[str]:
    body = re.search(rf"struct {name} \{{(.*?)\}};", text, re.S).group(1)
    return re.findall(r"long long (\w+);", body)


def test_table_layout_and_constants_match_the_headers():
    table = (CUDA_DIR / "table.cuh").read_text()
    numeric = (CUDA_DIR / "numeric.cuh").read_text()
    assert _struct_fields(table, "TensorRow") == list(cb.ROW_FIELDS)
    assert _struct_fields(table, "ChunkRow") == list(cb.CHUNK_FIELDS)
    codes = dict(re.findall(r"k(\w+) = (\d+)", re.search(r"enum DType[^{]*\{(.*?)\};", table).group(1)))
    assert {name.lower(): int(v) for name, v in codes.items()} == {
        str(dtype).removeprefix("torch."): code for dtype, code in cb.DTYPE_CODES.items()}
    assert int(re.search(r"constexpr int kThreads = (\d+);", table).group(1)) == cb.THREADS
    assert int(re.search(r"constexpr int kVec = (\d+);", numeric).group(1)) == cb.VECTOR_ELEMS
    assert cb.CHUNK % cb.VECTOR_ELEMS == 0


def test_cupy_sources_inline_each_header_once(tmp_path, monkeypatch):
    for source in {s for s, _ in cb.KERNELS.values()}:
        text = cb.source_with_headers(source)
        assert not re.search(r'#include "', text) and "#pragma once" not in text
        assert text.count("struct TensorRow {") == 1 and text.count("constexpr int kVec") == 1
    # CuPy's compile cache is keyed by the text: a header edit must change it.
    copy = tmp_path / "cuda"
    shutil.copytree(CUDA_DIR, copy)
    monkeypatch.setattr(cb, "SOURCE_DIR", copy)
    before = cb.source_with_headers("adamw.cu")
    (copy / "numeric.cuh").write_text((copy / "numeric.cuh").read_text() + "// edited\n")
    after = cb.source_with_headers("adamw.cu")
    assert "// edited" not in before and "// edited" in after


# --------------------------------------------------------------------------- host-side tables
@pytest.mark.parametrize("chunk", [8, 64])
def test_chunks_cover_every_element_once(chunk):
    numels = [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 5, 0, 7]
    chunks = cb.chunk_rows(numels, chunk)
    for t, n in enumerate(numels):
        starts = [s for i, s in chunks if i == t]
        assert starts == sorted(starts) and len(starts) == -(-n // chunk), (t, n, starts)
        covered = [e for s in starts for e in range(s, min(s + chunk, n))]
        assert covered == list(range(n)), (t, n)
    assert [i for i, _ in chunks] == sorted(i for i, _ in chunks)  # tensor by tensor, in order


def _adamw_tensors(n: int, dtype=torch.bfloat16, offset: int = 0) -> dict[str, torch.Tensor]:
    def fresh(dt, extra=0):
        return torch.empty(n + extra, dtype=dt)[extra:]

    return dict(param=fresh(dtype, offset), grad=fresh(dtype), exp_avg=fresh(torch.float32),
                exp_avg_sq=fresh(torch.float32), max_exp_avg_sq=fresh(torch.float32), master=fresh(torch.float32),
                step=torch.zeros(2)[1])


def test_tensor_row_holds_addresses_size_dtypes_and_alignment():
    t = _adamw_tensors(37)
    assert all(x.data_ptr() % cb.VECTOR_BYTES == 0 for k, x in t.items() if k != "step"), "allocator alignment"
    row = dict(zip(cb.ROW_FIELDS, cb.tensor_row(**t)))
    assert {f: row[f] for f in cb.ADDRESS_FIELDS} == {f: t[f].data_ptr() for f in cb.ADDRESS_FIELDS}
    assert (row["numel"], row["param_dtype"], row["grad_dtype"]) == (37, cb.DTYPE_CODES[torch.bfloat16],
                                                                      cb.DTYPE_CODES[torch.bfloat16])
    assert row["vectorized"] == 1, "a step tensor off the 16-byte boundary must not matter (one scalar read)"

    grad_only = dict(zip(cb.ROW_FIELDS, cb.tensor_row(grad=t["exp_avg"])))
    assert grad_only["grad"] == t["exp_avg"].data_ptr() and grad_only["param_dtype"] == cb.NO_PARAM
    assert all(grad_only[f] == 0 for f in cb.ADDRESS_FIELDS if f != "grad")
    assert grad_only["grad_dtype"] == cb.DTYPE_CODES[torch.float32]

    shifted = _adamw_tensors(37, offset=1)  # the param starts 2 bytes past a 16-byte boundary
    assert dict(zip(cb.ROW_FIELDS, cb.tensor_row(**shifted)))["vectorized"] == 0


def test_table_buffer_is_rows_then_chunks():
    rows = [cb.tensor_row(**_adamw_tensors(n)) for n in (20, 0, 9)]
    table = cb.Table(rows, torch.device("cpu"), chunk=8)
    assert table.chunks == cb.chunk_rows([20, 0, 9], 8) and table.num_chunks == 5
    words = table.buffer.tolist()
    row_words = len(cb.ROW_FIELDS) * len(rows)
    assert words[:row_words] == [w for r in rows for w in r]
    assert words[row_words:] == [w for c in table.chunks for w in c]
    assert table.rows_address == table.buffer.data_ptr()
    assert table.chunks_address - table.rows_address == 8 * row_words
    with pytest.raises(ValueError, match="multiple of 8"):
        cb.Table(rows, torch.device("cpu"), chunk=12)


def test_tables_are_cached_by_content_so_a_steady_loop_uploads_nothing(monkeypatch):
    uploads = []
    upload = cb._upload
    monkeypatch.setattr(cb, "_upload", lambda words, device: uploads.append(1) or upload(words, device))
    monkeypatch.setattr(cb, "_TABLES", {})
    cpu = torch.device("cpu")
    a, b = _adamw_tensors(70), _adamw_tensors(5)
    rows = [cb.tensor_row(**a), cb.tensor_row(**b)]
    first = cb.table_for(rows, cpu)
    assert cb.table_for([cb.tensor_row(**a), cb.tensor_row(**b)], cpu) is first and len(uploads) == 1
    assert cb.table_for([cb.tensor_row(**a), cb.tensor_row(**_adamw_tensors(5))], cpu) is not first  # new address
    as_fp16 = dict(b, param=b["param"].view(torch.float16), grad=b["grad"].view(torch.float16))
    assert cb.table_for([cb.tensor_row(**a), cb.tensor_row(**as_fp16)], cpu) is not first  # same bytes, new dtype
    monkeypatch.setattr(cb, "CHUNK", 16)
    assert cb.table_for(rows, cpu).chunk_elems == 16 and len(uploads) == 4


def _fake_device(monkeypatch) -> list:
    """Treat CPU tensors as kernel tensors and record launches instead of running them."""
    launches = []

    class Recorder:
        def launch(self, launch, device_index, stream):
            launches.append(launch)

    monkeypatch.setattr(cb, "_runs_kernels", lambda grad: grad.dtype in triton_adamw.KERNEL_DTYPES)
    monkeypatch.setattr(cb, "_stream", lambda device: 0)
    monkeypatch.setattr(cb, "loader", lambda name=None: Recorder())
    monkeypatch.setattr(cb, "_TABLES", {})
    return launches


def _state(params, master=False):
    return dict(grads=[torch.randn(p.shape).to(p.dtype) for p in params],
                exp_avgs=[torch.zeros(p.shape) for p in params], exp_avg_sqs=[torch.zeros(p.shape) for p in params],
                steps=[torch.zeros(()) for _ in params],
                masters=[p.float() if master and p.dtype != torch.float32 else None for p in params])


def test_one_adamw_launch_and_two_grad_stats_launches_whatever_the_tensors(monkeypatch):
    launches = _fake_device(monkeypatch)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    for n in (3, 40):
        launches.clear()
        cb._TABLES.clear()
        params = [torch.randn(2 * i + 1).to((torch.float32, torch.bfloat16, torch.float16)[i % 3]) for i in range(n)]
        state = _state(params, master=True)
        cb.adamw_step(params, state["grads"], state["exp_avgs"], state["exp_avg_sqs"], state["steps"],
                      masters=state["masters"], **hyper)
        assert [x.kernel for x in launches] == ["opt_core_adamw_step"], (n, launches)
        table = next(iter(cb._TABLES.values()))
        assert launches[0].args[:3] == (table.rows_address, table.chunks_address, cb.CHUNK)
        assert launches[0].grid == table.num_chunks == n
        assert all(float(s) == 1.0 for s in state["steps"])
        cb.adamw_step(params, state["grads"], state["exp_avgs"], state["exp_avg_sqs"], state["steps"],
                      masters=state["masters"], **hyper)  # the next step of a steady loop: the same table
        assert len(cb._TABLES) == 1 and launches[1].args[:2] == launches[0].args[:2]
        launches.clear()
        cb.grad_stats(state["grads"])
        assert [x.kernel for x in launches] == ["opt_core_grad_stats_partials", "opt_core_grad_stats_finish"]


def test_tensors_the_kernels_do_not_take_run_the_reference(monkeypatch):
    launches = _fake_device(monkeypatch)
    params = [torch.randn(5, 3).t(), torch.randn(6, dtype=torch.float64), torch.randn(4)]  # strided, fp64, kernel
    ours, theirs = [p.clone() for p in params], [p.clone() for p in params]
    state = _state(params)
    twin = {k: [t.clone() if t is not None else None for t in v] for k, v in state.items()}
    twin["exp_avgs"][1], twin["exp_avg_sqs"][1] = (torch.zeros(6, dtype=torch.float64) for _ in range(2))
    state["exp_avgs"][1], state["exp_avg_sqs"][1] = (torch.zeros(6, dtype=torch.float64) for _ in range(2))
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    cb.adamw_step(ours, state["grads"], state["exp_avgs"], state["exp_avg_sqs"], state["steps"], **hyper)
    reference.adamw_step(theirs[:2], twin["grads"][:2], twin["exp_avgs"][:2], twin["exp_avg_sqs"][:2],
                         twin["steps"][:2], **hyper)
    for a, b in zip(ours[:2], theirs[:2]):
        assert torch.equal(a, b)
    assert torch.equal(ours[2], params[2]), "the kernel tensor was only recorded, so it must be untouched"
    rows = next(iter(cb._TABLES.values())).rows
    assert [r[cb.ROW_FIELDS.index("param")] for r in rows] == [ours[2].data_ptr()]
    assert len(launches) == 1 and [float(s) for s in state["steps"]] == [1.0, 1.0, 1.0]


def test_invalid_arguments_raise_named_errors():
    p = [torch.randn(3)]
    s = _state(p)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    lists = (p, s["grads"], s["exp_avgs"], s["exp_avg_sqs"], s["steps"])
    with pytest.raises(ValueError, match="grads has 0 tensors"):
        cb.adamw_step(p, [], s["exp_avgs"], s["exp_avg_sqs"], s["steps"], **hyper)
    with pytest.raises(ValueError, match="inv_scale must hold one value"):
        cb.adamw_step(*lists, inv_scale=torch.ones(2), **hyper)
    with pytest.raises(TypeError, match="found_inf must be a 0-d tensor"):
        cb.adamw_step(*lists, found_inf=1.0, **hyper)
    with pytest.raises(ValueError, match="lr as a tensor must have 1 floating-point element"):
        cb.adamw_step(*lists, **dict(hyper, lr=torch.ones(3)))
    with pytest.raises(ValueError, match="at least one gradient"):
        cb.grad_stats([])
    with pytest.raises(ValueError, match="unscale_in_place needs inv_scale"):
        cb.grad_stats(s["grads"], unscale_in_place=True)
    with pytest.raises(ValueError, match="loader must be"):
        cb.loader("nvcc")


def test_missing_backend_says_what_is_missing_and_how_to_get_it(tmp_path, monkeypatch):
    def no_cupy():
        raise ImportError("No module named 'cupy'")

    monkeypatch.setattr(cb, "_cupy_loader", no_cupy)
    monkeypatch.setattr(cb, "DEFAULT_LIBRARY", tmp_path / "libopt_core_cuda.so")
    monkeypatch.delenv("OPT_CORE_CUDA_LIB", raising=False)
    monkeypatch.delenv("OPT_CORE_CUDA_LOADER", raising=False)
    with pytest.raises(cb.BackendUnavailable) as err:
        cb.loader()
    message = str(err.value)
    assert str(tmp_path / "libopt_core_cuda.so") in message and "CuPy is not installed" in message
    assert cb.BUILD_COMMAND in message and cb.CUPY_INSTALL in message
    monkeypatch.setenv("OPT_CORE_CUDA_LIB", str(tmp_path / "elsewhere.so"))
    with pytest.raises(cb.BackendUnavailable, match="no CUDA library at .*elsewhere.so.*OPT_CORE_CUDA_LIB"):
        cb.loader()


# --------------------------------------------------------------------------- on a GPU
SHAPES = [(3, 21851), (), (0,), (4097,), (1, 7), (513, 9), (2, 2, 3)]  # one crosses a chunk, one is empty


@pytest.fixture(params=["library", "cupy"])
def gpu_loader(request, monkeypatch) -> str:
    """Run the test with one loader: CuPy when installed, the library when it builds here."""
    if request.param == "cupy":
        pytest.importorskip("cupy", reason="the CuPy loader needs cupy (pip install cupy-cuda13x)")
    else:
        monkeypatch.setenv("OPT_CORE_CUDA_LIB", str(request.getfixturevalue("built_library")))
    monkeypatch.setenv("OPT_CORE_CUDA_LOADER", request.param)
    return request.param


def _gpu_params(dtype):
    out = []
    for i, s in enumerate(SHAPES):
        t = torch.randn(s, device="cuda").to(dtype)
        if i == 3:  # a view 1 element in: off the 16-byte boundary, the element-wise path
            base = torch.empty(t.numel() + 1, device="cuda", dtype=dtype)
            base[1:] = t.flatten()
            t = base[1:].view(s)
        out.append(t)
    return out


def _fresh_state(params, *, amsgrad=False, master=False):
    n = len(params)
    return dict(exp_avgs=[torch.zeros(p.shape, device="cuda") for p in params],
                exp_avg_sqs=[torch.zeros(p.shape, device="cuda") for p in params],
                steps=[torch.zeros((), device="cuda") for _ in range(n)],
                max_exp_avg_sqs=[torch.zeros(p.shape, device="cuda") for p in params] if amsgrad else None,
                masters=[p.float().clone() for p in params] if master else None)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(), dict(amsgrad=True), dict(maximize=True)], ids=str)
def test_gpu_fp32_matches_torch_adamw_step_by_step(gpu_loader, options):
    ours = _gpu_params(torch.float32)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    state = _fresh_state(ours, amsgrad=options.get("amsgrad", False))
    opt = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, foreach=False, **options)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # our launches must follow PyTorch's current stream
        for step in range(6):
            lr = 1e-2 / (1 + step)
            grads = [torch.randn(p.shape, device="cuda") for p in ours]
            for q, g in zip(theirs, grads):
                q.grad = g.clone()
            # every other step lr comes as a device tensor (read on the device as fp64)
            lr_arg = torch.tensor(lr, device="cuda", dtype=torch.float64) if step % 2 else lr
            opt.param_groups[0]["lr"] = lr
            opt.step()
            cb.adamw_step(ours, grads, state["exp_avgs"], state["exp_avg_sqs"], state["steps"], lr=lr_arg,
                          beta1=0.8, beta2=0.95, eps=1e-8, weight_decay=0.1,
                          max_exp_avg_sqs=state["max_exp_avg_sqs"], maximize=options.get("maximize", False))
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b.detach(), rtol=2e-6, atol=1e-7, msg=f"param {i}")
        s = opt.state[b]
        torch.testing.assert_close(state["exp_avgs"][i], s["exp_avg"], rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sqs"][i], s["exp_avg_sq"], rtol=2e-6, atol=1e-7)
        if options.get("amsgrad"):
            torch.testing.assert_close(state["max_exp_avg_sqs"][i], s["max_exp_avg_sq"], rtol=2e-6, atol=1e-7)
        assert float(state["steps"][i]) == float(s["step"]) == 6.0


def _within_one_ulp(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    # fp32 rounding differences of one op can move a low-precision result by at most its last place
    return bool(((ours.float() - ref.float()).abs() <= torch.finfo(ref.dtype).eps * ref.float().abs()).all())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("master", [False, True], ids=["memory-efficient", "master-weights"])
def test_gpu_low_precision_recipes_match_torch_adamw(gpu_loader, dtype, master):
    ours = _gpu_params(dtype)
    state = _fresh_state(ours, master=master)
    shadow = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = torch.optim.AdamW(shadow, lr=1e-3, weight_decay=0.1, foreach=False)
    for step in range(5):
        if not master:  # the recipe steps the rounded value: so does the reference, every step
            with torch.no_grad():
                for s, p in zip(shadow, ours):
                    s.copy_(p.float())
        grads = [torch.randn(p.shape, device="cuda").to(dtype) for p in ours]
        for s, g in zip(shadow, grads):
            s.grad = g.float()
        opt.step()
        cb.adamw_step(ours, grads, state["exp_avgs"], state["exp_avg_sqs"], state["steps"], lr=1e-3, beta1=0.9,
                      beta2=0.999, eps=1e-8, weight_decay=0.1, masters=state["masters"])
        for i, (p, s) in enumerate(zip(ours, shadow)):
            if master:
                torch.testing.assert_close(state["masters"][i], s.detach(), rtol=2e-6, atol=1e-7, msg=f"{i}")
                assert torch.equal(p, state["masters"][i].to(dtype)), i
            else:
                assert _within_one_ulp(p, s.detach().to(dtype)), (step, i)
            torch.testing.assert_close(state["exp_avg_sqs"][i], opt.state[s]["exp_avg_sq"], rtol=2e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("master", [False, True], ids=["no-master", "master"])
def test_gpu_matches_the_triton_path(gpu_loader, dtype, master):
    base = _gpu_params(dtype)
    runs = {}
    for name, step_fn in (("cuda", cb.adamw_step), ("triton", triton_adamw.adamw_step)):
        params = [p.clone() for p in base]
        state = _fresh_state(params, amsgrad=True, master=master)
        gen = torch.Generator(device="cuda").manual_seed(7)
        for _ in range(3):
            grads = [(torch.randn(p.shape, device="cuda", generator=gen) * 64).to(dtype) for p in params]
            step_fn(params, grads, **state, lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.05,
                    inv_scale=torch.tensor(1 / 64, device="cuda"), clip_coef=torch.tensor(0.5, device="cuda"))
        runs[name] = (params, state)
    (ours, s1), (theirs, s2) = runs["cuda"], runs["triton"]
    for i in range(len(base)):
        for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs") + (("masters",) if master else ()):
            torch.testing.assert_close(s1[key][i], s2[key][i], rtol=2e-6, atol=1e-7, msg=f"{key} {i}")
        assert torch.equal(s1["steps"][i], s2["steps"][i])
        if dtype == torch.float32:
            torch.testing.assert_close(ours[i], theirs[i], rtol=2e-6, atol=1e-7, msg=f"param {i}")
        else:
            assert _within_one_ulp(ours[i], theirs[i]), i


@pytest.mark.gpu
def test_gpu_inf_in_one_gradient_skips_everything(gpu_loader):
    params = _gpu_params(torch.bfloat16) + _gpu_params(torch.float32)
    state = _fresh_state(params, amsgrad=True)
    state["masters"] = [p.float().clone() if p.dtype == torch.bfloat16 else None for p in params]
    for t in state["exp_avgs"] + state["exp_avg_sqs"]:
        t.uniform_(0, 1)
    for s in state["steps"]:
        s.fill_(3)
    grads = [torch.randn(p.shape, device="cuda").to(p.dtype) for p in params]
    grads[3][17] = float("inf")
    inv_scale = torch.tensor(0.5, device="cuda")
    _, nonfinite = cb.grad_stats(grads, inv_scale=inv_scale)
    assert float(nonfinite) == 1.0
    before = [t.clone() for t in params + [x for v in state.values() if v for x in v if x is not None]]
    cb.adamw_step(params, grads, **state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                  inv_scale=inv_scale, found_inf=(nonfinite > 0).float())
    after = params + [x for v in state.values() if v for x in v if x is not None]
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "a skipped step changed state"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_grad_stats_match_the_reference(gpu_loader, dtype):
    grads = _gpu_params(dtype)
    inv_scale = torch.tensor(0.25, device="cuda")
    sumsq, nonfinite = cb.grad_stats(grads, inv_scale=inv_scale)
    exact = sum(((g.double() * 0.25) ** 2).sum() for g in grads)
    torch_sumsq, _ = reference.grad_stats(grads, inv_scale=inv_scale)
    assert_close_to_reference("sumsq", sumsq, exact, torch_sumsq, factor=FORWARD_FACTOR)
    assert float(nonfinite) == 0.0

    grads[0][1, 5], grads[3][4096] = float("inf"), float("nan")
    expected = [(g.float() * inv_scale).to(dtype) for g in grads]
    _, nonfinite = cb.grad_stats(grads, inv_scale=inv_scale, unscale_in_place=True)
    assert float(nonfinite) == 2.0
    for i, (g, e) in enumerate(zip(grads, expected)):
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True, msg=f"unscaled grad {i}")


@pytest.mark.gpu
def test_gpu_loaders_give_the_same_bits(monkeypatch, request):
    pytest.importorskip("cupy", reason="comparing the loaders needs cupy")
    monkeypatch.setenv("OPT_CORE_CUDA_LIB", str(request.getfixturevalue("built_library")))
    params = _gpu_params(torch.bfloat16)
    grads = [torch.randn(p.shape, device="cuda").to(torch.bfloat16) for p in params]
    results = []
    for name in ("library", "cupy"):
        monkeypatch.setenv("OPT_CORE_CUDA_LOADER", name)
        ps, gs = [p.clone() for p in params], [g.clone() for g in grads]
        state = _fresh_state(ps, master=True)
        stats = cb.grad_stats(gs, inv_scale=torch.tensor(0.5, device="cuda"), unscale_in_place=True)
        cb.adamw_step(ps, gs, **state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
        results.append([*ps, *gs, *stats, *state["exp_avgs"], *state["exp_avg_sqs"], *state["masters"]])
    assert all(torch.equal(a, b) for a, b in zip(*results))
