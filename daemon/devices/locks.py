"""One lock per device, shared by the parts that must not count on the same free memory at once:
a load holds its devices' locks from its admission to its end (two load peaks never overlap),
and a KV cache grows back only while none of its devices' locks is held (daemon/models/elastic.py).
Built by the runtime and handed to both, so neither owns the other's state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager


class DeviceLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def of(self, device: str) -> asyncio.Lock:
        return self._locks.setdefault(device, asyncio.Lock())

    def busy(self, devices: Iterable[str]) -> bool:
        """Whether a load (or a grow) holds one of them now."""
        return any(self.of(device).locked() for device in devices)

    @asynccontextmanager
    async def held(self, devices: Iterable[str]) -> AsyncIterator[None]:
        """Every one of them, taken in sorted order: two holders of overlapping sets never wait on
        each other in a cycle."""
        async with AsyncExitStack() as stack:
            for device in sorted(set(devices)):
                await stack.enter_async_context(self.of(device))
            yield
