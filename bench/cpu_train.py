"""``python -m bench.cpu_train``: a training step of ours against transformers' OPTForCausalLM on the CPU.

The main job's configuration (preset ``tiny``: width 128, 4 layers, 4 heads, vocabulary 4096, seqlen 128,
batch 16, fp32, dropout 0.1), the same initial weights, the same batches of the demo's own data, the same
optimizer (``torch.optim.AdamW(fused=True)``, lr 3e-3, betas 0.9/0.95, weight decay 0.1) and gradient
clipping at 1.0.  Ours is the trainer's own ``Trainer.train_step`` (the native CPU path, the chunked LM-head
loss, the guard's one host sync); theirs is ``OPTForCausalLM(attn_implementation="sdpa")`` with
``labels``.  The two alternate in one process, round after round, and the medians of the step times give
the ratio (tokens/s of ours over theirs).

glibc's allocator settings are process-wide, so each setting runs in a process of its own: ``default``
(glibc's: tensors of 32 MiB or more are mmapped and page-faulted in again every step) and ``tuned`` (what
the trainer sets on the CPU, ``keep_freed_memory_on_cpu``); both models share their process's setting.

    python -m bench.cpu_train                        # both settings; results in bench/results/cpu/
    python -m bench.cpu_train --allocator tuned --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS_PER_STEP = 16 * 128


def _trainer(data_cache: str, out: Path):
    """Our side: a Trainer built as ``python -m opt_core.train`` builds it (its defaults: the tiny preset)."""
    import torch

    from opt_core import train as cli
    from opt_core.trainer.runtime import Runtime
    from opt_core.trainer.trainer import Trainer, prepare_data

    args = cli.parse_args(["--data-cache", data_cache, "--out", str(out), "--lr", "3e-3"])
    return Trainer(args, Runtime(device=torch.device("cpu")), torch.float32, out, prepare_data(args))


def _theirs(ours):
    """transformers' OPT with our initial weights and the same optimizer; a step function over ``batches``."""
    import torch
    import transformers

    hf_config = ours.config.to_hf()
    hf_config._attn_implementation = "sdpa"
    model = transformers.OPTForCausalLM(hf_config)
    model.load_state_dict(ours.model.to_hf_state_dict())
    model.train()
    args = ours.args
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.eps,
                                  weight_decay=args.weight_decay, fused=True)

    def step(block):
        # The same 128 input positions (transformers shifts the labels itself: 127 targets of them).
        loss = model(block[:, :-1], labels=block[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def measure(allocator: str, rounds: int, steps: int, warmup: int, data_cache: str) -> dict:
    """One process's measurement: median step times of both, alternating ``rounds`` x ``steps`` each."""
    import torch

    from opt_core.trainer.metrics import Progress
    from opt_core.trainer.runtime import keep_freed_memory_on_cpu

    if allocator == "tuned":
        keep_freed_memory_on_cpu()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ours = _trainer(data_cache, Path(tmp))
        # The same blocks for both, in order: the trainer's data stream, replayed for transformers.
        state = ours.batches.state_dict()
        batches = [next(ours.batches) for _ in range(warmup + rounds * steps)]
        ours.batches.load_state_dict(state)
        _, hf_step = _theirs(ours)
        quiet = Progress(0, 0, enabled=False)
        times = {"opt-core": [], "transformers": []}
        first = {"opt-core": ours.train_step(quiet)["loss"], "transformers": hf_step(batches[0])}
        for i in range(1, warmup):
            ours.train_step(quiet)
            hf_step(batches[i])
        for r in range(rounds):
            for name in times:
                for i in range(steps):
                    start = time.perf_counter()
                    ours.train_step(quiet) if name == "opt-core" else hf_step(batches[warmup + r * steps + i])
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"allocator": allocator, "median_ms": {k: 1000 * v for k, v in medians.items()},
            "tokens_per_s": {k: TOKENS_PER_STEP / v for k, v in medians.items()},
            "ratio": medians["transformers"] / medians["opt-core"], "first_loss": first,
            "steps_timed": {k: len(v) for k, v in times.items()}, "threads": torch.get_num_threads()}


def _machine() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "load_average_before": os.getloadavg()[0]}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# CPU training step: opt-core vs transformers ({m['date']})", "",
             f"- machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers {m['transformers']}, "
             f"Python {m['python']}; load average {m['load_average_before']:.2f} before, "
             f"{m['load_average_after']:.2f} after",
             f"- {report['config']}", "",
             "| allocator | opt-core ms/step | transformers ms/step | opt-core tok/s | transformers tok/s | ratio |",
             "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        ms, tps = r["median_ms"], r["tokens_per_s"]
        lines.append(f"| {r['allocator']} | {ms['opt-core']:.1f} | {ms['transformers']:.1f} | "
                     f"{tps['opt-core']:,.0f} | {tps['transformers']:,.0f} | {r['ratio']:.2f}x |")
    return "\n".join(lines + [""])


def _run_setting(allocator: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.cpu_train", "--worker", "--allocator", allocator, "--rounds", str(args.rounds),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--data-cache", args.data_cache]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the native path, as a CPU run
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--allocator", choices=["default", "tuned", "both"], default="both")
    p.add_argument("--rounds", type=int, default=6, help="alternations of the two models")
    p.add_argument("--steps", type=int, default=8, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps per model first")
    p.add_argument("--data-cache", default="runs/data")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.allocator, args.rounds, args.steps, args.warmup, args.data_cache)))
        return 0
    machine = _machine()
    runs = [_run_setting(a, args) for a in (("default", "tuned") if args.allocator == "both" else (args.allocator,))]
    machine["load_average_after"] = os.getloadavg()[0]
    report = {"machine": machine, "runs": runs,
              "config": f"preset tiny, seq 128, batch 16, fp32, AdamW(fused) + clip 1.0; {args.rounds} rounds x "
                        f"{args.steps} steps per model after {args.warmup} warm-up steps; medians"}
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{machine['date'][:10]}-cpu-train"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
