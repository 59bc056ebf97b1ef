"""Tables and plots of simulation results (matplotlib only imported to draw)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .world import Result

COLUMNS = ("strategy", "SLO met", "worst model", "longest wait", "p50 TTFT", "p99 TTFT", "cold starts", "evictions",
           "OOMs", "OOMs avoided", "refused", "timed out", "VRAM util", "models warm", "wall s")


def _seconds(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f} s"


def row(r: Result) -> tuple[str, ...]:
    name, share = r.worst_model
    return (r.strategy, f"{100 * r.slo_attainment:.1f} %", f"{100 * share:.1f} % {name}", f"{r.longest_wait_s:.0f} s",
            _seconds(r.ttft_percentile(50)),
            _seconds(r.ttft_percentile(99)), str(r.loads), str(r.evictions), str(r.ooms), str(r.ooms_avoided),
            str(r.refused + r.failed_loads), str(r.timed_out), f"{100 * r.vram_util:.0f} %", f"{r.mean_loaded:.1f}",
            f"{r.wall_s:.1f}")


def markdown_table(results: Sequence[Result]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def per_model_table(results: Sequence[Result]) -> str:
    """Share of each model's requests within its goal, per strategy (markdown)."""
    models = list(results[0].by_model)
    lines = ["| strategy | " + " | ".join(models) + " |", "|" + "---|" * (len(models) + 1)]
    lines += ["| " + r.strategy + " | " + " | ".join(f"{100 * r.by_model[m]:.1f} %" for m in models) + " |"
              for r in results]
    return "\n".join(lines)


def text_table(results: Sequence[Result]) -> str:
    rows = [COLUMNS] + [row(r) for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)


def plot(results: Sequence[Result], title: str, path: Path) -> None:
    """Three panels: SLO attainment, the TTFT distribution, cold starts / evictions / OOMs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.strategy for r in results]
    colours = ["#1f77b4" if r.strategy.startswith("lessor") else "#aec7e8" if "lru_idle" in r.strategy or "value" in r.strategy
               else "#9e9e9e" for r in results]  # lessor, ablations of lessor, baselines
    fig, (slo, cdf, counts) = plt.subplots(1, 3, figsize=(16, 4.8))
    fig.suptitle(title, fontsize=11)
    slo.barh(names, [100 * r.slo_attainment for r in results], color=colours)
    slo.set_xlabel("requests within their TTFT goal (%)")
    slo.set_xlim(0, 100)
    slo.invert_yaxis()
    for r in results:
        served = np.sort(r.ttft[~np.isnan(r.ttft)])
        if not len(served):
            continue
        picks = np.linspace(0, len(served) - 1, min(len(served), 2000)).astype(int)
        share = (picks + 1) / r.requests  # of all requests: the curve tops out at the share served
        cdf.plot(np.maximum(served[picks], 1e-3), 100 * share, label=r.strategy,
                 linestyle="-" if r.strategy.startswith("lessor") else "--")
    cdf.set_xscale("log")
    cdf.set_xlabel("time to first token (s), log scale")
    cdf.set_ylabel("requests served by then (% of all)")
    cdf.set_ylim(0, 100)
    cdf.legend(fontsize=8, loc="lower right")
    cdf.grid(alpha=0.3)
    y = np.arange(len(results))
    for offset, label, values in ((-0.27, "cold starts", [r.loads for r in results]),
                                  (0.0, "evictions", [r.evictions for r in results]),
                                  (0.27, "OOM crashes", [r.ooms for r in results])):
        counts.barh(y + offset, values, height=0.27, label=label)
    counts.set_yticks(y, names)
    counts.set_xscale("symlog")
    counts.invert_yaxis()
    counts.legend(fontsize=8)
    counts.set_xlabel("count over the run (symlog)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
