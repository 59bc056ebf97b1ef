"""The request trace: when each request arrives, for which model, and how long it is.

Per model, arrivals are a renewal process: Poisson (exponential gaps) or bursty Gamma gaps with a
chosen coefficient of variation (CV 1 is Poisson; CV 3 sends most requests in bursts with long
quiet spells between them). Popularity over the models is Zipf. Prompt and output lengths are
log-normal. Everything is drawn with numpy in bulk from one seed, so a trace of a million
requests costs well under a second and is the same on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Workload:
    requests: int = 100_000
    rate: float = 10.0  # requests per second, all models together
    arrivals: Literal["poisson", "gamma"] = "poisson"
    cv: float = 1.0  # gamma only: coefficient of variation of the gaps between one model's requests
    zipf_s: float = 1.0  # popularity of the model ranked k is proportional to 1 / k**s
    prompt_mean: float = 600.0  # tokens
    output_mean: float = 250.0  # tokens
    length_sigma: float = 0.8  # log-normal shape of both lengths
    seed: int = 1
    # Popularity that shifts: every `shift_every_s` the Zipf ranks go to a new random order of the
    # models (the first period keeps model 0 the most popular). None: ranks never move.
    shift_every_s: float | None = None
    # Models used together: `groups` > 0 deals the models round-robin into that many groups (Zipf
    # over the groups); a group is asked for in bursts (mean `burst_s`, on `duty` of the time), all
    # its members at once, at a Poisson rate within a burst. 0: each model on its own.
    groups: int = 0
    burst_s: float = 120.0
    duty: float = 0.25

    def __post_init__(self) -> None:
        if self.requests < 1 or self.rate <= 0 or self.cv <= 0:
            raise ValueError(f"workload: requests ({self.requests}), rate ({self.rate}) and cv ({self.cv}) "
                             "must be positive")


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order; column k describes request k."""

    arrival_s: np.ndarray  # float64
    model: np.ndarray  # int32: index into the scenario's models, ranked by popularity
    prompt_tokens: np.ndarray  # int32
    output_tokens: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.arrival_s)


def zipf_shares(n_models: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n_models + 1) ** s
    return weights / weights.sum()


def _gaps(rng: np.random.Generator, workload: Workload, rate: float, n: int) -> np.ndarray:
    mean = 1.0 / rate
    if workload.arrivals == "poisson":
        return rng.exponential(mean, n)
    shape = 1.0 / workload.cv ** 2  # gamma: CV = 1 / sqrt(shape)
    return rng.gamma(shape, mean / shape, n)


def _lengths(rng: np.random.Generator, mean: float, sigma: float, n: int) -> np.ndarray:
    mu = np.log(mean) - sigma ** 2 / 2  # so that the mean is `mean`
    return np.maximum(1, rng.lognormal(mu, sigma, n)).astype(np.int32)


def make_trace(workload: Workload, n_models: int) -> Trace:
    """`workload.requests` requests over `n_models` models, ranked by popularity (model 0 first)."""
    rng = np.random.default_rng(workload.seed)
    if workload.shift_every_s is not None:
        arrival, model = _shifting(rng, workload, n_models, workload.shift_every_s)
    elif workload.groups:
        arrival, model = _grouped(rng, workload, n_models)
    else:
        arrival, model = _renewal(rng, workload, n_models)
    n = workload.requests
    return Trace(arrival, model, _lengths(rng, workload.prompt_mean, workload.length_sigma, n),
                 _lengths(rng, workload.output_mean, workload.length_sigma, n))


def _in_order(times: list[np.ndarray], models: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` requests in arrival order."""
    arrival, model = np.concatenate(times), np.concatenate(models)
    order = np.argsort(arrival, kind="stable")[:n]
    return arrival[order], model[order].astype(np.int32)


def _shifting(rng: np.random.Generator, workload: Workload, n_models: int,
              period: float) -> tuple[np.ndarray, np.ndarray]:
    """Poisson arrivals; each `period` (the workload's shift_every_s), Zipf ranks over a fresh
    permutation of the models."""
    shares = zipf_shares(n_models, workload.zipf_s)
    periods = int(np.ceil(workload.requests / (workload.rate * period) * 1.1)) + 1
    times, models = [], []
    for p in range(periods):
        rank_of = np.arange(n_models) if p == 0 else rng.permutation(n_models)  # model -> its rank now
        counts = rng.poisson(workload.rate * period * shares[rank_of])
        for index, count in enumerate(counts):
            times.append(p * period + np.sort(rng.uniform(0.0, period, int(count))))
            models.append(np.full(int(count), index, dtype=np.int32))
    return _in_order(times, models, workload.requests)


def _grouped(rng: np.random.Generator, workload: Workload, n_models: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group, alternating bursts and quiet spells (exponential, mean `burst_s` and
    `burst_s` × (1 − duty) / duty); within its bursts each member gets Poisson arrivals at its
    share of the rate over the duty."""
    k, duty = workload.groups, workload.duty
    group_share = zipf_shares(k, workload.zipf_s)
    horizon = workload.requests / workload.rate * 1.1
    times, models = [], []
    for g in range(k):
        members = np.arange(g, n_models, k)
        spells = int(horizon / workload.burst_s / duty * 1.2) + 4
        on = rng.exponential(workload.burst_s, spells)
        off = rng.exponential(workload.burst_s * (1 - duty) / duty, spells)
        starts = np.cumsum(np.concatenate([[rng.uniform(0, off[0])], (on + off)[:-1]]))
        on_total = np.concatenate([[0.0], np.cumsum(on)])  # time "on" before each burst
        rate = workload.rate * group_share[g] / len(members) / duty  # per member, within a burst
        for index in members:
            count = rng.poisson(rate * on_total[-1])
            u = np.sort(rng.uniform(0.0, on_total[-1], int(count)))  # on-time, then mapped to real time
            burst = np.searchsorted(on_total, u, side="right") - 1
            times.append(starts[burst] + (u - on_total[burst]))
            models.append(np.full(int(count), index, dtype=np.int32))
    return _in_order(times, models, workload.requests)


def _renewal(rng: np.random.Generator, workload: Workload, n_models: int) -> tuple[np.ndarray, np.ndarray]:
    shares = zipf_shares(n_models, workload.zipf_s)
    counts = rng.multinomial(workload.requests, shares)
    times, models = [], []
    for index, (share, count) in enumerate(zip(shares, counts)):
        if count:
            times.append(np.cumsum(_gaps(rng, workload, workload.rate * share, int(count))))
            models.append(np.full(int(count), index, dtype=np.int32))
    return _in_order(times, models, workload.requests)
