"""kernels/tuning.py: bucketed autotune keys, the tuned table per GPU, the modes (under the interpreter, with a
fake two-config kernel)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import triton
import triton.language as tl

from opt_core.kernels import attention, layer_norm, relu_mlp, tuning

pytestmark = pytest.mark.interpreter


@triton.jit
def _scale_kernel(X, Y, M, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < M) * 2, mask=offs < M)


CONFIGS = [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=1)]


def _tuner(prune=None):
    return tuning.autotune(CONFIGS, key=["M"], buckets=["M"],
                           prune_configs_by={"early_config_prune": prune} if prune else None)(_scale_kernel)


def _launch(tuner, M):
    x = torch.randn(M)
    y = torch.full((M,), float("nan"))
    tuner[lambda meta: (triton.cdiv(M, meta["BLOCK"]),)](x, y, M)
    return x, y


def _count_benchmarks(tuner, monkeypatch) -> list:
    timed = []
    bench = tuner._bench

    def counting(*args, config, **kwargs):
        timed.append(config)
        return bench(*args, config=config, **kwargs)
    monkeypatch.setattr(tuner, "_bench", counting)
    return timed


@pytest.fixture(autouse=True)
def _no_table(monkeypatch, tmp_path):
    # No packaged table and no mode leaks in from the environment: each test says what it uses.
    monkeypatch.setenv(tuning.TABLE_ENV, str(tmp_path / "no-table.json"))
    monkeypatch.delenv(tuning.MODE_ENV, raising=False)


def test_bucket_is_the_next_power_of_two():
    for n in [random.randint(2, 1 << 20) for _ in range(50)]:
        b = tuning.bucket(n)
        assert b & (b - 1) == 0 and n <= b < 2 * n
    assert tuning.bucket(0) == tuning.bucket(1) == 1


def test_a_new_size_in_a_tuned_bucket_does_not_tune_again(monkeypatch):
    tuner = _tuner()
    timed = _count_benchmarks(tuner, monkeypatch)
    sizes = [random.randint(33, 63), random.randint(33, 63), 64, random.randint(65, 127)]
    for M in sizes:
        x, y = _launch(tuner, M)
        torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)
    # Buckets 64, 64, 64, 128: two tunings of two configs each.
    assert len(timed) == 2 * len(CONFIGS)
    assert set(dict.keys(tuner.cache)) == {(64, "torch.float32", "torch.float32"),
                                           (128, "torch.float32", "torch.float32")}


def test_choices_round_trip_through_the_table_file(tmp_path):
    tuner = _tuner()
    _launch(tuner, 50)
    table = tuning.choices()
    entries = table["kernels"][tuner.name]
    assert entries["key"] == ["M"] and entries["buckets"] == ["M"]
    (key, config), = entries["entries"].items()
    assert key == "64|torch.float32|torch.float32" and config == tuning.config_json(tuner.best_config)

    path = tuning.write_table(tmp_path / "gpu.json", table, "Some GPU")
    back = tuning.read_table(path)
    assert back["gpu"] == "Some GPU" and back["triton"] == triton.__version__
    assert back["kernels"][tuner.name] == entries


def test_merge_keeps_the_earlier_tables_entry():
    other = {"kwargs": {"BLOCK": 16}, "num_warps": 1, "num_stages": 3}
    mine = {"kwargs": {"BLOCK": 32}, "num_warps": 1, "num_stages": 3}

    def table(entries):
        return {"kernels": {"k.kernel": {"key": ["M"], "buckets": ["M"], "entries": entries}}}
    merged = tuning.merge_tables(table({"64": mine}), table({"64": other, "128": other}))
    assert merged["kernels"]["k.kernel"]["entries"] == {"64": mine, "128": other}


def test_read_table_names_a_file_that_is_not_one(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no": "kernels"}))
    with pytest.raises(ValueError, match="bad.json"):
        tuning.read_table(bad)
    assert tuning.read_table(tmp_path / "missing.json") == {"kernels": {}}


def _table_choosing(tmp_path, tuner, config) -> None:
    entry = {"key": ["M"], "buckets": ["M"], "entries": {"64|torch.float32|torch.float32": config}}
    path = tuning.write_table(tmp_path / "tuned.json", {"kernels": {tuner.name: entry}}, "test")
    return path


def test_a_tuned_entry_bypasses_tuning(tmp_path, monkeypatch):
    tuner = _tuner()
    timed = _count_benchmarks(tuner, monkeypatch)
    choice = random.choice(CONFIGS)
    monkeypatch.setenv(tuning.TABLE_ENV, str(_table_choosing(tmp_path, tuner, tuning.config_json(choice))))
    x, y = _launch(tuner, random.randint(33, 64))
    torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)
    assert timed == [] and tuner.best_config is choice  # the list's own object (its pre-hook)


def test_a_forced_retune_tunes_despite_the_table(tmp_path, monkeypatch):
    tuner = _tuner()
    timed = _count_benchmarks(tuner, monkeypatch)
    monkeypatch.setenv(tuning.TABLE_ENV, str(_table_choosing(tmp_path, tuner, tuning.config_json(CONFIGS[0]))))
    monkeypatch.setenv(tuning.MODE_ENV, "retune")
    x, y = _launch(tuner, 50)
    torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)
    assert len(timed) == len(CONFIGS)


def test_an_entry_whose_config_left_the_list_tunes(tmp_path, monkeypatch):
    tuner = _tuner()
    timed = _count_benchmarks(tuner, monkeypatch)
    gone = {"kwargs": {"BLOCK": 64}, "num_warps": 1, "num_stages": 3}
    monkeypatch.setenv(tuning.TABLE_ENV, str(_table_choosing(tmp_path, tuner, gone)))
    _launch(tuner, 50)
    assert len(timed) == len(CONFIGS)


def test_first_mode_runs_the_first_kept_config_without_tuning(monkeypatch):
    tuner = _tuner(prune=lambda configs, nargs, **kw: configs[1:])
    timed = _count_benchmarks(tuner, monkeypatch)
    monkeypatch.setenv(tuning.MODE_ENV, "first")
    x, y = _launch(tuner, 50)
    torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)
    assert timed == [] and tuner.best_config is CONFIGS[1] and not dict.keys(tuner.cache)


def test_compile_mode_splits_the_configs_and_launches_nothing(monkeypatch):
    tuner = _tuner()
    shares = []
    for part in range(2):
        compiled = []
        monkeypatch.setattr(tuner, "_launch", lambda config, args, kwargs, warmup=False: compiled.append(
            (config, warmup)))
        monkeypatch.setenv(tuning.MODE_ENV, f"compile:{part}/2")
        _, y = _launch(tuner, 50)
        assert y.isnan().all()  # compiled, never launched
        shares.append(compiled)
    assert all(warmup for share in shares for _, warmup in share)
    assert sorted((id(c) for share in shares for c, _ in share)) == sorted(id(c) for c in CONFIGS)
    assert not dict.keys(tuner.cache)  # nothing was tuned


def test_compile_mode_compiles_only_the_tables_choice(tmp_path, monkeypatch):
    tuner = _tuner()
    choice = random.choice(CONFIGS)
    monkeypatch.setenv(tuning.TABLE_ENV, str(_table_choosing(tmp_path, tuner, tuning.config_json(choice))))
    compiled = []
    monkeypatch.setattr(tuner, "_launch", lambda config, args, kwargs, warmup=False: compiled.append(config))
    for part in range(2):
        monkeypatch.setenv(tuning.MODE_ENV, f"compile:{part}/2")
        _launch(tuner, random.randint(33, 64))
    assert compiled == [choice]


@pytest.mark.parametrize("text", ["fast", "compile:2/2", "compile:1", "compile:-1/3"])
def test_a_bad_mode_names_the_variable(text):
    with pytest.raises(ValueError, match=tuning.MODE_ENV):
        tuning.parse_mode(text)


def test_every_autotuned_kernel_goes_through_tuning():
    """attention, relu_mlp and layer_norm: no autotuner of theirs is Triton's own."""
    from triton.runtime.autotuner import Autotuner

    tuners = [v for module in (attention, relu_mlp, layer_norm) for v in vars(module).values()
              if isinstance(v, Autotuner)]
    assert len(tuners) >= 11 and all(isinstance(t, tuning.Autotuner) for t in tuners)
    by_name = {t.name: t for t in tuners}
    assert by_name["relu_mlp.matmul_kernel"].buckets == ("M", "N", "K")
    assert by_name["attention.fwd_kernel"].buckets == ("seqlen_bucket",)
    assert by_name["layer_norm.bwd_wide_kernel"].buckets == ("N",)
