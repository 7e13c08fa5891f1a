"""``python -m bench.plots RESULTS.json [--out DIR] [--profile SUMMARY.json ...]``: PNGs of a benchmark run.

Written beside the results JSON (or into ``--out``), named after it:

- ``<stem>-attention.png``: attention TFLOP/s against sequence length, a panel
  per mode, a line per provider and head layout (heads x head_dim).
- ``<stem>-mlp.png``: the ReLU-MLP block's TFLOP/s against the model width, a
  panel per mode, a line per provider.
- ``<stem>-memory-bound.png``: LayerNorm (plain, and with the residual add
  fused) GB/s as a fraction of the copy bandwidth measured in the same run,
  against the width; AdamW's step the same, a bar per parameter list and
  provider.
- ``<stem>-step-breakdown.png``: where a training step's time goes, one stacked
  bar per ``python -m bench.profile`` summary: the ``profile-*.json`` files
  beside the results whose device is the run's, or the ones given.

Rows that failed or carry no time are left out, and a plot with nothing to show
is not written; fields this module does not know are ignored.  Uses
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

MODES = ("fwd", "bwd", "fwd+bwd")
_ATTENTION_SHAPE = re.compile(r"b(\d+)xs(\d+)xh(\d+)xd(\d+)")
_MLP_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")
_ROWS_BY_WIDTH = re.compile(r"^(\d+)x(\d+)$")


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("bench.plots needs matplotlib (pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(value) -> Optional[float]:
    """A finite positive number, or None (NaN for a failed row, missing fields, strings...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _measured(rows: list) -> list[dict]:
    return [r for r in rows if isinstance(r, dict) and not r.get("error") and _number(r.get("ms"))
            and isinstance(r.get("op"), str) and isinstance(r.get("shape"), str)]


def _label(row: dict, *parts: str, with_dtype: bool) -> str:
    return " ".join([row.get("provider", "?"), *parts] + ([str(row.get("dtype"))] if with_dtype else []))


def _several_dtypes(rows: list[dict]) -> bool:
    return len({r.get("dtype") for r in rows}) > 1


# --------------------------------------------------------------------------- figures
def _line_panels(plt, series: dict, xlabel: str, ylabel: str, title: str, log_x: bool):
    """One panel per mode; ``series`` maps (mode, label) to {x: y}."""
    modes = [m for m in MODES if any(k[0] == m for k in series)]
    modes += sorted({k[0] for k in series} - set(modes))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for (m, label), points in sorted(series.items()):
            if m == mode:
                xs = sorted(points)
                ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_title(mode)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def attention_figure(plt, rows: list[dict], env: dict):
    rows = [r for r in rows
            if r["op"] == "attention" and _ATTENTION_SHAPE.search(r["shape"]) and _number(r.get("tflops"))]
    if not rows:
        return None
    series, several = defaultdict(dict), _several_dtypes(rows)
    for r in rows:
        _, s, h, d = map(int, _ATTENTION_SHAPE.search(r["shape"]).groups())
        series[(str(r.get("mode")), _label(r, f"{h}x{d}", with_dtype=several))][s] = r["tflops"]
    return _line_panels(plt, series, "sequence length", "TFLOP/s",
                        f"attention (causal) on {env.get('device', '?')}", log_x=True)


def mlp_figure(plt, rows: list[dict], env: dict):
    rows = [r for r in rows if r["op"] == "relu_mlp" and _MLP_SHAPE.match(r["shape"]) and _number(r.get("tflops"))]
    if not rows:
        return None
    series, several = defaultdict(dict), _several_dtypes(rows)
    for r in rows:
        tokens, width, _ = map(int, _MLP_SHAPE.match(r["shape"]).groups())
        series[(str(r.get("mode")), _label(r, f"({tokens} tokens)", with_dtype=several))][width] = r["tflops"]
    return _line_panels(plt, series, "model width d (FFN 4d)", "TFLOP/s",
                        f"ReLU-MLP block on {env.get('device', '?')}", log_x=True)


def _copy_fraction(row: dict, copy_gbps: Optional[float]) -> Optional[float]:
    if row.get("roofline") == "copy" and _number(row.get("fraction_of_roofline")):
        return row["fraction_of_roofline"]
    gbps = _number(row.get("gbps"))
    return gbps / copy_gbps if gbps and copy_gbps else None


def memory_bound_figure(plt, rows: list[dict], env: dict):
    copy_gbps = _number(env.get("copy_bandwidth_gbps"))
    rows = [r for r in rows if _copy_fraction(r, copy_gbps) is not None]
    norms = {op: [r for r in rows if r["op"] == op and _ROWS_BY_WIDTH.match(r["shape"])]
             for op in ("layer_norm", "add+layer_norm")}
    adamw = [r for r in rows if r["op"] == "adamw_step"]
    panels = [(op, ops_rows) for op, ops_rows in norms.items() if ops_rows] + ([("adamw_step", adamw)] if adamw else [])
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.6), squeeze=False)
    for ax, (op, op_rows) in zip(axes[0], panels):
        if op == "adamw_step":
            _adamw_bars(ax, op_rows, copy_gbps)
        else:
            _layer_norm_lines(ax, op, op_rows, copy_gbps)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("fraction of the copy bandwidth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    bandwidth = f"{copy_gbps:.0f} GB/s" if copy_gbps else "not recorded"
    fig.suptitle(f"memory-bound ops on {env.get('device', '?')} (copy bandwidth {bandwidth})")
    fig.tight_layout()
    return fig


def _layer_norm_lines(ax, op: str, rows: list[dict], copy_gbps: Optional[float]) -> None:
    series, several = defaultdict(dict), _several_dtypes(rows)
    for r in rows:
        width = int(_ROWS_BY_WIDTH.match(r["shape"]).group(2))
        series[_label(r, str(r.get("mode")), with_dtype=several)][width] = _copy_fraction(r, copy_gbps)
    for label, points in sorted(series.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width (normalised size)")
    ax.set_title(op)


def _adamw_bars(ax, rows: list[dict], copy_gbps: Optional[float]) -> None:
    cases = list(dict.fromkeys(f"{r['shape']} {r.get('dtype')}" for r in rows))
    providers = list(dict.fromkeys(r.get("provider") for r in rows))
    width = 0.8 / len(providers)
    for k, provider in enumerate(providers):
        values = {f"{r['shape']} {r.get('dtype')}": _copy_fraction(r, copy_gbps) for r in rows
                  if r.get("provider") == provider}
        xs = [i for i, case in enumerate(cases) if case in values]
        ax.bar([x + k * width for x in xs], [values[cases[x]] for x in xs], width, label=provider)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([textwrap.fill(case, 26) for case in cases], fontsize=6, rotation=30, ha="right")
    ax.set_title("adamw_step")


def step_breakdown_figure(plt, summaries: list[dict]):
    """A stacked bar per profile summary: each family's share of the traced step."""
    summaries = [s for s in summaries if isinstance(s.get("families"), list) and _number(s.get("traced_step_ms"))]
    if not summaries:
        return None
    names = list(dict.fromkeys(f["family"] for s in summaries for f in s["families"]))
    uncovered = list(dict.fromkeys(s.get("uncovered", {}).get("label", "uncovered") for s in summaries))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(summaries) + 3), 5))
    bottoms = [0.0] * len(summaries)
    for k, name in enumerate(names + uncovered):
        heights = [100 * _share(s, name) for s in summaries]
        colour = colours(k % 10) if k < len(names) else "lightgrey"
        ax.bar(range(len(summaries)), heights, 0.6, bottom=bottoms, label=name, color=colour)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, s in enumerate(summaries):
        ax.text(i, bottoms[i] + 1, f"{s['traced_step_ms']:.1f} ms", ha="center", fontsize=8)
    ax.set_xticks(range(len(summaries)))
    ax.set_xticklabels([f"{s.get('preset')} {s.get('dtype')}\n{s.get('batch_size')} x {s.get('seq_len')}\n"
                        f"{textwrap.fill(str(s.get('device')), 22)}" for s in summaries], fontsize=7)
    ax.set_ylabel("share of the traced step (%)")
    ax.set_title("where a training step's time goes (bench.profile)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def _share(summary: dict, name: str) -> float:
    step = summary["traced_step_ms"]
    for f in summary["families"]:
        if f.get("family") == name:
            return (_number(f.get("ms")) or 0.0) / step
    uncovered = summary.get("uncovered", {})
    return (_number(uncovered.get("ms")) or 0.0) / step if uncovered.get("label", "uncovered") == name else 0.0


# --------------------------------------------------------------------------- files
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _summaries(results_json: Path, env: dict, profiles: Optional[Sequence[Path]]) -> list[dict]:
    """The profile summaries to draw: the given ones, else those beside the results on the run's device."""
    if profiles is not None:
        return [_read_json(p) for p in profiles]
    found = [_read_json(p) for p in sorted(Path(results_json).parent.glob("profile-*.json"))]
    return [s for s in found if s.get("device") == env.get("device")]


def write_plots(results_json: Path, out_dir: Path, profiles: Optional[Sequence[Path]] = None) -> list[Path]:
    """Write the PNGs of a results JSON (and of profile summaries) into ``out_dir``; return their paths."""
    results_json, out_dir = Path(results_json), Path(out_dir)
    data = _read_json(results_json)
    env = data.get("environment") if isinstance(data.get("environment"), dict) else {}
    rows = _measured(data.get("rows") if isinstance(data.get("rows"), list) else [])
    plt = _pyplot()
    figures = {
        "attention": attention_figure(plt, rows, env),
        "mlp": mlp_figure(plt, rows, env),
        "memory-bound": memory_bound_figure(plt, rows, env),
        "step-breakdown": step_breakdown_figure(plt, _summaries(results_json, env, profiles)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        if fig is None:
            continue
        path = out_dir / f"{results_json.stem}-{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a bench results JSON")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: the results' folder)")
    parser.add_argument("--profile", type=Path, nargs="+", help="bench.profile summaries for the stacked bar "
                        "(default: profile-*.json beside the results, on the same device)")
    args = parser.parse_args(argv)
    try:
        written = write_plots(args.results, args.out or args.results.parent, args.profile)
    except (ValueError, ImportError) as e:
        print(f"bench.plots: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    if not any(path.stem.endswith("-step-breakdown") for path in written):
        print("bench.plots: no step breakdown (no bench.profile summary of this device beside the results); "
              "`python -m bench.profile --preset opt-1.3b --out <the results folder>` writes one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
