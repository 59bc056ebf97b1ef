"""`value`: keep the models that serve the most requests per byte, learned from the traffic.

A load that is short of memory is weighed against what it would evict, in requests served within
their goal over a horizon (the window the router's decayed rates describe). A model's *served
rate* is its decayed request rate × the share of its requests that started at once while it was
loaded: one its bursts swamp serves few of them in time, however often it is asked.

- gain: the newcomer's served rate × (horizon − its load cost): it serves nothing while it loads;
- loss: each victim's served rate × (horizon + its load cost): its requests go unserved, and
  coming back costs a load of its own.

It loads only when gain > (1 + margin) × loss, so noise in the rates does not swap models back
and forth. Victims are taken cheapest first: the lowest loss per byte they free where the load is
short (GreedyDual-Size-Frequency's frequency × cost / size, with the decayed rate as frequency).

Two guards, because rates alone would let a model churn or starve:

- *Churn age.* A model that became ready less than `churn_age_s` ago is not evicted for another
  (ModelMesh's minimum age): a burst cannot swap it straight back out.
- *Ageing.* A model whose requests have gone unserved for `starved_s` counts its rate ×
  (1 + starved_s / starvation_s), so however rare, it is loaded in the end. Until then its
  requests wait (`Queue`), and the answer says when to ask again (`recheck_s`).

Loads nobody's traffic asked for (an operator's, a restart after a crash) and giving memory back
to processes lessor does not manage are not weighed: they evict the cheapest idle models as
needed, as `lru_idle` would evict the oldest. Elastic KV comes first, as for every policy.

Why this is the default: bench/README.md ("Policy simulator") measures it against static
placement, an Ollama-like and a llama-swap-like scheduler on the same traces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .admission import decide_with_candidates, free_with, holds_on, rejected, shortfall, shrink_to_cover
from .snapshot import Admit, AdmissionRequest, Decision, Evict, ModelView, Queue, Snapshot


@dataclass(frozen=True)
class Value:
    horizon_s: float = 600.0
    margin: float = 0.5
    churn_age_s: float = 60.0
    starvation_s: float = 7200.0
    weigh_share: bool = True  # the served rate (rate × share started at once); False: the rate alone

    def __call__(self, request: AdmissionRequest, snapshot: Snapshot) -> Decision:
        short = shortfall(request, snapshot)
        if not short:
            return Admit()
        def cheapest_first(m: ModelView) -> tuple:
            return self._keep_per_byte(m, short), m.last_used_s, m.name
        if request.is_give_back or request.cause != "request":
            return decide_with_candidates(request, snapshot, eligible=lambda m: True, order=cheapest_first)
        others = sorted((m for m in snapshot.models.values()
                         if m.name != request.model and not m.pinned and holds_on(m, short)), key=cheapest_first)
        shrink = shrink_to_cover(short, others)
        if shrink:
            return Evict((), shrink)
        _, still_short = free_with(short, others)
        if still_short:
            return rejected(short, still_short, others)
        return self._weigh(snapshot.models.get(request.model), short, others, snapshot.now_s)

    def _weigh(self, newcomer: ModelView | None, short: dict[str, int], others: list[ModelView],
               now: float) -> Decision:
        """Evict the cheapest mature models if the newcomer is worth them (idle ones alone if they
        do), queue behind them while they are busy, or wait: for ageing, or for young ones to mature."""
        mature = [m for m in others if m.state == "ready" and now - m.ready_since_s >= self.churn_age_s]
        name = newcomer.name if newcomer else "?"
        for pool in ([m for m in mature if m.idle], mature):
            victims, remaining = free_with(short, pool)
            if remaining:
                continue
            chosen = [m for m in pool if m.name in victims]
            if self._worth(newcomer, chosen):
                if all(v.idle for v in chosen):
                    return Evict(tuple(victims))
                return Queue("the models it would evict are busy", tuple(victims))
            return Queue(self._not_worth(name, chosen), (), self._recheck_s(newcomer, chosen))
        young = [m for m in others if m.state == "ready" and m not in mature]
        if young:
            matures_in = min(self.churn_age_s - (now - m.ready_since_s) for m in young)
            return Queue(f"{', '.join(m.name for m in young)} loaded less than {self.churn_age_s:g} s ago "
                         "(policy.churn_age)", (), max(1.0, matures_in))
        return Queue("a load under way holds the memory")

    # -- the weighing --------------------------------------------------------------------------

    def _served_rate(self, model: ModelView) -> float:
        """The requests per second it serves within their goal, as far as the router can tell:
        those that start at once. A model its bursts swamp is worth less than its rate."""
        return model.request_rate * (model.started_share if self.weigh_share else 1.0)

    def _loss(self, model: ModelView) -> float:
        return self._served_rate(model) * (self.horizon_s + model.load_cost_s)

    def _keep_per_byte(self, model: ModelView, short: dict[str, int]) -> float:
        freed = sum(model.held_bytes.get(d, 0) for d in short)
        return self._loss(model) / freed if freed else math.inf

    def _gain(self, newcomer: ModelView | None, ageing: float = 1.0) -> float:
        if newcomer is None:
            return 0.0
        return self._served_rate(newcomer) * ageing * max(0.1 * self.horizon_s, self.horizon_s - newcomer.load_cost_s)

    def _ageing(self, newcomer: ModelView | None) -> float:
        return 1.0 + (newcomer.starved_s if newcomer else 0.0) / self.starvation_s

    def _worth(self, newcomer: ModelView | None, victims: Sequence[ModelView]) -> bool:
        return self._gain(newcomer, self._ageing(newcomer)) > self._guarded_loss(victims)

    def _guarded_loss(self, victims: Sequence[ModelView]) -> float:
        return (1 + self.margin) * sum(self._loss(v) for v in victims)

    def _recheck_s(self, newcomer: ModelView | None, victims: Sequence[ModelView]) -> float | None:
        """Seconds until ageing alone makes the load worth it (None: it never will, its rate is 0)."""
        base = self._gain(newcomer)
        if base <= 0:
            return None
        needed = self._guarded_loss(victims) / base  # the ageing factor it needs
        starved = newcomer.starved_s if newcomer else 0.0
        # At least a second apart: the rates move meanwhile, and lessord's router looks again every second.
        return max(1.0, (needed - 1.0) * self.starvation_s - starved)

    def _not_worth(self, model: str, victims: Sequence[ModelView]) -> str:
        names = ", ".join(f"{v.name} ({v.request_rate * 60:.2g}/min)" for v in victims)
        return (f"evicting {names} would lose more requests than '{model}' would serve: it waits, and ages "
                f"(policy.starvation)")

