"""The policy simulator: lessor's policies and ledger against Ollama-like, llama-swap-like and
static scheduling, over the same simulated GPUs and request traces. See bench/README.md."""

from .scenarios import Scenario, scenarios
from .simulator import Simulator
from .strategies import Strategy, StrategyOptions, all_strategies
from .workload import Trace, Workload, make_trace
from .world import Hardware, Result, SimModel


def run_scenario(scenario: Scenario, requests: int | None = None, strategies: list[Strategy] | None = None,
                 seed: int | None = None) -> list[Result]:
    """Every strategy over one trace of the scenario."""
    from dataclasses import replace

    workload = scenario.workload
    if requests is not None:
        workload = replace(workload, requests=requests)
    if seed is not None:
        workload = replace(workload, seed=seed)
    trace = make_trace(workload, len(scenario.models))
    return [Simulator(scenario.hardware, scenario.models, strategy, scenario.slo_ttft_s, scenario.wait_timeout_s).run(trace)
            for strategy in strategies or all_strategies(scenario.options)]


__all__ = ["Hardware", "Result", "Scenario", "SimModel", "Simulator", "Strategy", "StrategyOptions", "Trace",
           "Workload", "all_strategies", "make_trace", "run_scenario", "scenarios"]
