"""lessord: the daemon's parts as daemon/runtime.py (the composition root) builds them, with the
HTTP servers around them: the admin API and the router; it runs their loops, publishes to MQTT,
and shuts down cleanly on SIGTERM/SIGINT (engines stopped, leases released, ledger closed).
SIGHUP reloads the config."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from ..daemon import state_files
from ..daemon.config.fields import parse_listen
from ..daemon.config.schema import LessorConfig, load_config, parse_config
from ..daemon.controller import Controller, config_source
from ..daemon.errors import ConfigError, LessorError
from ..daemon.ledger.database import SchemaTooNew
from ..daemon.ledger.ledger_errors import LedgerDamaged, LedgerUnavailable
from ..daemon.ledger.recovery import FRESH, RECOVER, recover
from ..daemon.notify import Notifier, watchdog, watchdog_interval_s
from ..daemon.runtime import publishing, runtime
from ..daemon.traffic.control import TrafficControl
from .admin import make_admin_app
from .admin_http import AdminSite, request_deadline
from .auth import resolve_token
from .logfilter import LOG_FORMATS, configure_logging
from .router import start_router

log = logging.getLogger("lessor.service")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


async def serve(config: LessorConfig, force_sim: bool, reload_config: Callable[[], LessorConfig] | None = None,
                notifier: Notifier | None = None, source: str | None = None) -> None:
    notifier = notifier or Notifier()
    token = resolve_token(config.token_path(), create=True)
    assert token is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(runtime(
            config, force_sim, settle_in_background=True, subreaper=True,
            config_source=config_source(source) if source else None, config_loader=reload_config))
        await stack.enter_async_context(publishing(controller))
        stack.push_async_callback(controller.supervisor.close)  # engines stop before MQTT says offline
        stack.push_async_callback(_cancel, [controller.reconciler.settling])  # adoptions end before that
        ready = asyncio.Event()
        await _serve_admin(stack, controller, token, ready)
        traffic = controller.traffic
        assert traffic is not None  # the runtime builds it for every lessord that reconciles
        await _serve_router(stack, controller, traffic, config)
        # Served from here on, while the previous lessord's engines are adopted; ready once they are.
        starting = asyncio.ensure_future(_come_up(controller, config, ready, notifier))
        starting.add_done_callback(lambda task: _stop_if_failed(task, stop))
        stack.push_async_callback(_stop_all, [starting, *_background(controller, traffic, notifier)], traffic)
        if reload_config is not None:
            reloads: set[asyncio.Task] = set()
            loop.add_signal_handler(signal.SIGHUP, lambda: _spawn(reloads, reload(controller, notifier)))
        await stop.wait()
        # From here a database that fails is not waited on again for each engine's stop: lessord
        # exits within stop_grace per engine plus 3 x the ledger's deadline, whatever it does.
        controller.ledger.closing()
        failed = starting.exception() if starting.done() and not starting.cancelled() else None
        if failed is not None:
            raise failed  # the start's settling failed: lessord stops, as if it had not started
        notifier.stopping()
        log.info("lessord stopping: draining, stopping engines, closing the ledger")


async def _serve_admin(stack: AsyncExitStack, controller: Controller, token: str, ready: asyncio.Event) -> None:
    app = make_admin_app(controller, token, ready)
    app.middlewares.append(request_deadline)  # inside error_middleware: a refusal is rendered like any error
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await _listen(runner, controller.config)


async def _serve_router(stack: AsyncExitStack, controller: Controller, traffic: TrafficControl,
                        config: LessorConfig) -> None:
    """The OpenAI door around the runtime's traffic control."""
    host, port = parse_listen(config.router.listen)
    with _binding("router.listen", config.router.listen):
        server = await start_router(traffic, controller.supervisor, config.router, host, port)
    stack.push_async_callback(server.close)


async def _come_up(controller: Controller, config: LessorConfig, ready: asyncio.Event, notifier: Notifier) -> None:
    """After the start's settling (every engine of the previous lessord adopted or stopped), pinned
    models load (one whose engine was stopped loads again); then /readyz and systemd say ready."""
    await controller.reconciler.settled()
    await _load_pinned(controller, config)
    ready.set()
    notifier.ready(f"{len(config.models)} model(s), probe {controller.probe.name}")
    _say_where(controller, config)


async def _load_pinned(controller: Controller, config: LessorConfig) -> None:
    for spec in config.models:
        if spec.pinned:
            try:
                await controller.load(spec.name)
            except LessorError as exc:  # keep serving the others; /readyz says not ready, naming it
                controller.pin_failed(spec.name, str(exc))
                # The supervisor's line said why; this one says what it means for the pin.
                logs = (f"; `lessor logs {spec.name}` has the engine's log"
                        if controller.supervisor.log_path(spec.name).exists() else "")
                log.error("%s: pinned, but did not load: %s; lessord serves the others, /readyz says not ready%s",
                          spec.name, exc, logs)


def _stop_if_failed(task: asyncio.Future, stop: asyncio.Event) -> None:
    if not task.cancelled() and task.exception() is not None:
        stop.set()


def _background(controller: Controller, traffic: TrafficControl, notifier: Notifier) -> list[asyncio.Future]:
    """The loops lessord runs while it serves: keep_alive, the reconciler, systemd's watchdog."""
    tasks: list[asyncio.Future] = [asyncio.ensure_future(traffic.run_keep_alive()),
                                   asyncio.ensure_future(controller.reconciler.run())]
    interval = watchdog_interval_s()
    if interval:
        tasks.append(asyncio.ensure_future(watchdog(notifier, interval)))
    return tasks


async def _stop_all(tasks: Sequence[asyncio.Future], traffic: TrafficControl) -> None:
    """Background loops and on-demand loads end (awaited, not only cancelled: one may be midway
    through an unload) before the supervisor stops the engines that are left."""
    await _cancel(tasks)
    await traffic.close()


async def _cancel(tasks: Sequence[asyncio.Future | None]) -> None:
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


def _say_where(controller: Controller, config: LessorConfig) -> None:
    host, port = parse_listen(config.admin.listen)
    router_host, router_port = parse_listen(config.router.listen)
    print(f"lessord: OpenAI router on http://{router_host}:{router_port}/v1, admin API on http://{host}:{port} "
          f"(probe: {controller.probe.name}); token in "
          f"{'$LESSOR_ADMIN_TOKEN' if os.environ.get('LESSOR_ADMIN_TOKEN') else config.token_path()}", flush=True)
    log.info("serving: router on %s:%d, admin API on %s:%d, %d model(s), probe %s", router_host, router_port,
             host, port, len(config.models), controller.probe.name)


def _spawn(tasks: set[asyncio.Task], coro) -> None:
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


class ListenFailed(OSError):
    """A listener could not bind: named by its config field, with what to change."""

    def __str__(self) -> str:
        return self.strerror or ""


@contextmanager
def _binding(field: str, address: str):
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise ListenFailed(exc.errno, f"cannot listen on {address} ({field}): {exc.strerror}") from None
        # After `lessord ... &` this is easy to miss: say who may hold it and how to move.
        flag = f"--{field.split('.')[0]}-listen"
        raise ListenFailed(exc.errno, f"cannot listen on {address} ({field}): the address is in use, most likely by "
                           f"another lessord (`lessor status --admin http://{address}` says which config it runs); "
                           f"stop it, or set {field} in the config or {flag} HOST:PORT") from None


async def _listen(runner, config: LessorConfig) -> None:
    host, port = parse_listen(config.admin.listen)
    with _binding("admin.listen", config.admin.listen):
        await AdminSite(runner, config.admin, host, port).start()
    if config.admin.unix_socket:
        previous = os.umask(0o117)  # born 0660: never a moment when others could connect
        try:
            await AdminSite(runner, config.admin, path=config.admin.unix_socket).start()
        finally:
            os.umask(previous)
        os.chmod(config.admin.unix_socket, 0o660)


async def reload(controller: Controller, notifier: Notifier) -> bool:
    """SIGHUP: read the config again and apply it (Controller.reload_file, as POST /admin/v1/reload);
    a bad one is refused whole and the old one kept; one that must wait for a load is pending (the
    controller logged what for) and applies when it ends."""
    notifier.reloading()
    try:
        done = await controller.reload_file()
    except LessorError:  # the controller logged why
        notifier.ready("reload refused: running config kept")
        return False
    notifier.ready("config reloaded" if done["reloaded"] else f"reload pending: {done['pending']['reason']}")
    return True


def check_at_start(config: LessorConfig, force_sim: bool, source: str) -> bool:
    """check-config's checks, with its severities: errors stop the start, warnings are logged."""
    from ..daemon.config.checks import check

    report = check(config, force_sim)
    for finding in report.findings:
        (print(f"lessord: {source}: {finding}", file=sys.stderr) if finding.error
         else log.warning("%s: %s", source, finding))
    if report.errors:
        print(f"lessord: not started: {report.errors} error(s) in {source}, as `lessor check-config"
              f"{' --sim' if force_sim else ''} {source}` lists them", file=sys.stderr)
    return not report.errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lessord", description="lessor daemon: VRAM leases for LLMs sharing GPUs")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--sim", action="store_true", help="use the simulated devices of the config even if NVML works")
    parser.add_argument("--admin-listen", metavar="HOST:PORT", help="override admin.listen")
    parser.add_argument("--router-listen", metavar="HOST:PORT", help="override router.listen")
    parser.add_argument("--log-level", default=os.environ.get("LESSOR_LOG_LEVEL", "WARNING"),
                        choices=LOG_LEVELS,
                        help="default WARNING (quiet); INFO adds one line per step of each model's lifecycle")
    parser.add_argument("--log-format", default=os.environ.get("LESSOR_LOG_FORMAT", "plain"), choices=LOG_FORMATS,
                        help="plain (the default; without timestamps under journald) or json: one object per line "
                             "for log shippers ($LESSOR_LOG_FORMAT)")
    damaged = parser.add_mutually_exclusive_group()
    damaged.add_argument("--recover-from-engines", dest="recovery", action="store_const", const=RECOVER,
                         help="only if the ledger is damaged: set its files aside, rebuild the leases of the "
                              "engines that still run from the ledger's record, say what it could not, and exit; "
                              "the next start adopts them")
    damaged.add_argument("--start-fresh", dest="recovery", action="store_const", const=FRESH,
                         help="only if the ledger is damaged: set its files aside and exit; the next start begins "
                              "with an empty ledger (and stops the engines that still run as strays)")
    args = parser.parse_args(argv)
    # A default from the environment skips `choices`: checked here, naming the variable.
    for value, variable, allowed in ((args.log_level, "LESSOR_LOG_LEVEL", LOG_LEVELS),
                                     (args.log_format, "LESSOR_LOG_FORMAT", LOG_FORMATS)):
        if value not in allowed:
            parser.error(f"${variable} is '{value}': use one of {', '.join(allowed)}")
    return args


def configure(args: argparse.Namespace) -> LessorConfig:
    config = load_config(args.config)
    overrides = {}
    if args.admin_listen:
        overrides["admin"] = {**config.admin.model_dump(), "listen": args.admin_listen}
    if args.router_listen:
        overrides["router"] = {**config.router.model_dump(), "listen": args.router_listen}
    if overrides:
        config = parse_config({**config.model_dump(), **overrides}, source="command line")
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        config = configure(args)
    except ConfigError as exc:
        print(f"lessord: invalid config {exc}", file=sys.stderr)
        return 2
    if not args.recovery and not check_at_start(config, args.sim, args.config):
        return 2
    run: Callable[..., Any]
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        os.umask(state_files.UMASK)  # before any file is made: the ledger and engines' logs are not for others
        state_files.secure(Path(config.state_dir))
        if args.recovery:  # then exit: under systemd, stopping a foreground lessord would stop the engines
            for line in asyncio.run(recover(config, args.recovery)).lines():
                print(f"lessord: {line}", flush=True)
            return 0
        run(serve(config, args.sim, lambda: configure(args), source=args.config))
    except (LedgerDamaged, SchemaTooNew) as exc:  # at start: nothing was changed
        print(f"lessord: {exc}", file=sys.stderr)
        return 3
    except LedgerUnavailable as exc:  # at start, a database down or hung: systemd tries again (3 stops it)
        print(f"lessord: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found only when used: a key file or variable that is missing
        print(f"lessord: invalid config {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lessord: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
