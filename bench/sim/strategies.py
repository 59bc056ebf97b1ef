"""What is compared: lessor's policies and three baselines, all as policies over one ledger.

A strategy is a policy (the same `Policy` signature as lessor's: a pure function of an
AdmissionRequest and a Snapshot) plus the few facts of how its scheduler loads:

- `peak_aware`: lessor plans with the memory model and the planner and asks the policy for the
  load's worst moment (weights + load peak, or everything at once for a one-phase engine), then
  sizes the KV cache from what is really left. The baselines ask for the steady size they
  estimate (weights + a fixed KV cache + workspace) and never see the load peak.
- `serial`: "device" (lessor: loads on one device never overlap), "global" (Ollama: one load at
  a time), or None (llama-swap: each swap group loads on its own).
- `keep_alive`: idle seconds before a model is unloaded (None: never).
- `drain`: when a load must wait for busy models, those models stop taking new requests until
  they are idle (lessor's router). Without it, a busy model can keep the load waiting forever.

A `Queue` names its blockers, as lessor's policies do: the models it would evict were every
model idle. The router's lanes ask the policy again once they all are.

The baseline policies below are lessor's reading of the other schedulers' documented behaviour,
not their code: Ollama's scheduler (`OLLAMA_MAX_LOADED_MODELS` = 3 per GPU, evict the runner
whose keep-alive expires first, wait when every runner is busy) and llama-swap's groups (one
model of a `swap: true` group at a time, swapped when another member is asked for, no memory
accounting at all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from lessor.daemon.config.schema import PolicyConfig, RouterConfig
from lessor.policies import (
    POLICIES,
    AdmissionRequest,
    Admit,
    Decision,
    Evict,
    ModelView,
    Policy,
    Queue,
    Rejected,
    Snapshot,
    Value,
    shortfall,
)
from lessor.policies.eviction import deduct


@dataclass(frozen=True)
class Strategy:
    name: str
    policy: Policy
    peak_aware: bool
    serial: Literal["device", "global"] | None = "device"
    keep_alive: float | None = None
    drain: bool = False
    drain_after: float = 0.0  # seconds a load waits for its victims to idle by themselves before draining them
    static: tuple[str, ...] | None = None  # the fixed set a static deployment loads at start
    lessor: bool = False  # one of lessor's own policies (for the report)
    learns: bool = False  # its policy reads what the router learned (the simulator fills it in only then)
    notes: str = ""


def _value(**changes: Any) -> Value:
    """The config's default policy (value, as lessor runs it) with `changes` to its parameters."""
    policy = PolicyConfig().build()
    assert isinstance(policy, Value), "PolicyConfig's default names the value policy"
    return replace(policy, **changes)


def ollama_like(max_per_device: int = 3) -> Policy:
    """Fit the estimate and at most `max_per_device` models per GPU; evict idle models whose
    keep-alive runs out first (equal keep-alives: least recently used); wait if all are busy,
    for the ones it would evict were every model idle."""
    def policy(request: AdmissionRequest, snapshot: Snapshot) -> Decision:
        short = shortfall(request, snapshot)
        crowded = {d: _loaded_on(snapshot, d, request.model) for d in request.need_bytes}
        if not short and all(len(ms) < max_per_device for ms in crowded.values()):
            return Admit()
        candidates = list({m.name: m for ms in crowded.values() for m in ms}.values())
        victims, remaining = _victims(short, crowded, max_per_device,
                                      sorted(candidates, key=lambda m: (not m.idle, m.last_used_s, m.name)))
        if remaining:
            return Rejected("the estimate does not fit even on an empty GPU", remaining)
        busy = [v for v in victims if not snapshot.models[v].idle]
        if busy:
            blockers, _ = _victims(short, crowded, max_per_device,
                                   sorted(candidates, key=lambda m: (m.last_used_s, m.name)))
            return Queue(f"waiting for {', '.join(busy)} to finish", tuple(blockers))
        return Evict(tuple(victims))
    return policy


def _victims(short: Mapping[str, int], crowded: Mapping[str, list[ModelView]], max_per_device: int,
             ordered: list[ModelView]) -> tuple[list[str], dict[str, int]]:
    """Take models in order until each GPU is under the count and the memory is covered."""
    victims: list[str] = []
    remaining = dict(short)
    for model in ordered:
        over = any(len(ms) - _count(ms, victims) >= max_per_device for ms in crowded.values())
        if not over and not remaining:
            break
        victims.append(model.name)
        deduct(remaining, model)
    return victims, remaining


def _loaded_on(snapshot: Snapshot, device: str, excluding: str) -> list[ModelView]:
    return [m for m in snapshot.models.values() if m.name != excluding and m.held_bytes.get(device, 0) > 0]


def _count(models: list[ModelView], names: list[str]) -> int:
    return sum(1 for m in models if m.name in names)


def llama_swap_like(groups: Mapping[str, str]) -> Policy:
    """One model per swap group: asking for another member unloads the one loaded, after its
    requests finish. Memory is never looked at (the operator sized the groups)."""
    def policy(request: AdmissionRequest, snapshot: Snapshot) -> Decision:
        group = groups.get(request.model)
        members = [m for m in snapshot.models.values()
                   if m.name != request.model and groups.get(m.name) == group and m.held_bytes]
        if any(not m.idle for m in members):
            return Queue(f"swap group '{group}' is busy", tuple(m.name for m in members))
        return Evict(tuple(m.name for m in members)) if members else Admit()
    return policy


def static_policy(request: AdmissionRequest, snapshot: Snapshot) -> Decision:
    return Admit()  # the set was chosen up front; anything else is refused before it gets here


@dataclass(frozen=True)
class StrategyOptions:
    """Per-scenario facts the strategies need."""

    swap_groups: Mapping[str, str] = field(default_factory=dict)
    static_set: tuple[str, ...] = ()
    keep_alive: float = 300.0  # Ollama's default, and lessor's default model keep_alive


def all_strategies(options: StrategyOptions) -> list[Strategy]:
    ka = options.keep_alive
    patience = RouterConfig().drain_after  # lessord's default
    return [
        Strategy("static", static_policy, peak_aware=False, serial="global", static=options.static_set,
                 notes="fixed set loaded at start, one by one; other models are refused"),
        Strategy("llama-swap-like", llama_swap_like(options.swap_groups), peak_aware=False, serial=None,
                 notes="one model per swap group, no memory accounting"),
        Strategy("ollama-like", ollama_like(3), peak_aware=False, serial="global", keep_alive=ka,
                 notes="steady estimate, <=3 models/GPU, keep-alive order, one load at a time"),
        Strategy("lessor value", PolicyConfig().build(), peak_aware=True, keep_alive=None, drain=True,
                 drain_after=patience, lessor=True, learns=True,
                 notes="the default: keeps the models that serve the most requests per byte, learned from the traffic"),
        Strategy("lessor fit", POLICIES["fit"], peak_aware=True, keep_alive=ka, drain=True, drain_after=patience,
                 lessor=True, notes="never evicts; keep_alive frees memory"),
        Strategy("lessor lru_idle", POLICIES["lru_idle"], peak_aware=True, keep_alive=None, drain=True,
                 drain_after=patience, lessor=True,
                 notes="evicts idle models, least recently used first; keep warm until room is needed"),
        Strategy("lessor priority", POLICIES["priority"], peak_aware=True, keep_alive=None, drain=True,
                 drain_after=patience, lessor=True, notes="evicts idle models of lower priority only"),
        # What the router's drain costs and buys: lru_idle draining at once (lessor before
        # router.drain_after existed), and never draining.
        Strategy("lru_idle, drain_after 0", POLICIES["lru_idle"], peak_aware=True, keep_alive=None, drain=True,
                 notes="ablation: lessor's lru_idle with router.drain_after 0"),
        Strategy("lru_idle, never drain", POLICIES["lru_idle"], peak_aware=True, keep_alive=None,
                 notes="ablation: a load waits until its victims idle by themselves"),
        # What the value policy's defaults buy: Ollama's keep_alive of 5 minutes (lessor's default
        # before), the rate alone (no share started at once), no ageing (a model may starve).
        Strategy("value, keep_alive 5 min", PolicyConfig().build(), peak_aware=True, keep_alive=ka, drain=True,
                 drain_after=patience, learns=True, notes="ablation: the value policy with keep_alive 300 s"),
        Strategy("value, rate alone", _value(weigh_share=False), peak_aware=True,
                 keep_alive=None, drain=True, drain_after=patience, learns=True,
                 notes="ablation: the value policy weighing request rates, not the share started at once"),
        Strategy("value, no ageing", _value(starvation_s=math.inf), peak_aware=True,
                 keep_alive=None, drain=True, drain_after=patience, learns=True,
                 notes="ablation: the value policy where a rare model may starve"),
        Strategy("value, idle never yields", _value(yields=False), peak_aware=True,
                 keep_alive=None, drain=True, drain_after=patience, learns=True,
                 notes="ablation: the value policy before issue 34, where an idle model kept its place by its rate"),
    ]

