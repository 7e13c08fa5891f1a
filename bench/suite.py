"""The benchmark suite (``python -m bench``): stages, each with its own time limit and output files.

Stages, in order (``--stages`` picks some; ``table`` means goal, rest, profile and plots):

1. ``smoke``: each op's ``smoke()`` in its own process, ops in parallel: small shapes in bf16 and fp16
   against float64, the TMA descriptor paths and the pointer paths, one config per kernel.  An op that
   fails (a comparison, an exception, a crash, the time limit) is reported and skipped later on.  Beside
   them, one process per unproven variant the rows list (a kernel never yet run on a GPU: the Gluon
   ones) runs its op module's ``prove()`` against float64; the table times that variant only where its
   proof passed (its rows say why otherwise), so a hang or a wrong result costs only its own rows.
2. ``warmup``: the kernels, configs and specialisations the table will launch are compiled first, by
   processes that run each op's cases with ``OPT_CORE_TUNING=compile:I/N`` (process I of N compiles
   its share of every launch's configs through the JIT's launch path, launching nothing) sharing
   Triton's on-disk cache; as many at once as there are cores and as the GPU's memory holds
   (``WARMUP_GIB``, each op's largest case).  Each process logs what it compiled; every table process
   logs its cache hits and misses (``compile_cache`` in the results).
3. ``goal``, then ``rest``: the table, the goal shapes of every op first (attention causal head_dim 128
   seqlen 8k bf16 forward and forward+backward, the MLP at 1.3B and 6.7B widths, LayerNorm at 16k
   rows, AdamW over 1.3B parameters, a training step of opt-1.3b), then the other shapes; one process
   per op and pass with its own limit, rows appended after every case (JSON and markdown).  The
   autotuners' choices go to the run's tuned table (``<out>/tuned-<gpu>.json``, seeded from
   ``kernels/tuned/<gpu>.json`` unless ``--retune``), which every later process starts from.
4. ``profile``: ``python -m bench.profile`` on opt-1.3b (the step breakdown the plots draw).
5. ``plots``: ``bench.plots.write_plots`` on the results.
6. ``tests``: the ``gpu``-marked tests with the time left, no ``-x``, a per-test limit where
   pytest-timeout is installed; skipped without CUDA.

A stage gets the lesser of its cap and what is left of ``--budget`` after the floors of the stages
after it; it is skipped when that is below its own floor.  The run's tuned table is copied to
``kernels/tuned/<gpu>.json`` at the end (on a GPU).  The short table is printed last.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from bench import harness, telemetry
from bench.harness import DTYPES, OPS

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("smoke", "warmup", "goal", "profile", "rest", "plots", "tests")
ALIASES = {"table": ("goal", "profile", "rest", "plots"), "all": STAGES}
# (cap, floor) seconds: a stage gets min(cap, what is left less the floors of the stages after it).
LIMITS = {"smoke": (90, 20), "warmup": (150, 15), "goal": (180, 30), "rest": (None, 20), "profile": (75, 25),
          "plots": (30, 5), "tests": (None, 30)}
OP_FLOOR_S = 15            # what each later op of a pass keeps when an earlier one runs long
OP_CAP = (3.0, 60.0)       # on a GPU an op's process may take 3x its planned time, at least 60 s
TEST_TIMEOUT_S = 90        # per GPU test, where pytest-timeout is installed
# Run after the others: the Gluon kernels' tests (never yet run on a GPU; the smoke stage proved them first)
LAST_TESTS = ("tests/test_attention_gluon.py", "tests/test_attention_gluon_bwd.py", "tests/test_relu_mlp_gluon.py")
# GPU memory one warm-up process of an op may hold (GiB): its largest case's tensors, two cases at once.
WARMUP_GIB = {"layer_norm": 4, "adamw": 1, "attention": 8, "relu_mlp": 24, "mfu": 12}
PROFILE = {True: ["--preset", "opt-1.3b", "--steps", "2"], False: ["--preset", "test", "--steps", "1", "--warmup", "1"]}


@dataclasses.dataclass
class Settings:
    out: Path
    ops: tuple = OPS
    dtypes: tuple = ("bf16",)
    quick: bool = False
    stages: tuple = STAGES
    budget_s: float = 450.0
    workers: int = os.cpu_count() or 1
    retune: bool = False
    python: str = sys.executable


@dataclasses.dataclass
class Outcome:
    stage: str
    status: str                 # "ok", "failed", "timed out", "skipped"
    seconds: float = 0.0
    limit: Optional[float] = None
    detail: str = ""


class Clock:
    def __init__(self, budget_s: float):
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, stage: str, later: tuple) -> Optional[float]:
        """The stage's time limit now, or None when less than its floor is left for it."""
        cap, floor = LIMITS[stage]
        available = self.left() - sum(LIMITS[s][1] for s in later)
        limit = available if cap is None else min(cap, available)
        return limit if limit >= floor else None


def expand(stages) -> tuple:
    names = [s for name in stages for s in ALIASES.get(name, (name,))]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {STAGES} and {sorted(ALIASES)}")
    return tuple(s for s in STAGES if s in names)


# --------------------------------------------------------------------------- processes
@dataclasses.dataclass
class Task:
    name: str
    cmd: list
    env: dict
    log: Path
    weight: float = 0.0          # GiB of GPU memory it may hold
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    log_file: Optional[object] = None


@dataclasses.dataclass
class Result:
    rc: Optional[int]            # None: killed at its time limit
    seconds: float

    @property
    def status(self) -> str:
        return "timed out" if self.rc is None else "ok" if self.rc == 0 else f"failed (exit {self.rc})"


def _start(task: Task) -> None:
    task.log.parent.mkdir(parents=True, exist_ok=True)
    # A session of its own: on its time limit the task and every process it started are stopped.
    task.log_file = task.log.open("w")
    task.proc = subprocess.Popen(task.cmd, env=task.env, cwd=ROOT, stdout=task.log_file,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    task.started = time.monotonic()


def _stop(task: Task) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(task.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            task.proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_tasks(tasks: list[Task], workers: int, timeout: float, memory_gib: float = float("inf")) -> dict:
    """Run ``tasks`` at most ``workers`` and ``memory_gib`` (their weights) at once, all within ``timeout``
    seconds; name -> Result, rc None for those stopped at the limit or never started."""
    deadline, pending, running, results = time.monotonic() + timeout, list(tasks), [], {}
    while pending or running:
        while pending and len(running) < workers and (
                not running or sum(t.weight for t in running) + pending[0].weight <= memory_gib):
            _start(pending[0])
            running.append(pending.pop(0))
        time.sleep(0.1)
        for task in [t for t in running if t.proc.poll() is not None]:
            results[task.name] = Result(task.proc.returncode, time.monotonic() - task.started)
            task.log_file.close()
            running.remove(task)
        if time.monotonic() > deadline:
            for task in running:
                _stop(task)
                task.log_file.close()
                results[task.name] = Result(None, time.monotonic() - task.started)
            results.update({t.name: Result(None, 0.0) for t in pending})
            break
    return results


# --------------------------------------------------------------------------- the run
class Run:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.out = settings.out
        self.clock = Clock(settings.budget_s)
        self.gpu = torch.cuda.is_available()
        self.device_name = harness.device_name(torch.device("cuda" if self.gpu else "cpu"))
        self.target = harness.Target.of(torch.device("cuda" if self.gpu else "cpu"))
        self.outcomes: list[Outcome] = []
        self.lines: list[str] = []           # the summary, printed before the short table
        self.planned = self._planned_op_seconds() if self.gpu else {}

    def _planned_op_seconds(self) -> dict:
        """(pass, op) -> the plan's seconds for it on an H200, for each op's cap; none if the plan fails."""
        from bench import plan

        try:
            stages = plan.plan(plan.Settings(quick=self.settings.quick, dtypes=_dtypes(self.settings.dtypes)))
        except Exception as e:  # the caps are a guard, not a reason to stop: each op then gets what is left
            print(f"no per-op caps (the plan failed: {type(e).__name__}: {e})", flush=True)
            return {}
        return {(s.name, op): seconds for s in stages for op, seconds in s.per_op.items()}

    # --------------------------------------------------------------- helpers
    def env(self, mode: Optional[str] = None, interpret: bool = True) -> dict:
        """A child's environment: the run's tuned table, ``OPT_CORE_TUNING=mode`` (or unset), and on the CPU
        the interpreter on or off."""
        from opt_core.kernels import tuning

        env = dict(os.environ)
        env[tuning.TABLE_ENV] = str(self.run_table)
        env.pop(tuning.MODE_ENV, None)
        if mode:
            env[tuning.MODE_ENV] = mode
        if not self.gpu:
            env["TRITON_INTERPRET"] = "1" if interpret else "0"
        return env

    @property
    def run_table(self) -> Path:
        from opt_core.kernels import tuning

        return self.out / f"tuned-{tuning.gpu_slug(self.device_name)}.json"

    def worker(self, stage: str, op: str, *extra) -> list:
        cmd = [self.settings.python, "-m", "bench.worker", stage, "--op", op, "--out", str(self.out),
               "--dtypes", *self.settings.dtypes, *extra]
        return cmd + (["--quick"] if self.settings.quick else [])

    def ops(self) -> list[str]:
        """The ops still in the run: those whose smoke check (this run's or the last one here) passed."""
        failed = set()
        for op in self.settings.ops:
            path = self.out / "smoke" / f"{op}.json"
            if path.exists() and not json.loads(path.read_text())["ok"]:
                failed.add(op)
        return [op for op in self.settings.ops if op not in failed]

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    # --------------------------------------------------------------- stages
    def smoke(self, limit: float) -> Outcome:
        for op in self.settings.ops:
            (self.out / "smoke" / f"{op}.json").unlink(missing_ok=True)
        tasks = [Task(op, self.worker("smoke", op), self.env("first"), self.out / "logs" / f"smoke-{op}.log")
                 for op in self.settings.ops]
        proofs = self.proof_tasks()
        results = run_tasks(tasks + proofs, max(1, min(self.settings.workers, len(tasks) + len(proofs))), limit)
        bad = self.proofs_failed(proofs)
        for op in self.settings.ops:
            result = results[op]
            path = self.out / "smoke" / f"{op}.json"
            report = json.loads(path.read_text()) if path.exists() else None
            if report is None:  # crashed or stopped before writing: the op is out
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"op": op, "ok": False, "error": result.status}))
            if report is None or not report["ok"]:
                bad.append(op)
                self.say(f"  smoke {op}: FAILED ({result.status}; log {tasks[0].log.parent}/smoke-{op}.log)"
                         f"{': ' + '; '.join((report or {}).get('failed', [])[:3]) if report else ''}")
            else:
                self.say(f"  smoke {op}: {report['passed']}/{report['compared']} pass, {report['seconds']} s")
        return Outcome("smoke", "failed" if bad else "ok", detail=f"skipped later: {', '.join(bad)}" if bad else "")

    def proof_tasks(self) -> list:
        """One process per unproven variant (a kernel never yet run on a GPU) that this run's rows list:
        its proof against float64, beside the smoke checks."""
        tasks = []
        for op in self.settings.ops:
            module = importlib.import_module(f"bench.{op}")
            for variant in harness.unproven_variants(module, self.target, self.settings.quick,
                                                     _dtypes(self.settings.dtypes)):
                harness.proof_path(self.out, op, variant).unlink(missing_ok=True)
                tasks.append(Task(f"{op}~{variant}", self.worker("prove", op, "--variant", variant),
                                  self.env("first"), self.out / "logs" / f"prove-{op}~{variant}.log"))
        return tasks

    def proofs_failed(self, proofs: list) -> list[str]:
        """The proofs that did not pass, reported; their variants' rows hold the reason instead of times."""
        bad = []
        for task in proofs:
            op, variant = task.name.split("~")
            if harness.proven(self.out, op, variant):
                self.say(f"  prove {op} {variant}: passed (its rows are timed)")
            else:
                bad.append(task.name)
                self.say(f"  prove {op} {variant}: FAILED, not timed (log {task.log})")
        return bad

    def warmup(self, limit: float) -> Outcome:
        tasks = []
        for op in self.ops():
            n = warmup_slices(op, self.settings.workers, self.target, self.settings.quick)
            tasks += [Task(f"{op}-{i}", self.worker("warmup", op, "--tag", str(i)), self.env(f"compile:{i}/{n}"),
                           self.out / "logs" / f"warmup-{op}-{i}.log", WARMUP_GIB[op] if self.gpu else 0.0)
                      for i in range(n)]
        tasks.sort(key=lambda t: -t.weight)  # the heaviest first: they wait for memory least at the start
        memory = 0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30 if self.gpu else float("inf")
        results = run_tasks(tasks, self.settings.workers, limit, memory)
        compiled, failed = 0, [name for name, r in results.items() if r.rc != 0]
        for path in (self.out / "warmup").glob("*.json"):
            compiled += sum(json.loads(path.read_text())["compiled"].values())
        self.say(f"  warm-up: {len(tasks)} processes compiled {compiled} configs"
                 f"{' (interpreter: only counted, nothing compiles)' if not self.gpu else ''}"
                 f"{'; not clean: ' + ', '.join(failed) if failed else ''}")
        return Outcome("warmup", "ok" if not failed else "failed", detail=f"{compiled} configs compiled")

    def table(self, part: str, limit: float) -> Outcome:
        stage_deadline = time.monotonic() + limit
        ops = [op for op in self.ops() if importlib.import_module(f"bench.{op}").specs(
            self.target, self.settings.quick, _dtypes(self.settings.dtypes), part)]
        failed = []
        for i, op in enumerate(ops):
            left = stage_deadline - time.monotonic() - OP_FLOOR_S * (len(ops) - i - 1)
            if (part, op) in self.planned:
                left = min(left, max(OP_CAP[1], OP_CAP[0] * self.planned[(part, op)]))
            if left < OP_FLOOR_S:
                failed.append(f"{op} (no time)")
                continue
            task = Task(op, self.worker("table", op, "--part", part), self.env(),
                        self.out / "logs" / f"{part}-{op}.log")
            result = run_tasks([task], 1, left)[op]
            self.merge_tuned()
            self.say(f"  {part} {op}: {result.status}, {result.seconds:.0f} s")
            if result.rc != 0:
                failed.append(op)
        harness.collect(self.out)
        return Outcome(part, "failed" if failed else "ok", detail=", ".join(failed))

    def profile(self, limit: float) -> Outcome:
        task = Task("profile", [self.settings.python, "-m", "bench.profile", *PROFILE[self.gpu], "--out",
                                str(self.out)], self.env(interpret=False), self.out / "logs" / "profile.log")
        result = run_tasks([task], 1, limit)["profile"]
        self.merge_tuned()
        return Outcome("profile", "ok" if result.rc == 0 else result.status)

    def plots(self, limit: float) -> Outcome:
        if importlib.util.find_spec("bench.plots") is None:
            return Outcome("plots", "skipped", detail="no bench.plots module")
        results = harness.collect(self.out)
        if results is None:
            return Outcome("plots", "skipped", detail="no results to plot")
        from bench import plots

        try:
            written = plots.write_plots(results[0], self.out)
        except Exception as e:  # matplotlib missing, an unexpected row: the numbers matter more
            return Outcome("plots", "failed", detail=f"{type(e).__name__}: {e}"[:200])
        return Outcome("plots", "ok", detail=", ".join(p.name for p in written))

    def tests(self, limit: float) -> Outcome:
        """The gpu-marked tests; the ones of paths never yet run on a GPU (``LAST_TESTS``: the Gluon kernels)
        in a second process after the others, so a hang there costs only them."""
        if not self.gpu:
            return Outcome("tests", "skipped", detail="no CUDA device: the gpu-marked tests only skip here")
        base = [self.settings.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            base.append(f"--timeout={TEST_TIMEOUT_S}")
        ignored = [f"--ignore={path}" for path in LAST_TESTS]
        tasks = [Task("tests", base + ["tests", *ignored], self.env(), self.out / "logs" / "gpu-tests.log"),
                 Task("tests-last", base + list(LAST_TESTS), self.env(), self.out / "logs" / "gpu-tests-last.log")]
        results = run_tasks(tasks, 1, limit)
        for task in tasks:
            tail = task.log.read_text().splitlines()[-12:] if task.log.exists() else []
            for line in tail:
                self.say(f"  {line}")
        ok = all(r.rc == 0 for r in results.values())
        return Outcome("tests", "ok" if ok else next(r.status for r in results.values() if r.rc != 0))

    # --------------------------------------------------------------- tuned tables
    def seed_tuned(self) -> None:
        from opt_core.kernels import tuning

        if self.run_table.exists() or self.settings.retune:
            return
        committed = tuning.TUNED_DIR / self.run_table.name.removeprefix("tuned-")
        if committed.exists():
            tuning.write_table(self.run_table, tuning.read_table(committed), self.device_name)

    def merge_tuned(self) -> None:
        from opt_core.kernels import tuning

        fresh = [tuning.read_table(p) for p in sorted((self.out / "tuned").glob("*.json"))]
        merged = tuning.merge_tables(tuning.read_table(self.run_table), *fresh)
        if merged["kernels"]:
            tuning.write_table(self.run_table, merged, self.device_name)

    def publish_tuned(self) -> Optional[Path]:
        """On a GPU: the run's table, over the committed one, as ``kernels/tuned/<gpu>.json``."""
        from opt_core.kernels import tuning

        if not self.gpu or not self.run_table.exists():
            return None
        committed = tuning.TUNED_DIR / self.run_table.name.removeprefix("tuned-")
        merged = tuning.merge_tables(tuning.read_table(self.run_table), tuning.read_table(committed))
        return tuning.write_table(committed, merged, self.device_name)


def warmup_slices(op: str, cores: int, target: harness.Target = harness.H200, quick: bool = False) -> int:
    """Warm-up processes for an op: one per config of its longest pruned list (more would compile
    nothing), at most ``cores``; one where nothing is autotuned."""
    from bench import plan

    specs = importlib.import_module(f"bench.{op}").specs(target, quick, (torch.bfloat16,), "all")
    tunes = plan.op_work(op, specs, target, compiles=False).tunes
    return max(1, min(cores, max((t.configs for t in tunes.values()), default=1)))


def _dtypes(names) -> tuple:
    return tuple(DTYPES[n] for n in names)


STAGE_RUNNERS = {"smoke": Run.smoke, "warmup": Run.warmup, "goal": lambda r, t: r.table("goal", t),
                 "rest": lambda r, t: r.table("rest", t), "profile": Run.profile, "plots": Run.plots,
                 "tests": Run.tests}


def run(settings: Settings) -> int:
    settings.out.mkdir(parents=True, exist_ok=True)
    suite = Run(settings)
    print(f"opt-core bench suite on {suite.device_name}: stages {', '.join(settings.stages)}, "
          f"budget {settings.budget_s:.0f} s, {settings.workers} workers, results in {settings.out}", flush=True)
    print(f"GPU state: {telemetry.line(telemetry.snapshot())}", flush=True)
    if not suite.gpu:
        print(harness.CPU_NOTE, flush=True)
    suite.seed_tuned()
    for i, stage in enumerate(settings.stages):
        limit = suite.clock.limit(stage, settings.stages[i + 1:])
        if limit is None:
            suite.outcomes.append(Outcome(stage, "skipped", detail=f"{suite.clock.left():.0f} s left"))
            continue
        print(f"== {stage} (limit {limit:.0f} s)", flush=True)
        started = time.monotonic()
        outcome = STAGE_RUNNERS[stage](suite, limit)
        outcome.seconds, outcome.limit = time.monotonic() - started, limit
        suite.outcomes.append(outcome)
    published = suite.publish_tuned()
    _summary(suite, published)
    return 0 if all(o.status in ("ok", "skipped") for o in suite.outcomes) else 1


# --------------------------------------------------------------------------- the report
def _summary(suite: Run, published: Optional[Path]) -> None:
    print("\n== summary")
    for o in suite.outcomes:
        limit = f"{o.limit:.0f}" if o.limit is not None else "-"
        print(f"{o.stage:<8} {o.status:<18} {o.seconds:6.0f} s of {limit:>4}  {o.detail}")
    paths = harness.collect(suite.out)
    if paths is None:
        print("no results: the table did not run")
        return
    data = json.loads(paths[0].read_text())
    for c in data["compile_cache"]:
        print(harness.compile_cache_line(c))
    for t in data["telemetry"][:1] + data["telemetry"][-1:]:
        print(f"GPU {t.get('when')} {t.get('op')} ({t.get('part')}): {telemetry.line(t)}")
    print(f"results: {paths[0]} and {paths[1]}")
    if published is not None:
        print(f"tuned table: {published} (commit it with the results)")
    rows = harness.rows_from_records(data["rows"])
    print(f"\n== short table ({len(rows)} rows; the goal shapes first)")
    print("\n".join(short_table(rows)))
    if not suite.gpu:
        print(harness.CPU_NOTE)


def short_table(rows: list, limit: int = 50) -> list[str]:
    """A compact table of the rows, goal rows first, at most ``limit`` of them."""
    ordered = [r for r in rows if r.part == "goal"] + [r for r in rows if r.part != "goal"]
    lines = ["op | shape | dtype | mode | provider | ms | TFLOP/s or GB/s | roof | x base | MiB"]
    for r in ordered[:limit]:
        if r.error:
            lines.append(f"{r.op} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} | failed: {r.error[:60]}")
            continue
        rate = f"{r.tflops:.0f} TF/s" if r.roofline == "gemm" else f"{r.gbps:.0f} GB/s"
        speed = f"{r.speedup_vs_baseline:.2f}" if r.speedup_vs_baseline is not None else "-"
        memory = f"{r.peak_memory_mib:.0f}" if r.peak_memory_mib is not None else "-"
        lines.append(f"{r.op} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} | {r.ms:.3f} | {rate} | "
                     f"{100 * r.fraction_of_roofline:.0f}% | {speed} | {memory}")
    if len(ordered) > limit:
        lines.append(f"... {len(ordered) - limit} more rows in the markdown results")
    return lines


def dry_run(settings: Settings) -> int:
    """Each stage's limit (if each earlier stage ran to its plan on the GPU, or to nothing here) and what
    it would start; nothing runs."""
    from bench import plan

    planned = {s.name: s.seconds for s in plan.plan(plan.Settings(quick=settings.quick))}
    left = settings.budget_s
    print(f"dry run: budget {settings.budget_s:.0f} s, stages {', '.join(settings.stages)}, out {settings.out}")
    for i, stage in enumerate(settings.stages):
        cap, floor = LIMITS[stage]
        available = left - sum(LIMITS[s][1] for s in settings.stages[i + 1:])
        limit = available if cap is None else min(cap, available)
        if limit < floor:
            print(f"{stage:<8} skipped: {left:.0f} s left")
            continue
        print(f"{stage:<8} limit {limit:4.0f} s, planned {planned.get(stage, 0):4.0f} s on an H200")
        left -= min(limit, planned.get(stage, 0))
    return 0
