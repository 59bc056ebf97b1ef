"""Clocks the test moves: time passes, and timers fire, only when the test says."""

import asyncio
import heapq


class ManualClock:
    """The supervisor's and the router's clock: time moves when the test says, and the router's
    timers fire as it passes them, in order."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list = []
        self._seq = 0

    def __call__(self) -> float:
        return self.now

    def call_at(self, when_s, callback) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when_s, self._seq, callback))

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self._timers and self._timers[0][0] <= end:
            self.step()
        self.now = end

    def step(self) -> bool:
        """Move to the next timer and run every callback due then; False when none is left."""
        if not self._timers:
            return False
        self.now = max(self.now, self._timers[0][0])
        while self._timers and self._timers[0][0] <= self.now:
            heapq.heappop(self._timers)[2]()
        return True


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SteppedSleep:
    """The pruning loop's sleep, under the test's control: each call tells the test how long the
    loop asked to sleep and returns only when the test wakes it (the test moves the clock)."""

    def __init__(self) -> None:
        self.asleep: asyncio.Queue[float] = asyncio.Queue()
        self.wake: asyncio.Queue[None] = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        await self.asleep.put(seconds)
        await self.wake.get()

    async def one_round(self) -> float:
        """Let the loop wake once, prune, and fall asleep again; how long it then sleeps."""
        self.wake.put_nowait(None)
        return await self.asleep.get()
