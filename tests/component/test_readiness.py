"""Readiness is noticed when the engine logs it, not at the next poll: the probe's wake-ups are
counted, never timed (a backoff of an hour shows the log line alone woke it)."""

import asyncio
import itertools
import os
import sys

from lessor.engines.logwatch import LogWatch
from lessor.engines.process import Backoff, EngineProcess

from ..support.waiting import HANG_S, NEVER


async def sleeper(tmp_path) -> EngineProcess:
    return await EngineProcess.spawn([sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ),
                                     tmp_path / "engine.log")


def append(path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


async def test_the_ready_line_wakes_the_probe(tmp_path):
    proc = await sleeper(tmp_path)

    def check() -> bool:
        if proc.probes == 1:  # the first probe finds it loading; then the engine says it is ready
            append(proc.log_path, "INFO: loading\nINFO: Application startup complete.\n")
            return False
        return True
    try:
        await asyncio.wait_for(proc.wait_until(check, "loading", HANG_S, ["Application startup complete."], NEVER),
                               HANG_S)
        assert proc.probes == 2  # woken by the line: the hour-long backoff never ran out
        assert proc.ready_line_at is not None  # where the load's timeline splits the engine's share
    finally:
        await proc.stop(1)


class FirstQuick(Backoff):
    """One short wait, then an hour: a probe after that hour can only come from a ready line."""

    def intervals(self):
        yield 0.001
        while True:
            yield 3600


async def test_a_ready_line_before_the_engine_answers_starts_the_backoff_over(tmp_path):
    """uvicorn logs "Application startup complete." just before it serves: the probe the line woke
    fails, and the next must come at the backoff's first interval, not at its cap."""
    proc = await sleeper(tmp_path)

    def check() -> bool:
        if proc.probes == 2:  # after the short wait: the engine logs its line, the next probe is woken by it
            append(proc.log_path, "INFO:     Application startup complete.\n")
        return proc.probes == 4  # the woken probe (3) still finds it starting; the one after the restart answers
    try:
        await asyncio.wait_for(proc.wait_until(check, "loading", HANG_S, ["Application startup complete."],
                                               FirstQuick()), HANG_S)
        assert proc.probes == 4
    finally:
        await proc.stop(1)


async def test_other_log_lines_do_not_probe(tmp_path):
    """A chatty engine's lines wake the watch but only its ready line probes."""
    proc = await sleeper(tmp_path)
    watch = LogWatch(proc.log_path, ["ready to roll"])
    try:
        assert watch.start()
        append(proc.log_path, "INFO: capturing graphs\n" * 50)
        append(proc.log_path, "INFO: The server is fired up and ready to roll!\n")
        await asyncio.wait_for(watch.seen.wait(), HANG_S)
        assert watch.wakes >= 1
    finally:
        watch.close()
        await proc.stop(1)


async def test_a_marker_split_across_writes_is_found(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text("# lessor: starting x\n")
    with LogWatch(log, ["weights loaded:"]) as watch:
        assert watch.start()
        assert not watch.seen.is_set()
        append(log, "INFO weights lo")
        append(log, "aded: {...}\n")
        await asyncio.wait_for(watch.seen.wait(), HANG_S)


async def test_a_line_written_before_the_watch_counts(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text("# lessor: starting x\nmain: server is listening on http://127.0.0.1:9\n")
    with LogWatch(log, ["server is listening on"]) as watch:
        assert watch.start()
        assert watch.seen.is_set()


async def test_without_markers_or_a_log_it_polls(tmp_path):
    assert not LogWatch(tmp_path / "engine.log", []).start()
    assert not LogWatch(tmp_path / "missing.log", ["x"]).start()
    proc = await sleeper(tmp_path)
    try:  # no ready line it knows: the backoff alone probes until the check holds
        await asyncio.wait_for(proc.wait_until(lambda: proc.probes == 3, "loading", HANG_S, (),
                                               Backoff(first_s=0.001, cap_s=0.002)), HANG_S)
        assert proc.probes == 3 and proc.ready_line_at is None
    finally:
        await proc.stop(1)


def test_the_backoff_starts_at_milliseconds_and_is_capped():
    assert list(itertools.islice(Backoff().intervals(), 7)) == [0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.1]


async def test_a_probe_that_never_answers_ends_at_the_deadline_not_after_it(tmp_path):
    """Issue 39, finding 10: a health URL that accepts and never answers held each probe for the
    probe's own timeout, so a 6 s `timeouts.ready` stopped the engine after 10.2 s. Each probe is
    bounded by the time left: a probe that would never end ends the wait at its deadline."""
    proc = await sleeper(tmp_path)
    hung = asyncio.get_running_loop().create_future()  # the engine's answer, which never comes

    async def check() -> bool:
        return await hung
    try:
        try:
            await asyncio.wait_for(proc.wait_until(check, "loading", 0.05, (), NEVER), HANG_S)  # hung before
        except TimeoutError as exc:
            assert "still not done loading after 0.05 s" in str(exc) and proc.probes == 1
        else:
            raise AssertionError("a probe that never answers made the engine ready")
    finally:
        await proc.stop(1)


async def test_a_health_url_that_accepts_and_never_answers_times_the_wait_out(tmp_path):
    proc = await sleeper(tmp_path)
    accepted = []
    server = await asyncio.start_server(lambda reader, writer: accepted.append(writer), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        try:
            await asyncio.wait_for(proc.wait_http(f"http://127.0.0.1:{port}/health", 0.05, "loading"), HANG_S)
        except TimeoutError as exc:
            assert "still not done loading" in str(exc)
        else:
            raise AssertionError("ready without an answer")
    finally:
        server.close()
        for writer in accepted:
            writer.close()
        await proc.stop(1)
