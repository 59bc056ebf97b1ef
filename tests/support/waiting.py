"""Waiting on a state, never on the clock: each wait polls a condition or reads events, and its
limit (HANG_S) only turns a hang into a failure."""

import asyncio
import time

from lessor.engines.process import Backoff

# How long a test waits for what should happen before calling it a hang. Only a guard: nothing in
# a normal run, on however busy a machine, comes near it (tests wait on the event, not a window).
HANG_S = 600.0

NEVER = Backoff(first_s=3600, cap_s=3600)  # a readiness backoff: no timed probe within any test's life


async def until(condition, what: str = "the condition", hang_s: float = HANG_S) -> None:
    """Wait until `condition()` holds, looking again each time the loop has run others' work.
    `hang_s` only turns a hang into a failure: a slow machine never reaches it in normal runs."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + hang_s
    while not condition():
        if loop.time() > give_up:
            raise AssertionError(f"{what} never held ({hang_s:g} s)")
        await asyncio.sleep(0.005)


def until_sync(check, what: str) -> None:
    """`until` for a test without an event loop: poll `check` until it holds; the deadline only
    turns a hang into a failure."""
    deadline = time.monotonic() + HANG_S
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.02)


def drain_events(queue, kind="model_state"):
    """The events of one type (None: all) waiting in a bus subscription, in order; the others are dropped."""
    out = []
    while not queue.empty():
        event = queue.get_nowait()
        if kind is None or event.type == kind:
            out.append(event)
    return out
