"""lessor: the command-line client: the parser and its commands. It talks to the admin API
(api/cli_client.py); `plan --config` and `check-config` run the daemon's own code locally (same
controller path), so they work without a daemon. What it prints is api/cli_render.py; the
commands that keep running (events, top, logs -f) are api/cli_live.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..daemon.config.schema import LessorConfig, load_config
from ..daemon.errors import ConfigError, LessorError
from ..daemon.units import parse_size
from . import cli_live
from .auth import ENV_TOKEN
from .cli_client import DEFAULT_ADMIN, DEFAULT_CONFIG, ENV_CONFIG, ApiError, config_path, make_client
from .cli_completion import completion_script
from .cli_render import (
    reload_text,
    render_budget,
    render_fingerprints,
    render_leases,
    render_models,
    render_names,
    render_plan,
    render_status,
)


def _colour() -> bool:
    """ANSI colours only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _width() -> int:
    """The terminal's columns; 0 (no limit) when stdout is a pipe or a file, which get every word."""
    return shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("lessor")
    except PackageNotFoundError:  # run from a source tree: the version lessord's status reports
        from .. import __version__
        return __version__


# -- commands --------------------------------------------------------------------------------

def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"lessor: --set takes KEY=VALUE (got '{pair}')")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    overrides = _parse_overrides(args.set)
    named = config_path(args)  # --config or $LESSOR_CONFIG; /etc's default only finds the daemon
    if named and not args.admin:
        plan = asyncio.run(_local_plan(load_config(named), args.model, overrides, args.sim))
    else:
        plan = make_client(args).call("POST", "/admin/v1/plan", {"model": args.model, "overrides": overrides})
    print(json.dumps(plan, indent=2) if args.json else render_plan(plan))
    return 0 if plan["fits"] else 1


async def _local_plan(config: LessorConfig, model: str, overrides: dict[str, Any], sim: bool) -> dict[str, Any]:
    from ..daemon.runtime import runtime

    async with runtime(config, force_sim=sim, engines={}, reconcile=False) as controller:
        return controller.plan(model, overrides)


def cmd_status(args: argparse.Namespace) -> int:
    status = make_client(args).call("GET", "/admin/v1/status")
    print(json.dumps(status, indent=2) if args.json else render_status(status, _colour(), _width()))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    models = make_client(args).call("GET", "/admin/v1/models")
    print(json.dumps(models, indent=2) if args.json else render_names(models) if args.names else render_models(models, _width()))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    return cli_live.cmd_events(args, make_client(args))


def cmd_top(args: argparse.Namespace) -> int:
    return cli_live.cmd_top(args, make_client(args), _colour(), _width())


def cmd_logs(args: argparse.Namespace) -> int:
    return cli_live.cmd_logs(args, make_client(args))


def cmd_completion(args: argparse.Namespace) -> int:
    print(completion_script(parser(), args.shell))
    return 0


def cmd_fingerprints(args: argparse.Namespace) -> int:
    client = make_client(args)
    if args.delete:
        gone = client.call("DELETE", f"/admin/v1/fingerprints/{args.delete}")
        print(json.dumps(gone, indent=2) if args.json else f"forgot fingerprint {gone['key']} of {gone['model']}")
        return 0
    query = f"?model={urllib.parse.quote(args.model)}" if args.model else ""
    rows = client.call("GET", f"/admin/v1/fingerprints{query}")
    print(json.dumps(rows, indent=2) if args.json else render_fingerprints(rows))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Exit 0: no errors (warnings are printed); 1: the config has problems (not YAML, the schema's,
    or an error of the checks), each listed; 2: a usage error, or the file cannot be read."""
    from ..daemon.config.checks import check

    try:
        with open(args.file, "rb"):
            pass
    except OSError as exc:
        print(f"lessor: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.file)
    except ConfigError as exc:  # the file says something wrong: every problem, as the checks' errors are
        print(f"lessor: invalid config {exc}", file=sys.stderr)
        return 1
    report = check(config, args.sim)
    for finding in report.findings:
        print(f"{args.file}: {finding}", file=sys.stderr if finding.error else sys.stdout)
    verdict = f"{report.errors} error(s)" if report.errors else "OK"
    print(f"{args.file}: {verdict} ({len(config.models)} model(s), policy {config.policy.name}; checked against "
          f"{report.devices})")
    return 1 if report.errors else 0


def cmd_reload(args: argparse.Namespace) -> int:
    """A refused reload is an API error (main() prints why, exit 1); the running config is kept. A pending
    one is not an error: it applies when the loads it waits for end."""
    try:
        done = make_client(args).call("POST", "/admin/v1/reload")
    except ApiError as exc:
        exc.hint = exc.hint or "reload refused: lessord runs the config it had"
        raise
    if args.json:
        print(json.dumps(done, indent=2))
        return 0
    print(reload_text(done))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    client = make_client(args)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["model"] = client.call("POST", f"/admin/v1/models/{args.model}",
                                          {"action": "load", "overrides": _parse_overrides(args.set)})
        except ApiError as exc:
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
        if worker.is_alive() and sys.stderr.isatty():
            print(f"\rloading {args.model} ... {time.monotonic() - started:5.1f} s", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if "error" in result:
        raise result["error"]
    model = result["model"]
    if args.json:
        print(json.dumps(model, indent=2))
        return 0
    evicted = model.get("evicted")  # absent from an older daemon's answer
    print(f"{model['name']}: {model['state']} in {time.monotonic() - started:.1f} s"
          + (f"; evicted {', '.join(evicted)} to make room" if evicted else ""))
    return 0


def cmd_simple(method: str, path: str, render=None, body=None):
    def run(args: argparse.Namespace) -> int:
        data = make_client(args).call(method, path.format(**vars(args)), body(args) if body else None)
        print(json.dumps(data, indent=2) if args.json or render is None else render(data))
        return 0
    return run


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of lines, at least 1; got {text!r}")
    return int(text)


def _daemon_options(p: argparse.ArgumentParser, default: Any = None) -> None:
    """Which daemon and how to print: before the command (`lessor --config X status`) or after it.
    The command's copies default to SUPPRESS, so an option given before it is not reset to None."""
    p.add_argument("--admin", default=default, help=f"admin API URL (default: $LESSOR_ADMIN_URL, the config's "
                                                    f"admin.listen, or {DEFAULT_ADMIN} when no config is found)")
    p.add_argument("--token", default=default, help=f"admin bearer token (default ${ENV_TOKEN} or the config's token file)")
    p.add_argument("--config", default=default, help=f"the daemon's config file (default ${ENV_CONFIG}, then "
                                                     f"{DEFAULT_CONFIG}): finds the API address and the token file; "
                                                     "warns when the daemon reached runs another")
    p.add_argument("--json", action="store_true", default=False if default is None else default, help="print JSON")


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _daemon_options(common, default=argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="lessor", description="lessor CLI: devices, leases and models of a running lessord")
    p.add_argument("--version", action="version", version=f"lessor {version()}")
    _daemon_options(p)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", parents=[common], help="devices with a lease bar, and models").set_defaults(func=cmd_status)
    leases = sub.add_parser("leases", parents=[common], help="granted leases")
    leases.set_defaults(func=cmd_simple("GET", "/admin/v1/leases", render_leases))
    models = sub.add_parser("models", parents=[common], help="configured models: state, idle time, requests, pid, error")
    models.add_argument("--names", action="store_true", help="names and aliases only, one a line (shell completion)")
    models.set_defaults(func=cmd_models)
    load = sub.add_parser("load", parents=[common], help="load a model (waits, showing progress)")
    load.add_argument("model")
    load.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine argument override")
    load.set_defaults(func=cmd_load)
    unload = sub.add_parser("unload", parents=[common], help="unload a model")
    unload.add_argument("model")
    unload.set_defaults(func=cmd_simple("POST", "/admin/v1/models/{model}", lambda m: f"{m['name']}: {m['state']}",
                                        body=lambda a: {"action": "unload"}))
    plan = sub.add_parser("plan", parents=[common], help="would this model fit now? (with --config: computed locally)")
    plan.add_argument("model")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine argument to try, e.g. max_batch_size=2")
    plan.add_argument("--sim", action="store_true", help="with --config: use the simulated devices even if NVML works")
    plan.set_defaults(func=cmd_plan)
    logs = sub.add_parser("logs", parents=[common], help="the model's engine log (this run's, or the last one's)")
    logs.add_argument("model")
    logs.add_argument("-n", "--lines", type=_positive, default=50, help="how many of the last lines (default 50)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C ends)")
    logs.add_argument("--interval", type=float, default=1.0, help="with -f: seconds between reads (default 1)")
    logs.set_defaults(func=cmd_logs)
    events = sub.add_parser("events", parents=[common], help="the event stream, a line each (--json: the raw events)")
    events.set_defaults(func=cmd_events)
    top = sub.add_parser("top", parents=[common], help="the status, drawn again on each event (Ctrl-C ends)")
    top.add_argument("--once", action="store_true", help="draw it once and exit")
    top.set_defaults(func=cmd_top)
    prints = sub.add_parser("fingerprints", parents=[common], help="what lessor measured per model, engine version and devices")
    prints.add_argument("--model", default=None, help="only this model's")
    prints.add_argument("--delete", metavar="KEY", default=None, help="forget this fingerprint (its plans go back to the memory model)")
    prints.set_defaults(func=cmd_fingerprints)
    check = sub.add_parser("check-config", help="validate a config file and list every problem",
                           description="Validate a config file against this machine and list every problem. Exit "
                                       "status: 0 no errors (warnings are printed), 1 the config has problems "
                                       "(YAML, schema or checks; each listed), 2 a usage error or an unreadable file.")
    check.add_argument("file")
    check.add_argument("--sim", action="store_true", help="check against the simulated devices even if NVML works "
                                                         "(as lessord --sim runs)")
    check.set_defaults(func=cmd_check_config)
    reload = sub.add_parser("reload", parents=[common], help="make lessord read its config file again: what changed, "
                                                             "or why it was refused")
    reload.set_defaults(func=cmd_reload)
    foreign = sub.add_parser("set-foreign", parents=[common], help="simulated devices: set foreign usage")
    foreign.add_argument("device")
    foreign.add_argument("size", type=parse_size)
    foreign.set_defaults(func=cmd_simple("PUT", "/admin/v1/devices/{device}/foreign", render_budget,
                                         body=lambda a: {"foreign_bytes": a.size}))
    completion = sub.add_parser("completion", help="print a shell completion script: source <(lessor completion bash)")
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(func=cmd_completion)
    return p


def _quiet_stdout() -> None:
    """The reader left (`lessor plan --json | head -1`): what is still buffered goes to /dev/null,
    so the interpreter's last flush raises no second BrokenPipeError (as CPython's docs advise)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (a test's capture)
        pass


@contextmanager
def _ctrl_c_ends() -> Iterator[None]:
    """Ctrl-C (SIGINT) ends the command, however it was started: a shell without job control
    starts `cmd &` with SIGINT ignored and Python keeps a signal it inherits ignored, so
    `lessor logs -f` (or events, top) started that way could never be ended by it. Restored after,
    for a caller that runs main() in its own process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    try:
        with _ctrl_c_ends():
            args = parser().parse_args(argv)
            code = args.func(args)
            sys.stdout.flush()
            return code
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left
    except SystemExit:  # --help, --version, a usage error: their text flushed here, not at exit
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_stdout()
        raise
    except KeyboardInterrupt:  # Ctrl-C ends events, top and logs -f: no traceback
        return 130
    except ConfigError as exc:
        print(f"lessor: invalid config {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"lessor: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"lessor: {exc.hint}", file=sys.stderr)
        return 1
    except LessorError as exc:
        print(f"lessor: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
