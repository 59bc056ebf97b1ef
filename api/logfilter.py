"""What the admin API's HTTP server logs about its clients' mistakes. The composition root
installs it with `install_client_mistakes()` once logging is configured."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("lessor.api")


class ClientMistakes(logging.Filter):
    """aiohttp logs a malformed request (a client's mistake, already answered 400) as an ERROR with
    a traceback: anyone who can connect could flood the log. One INFO line says it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.info("admin API: malformed request answered %s: %s", exc.code, str(exc.message).splitlines()[0][:200])
            return False
        return True


def install_client_mistakes(logger: str = "aiohttp.server") -> ClientMistakes:
    """Add the filter to aiohttp's server logger (once: a second call finds it there)."""
    target = logging.getLogger(logger)
    found = next((f for f in target.filters if isinstance(f, ClientMistakes)), None)
    if found is None:
        found = ClientMistakes()
        target.addFilter(found)
    return found
