"""`value`: keep the models that serve the most requests per byte, learned from the traffic.

A load that is short of memory is weighed against what it would evict, in requests served within
their goal over a horizon (the window the router's decayed rates describe). A model's *served
rate* is its decayed request rate × the share of its requests it kept up with while it was
loaded (`kept_up_share`: started at once, or queued behind less than one full batch), and never
less than the requests it started (`start_rate`): one its bursts swamp serves few of them in time,
however often it is asked, while one that fills every slot it has is worth at least what it
serves (the busiest model never looks the cheapest).

- gain: the newcomer's served rate × (horizon − its load cost): it serves nothing while it loads;
- loss: each victim's served rate × (horizon + its load cost): its requests go unserved, and
  coming back costs a load of its own.

It loads only when gain > (1 + margin) × loss, so noise in the rates does not swap models back
and forth. Victims are taken cheapest first: the lowest loss per byte they free where the load is
short (GreedyDual-Size-Frequency's frequency × cost / size, with the decayed rate as frequency).

Rates protect only models in use now. An idle model *yields* to a load whose requests wait,
whatever the weighing says, once it has gone unasked for the churn age (a quiet model, as for
every policy: policies/eviction.py), or at once where it is asked so rarely that a reload costs
it little (its requests come more than `RARE_RELOADS` reloads apart: idle, it is not in use). An
idle model asked for more recently holds the load until it yields, and the `Queue` says when; a
busy rare one is named as the load's blocker (the router asks again the moment it idles).
A model asked for the first time (`first_time`: never served here) has no rate worth weighing:
it is worth what the idle models it would evict are (an optimistic prior, as Ollama and
llama-swap swap at once); against busy models it weighs its rate like any other.

Two guards, because rates alone would let a model churn or starve:

- *Churn age.* A model that became ready less than `churn_age_s` ago is not evicted for another
  by the weighing (ModelMesh's minimum age): a burst cannot swap it straight back out.
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
from collections.abc import Sequence
from dataclasses import dataclass

from .eviction import decide_with_candidates, free_with, holds_on, rejected, shortfall, shrink_to_cover, turns_quiet
from .snapshot import AdmissionRequest, Admit, Decision, Evict, ModelView, Queue, Snapshot

# A model whose requests come more than this many of its reloads apart (rate × reload < 1 / this)
# yields as soon as it is idle: a reload delays about one of its requests, while a waiting one
# would wait for nothing. Chosen in the simulator: 6 serves the two-model box as Ollama does (8
# already keeps a model there that should go) and wins box-together (4 let models go that were
# asked for again within a few reloads).
RARE_RELOADS = 6.0


@dataclass(frozen=True)
class Value:
    horizon_s: float = 600.0
    margin: float = 0.5
    churn_age_s: float = 60.0
    starvation_s: float = 7200.0
    weigh_share: bool = True  # the served rate (rate × share kept up with); False: the rate alone
    yields: bool = True  # idle models yield to waiting ones (False: only the simulator's ablation)

    def __call__(self, request: AdmissionRequest, snapshot: Snapshot) -> Decision:
        short = shortfall(request, snapshot)
        if not short:
            return Admit()
        def cheapest_first(m: ModelView) -> tuple:
            return self._keep_per_byte(m, short), m.last_used_s, m.name
        if request.is_give_back or request.cause != "request":
            return decide_with_candidates(request, snapshot, eligible=lambda m: True, order=cheapest_first,
                                          churn_age_s=self.churn_age_s)
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
        """Evict the cheapest mature idle models if the newcomer is worth them, else the idle
        ones that yield (whatever their rates); queue behind busy ones it is worth; or wait: for
        idle ones to yield, for ageing, or for young ones to mature."""
        mature = [m for m in others if m.state == "ready" and now - m.ready_since_s >= self.churn_age_s]
        idle = [m for m in mature if m.idle]
        victims, remaining = free_with(short, idle)
        if not remaining and self._worth(newcomer, self._chosen(idle, victims), prior=True):
            return Evict(tuple(victims))
        victims, remaining = free_with(short, (m for m in others if self._yields(m, now)))
        if not remaining and self.yields:
            return Evict(tuple(victims))
        victims, remaining = free_with(short, mature)
        if not remaining:
            chosen = self._chosen(mature, victims)
            if self._worth(newcomer, chosen):
                if all(v.idle for v in chosen):
                    return Evict(tuple(victims))
                return Queue("the models it would evict are busy", tuple(victims))
        if self.yields:
            # Busy models that yield the moment they idle (rare ones): the load waits for them by
            # name, so the router asks again as soon as they do, not at the next recheck.
            at_once = [m for m in others
                       if m.state == "ready" and (self._yields(m, now) or self._yield_after_s(m) == 0.0)]
            victims, remaining_at_once = free_with(short, at_once)
            if not remaining_at_once:
                return Queue("the models that could make room are busy; they yield once idle", tuple(victims))
        # Nothing to evict now: wait for whatever frees the room first.
        waits = [turns_quiet(short, [m for m in others if m.state == "ready"], now,
                             lambda m: max(m.last_used_s, m.ready_since_s) + self._yield_after_s(m))
                 if self.yields else None]
        if not remaining:
            # Busy models it is not worth hold the room: looked at again by ageing, and within a
            # churn age (by when they may be quiet).
            ageing = self._recheck_s(newcomer, chosen)
            busy = [self._yield_after_s(m) for m in chosen if not m.idle]
            waits.append(Queue(self._not_worth(newcomer.name if newcomer else "?", chosen), (),
                               max(1.0, min(ageing or math.inf, self.churn_age_s, *busy))))
        else:
            young = [m for m in others if m.state == "ready" and m not in mature]
            if young:
                # Matured, or a busy one idle long enough to yield, whichever comes first.
                matures_in = min(self.churn_age_s - (now - m.ready_since_s) for m in young)
                busy = [self._yield_after_s(m) for m in young if not m.idle]
                waits.append(Queue(f"{', '.join(m.name for m in young)} loaded less than {self.churn_age_s:g} s "
                                   "ago (policy.churn_age)", (), max(1.0, min([matures_in, *busy]))))
        if found := [w for w in waits if w is not None]:  # each says when it rechecks
            return min(found, key=lambda w: math.inf if w.recheck_s is None else w.recheck_s)
        return Queue("a load under way holds the memory")

    def _yields(self, m: ModelView, now: float) -> bool:
        return m.idle and now - max(m.last_used_s, m.ready_since_s) >= self._yield_after_s(m)

    def _yield_after_s(self, m: ModelView) -> float:
        """How long `m` must idle before it yields to a waiting load."""
        if not self.yields:
            return math.inf
        if m.request_rate * m.load_cost_s * RARE_RELOADS < 1.0:
            return 0.0
        return self.churn_age_s

    @staticmethod
    def _chosen(pool: Sequence[ModelView], victims: Sequence[str]) -> list[ModelView]:
        return [m for m in pool if m.name in victims]

    # -- the weighing --------------------------------------------------------------------------

    def _served_rate(self, model: ModelView) -> float:
        """The requests per second it serves within their goal, as far as the router can tell:
        those it keeps up with, and never fewer than it starts. A model its bursts swamp is worth
        less than its rate; one that fills its slots is worth at least what it serves."""
        if not self.weigh_share:
            return model.request_rate
        return max(model.request_rate * model.kept_up_share, model.start_rate)

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

    def _worth(self, newcomer: ModelView | None, victims: Sequence[ModelView], prior: bool = False) -> bool:
        """Whether the newcomer serves more than the victims lose. `prior`: the victims are idle,
        and a newcomer never served here is worth them (it has no rate yet to weigh)."""
        if prior and newcomer is not None and newcomer.first_time:
            return True
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

