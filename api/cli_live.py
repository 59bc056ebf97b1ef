"""The `lessor` commands that keep running: `events` (the SSE stream, a line each), `top` (the
status, drawn again on each event) and `logs -f` (an engine log, followed). Each ends on Ctrl-C
(cli.main turns that into exit 130 without a traceback) or when lessord closes the stream."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from . import cli_render
from .cli_client import ApiError, Client

FOLLOW_WINDOW_LINES = 1000  # what each poll of `logs -f` reads; more new lines than this between two polls are skipped
CLEAR = "\x1b[H\x1b[2J"


def sse(client: Client, on_connect: Callable[[], None] = lambda: None) -> Iterator[dict[str, Any]]:
    """The admin event stream's events, as dicts, until lessord closes it. `on_connect` runs once
    the daemon has subscribed this stream (its first comment line): nothing after it is missed."""
    event_data: list[str] = []
    with client.stream("/admin/v1/events") as response:
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith(":"):
                if line == ": connected":
                    on_connect()
            elif line.startswith("data:"):
                event_data.append(line[5:].lstrip())
            elif not line and event_data:
                yield json.loads("\n".join(event_data))
                event_data = []
    raise SystemExit(f"lessor: the event stream at {client.base} ended (lessord stopped?)")


def cmd_events(args: argparse.Namespace, client: Client) -> int:
    def say() -> None:  # on stderr, so `--json | jq` reads events only
        print(f"lessor: following the events of {client.base} (Ctrl-C ends)", file=sys.stderr, flush=True)

    for event in sse(client, say):
        print(json.dumps(event, separators=(",", ":")) if args.json else cli_render.render_event(event), flush=True)
    return 0


def cmd_top(args: argparse.Namespace, client: Client, colour: bool, width: int) -> int:
    """On a terminal the screen is cleared and drawn again; elsewhere each frame follows the last
    under a header line, so a pipe or a test reads every one."""
    tty = sys.stdout.isatty()

    def frame(event: dict[str, Any] | None) -> None:
        status = client.call("GET", "/admin/v1/status")
        if args.json:
            print(json.dumps(status, separators=(",", ":")), flush=True)
            return
        cause = cli_render.render_event(event) if event else "connected"
        header = f"lessor top  {time.strftime('%H:%M:%S')}  ({cause})"
        text = cli_render.render_status(status, colour, width)
        print((CLEAR if tty else "") + header + "\n" + text + ("" if tty else "\n"), flush=True)

    if args.once:
        frame(None)
        return 0
    for event in sse(client, lambda: frame(None)):  # the first frame once subscribed: no change falls between
        frame(event)
    return 0


def _new_lines(previous: list[str], window: list[str]) -> tuple[list[str], bool]:
    """The lines of `window` (the log's last lines now) after those already shown (`previous`, its
    last lines then); True when they do not follow on (a new log: the engine started again)."""
    for overlap in range(min(len(previous), len(window)), 0, -1):
        if window[:overlap] == previous[-overlap:]:
            return window[overlap:], False
    return window, bool(previous)


def cmd_logs(args: argparse.Namespace, client: Client) -> int:
    path = f"/admin/v1/models/{urllib.parse.quote(args.model, safe='')}/log?lines="
    if not args.follow:
        sys.stdout.write(client.text(path + str(args.lines)))
        return 0
    shown: list[str] | None = None
    waiting_said = False
    while True:
        try:
            window = client.text(path + str(max(args.lines, FOLLOW_WINDOW_LINES))).splitlines()
        except ApiError as exc:
            if exc.type != "log_not_found":
                raise
            if not waiting_said:  # never started yet: -f waits for its first start
                print(f"lessor: {exc.message}; waiting for it to start (Ctrl-C ends)", file=sys.stderr, flush=True)
                waiting_said = True
            window = []
        if shown is None:
            fresh, restarted = window[-args.lines:], False
        else:
            fresh, restarted = _new_lines(shown, window)
        if restarted:
            print(f"--- {args.model}: a new engine log (the engine started again) ---")
        if fresh:
            print("\n".join(fresh))
        sys.stdout.flush()
        shown = window
        time.sleep(args.interval)
