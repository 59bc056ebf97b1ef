"""One composition root (issue 35): what daemon/runtime.py builds is what every part uses. Each
part shared by two others is one object, handed to both at their construction; the CLI's
read-only runtime builds no traffic control and no MQTT publisher."""

from lessor.daemon.models.traffic_counters import NoTraffic
from lessor.daemon.mqtt import MqttPublisher
from lessor.daemon.runtime import publishing, runtime
from lessor.daemon.traffic.control import TrafficControl

from ..support.configs import sim_config, torch_model


async def test_the_parts_the_runtime_built_are_the_ones_each_part_uses(tmp_path):
    async with runtime(sim_config(tmp_path, [torch_model("a")]), engines={}) as controller:
        supervisor, reconciler, traffic = controller.supervisor, controller.reconciler, controller.traffic
        assert isinstance(traffic, TrafficControl) and reconciler is not None
        assert supervisor._traffic is traffic and traffic._supervisor is supervisor  # each other's, no attach
        assert supervisor.loads._writer() is supervisor and supervisor.reconfiguring._supervisor() is supervisor
        elastic = supervisor.elastic
        assert elastic._locks is supervisor.loads.device_locks  # the loads' locks, which a grow waits for
        assert elastic._in_flight == traffic.in_flight
        assert reconciler._elastic is elastic and reconciler._meter is supervisor.meter
        assert reconciler._lingering_memory is supervisor.lingering is controller._lingering
        assert controller._fingerprinting is supervisor.fingerprinting
        assert reconciler.settling is not None and reconciler.settling.done()  # the start's, settled before yield
        assert controller.history._read() == controller.devices()
        assert controller.mqtt is None  # none configured


async def test_the_mqtt_publisher_is_built_with_the_runtime_and_run_by_publishing(tmp_path):
    config = sim_config(tmp_path, mqtt={"url": "mqtt://127.0.0.1:9"})  # never reached: publishing is not entered
    async with runtime(config, engines={}) as controller:
        assert isinstance(controller.mqtt, MqttPublisher)
        assert controller.mqtt._state() == (controller.devices(), controller.models())
    async with runtime(config, engines={}, reconcile=False) as local:
        assert local.mqtt is None
        async with publishing(local) as publisher:
            assert publisher is None


async def test_the_read_only_runtime_serves_no_traffic(tmp_path):
    async with runtime(sim_config(tmp_path, [torch_model("a")]), engines={}, reconcile=False) as controller:
        assert controller.traffic is None and isinstance(controller.supervisor._traffic, NoTraffic)
        assert controller.reconciler is not None and controller.reconciler.settling is None
    assert not (tmp_path / "state" / "traffic.json").exists()  # the running daemon's statistics are not written
