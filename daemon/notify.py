"""systemd's notify protocol: datagrams to $NOTIFY_SOCKET (a path, or an abstract socket '@name').

The watchdog is pinged from a task on the event loop, so a blocked loop stops the pings and
systemd restarts the daemon, which is what WatchdogSec= is for.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") if address is None else address

    def send(self, *fields: str, wait: bool = True) -> bool:
        """Send `KEY=VALUE` lines; False where no notify socket is set (not under systemd), or, with
        `wait=False`, where the receiver's queue is full (net.unix.max_dgram_qlen, 10 by default)."""
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), 0 if wait else socket.MSG_DONTWAIT, target)
            except BlockingIOError:
                return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def ping(self) -> bool:
        """WATCHDOG=1, never blocking: on a full queue a blocking send would stall the event loop
        (the admin API, the router) until the receiver reads. A dropped ping is harmless: the next
        one follows within half of WatchdogSec=."""
        return self.send("WATCHDOG=1", wait=False)


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec= when systemd asks this process for pings, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2


async def watchdog(notifier: Notifier, interval_s: float) -> None:
    while True:
        notifier.ping()
        await asyncio.sleep(interval_s)
