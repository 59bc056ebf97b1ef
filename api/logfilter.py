"""How lessord logs: the format of its lines (plain, plain under journald, JSON) and the filter of
its clients' mistakes. The composition root calls `configure_logging()` once, at start.

Plain is the default: `ts level logger message`. Under systemd (stderr is the journal's stream,
$JOURNAL_STREAM) the timestamp is left to journald and each line starts with its syslog priority
(`<4>`), so `journalctl -p warning` selects by level. `json`: one object per line for log
shippers: ts (ISO 8601, UTC), level, logger, msg, what the call passed in `extra=` (model, device,
pid, ...), and a traceback as one `exc` field."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, TextIO

from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("lessor.api")

LOG_FORMATS = ("plain", "json")
PLAIN = "%(asctime)s %(levelname)s %(name)s %(message)s"
JOURNAL = "<%(syslog_priority)d>%(levelname)s %(name)s %(message)s"
# What every LogRecord has: the rest of its attributes came from the call's `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# syslog(3) priorities by logging level, for journald's `<N>` prefix.
_SYSLOG = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """What the log call passed in `extra=`."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is a field, never more lines)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key, value in extras(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """Plain, less the timestamp journald adds, with the syslog priority journald reads."""

    def __init__(self) -> None:
        super().__init__(JOURNAL)

    def format(self, record: logging.LogRecord) -> str:
        record.syslog_priority = _SYSLOG.get(record.levelno, 6)
        return super().format(record)


def under_journald(stream: TextIO) -> bool:
    """systemd sets $JOURNAL_STREAM to the device:inode of the journal's stream; children of the
    service inherit the variable with other stderrs, so it counts only when it is this one."""
    try:
        device, inode = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def formatter_for(log_format: str, stream: TextIO) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format != "plain":
        raise ValueError(f"log format '{log_format}': use one of {', '.join(LOG_FORMATS)}")
    return JournalFormatter() if under_journald(stream) else logging.Formatter(PLAIN)


def in_words(value: Any) -> Any:
    """A collection as a reader writes it: `a, b`, `none` when empty, `k=v` for a mapping; anything
    else as it is. A log line says `adopted qwen-coder`, never `adopted ['qwen-coder']` or `added ()`."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={in_words(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return ", ".join(str(in_words(v)) for v in items) or "none"
    return value


class InWords(logging.Filter):
    """Each %s argument of a log call that is a list, tuple, set or dict, in words (in_words), for
    every logger lessord's handler writes: one place instead of a join at each call."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:  # a lone mapping is %(name)s style: left alone
            record.args = tuple(in_words(arg) for arg in record.args)
        return True


def configure_logging(level: str, log_format: str = "plain", stream: TextIO | None = None) -> logging.Handler:
    """lessord's one handler on the root logger (replacing any there), and the filters below."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for(log_format, stream))
    handler.addFilter(InWords())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    install_client_mistakes()
    return handler


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
