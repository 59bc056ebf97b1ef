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
    shares = zipf_shares(n_models, workload.zipf_s)
    counts = rng.multinomial(workload.requests, shares)
    times, models = [], []
    for index, (share, count) in enumerate(zip(shares, counts)):
        if count:
            times.append(np.cumsum(_gaps(rng, workload, workload.rate * share, int(count))))
            models.append(np.full(int(count), index, dtype=np.int32))
    arrival = np.concatenate(times)
    order = np.argsort(arrival, kind="stable")
    n = workload.requests
    return Trace(arrival[order], np.concatenate(models)[order],
                 _lengths(rng, workload.prompt_mean, workload.length_sigma, n),
                 _lengths(rng, workload.output_mean, workload.length_sigma, n))
