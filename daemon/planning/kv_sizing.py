"""KV cache sizing, for the planner (daemon/planning/planner.py): how many tokens fit on every device
after the weights and workspace, capped by the model's context (as its engine derives it) and the
plan's bounds, the engine parameters that size gives, and the lines that say how it was chosen or
why it does not fit (with the value of the engine's KV argument that would, `KvHint`). Pure."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ...engines.base import Sizing
from ...memory.context import ContextLimit
from ..config.model_spec import ModelSpec
from ..units import GiB, MiB, format_bytes
from .profile import DeviceMemory, Memory


@dataclass(frozen=True)
class KvHint:
    """The configured KV size was refused: the value of the engine's KV argument that the arithmetic
    says fits (None: none does), and how the reason reads with the value once a plan confirmed it."""

    reason: int  # its index in the plan's reasons
    value: int | None
    say: Callable[[int | None], str]

def kv_bytes(device: DeviceMemory, tokens: int) -> int:
    """The KV lease of one device: the cache and what grows with it (a context-sized buffer)."""
    return _tokens_bytes(tokens, device.kv_rate)

def _tokens_bytes(tokens: int, rate: float) -> int:
    """Bytes for `tokens` at a rate that may be fractional, rounded up (to a thousandth of a byte first)."""
    return -(-int(tokens * rate * 1000) // 1000)

def _fit_tokens(memory: Memory, after_weights: Mapping[str, int]) -> tuple[int, int]:
    """KV tokens that fit on every device, and the room (bytes after weights and workspace) of the
    device that limits them."""
    rooms = [(after_weights[d] - m.workspace, m.kv_rate) for d, m in zip(after_weights, memory.devices)]
    fits = [max(0, int(room // rate)) if rate else 1 << 40 for room, rate in rooms]
    limiting = min(range(len(fits)), key=fits.__getitem__)
    return fits[limiting], rooms[limiting][0]

def _context(spec: ModelSpec) -> tuple[ContextLimit, bool] | None:
    """The engine's context limit for this model (engines/*.py `context_limit`) and whether the
    engine refuses more; None where the architecture does not say the model's context."""
    if spec.architecture is None:
        return None
    limit, hard = spec.engine.context_limit(spec.architecture)
    return (limit, hard) if limit is not None else None

def size_kv(spec: ModelSpec, memory: Memory, after_weights: Mapping[str, int],
             total_bytes: int) -> tuple[int, dict[str, Any], list[str], list[str], KvHint | None, list[str]]:
    """KV tokens and engine parameters from the bytes left on each device after the weights, never
    more than the model's context (as its engine derives it) for every sequence planned; and the
    lines that say how the size was chosen."""
    engine, goal = spec.engine, spec.plan
    fit_tokens, room = _fit_tokens(memory, after_weights)
    rate = max(m.kv_rate for m in memory.devices)
    configured = getattr(engine, engine.kv_param)
    batch = getattr(engine, engine.batch_param)
    granule = engine.kv_granule(batch or goal.max_batch_size)
    limit = _context(spec)
    per_sequence = limit[0].tokens if limit else None
    hard, basis = (limit[1], limit[0].basis) if limit else (False, "")  # hard: the engine refuses more
    warnings, sizing = [], [_shape_line(spec)]
    # An engine that sizes its cache per sequence holds kv_param x batch tokens (vLLM, torch); the
    # others share one pool of kv_param tokens among every sequence (SGLang, llama.cpp, ktransformers).
    sequences = (batch or goal.max_batch_size) if engine.kv_per_sequence else 1
    if configured is not None:
        configured, rounded = engine.rounded_kv(configured, batch or goal.max_batch_size)
        warnings += [rounded] if rounded else []
        tokens = configured * sequences
        by = "configured"
    else:
        by = "max_kv" if goal.max_kv_tokens is not None and goal.max_kv_tokens < fit_tokens else "fit"
        tokens = fit_tokens if goal.max_kv_tokens is None else min(fit_tokens, goal.max_kv_tokens)
        tokens -= tokens % granule
    if batch is None:
        batch = goal.max_batch_size
        if goal.goal == "concurrency" and goal.context_tokens:
            batch = max(1, min(256, tokens // goal.context_tokens))
    cap = per_sequence * batch if per_sequence else None
    reasons, hint = [], None
    fitting = fit_tokens // sequences // granule * granule  # the most kv_param that fits now
    if cap is not None and per_sequence is not None and hard:  # never offer a value the engine refuses
        fitting = min(fitting, per_sequence if engine.kv_per_sequence else cap // granule * granule)
    of = f" ({engine.kv_param} {configured} x {engine.batch_param} {sequences})" if sequences > 1 else ""
    if configured is None and cap is not None and tokens > cap:
        tokens, by = max(granule, cap // granule * granule), "context"
    sizing.append(_kv_line(spec, tokens, by, limit, batch))
    above = _above_limit(engine, configured, sequences, batch, limit)
    if tokens > fit_tokens:
        said = f"KV cache of {tokens} tokens{of} needs {_need_and_left(int(tokens * rate), room)}"
        fewer = f" or lower {engine.batch_param}" if sequences > 1 else ""
        hint = KvHint(0, fitting, lambda v: f"{said}; lower {engine.kv_param} to {v} or free memory" if v else
                      f"{said}; no {engine.kv_param} fits: free memory{fewer}")
    elif tokens < goal.min_kv_tokens and configured is not None:
        said = f"{engine.kv_param} gives {tokens} KV tokens{of}, below plan.min_kv_tokens {goal.min_kv_tokens}"
        more = format_bytes(int(max(goal.min_kv_tokens - fitting * sequences, granule) * rate))
        hint = KvHint(0, fitting, lambda v: f"{said}; raise it to {v} (the most that fits now) or lower "
                      f"plan.min_kv_tokens" if v else f"{said}; no {engine.kv_param} that fits now reaches it: "
                      f"free {more} more or lower plan.min_kv_tokens")
    elif tokens < goal.min_kv_tokens and cap is not None and cap < goal.min_kv_tokens:
        reasons.append(f"plan.min_kv_tokens {goal.min_kv_tokens} is more than the model can use: its context "
                       f"{per_sequence} x {batch} sequences = {cap} tokens ({basis}); lower "
                       f"plan.min_kv_tokens or raise {engine.batch_param}")
    elif tokens < goal.min_kv_tokens:
        short = int((goal.min_kv_tokens - tokens) * rate)
        reasons.append(f"only {tokens} KV tokens fit after the weights and workspace ({_precise(max(room, 0))} left), "
                       f"below plan.min_kv_tokens {goal.min_kv_tokens}; free {_precise(short)} more or lower "
                       "plan.min_kv_tokens")
        # What the load needs at least: the policy is asked to make room for this, not for the
        # sliver that fits now (evicting for a sliver would end in a KV cache too small to load).
        tokens = -(-goal.min_kv_tokens // granule) * granule
    if hint is not None:  # said as the arithmetic has it; plan() confirms the value by planning with it
        reasons.append(hint.say(hint.value))
    if above:  # after the KV reason, which the hint's index names
        (reasons if hard else warnings).append(above)
    worst = max(memory.devices, key=lambda m: m.weights + m.workspace + kv_bytes(m, tokens))
    cache = max(_tokens_bytes(tokens, m.cache_rate) for m in memory.devices)
    workspace = worst.workspace + kv_bytes(worst, tokens) - int(tokens * worst.cache_rate)
    flags = engine.planned_flags(Sizing(tokens, batch, cache, len(memory.devices), workspace,
                                        worst.weights + worst.workspace + kv_bytes(worst, tokens), total_bytes,
                                        per_sequence))
    return (tokens, flags.params, reasons + flags.broken, [*warnings, *flags.warnings, *engine.env_warnings()], hint,
            sizing)

def _shape_line(spec: ModelSpec) -> str:
    a = spec.architecture
    if a is None:
        return "model shape: none given (memory.* as configured)"
    return f"model shape: {a.model_type or 'a model'} read from {a.source}" if a.source else \
        f"model shape: {a.model_type or 'a model'} from the config's architecture fields"

def _kv_line(spec: ModelSpec, tokens: int, by: str, limit, batch: int) -> str:
    """Which limit sized the KV cache: the configured value, the model's context for the planned
    batch, the plan's maximum, or the memory that fits."""
    if limit is None:
        bound = ("; no context limit known (no max_position_embeddings in the architecture): give it, or "
                 "plan.max_kv_tokens, to leave the rest of the card to other models")
    else:
        bound = (f"the model's context {limit[0].tokens} x {batch} sequences = {limit[0].tokens * batch} tokens "
                 f"({limit[0].basis})")
        bound = f"; at most {bound}" if by != "context" else f"{bound}; the rest of the card is left to other models"
    what = {"configured": f"engine.{spec.engine.kv_param} as configured", "context": "capped at ",
            "max_kv": f"capped by plan.max_kv_tokens {spec.plan.max_kv_tokens}",
            "fit": "what fits after the weights and workspace"}[by]
    return f"KV cache: {tokens} tokens, {what}{bound}"

def _above_limit(engine, configured: int | None, sequences: int, batch: int, limit) -> str | None:
    """A configured KV size (or SGLang's context_length) above the model's context: refused where
    the engine refuses it, a warning where it would only hold what no sequence can use."""
    if limit is None:
        return None
    context, hard = limit
    given_context = getattr(engine, "context_length", None)
    if given_context and given_context > context.tokens:
        return (f"engine.context_length {given_context} is above the {context.tokens} tokens {engine.title} accepts "
                f"for this model ({context.basis}); lower it to {context.tokens} or leave it unset")
    if configured is None:
        return None
    if engine.kv_per_sequence and configured > context.tokens:
        then = "it would refuse to start" if hard else "positions past it are untrained"
        return (f"engine.{engine.kv_param} {configured} is above the model's context {context.tokens} ({context.basis}): "
                f"{then}; lower it to {context.tokens} or leave it unset")
    if not engine.kv_per_sequence and configured > context.tokens * batch:
        return (f"engine.{engine.kv_param} {configured} is more than {batch} sequences can use: the model's context "
                f"{context.tokens} x {engine.batch_param} {batch} = {context.tokens * batch} tokens ({context.basis}); "
                f"the rest of the cache would sit unused")
    return None

def _precise(n: int) -> str:
    """Bytes with enough digits to compare: MiB below 10 GiB (to 0.1), GiB to 0.01 above."""
    return f"{n / MiB:.1f} MiB" if abs(n) < 10 * GiB else f"{n / GiB:.2f} GiB"

def _need_and_left(need: int, left: int) -> str:
    """What a KV cache needs against what is left, with digits enough to see the gap."""
    return (f"{_precise(need)} per device, {_precise(max(left, 0))} is left after the weights and workspace: "
            f"{_precise(need - max(left, 0))} short")
