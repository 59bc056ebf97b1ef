"""lessord: the composition root. Builds probe, ledger, supervisor and controller from the config,
serves the admin API, and shuts down cleanly on SIGTERM/SIGINT (engines stopped, leases released,
ledger closed)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Callable

from ..engines import adapters
from ..engines.base import EngineAdapter
from ..policies import POLICIES
from .config import LessorConfig, load_config, parse_listen
from .controller import Controller
from .devices import make_probe
from .errors import ConfigError, LessorError
from .events import ConfigReloaded, EventBus
from .ledger import Ledger
from .mqtt import MqttPublisher
from .notify import Notifier, watchdog, watchdog_interval_s
from .routing import Router
from .reconciler import Reconciler, reconcile_at_start
from .supervisor import Supervisor, Timeouts

log = logging.getLogger("lessor.service")



@asynccontextmanager
async def runtime(config: LessorConfig, force_sim: bool = False,
                  engines: dict[str, EngineAdapter] | None = None,
                  reconcile: bool = True) -> AsyncIterator[Controller]:
    """Everything but the HTTP servers; the CLI's local `plan` uses this same path with
    `reconcile=False` (read-only: it must not adopt or release a running daemon's engines)."""
    bus = EventBus()
    probe = make_probe(config.devices, force_sim)
    try:
        ledger = await Ledger.open(config.ledger_url(), probe, config.devices, publish=bus.publish)
        try:
            timeouts = Timeouts(config.timeouts.weights, config.timeouts.ready, config.timeouts.stop_grace)
            supervisor = Supervisor(config, ledger, POLICIES[config.policy.name],
                                    adapters() if engines is None else engines, bus.publish, probe=probe,
                                    timeouts=timeouts)
            reconciler = Reconciler(config.reconciler, ledger, supervisor, bus.publish)
            if reconcile:
                report = reconciler.at_start = await reconcile_at_start(
                    ledger, supervisor, Path(config.state_dir).absolute(), bus.publish)
                if report.adopted or report.stopped or report.released or report.strays:
                    log.warning("after restart: adopted %s, stopped %s, released %d lease(s), stopped %d stray(s)",
                                report.adopted, report.stopped, report.released, len(report.strays))
            controller = Controller(config, probe, ledger, supervisor, bus)
            controller.reconciler = reconciler
            publisher = MqttPublisher(config.mqtt, bus, lambda: (controller.devices(), controller.models())) \
                if config.mqtt else None
            controller.mqtt = publisher
            publishing = asyncio.ensure_future(publisher.run()) if publisher else None
            pruning = asyncio.ensure_future(ledger.run_pruning(config.ledger.history)) if reconcile else None
            try:
                yield controller
            finally:
                if pruning:
                    pruning.cancel()
                    await asyncio.gather(pruning, return_exceptions=True)
                await supervisor.close()
                for record in supervisor.records():
                    if record.state.value in ("ready", "failed"):
                        await supervisor.unload(record.spec.name, reason="lessord stopping")
                if publisher and publishing:
                    await publisher.flush(timeout_s=5)
                    publishing.cancel()
                    await asyncio.gather(publishing, return_exceptions=True)
                    await publisher.announce_offline()
        finally:
            await ledger.close()
    finally:
        probe.close()


async def serve(config: LessorConfig, force_sim: bool, reload_config: Callable[[], LessorConfig] | None = None,
                notifier: Notifier | None = None) -> None:
    from aiohttp import web

    from ..api.admin import make_admin_app
    from ..api.auth import resolve_token

    notifier = notifier or Notifier()
    token = resolve_token(config.token_path(), create=True)
    assert token is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        controller = await stack.enter_async_context(runtime(config, force_sim))
        ready = asyncio.Event()
        runner = web.AppRunner(make_admin_app(controller, token, ready), access_log=None, shutdown_timeout=10)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await _listen(runner, config)
        router = Router(controller.supervisor, config.router, controller.bus.listen)
        controller.router = router
        await _serve_router(stack, router, controller, config)
        for spec in config.models:
            if spec.pinned:
                try:
                    await controller.load(spec.name)
                except LessorError as exc:  # keep serving the others; the model shows as failed
                    log.error("pinned model %s did not load: %s", spec.name, exc)
                    print(f"lessord: pinned model {spec.name} did not load: {exc}", file=sys.stderr, flush=True)
        ready.set()
        stack.callback(asyncio.ensure_future(router.run_keep_alive()).cancel)
        stack.callback(asyncio.ensure_future(controller.reconciler.run()).cancel)
        interval = watchdog_interval_s()
        if interval:
            stack.callback(asyncio.ensure_future(watchdog(notifier, interval)).cancel)
        if reload_config is not None:
            reloads: set[asyncio.Task] = set()
            loop.add_signal_handler(signal.SIGHUP, lambda: _spawn(reloads, reload(controller, reload_config, notifier)))
        notifier.ready(f"{len(config.models)} model(s), probe {controller.probe.name}")
        host, port = parse_listen(config.admin.listen)
        router_host, router_port = parse_listen(config.router.listen)
        print(f"lessord: OpenAI router on http://{router_host}:{router_port}/v1, admin API on http://{host}:{port} "
              f"(probe: {controller.probe.name}); token in "
              f"{'$LESSOR_ADMIN_TOKEN' if os.environ.get('LESSOR_ADMIN_TOKEN') else config.token_path()}", flush=True)
        await stop.wait()
        notifier.stopping()
        log.info("lessord stopping: draining, stopping engines, closing the ledger")


async def _serve_router(stack: AsyncExitStack, router: Router, controller: Controller, config: LessorConfig) -> None:
    from ..api.router import start_router

    host, port = parse_listen(config.router.listen)
    server = await start_router(router, controller.supervisor, config.router, host, port)
    stack.push_async_callback(server.close)


def _spawn(tasks: set[asyncio.Task], coro) -> None:
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _listen(runner, config: LessorConfig) -> None:
    from aiohttp import web

    host, port = parse_listen(config.admin.listen)
    await web.TCPSite(runner, host, port).start()
    if config.admin.unix_socket:
        previous = os.umask(0o117)  # born 0660: never a moment when others could connect
        try:
            await web.UnixSite(runner, config.admin.unix_socket).start()
        finally:
            os.umask(previous)
        os.chmod(config.admin.unix_socket, 0o660)


async def reload(controller: Controller, reload_config: Callable[[], LessorConfig], notifier: Notifier) -> bool:
    """SIGHUP: read the config again and apply it; a bad one is refused whole and the old one kept."""
    notifier.reloading()
    try:
        change = await controller.reload(reload_config())
    except LessorError as exc:
        log.error("reload refused, running config kept: %s", exc)
        controller.bus.publish(ConfigReloaded(False, str(exc)))
        notifier.ready("reload refused: running config kept")
        return False
    log.warning("config reloaded: added %s, removed %s, changed %s", change.added, change.removed, change.changed)
    controller.bus.publish(ConfigReloaded(True, "", change.added, change.removed, change.changed))
    notifier.ready("config reloaded")
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lessord", description="lessor daemon: VRAM leases for LLMs sharing GPUs")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--sim", action="store_true", help="use the simulated devices of the config even if NVML works")
    parser.add_argument("--admin-listen", metavar="HOST:PORT", help="override admin.listen")
    parser.add_argument("--router-listen", metavar="HOST:PORT", help="override router.listen")
    parser.add_argument("--log-level", default=os.environ.get("LESSOR_LOG_LEVEL", "WARNING"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default WARNING (quiet)")
    return parser.parse_args(argv)


def configure(args: argparse.Namespace) -> LessorConfig:
    config = load_config(args.config)
    overrides = {}
    if args.admin_listen:
        overrides["admin"] = {**config.admin.model_dump(), "listen": args.admin_listen}
    if args.router_listen:
        overrides["router"] = {**config.router.model_dump(), "listen": args.router_listen}
    if overrides:
        from .config import parse_config
        config = parse_config({**config.model_dump(), **overrides}, source="command line")
    return config


class ClientMistakes(logging.Filter):
    """aiohttp logs a malformed request (a client's mistake, already answered 400) as an ERROR with
    a traceback: anyone who can connect could flood the log. One INFO line says it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.info("admin API: malformed request answered %s: %s", exc.code, str(exc.message).splitlines()[0][:200])
            return False
        return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("aiohttp.server").addFilter(ClientMistakes())
    try:
        config = configure(args)
    except ConfigError as exc:
        print(f"lessord: invalid config {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(config, args.sim, lambda: configure(args)))
    except ConfigError as exc:  # found only when used: a key file or variable that is missing
        print(f"lessord: invalid config {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lessord: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
