"""The ledger as tests set it up and look at it: simulated devices for a Ledger of their own, and
its tables read or dropped with SQL, as an operator's shell would."""

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from lessor.daemon.config.schema import DevicesConfig, HostPool, SimulatedGpu
from lessor.daemon.devices.probes import SimProbe
from lessor.daemon.ledger.database import leases_table, metadata
from lessor.daemon.units import GiB


def make_probe():
    return SimProbe([SimulatedGpu(total=24 * GiB, foreign=8 * GiB), SimulatedGpu(total=16 * GiB)],
                    host_total_bytes=64 * GiB)


DEVICES = DevicesConfig(headroom=GiB, host=HostPool(headroom=4 * GiB, simulated_total=64 * GiB))


async def rows(url: str) -> dict[str, int]:
    """The lease rows by state, as an operator's SQL shell sees them."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(select(leases_table.c.state, func.count()).group_by(leases_table.c.state))
            return {state: count for state, count in result}
    finally:
        await engine.dispose()


async def drop_ledger_tables(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
    await engine.dispose()
