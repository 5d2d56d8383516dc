"""Outputs of a run: summary.json, requests.jsonl, PNG plots and the text table.

Plots use matplotlib's Agg backend (files only, no display): ``latency_cdf.png`` (the
empirical CDFs of TTFT, TPOT and E2E of one run) and, for a sweep,
``sweep_throughput.png`` / ``sweep_latency.png`` against the offered request rate.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import LoadTestConfig
from .metrics import LATENCY_KEYS, RequestRecord


def config_json(config: LoadTestConfig) -> dict[str, Any]:
    """The config as JSON (distributions as their text form, the API key hidden)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "api_key":
            value = None if value is None else "***"
        elif f.name in ("input_dist", "output_dist") and value is not None:
            value = str(value)
        elif f.name == "extra_body":
            value = dict(value)
        out[f.name] = value
    return out


def write_run(out_dir: str | Path, config: LoadTestConfig, model: str, summary: dict,
              records: Sequence[RequestRecord], plots: bool = True) -> list[Path]:
    """Write summary.json, requests.jsonl and latency_cdf.png under ``out_dir``; the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.json", out / "requests.jsonl"]
    paths[0].write_text(json.dumps({"model": model, "config": config_json(config), **summary}, indent=2) + "\n")
    with open(paths[1], "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    if plots:
        paths.append(plot_latency_cdfs(records, out / "latency_cdf.png"))
    return paths


def _pyplot():
    import matplotlib  # noqa: PLC0415 - heavy; only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_latency_cdfs(records: Sequence[RequestRecord], path: Path) -> Path:
    plt = _pyplot()
    done = [r for r in records if r.is_ok]
    series = {"TTFT": [r.ttft_s * 1e3 for r in done],
              "TPOT": [r.tpot_s * 1e3 for r in done if r.tpot_s is not None],
              "E2E": [r.e2e_s * 1e3 for r in done]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, values) in zip(axes, series.items()):
        if values:
            x = np.sort(values)
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name} CDF ({len(values)} requests)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(points: Sequence[dict], out_dir: Path) -> list[Path]:
    """Throughput and latency against the offered rate, one point per sweep step."""
    plt = _pyplot()
    pts = sorted(points, key=lambda p: p["rate"])
    rates = [p["rate"] for p in pts]

    def col(key: str, sub: str | None = None) -> list[float]:
        return [np.nan if (v := (p[key][sub] if sub else p[key])) is None else v for p in pts]

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(rates, col("request_throughput"), "o-", label="throughput (req/s)")
    ax.plot(rates, col("goodput"), "s-", label="goodput (req/s)")
    ax.plot(rates, rates, ":", color="gray", label="offered")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("requests/s")
    ax2 = ax.twinx()
    ax2.plot(rates, col("slo_attainment"), "^--", color="tab:red", label="SLO attainment")
    ax2.set_ylabel("SLO attainment")
    ax2.set_ylim(0, 1.05)
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = [out_dir / "sweep_throughput.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms")):
        for sub in ("p50", "p90", "p99"):
            ax.plot(rates, col(key, sub), "o-", label=sub)
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylabel(key.replace("_ms", "").upper() + " (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "sweep_latency.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def format_table(summary: dict, title: str = "Load test") -> str:
    """A readable fixed-width summary (what ``pdserve loadtest`` prints)."""
    width = 58
    lines = [f"{f' {title} ':=^{width}}"]

    def row(name: str, value: Any) -> None:
        lines.append(f"{name:<40}{value:>18}")

    row("Requests (completed / sent)", f"{summary['num_completed']} / {summary['num_requests']}")
    row("Errors", summary["num_errors"])
    for kind, count in summary["errors"].items():
        row(f"  {kind}", count)
    row("Benchmark duration (s)", f"{summary['duration_s']:.2f}")
    row("Total input tokens", summary.get("total_input_tokens", "-"))
    row("Total output tokens", summary.get("total_output_tokens", "-"))
    row("Request throughput (req/s)", f"{summary['request_throughput']:.2f}")
    row("Input token throughput (tok/s)", f"{summary['input_throughput']:.1f}")
    row("Output token throughput (tok/s)", f"{summary['output_throughput']:.1f}")
    slo = summary.get("slo") or {}
    given = ", ".join(f"{k.replace('_ms', '').upper()}<={v:g}ms" for k, v in slo.items() if v is not None)
    row("SLOs", given or "none")
    row("Goodput (req/s)", f"{summary['goodput']:.2f}")
    row("SLO attainment", f"{summary['slo_attainment']:.1%}")
    for key in LATENCY_KEYS:
        name = key.replace("_ms", "").upper()
        lines.append(f"{f' {name} (ms) ':-^{width}}")
        for stat, value in summary[key].items():
            row(f"{stat.capitalize() if stat == 'mean' else stat.upper()} {name}",
                "-" if value is None else f"{value:.2f}")
    lines.append("=" * width)
    return "\n".join(lines)
