"""Policy simulator benchmark: every strategy over every scenario, side by side on one trace each.

    .venv/bin/python -m bench.policy_sim                      # 1M requests per scenario
    .venv/bin/python -m bench.policy_sim --requests 100000 --scenario seed

Prints a table per scenario and the simulator's own speed; writes bench/results/<scenario>.png
and bench/results/policy_sim.md (the tables, for bench/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file too: `bench` from the repo root

from bench.sim import all_strategies, make_trace, scenarios
from bench.sim.report import markdown_table, per_model_table, plot, text_table
from bench.sim.simulator import Simulator


def main() -> None:
    known = scenarios()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["all", *known], default="all")
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    chosen = known.values() if args.scenario == "all" else [known[args.scenario]]
    markdown = []
    for scenario in chosen:
        workload = replace(scenario.workload, requests=args.requests, seed=args.seed)
        started = time.perf_counter()
        trace = make_trace(workload, len(scenario.models))
        trace_s = time.perf_counter() - started
        results = [Simulator(scenario.hardware, scenario.models, s, scenario.slo_ttft_s, scenario.wait_timeout_s).run(trace)
                   for s in all_strategies(scenario.options)]
        hours = results[0].sim_seconds / 3600
        print(f"\n== {scenario.name}: {scenario.title}")
        print(f"   {args.requests} requests over {hours:.1f} simulated hours (trace drawn in {trace_s:.2f} s)")
        print(text_table(results))
        slowest = max(results, key=lambda r: r.wall_s)
        print(f"simulator speed: slowest strategy '{slowest.strategy}' {slowest.wall_s:.1f} s for {args.requests} "
              f"requests ({args.requests / slowest.wall_s:,.0f} requests/s); goal: 1M in < 60 s")
        plot(results, scenario.title, args.out / f"{scenario.name}.png")
        goals = ", ".join(f"{m} {g:g} s" for m, g in scenario.slo_ttft_s.items())
        per_model = (f"Requests within their goal, per model:\n\n{per_model_table(results)}\n\n"
                     if len(scenario.models) <= 4 else "")
        markdown.append(f"### {scenario.name}: {scenario.title}\n\n{scenario.story}\n\n"
                        f"{args.requests} requests, {hours:.1f} simulated hours; TTFT goals: {goals}.\n\n"
                        f"{markdown_table(results)}\n\n{per_model}![{scenario.name}](results/{scenario.name}.png)\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "policy_sim.md").write_text("\n".join(markdown))
    print(f"\nwrote {args.out}/policy_sim.md and the plots")


if __name__ == "__main__":
    main()
