"""Memory fingerprints: their table and its migration (SQLite and a real PostgreSQL), the store,
and the arithmetic that turns a measurement into a plan's figures."""

import asyncio
import json
import os
import sys
import time
from types import SimpleNamespace

import pytest
from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table, Text, insert, inspect, select
from sqlalchemy.ext.asyncio import create_async_engine

from lessor.daemon.config.schema import parse_config
from lessor.daemon.ledger.database import SCHEMA_VERSION, SchemaTooNew, schema_table
from lessor.daemon.ledger.fingerprints import DeviceMeasurement, FingerprintKey, FingerprintStore, Outcome
from lessor.daemon.ledger.ledger import Ledger
from lessor.daemon.models.measurements import Fingerprinting
from lessor.daemon.planning.planner import Measured, plan
from lessor.daemon.planning.profile import DeviceMemory, measured_figures, verify_tolerance, with_measured
from lessor.daemon.units import GiB, MiB
from lessor.memory.footprint import Source
from lessor.policies import DeviceBudget

from ..support.ledger import DEVICES, make_probe

KEY = FingerprintKey("qwen", "torch", "torch 2.13.0, transformers 5.24.0", ("sim24",), {"engine": {"dtype": "bfloat16"}})


def measurement(**over) -> DeviceMeasurement:
    base = dict(device="gpu0", method="engine", peak_bytes=5 * GiB, loading_peak_bytes=5 * GiB, steady_bytes=6 * GiB,
                weights_bytes=4 * GiB, kv_bytes=GiB, kv_tokens=16384, leased_bytes=6 * GiB, two_phase=True)
    return DeviceMeasurement(**{**base, **over})


# -- the schema and its migration ---------------------------------------------------------------

async def _first_release_schema(url: str) -> None:
    """The ledger's tables as the first release created them: no version table, no fingerprints."""
    old = MetaData()
    leases = Table("lessor_leases", old, Column("id", String(36), primary_key=True), Column("model", String(128)),
                   Column("device", String(32)), Column("kind", String(16)), Column("bytes", BigInteger),
                   Column("state", String(16)), Column("attempt", String(36)), Column("owner_pid", Integer),
                   Column("owner_started_at", Float), Column("granted_at", Float), Column("released_at", Float),
                   Column("release_reason", String(256)))
    Table("lessor_engines", old, Column("model", String(128), primary_key=True), Column("attempt", String(36)),
          Column("pid", Integer), Column("identity", String(96)), Column("port", Integer), Column("phase", String(16)),
          Column("params", Text), Column("kv_tokens", BigInteger), Column("started_at", Float))
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(old.create_all)
        await conn.execute(insert(leases), [{"id": "l1", "model": "qwen", "device": "gpu0", "kind": "weights",
                                             "bytes": 4 * GiB, "state": "granted", "attempt": "a1", "owner_pid": None,
                                             "owner_started_at": None, "granted_at": 1.0, "released_at": None,
                                             "release_reason": None}])
    await engine.dispose()


async def test_a_first_release_ledger_is_migrated_and_keeps_its_leases(ledger_url):
    await _first_release_schema(ledger_url)
    ledger = await Ledger.open(ledger_url, make_probe(), DEVICES)
    try:
        assert [(lease.id, lease.bytes) for lease in ledger.leases()] == [("l1", 4 * GiB)]
        async with ledger.database.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            version = (await conn.execute(select(schema_table.c.version))).scalars().all()
        assert {"lessor_fingerprints", "lessor_schema"} <= tables and version == [SCHEMA_VERSION]
        store = await FingerprintStore.open(ledger.database)
        await store.record(KEY, (measurement(),), Outcome.READY)
    finally:
        await ledger.close()
    again = await Ledger.open(ledger_url, make_probe(), DEVICES)  # opening a current schema changes nothing
    try:
        assert len(again.leases()) == 1
        assert [f.digest for f in (await FingerprintStore.open(again.database)).all()] == [KEY.digest]
    finally:
        await again.close()


async def test_a_ledger_of_a_newer_lessord_is_refused_by_name(ledger_url):
    await (await Ledger.open(ledger_url, make_probe(), DEVICES)).close()  # creates the current schema
    engine = create_async_engine(ledger_url)
    async with engine.begin() as conn:
        await conn.execute(schema_table.update().values(version=SCHEMA_VERSION + 1))
    await engine.dispose()
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}; this lessord knows up to"):
        await Ledger.open(ledger_url, make_probe(), DEVICES)


# -- the store ------------------------------------------------------------------------------------

async def test_fingerprints_persist_keep_the_newest_load_and_are_forgotten_on_delete(ledger_url):
    ledger = await Ledger.open(ledger_url, make_probe(), DEVICES)
    clock = iter([100.0, 200.0]).__next__
    try:
        store = await FingerprintStore.open(ledger.database, clock=clock)
        await store.record(KEY, (measurement(),), Outcome.READY)
        merged = await store.record(KEY, (measurement(steady_bytes=7 * GiB, weights_bytes=3 * GiB),), Outcome.OVERRUN)
        assert merged.loads == 2 and merged.outcome == Outcome.OVERRUN and merged.measured_at_s == 200.0
        # One load's figures together: a steady value beside another load's KV cache would say nothing true.
        assert merged.devices[0].steady_bytes == 7 * GiB and merged.devices[0].weights_bytes == 3 * GiB
        other = FingerprintKey(KEY.model, KEY.engine, "torch 2.14.0, transformers 5.24.0", KEY.devices, KEY.flags)
        reopened = await FingerprintStore.open(ledger.database)
        assert [f.to_dict() for f in reopened.all()] == [merged.to_dict()]
        assert reopened.get(other) is None
        assert (await reopened.delete(KEY.digest)).digest == KEY.digest
        assert await reopened.delete(KEY.digest) is None
        assert (await FingerprintStore.open(ledger.database)).all() == []
    finally:
        await ledger.close()


def test_a_key_says_why_another_keys_measurement_does_not_apply():
    newer = FingerprintKey(KEY.model, KEY.engine, "torch 2.14.0, transformers 5.24.0", ("NVIDIA H200",),
                           {"engine": {"dtype": "float16"}})
    why = " | ".join(newer.differences(KEY))
    assert "engine version 'torch 2.13.0, transformers 5.24.0', now 'torch 2.14.0" in why
    assert "devices sim24, now NVIDIA H200" in why and "flags engine" in why
    assert newer.digest != KEY.digest and KEY.differences(KEY) == []


# -- from a measurement to a plan's figures --------------------------------------------------------

PREDICTED = DeviceMemory(weights=4 * GiB, workspace=512 * MiB, kv_rate=65536.0, load_peak=GiB, cache_rate=65536.0)


def test_figures_of_a_finished_two_phase_load():
    m = measurement(weights_bytes=4 * GiB + 300 * MiB, kv_bytes=16384 * 70000, loading_peak_bytes=5 * GiB,
                    steady_bytes=4 * GiB + 300 * MiB + 16384 * 70000 + 900 * MiB)
    figures = measured_figures(PREDICTED, m, Outcome.READY)
    # Totals per phase: the 300 MiB the weights took beyond the model go to the lease held then (the
    # load peak while loading, the workspace once ready), never to a second copy of the weights.
    assert figures == {"kv_rate": 70000.0, "workspace": 300 * MiB + 900 * MiB, "load_peak": GiB}


def test_figures_of_an_out_of_memory_load_are_at_least_what_it_reached():
    kv = int(16384 * PREDICTED.kv_rate)
    one_phase = measurement(weights_bytes=None, kv_bytes=None, peak_bytes=7 * GiB, steady_bytes=0, leased_bytes=6 * GiB,
                            two_phase=False)
    # Every lease was held at once: the load peak is not the workspace's to carry.
    assert measured_figures(PREDICTED, one_phase, Outcome.OOM) == {
        "workspace": 7 * GiB + verify_tolerance(6 * GiB) - PREDICTED.weights - kv - PREDICTED.load_peak}
    loading = measurement(weights_bytes=None, kv_bytes=None, kv_tokens=0, peak_bytes=5 * GiB, steady_bytes=0,
                          leased_bytes=5 * GiB)
    assert measured_figures(PREDICTED, loading, Outcome.OOM) == {"load_peak": 5 * GiB + verify_tolerance(5 * GiB) - 4 * GiB}
    # Died allocating its KV cache (the cache was asked for): the workspace beside it was short.
    allocating = measurement(kv_bytes=None, peak_bytes=6 * GiB, steady_bytes=0, leased_bytes=5 * GiB + 512 * MiB)
    assert measured_figures(PREDICTED, allocating, Outcome.OOM) == {
        "workspace": 6 * GiB + verify_tolerance(5 * GiB + 512 * MiB) - PREDICTED.weights - kv}


def test_a_larger_measurement_wins_with_the_margin_and_says_where_it_came_from():
    spec = parse_config({"models": [{"name": "qwen", "engine": {"kind": "torch", "model_path": "/m"},
                                     "memory": {"weights": "4GiB", "kv_bytes_per_token": 65536, "load_peak": "1GiB"}}]}).models[0]
    store_print = _fingerprint(measurement(weights_bytes=5 * GiB, kv_bytes=GiB, kv_tokens=8192,
                                           steady_bytes=5 * GiB + GiB + 256 * MiB, loading_peak_bytes=5 * GiB + 100 * MiB))
    memory = with_measured(spec.profile(), store_print, 0.03)
    device = memory.devices[0]
    assert device.weights == 4 * GiB  # the weights lease stays the model's: what they took beyond goes below
    assert device.kv_rate == pytest.approx(GiB / 8192 * 1.03)
    assert device.workspace == -(-(5 * GiB + GiB + 256 * MiB - 4 * GiB - GiB) * 103 // 100)
    assert device.load_peak == -(-(GiB + 100 * MiB) * 103 // 100)  # 5 GiB + 100 MiB while loading, 4 GiB of it weights
    measured = [c for c in memory.components[0] if c.source == Source.MEASURED]
    assert {c.name for c in measured} == {"workspace_measured", "load_peak_measured"}
    assert all(store_print.digest[:8] in c.basis and "measured + 3%" in c.basis for c in measured)
    assert memory.kv_sources[0][0] == "measured"
    # The plan leases the larger figures and lists where each came from.
    budgets = {"gpu0": DeviceBudget("gpu0", 24 * GiB, 24 * GiB, GiB, 0, 0), "host": DeviceBudget("host", 64 * GiB, 64 * GiB, 4 * GiB, 0, 0)}
    before, after = plan(spec, budgets), plan(spec, budgets, measured=Measured(store_print, 0.03))
    assert after.kv_tokens < before.kv_tokens
    assert {m["name"] for m in after.to_dict()["memory"] if m["source"] == "measured"} >= {"workspace_measured", "kv_per_token"}
    assert next(m for m in after.to_dict()["memory"] if m["name"] == "kv_per_token")["bytes"] == int(GiB / 8192 * 1.03)


def test_a_smaller_measurement_changes_nothing():
    spec = parse_config({"models": [{"name": "qwen", "engine": {"kind": "torch", "model_path": "/m"},
                                     "memory": {"weights": "4GiB", "kv_bytes_per_token": 65536, "load_peak": "1GiB"}}]}).models[0]
    small = _fingerprint(measurement(weights_bytes=3 * GiB, kv_bytes=GiB // 2, kv_tokens=16384, steady_bytes=3 * GiB + GiB // 2,
                                     loading_peak_bytes=3 * GiB))
    assert with_measured(spec.profile(), small, 0.03) == spec.profile()


def _fingerprint(m: DeviceMeasurement):
    from lessor.daemon.ledger.fingerprints import Fingerprint
    return Fingerprint(KEY, (m,), Outcome.READY, time.time())


def test_a_fingerprint_row_round_trips():
    from lessor.daemon.ledger.fingerprints import Fingerprint
    f = _fingerprint(measurement())

    class Row:
        pass
    row = Row()
    row.__dict__.update(f.row())
    assert Fingerprint.from_row(row) == f
    assert json.loads(f.row()["flags"]) == dict(KEY.flags)


def test_an_engines_version_is_its_packages_or_its_binarys(tmp_path):
    import sys

    from lessor.engines.versions import engine_version

    assert engine_version([sys.executable], ("torch",)).startswith("torch 2.")
    assert engine_version([sys.executable], ("surely-not-a-package",)) == "surely-not-a-package not-installed"
    assert engine_version(["no-such-engine-binary"], ()) == "unknown: no-such-engine-binary not found"
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\necho 'version: 6789 (abc123)'\necho 'built with cc' >&2\n")
    binary.chmod(0o755)
    assert engine_version([str(binary)], ()) == "version: 6789 (abc123)"
    wrapper = tmp_path / "serve.sh"
    wrapper.write_text("#!/bin/sh\nexit 1\n")
    wrapper.chmod(0o755)
    assert engine_version([str(wrapper)], ("vllm",)) == "unknown: serve.sh is not a Python command"


def test_a_venvs_engine_version_is_asked_again_only_after_an_install(tmp_path):
    """A load refreshes the version; inside a venv it starts a Python only when pip changed the venv."""
    from lessor.engines.versions import engine_version

    venv = tmp_path / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    (tmp_path / "installed").write_text("1.0")
    python = venv / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f"#!/bin/sh\necho asked >> {tmp_path / 'asked'}\necho \"pkg $(cat {tmp_path / 'installed'})\"\n")
    python.chmod(0o755)

    def asked() -> int:
        return len((tmp_path / "asked").read_text().splitlines())
    spec = SimpleNamespace(engine=SimpleNamespace(version_query=lambda: ([str(python)], ("pkg",))))
    asyncio.run(Fingerprinting.warm(None, [spec, spec]))  # lessord's start: asked once, in the background
    assert asked() == 1
    assert engine_version([str(python)], ("pkg",), refresh=True) == "pkg 1.0" and asked() == 1  # a load
    (tmp_path / "installed").write_text("2.0")  # pip install -U: a new dist-info folder, site-packages touched
    (site / "pkg-2.0.dist-info").mkdir()
    stat = os.stat(site)
    os.utime(site, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # whatever the file system's granularity
    assert engine_version([str(python)], ("pkg",), refresh=True) == "pkg 2.0" and asked() == 2
    (venv / "pyvenv.cfg").write_text("include-system-site-packages = true\n")  # its own folder no longer tells
    engine_version([str(python)], ("pkg",), refresh=True)
    engine_version([str(python)], ("pkg",), refresh=True)
    assert asked() == 4


def test_a_venvs_versions_are_read_from_its_dist_info_without_starting_it(tmp_path):
    from lessor.engines.versions import engine_version

    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "Some_Engine-1.2.3.dist-info").mkdir(parents=True)
    (site / "Some_Engine-1.2.3.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: some-engine\nVersion: 1.2.3\n")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("include-system-site-packages = false\n")
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir()
    python.write_text("#!/bin/sh\necho 'some-engine 9.9' \n")  # what asking would say: it must not be asked
    python.chmod(0o755)
    assert engine_version([str(python)], ("some-engine",)) == "some-engine 1.2.3"
    assert engine_version([str(python)], ("some-engine", "other")) == "some-engine 9.9"  # one not there: asked
    assert engine_version([sys.executable], ("torch",), refresh=True).startswith("torch 2.")
