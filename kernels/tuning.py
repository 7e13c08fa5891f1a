"""Autotuning for every autotuned kernel: bucketed keys, a table of tuned choices per GPU model, modes.

The attention, ReLU-MLP and LayerNorm kernels are wrapped by ``autotune`` below instead of
``triton.autotune``.  What it adds to Triton's autotuner:

- Buckets: the key arguments named in ``buckets`` (token counts, widths, sequence lengths) are
  rounded up to a power of two before the key is looked up, so a new batch size lands in a bucket
  that is tuned already instead of tuning again.
- A tuned table: ``kernels/tuned/<gpu-slug>.json`` (package data) holds the config chosen for each
  kernel and key bucket on one GPU model.  A launch whose bucket is in it runs that config and does
  not tune.  ``OPT_CORE_TUNED_FILE`` names another file (the bench suite points it at the table the
  run is writing, so each process starts from what the previous ones tuned).
- Modes, ``OPT_CORE_TUNING`` (read at every launch):
  ``tuned`` (default): the table's choice where it has one, else tune;
  ``retune``: ignore the table, tune every bucket;
  ``first``: tune nothing, run the first config the prune function keeps (the suite's smoke stage:
  one compile per kernel);
  ``compile:I/N``: compile, without launching, share I of N of the configs a launch would tune, or the
  table's choice where it has one (the suite's warm-up: N processes fill Triton's on-disk cache
  through the launch path, so the timed stages load instead of compiling).
- ``choices()``: what this process tuned or took from the table, in the table's format;
  ``merge_tables`` / ``write_table`` / ``read_table`` handle the file.

The table's format (one file per GPU model)::

    {"gpu": "NVIDIA H200", "triton": "3.6.0", "torch": "...", "written": "<ISO date>",
     "kernels": {"<module>.<kernel>": {"key": [key argument names], "buckets": [the bucketed ones],
                                       "entries": {"<key values joined by |>":
                                                   {"kwargs": {...}, "num_warps": 8, "num_stages": 3}}}}}

A key's values are Triton's autotune key (the key arguments, then the dtype of every tensor
argument) with the bucketed arguments rounded.  An entry whose config is not in the kernel's config
list any more (the list changed since the table was written) is ignored: that bucket tunes.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import re
import time
import zlib
from pathlib import Path
from typing import Optional

import triton
import triton.testing
from triton.runtime.autotuner import Autotuner as _TritonAutotuner

from opt_core.kernels import dispatch

MODE_ENV = "OPT_CORE_TUNING"
TABLE_ENV = "OPT_CORE_TUNED_FILE"
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
_SEPARATOR = "|"


# --------------------------------------------------------------------------- modes and buckets
@dataclasses.dataclass(frozen=True)
class Mode:
    kind: str                 # "tuned", "retune", "first" or "compile"
    part: int = 0             # compile: this process's share ...
    parts: int = 1            # ... of this many


@functools.lru_cache(maxsize=None)
def parse_mode(text: str) -> Mode:
    """``OPT_CORE_TUNING``'s value as a Mode; ValueError naming the variable for anything else."""
    text = text.strip() or "tuned"
    if text in ("tuned", "retune", "first"):
        return Mode(text)
    match = re.fullmatch(r"compile:(\d+)/(\d+)", text)
    if match and 0 <= int(match.group(1)) < int(match.group(2)):
        return Mode("compile", int(match.group(1)), int(match.group(2)))
    raise ValueError(f"{MODE_ENV} must be 'tuned', 'retune', 'first' or 'compile:I/N' with 0 <= I < N, got {text!r}")


def mode() -> Mode:
    return parse_mode(os.environ.get(MODE_ENV, "tuned"))


def bucket(n: int) -> int:
    """The bucket of a size: the next power of two (1 for 0 and 1)."""
    return triton.next_power_of_2(max(int(n), 1))


# --------------------------------------------------------------------------- the table file
def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the table's file name for a GPU model."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def table_path(gpu_name: Optional[str] = None) -> Optional[Path]:
    """The tuned table a launch reads: ``OPT_CORE_TUNED_FILE`` if set, else the packaged file of the
    current GPU model (None without a GPU)."""
    if os.environ.get(TABLE_ENV):
        return Path(os.environ[TABLE_ENV])
    if gpu_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        gpu_name = torch.cuda.get_device_name()
    return TUNED_DIR / f"{gpu_slug(gpu_name)}.json"


def read_table(path: Path) -> dict:
    """The table at ``path``; an empty one when the file does not exist; ValueError naming a file that
    is not a table."""
    path = Path(path)
    if not path.exists():
        return {"kernels": {}}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a tuned table ({type(e).__name__}: {e})") from e
    if not isinstance(table, dict) or not isinstance(table.get("kernels"), dict):
        raise ValueError(f"{path}: not a tuned table (no 'kernels' object)")
    return table


@functools.lru_cache(maxsize=8)
def _entries(path: str, mtime_ns: int) -> dict:
    return {name: kernel.get("entries", {}) for name, kernel in read_table(Path(path))["kernels"].items()}


def _table_entries(kernel: str) -> dict:
    path = table_path()
    if path is None or not path.exists():
        return {}
    return _entries(str(path), path.stat().st_mtime_ns).get(kernel, {})


def merge_tables(*tables: dict) -> dict:
    """One table holding every entry of ``tables``; an entry of an earlier table wins over a later one
    (the suite merges a run's fresh choices first)."""
    merged: dict = {"kernels": {}}
    for table in tables:
        for key in ("gpu", "triton", "torch", "written"):
            merged.setdefault(key, table.get(key))
        for name, kernel in table.get("kernels", {}).items():
            into = merged["kernels"].setdefault(name, {"key": kernel.get("key"), "buckets": kernel.get("buckets"),
                                                       "entries": {}})
            for key, config in kernel.get("entries", {}).items():
                into["entries"].setdefault(key, config)
    return merged


def write_table(path: Path, table: dict, gpu_name: str) -> Path:
    """Write ``table`` (stamped with the GPU, Triton and torch versions and the date) to ``path``."""
    import torch

    stamped = dict(table, gpu=gpu_name, triton=triton.__version__, torch=torch.__version__,
                   written=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    stamped["kernels"] = {name: stamped["kernels"][name] for name in sorted(stamped["kernels"])}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped, indent=1, sort_keys=False) + "\n")
    return path


def config_json(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def key_text(key: tuple) -> str:
    return _SEPARATOR.join(map(str, key))


# --------------------------------------------------------------------------- the autotuner
class _BucketedCache(dict):
    """Triton's key -> config cache with the bucketed positions of every key rounded, and a miss first
    offered to ``fallback`` (the tuned table) before Triton tunes."""

    def __init__(self, positions, fallback):
        super().__init__()
        self.positions = frozenset(positions)
        self.fallback = fallback

    def normalise(self, key: tuple) -> tuple:
        return tuple(bucket(v) if i in self.positions and type(v) is int else v for i, v in enumerate(key))

    def __contains__(self, key) -> bool:
        key = self.normalise(key)
        if super().__contains__(key):
            return True
        config = self.fallback(key)
        if config is not None:
            super().__setitem__(key, config)
        return config is not None

    def __getitem__(self, key):
        return super().__getitem__(self.normalise(key))

    def __setitem__(self, key, value):
        super().__setitem__(self.normalise(key), value)


_TUNERS: dict[str, "Autotuner"] = {}


def _wall_clock_bench(kernel_call, quantiles):
    """Triton's benchmarker needs a GPU driver; under the interpreter (no driver) a config is timed by
    the wall clock: one call, then the (median, fastest, slowest) of three."""
    kernel_call()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        kernel_call()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return [times[1], times[0], times[2]][: len(quantiles)]


# do_bench budgets (ms of warm-up, ms of repeats) per config tuned on a GPU.  Triton's 25/100 make
# autotuning the largest cost of a time-boxed GPU run (hundreds of configs); do_bench first times 5
# calls and repeats at least once, so the slowest kernels tuned here (a 16k-token GEMM at width 12288,
# about 30 ms) get 7 calls either way, and a 20 us LayerNorm still gets about 1,500 repeats.
TUNE_BUDGET_MS = (10, 30)


def _device_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=TUNE_BUDGET_MS[0], rep=TUNE_BUDGET_MS[1], quantiles=quantiles)


class Autotuner(_TritonAutotuner):
    """Triton's autotuner with bucketed keys, the tuned table and the modes of this module's docstring."""

    def __init__(self, fn, configs, key, prune_configs_by=None, buckets=()):
        super().__init__(fn, fn.arg_names, configs, key, None, None, prune_configs_by=prune_configs_by,
                         do_bench=_wall_clock_bench if dispatch.INTERPRET else _device_bench)
        unknown = [k for k in list(key) + list(buckets) if k not in fn.arg_names]
        if unknown or not set(buckets) <= set(key):
            raise ValueError(f"autotune key {key} / buckets {buckets}: each must name an argument of "
                             f"{self.base_fn.__name__} and buckets must be key arguments")
        self.name = f"{self.base_fn.__module__.rsplit('.', 1)[-1]}.{self.base_fn.__name__}"
        self.buckets = tuple(buckets)
        self.cache = _BucketedCache([list(key).index(b) for b in buckets], self._from_table)
        self.compiled = 0  # configs compiled by this process in "compile" mode
        _TUNERS[self.name] = self

    def _from_table(self, key: tuple) -> Optional[triton.Config]:
        if mode().kind not in ("tuned", "compile"):
            return None
        entry = _table_entries(self.name).get(key_text(key))
        if entry is None:
            return None
        for config in self.configs:  # the list's own object: it carries the pre-hook
            if config_json(config) == entry:
                return config
        return None

    def run(self, *args, **kwargs):
        current = mode()
        if current.kind in ("tuned", "retune"):
            return super().run(*args, **kwargs)
        self.nargs = dict(zip(self.arg_names, args))
        # As Triton does: a single config is not pruned (the interpreter's own config may not pass).
        pruned = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        if current.kind == "first":
            return self._launch(pruned[0], args, kwargs)
        chosen = self._from_table(self.cache.normalise(self._key(args, kwargs)))
        for config in self._share([chosen] if chosen is not None else pruned, kwargs, current):
            self._launch(config, args, kwargs, warmup=True)
            self.compiled += 1
        self.best_config = pruned[0]  # launchers read it (relu_mlp's db1 rows); nothing ran
        return None

    def _key(self, args, kwargs) -> tuple:
        """The key Triton's ``run`` builds for a launch: the key arguments, then each tensor argument's dtype."""
        named = {k: v for k, v in {**dict(zip(self.arg_names, args)), **kwargs}.items() if k in self.arg_names}
        return tuple([named[k] for k in self.keys if k in named] +
                     [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])

    def _share(self, pruned, kwargs, current: Mode) -> list:
        # Config j of a launch goes to process (j + offset) % N, the offset drawn from the launch's
        # flags, so launches with fewer configs than processes do not all land on process 0.
        flags = sorted((k, v) for k, v in kwargs.items() if isinstance(v, (bool, int, str, type(None))))
        offset = zlib.crc32(repr((self.name, flags)).encode())
        return [c for j, c in enumerate(pruned) if (j + offset) % current.parts == current.part]

    def _launch(self, config, args, kwargs, warmup=False):
        """Run (or with ``warmup`` only compile) one config through the JIT's launch path."""
        meta = config.all_kwargs()
        if config.pre_hook is not None:
            config.pre_hook({**self.nargs, **kwargs, **meta})
        self.best_config = config
        return self.fn.run(*args, **dict(kwargs, warmup=warmup), **meta)


def autotune(configs, key, prune_configs_by=None, buckets=()):
    """``triton.autotune`` with this module's buckets, tuned table and modes."""
    def decorator(fn):
        return Autotuner(fn, configs, key, prune_configs_by=prune_configs_by, buckets=buckets)
    return decorator


def choices() -> dict:
    """The table of what this process's tuners tuned or took from the table (no gpu/date stamp)."""
    kernels = {}
    for name, tuner in sorted(_TUNERS.items()):
        entries = {key_text(key): config_json(config) for key, config in dict.items(tuner.cache)}
        if entries:
            kernels[name] = {"key": list(tuner.keys), "buckets": list(tuner.buckets), "entries": entries}
    return {"kernels": kernels}


def compiled_counts() -> dict[str, int]:
    """Configs each tuner compiled in "compile" mode in this process (non-zero only)."""
    return {name: t.compiled for name, t in sorted(_TUNERS.items()) if t.compiled}
