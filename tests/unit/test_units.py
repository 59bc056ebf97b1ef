import pytest

from lessor.daemon.config.schema import parse_config
from lessor.daemon.errors import ConfigError
from lessor.daemon.units import GiB, KiB, MiB, format_bytes, parse_duration, parse_size


@pytest.mark.parametrize("text,expected", [
    ("8GiB", 8 * GiB), ("8GB", 8 * 10**9), ("512MiB", 512 * MiB), ("1.5G", int(1.5 * GiB)),
    (1024, 1024), ("1024", 1024), ("  2 gib ", 2 * GiB), ("70272B", 70272),
    # One rule (README's config reference): IEC and the bare letters binary, SI as SI.
    ("8Gi", 8 * GiB), ("512Mi", 512 * MiB), ("64Ki", 64 * KiB), ("1Ti", 1 << 40), ("8G", 8 * GiB), ("8g", 8 * GiB),
    ("8GB", 8_000_000_000), ("500MB", 500_000_000), ("8kB", 8000),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["8 parsecs", "GiB", "-1GiB", -5, True, "1e9"])
def test_bad_sizes_say_what_to_write(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


@pytest.mark.parametrize("text,expected", [("30s", 30), ("5m", 300), ("1h", 3600), ("-1", -1), (12, 12), ("500ms", 0.5)])
def test_durations(text, expected):
    assert parse_duration(text) == expected


def test_format():
    assert format_bytes(15 * GiB) == "15.0 GiB"
    assert format_bytes(70272) == "68.6 KiB"
    assert format_bytes(-GiB) == "-1.0 GiB"


def _model(**memory) -> dict:
    return {"name": "m", "engine": {"kind": "torch", "model_path": "/m"},
            "memory": {"weights": "1GiB", "kv_bytes_per_token": 8192, **memory}}


def _problems(data) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return {p.path: p.reason for p in info.value.problems}


def test_a_memory_size_without_a_unit_below_1_mib_is_refused_suggesting_the_unit():
    """`weights: 8` was taken as 8 bytes, without a word."""
    problems = _problems({"models": [_model(weights=8, load_peak="512")],
                          "devices": {"headroom": 100, "simulated": [{"total": 24}]}})
    assert problems["models[0].memory.weights"] == ("8 is 8 byte(s), less than 1 MiB: most likely a unit is missing; "
                                                    "write '8GiB' or '8MiB' (a number without a unit is bytes)")
    assert "write '512GiB' or '512MiB'" in problems["models[0].memory.load_peak"]
    assert "less than 1 MiB" in problems["devices.headroom"] and "less than 1 MiB" in problems["devices.simulated[0].total"]
    assert len(problems) == 4


def test_zero_is_refused_where_it_cannot_work_and_kept_where_it_can():
    """`weights: 0` was accepted without a word; a headroom, a load peak, foreign usage of 0 are real."""
    problems = _problems({"models": [_model(weights=0)], "devices": {
        "gpus": [{"index": 0, "capacity": 0}], "host": {"capacity": "0GiB"}}})
    assert set(problems) == {"models[0].memory.weights", "devices.gpus[0].capacity", "devices.host.capacity"}
    assert all(reason.startswith("0 bytes cannot work here; write the size with a unit") for reason in problems.values())
    config = parse_config({"models": [_model(load_peak=0, activation=0)],
                           "devices": {"headroom": 0, "simulated": [{"total": "8GiB", "foreign": 0}]}})
    assert config.devices.headroom == 0 and config.models[0].memory.load_peak == 0


def test_bytes_said_as_bytes_and_sizes_of_a_mib_or_more_are_taken():
    config = parse_config({"models": [_model(weights=8 * GiB, activation="70272B", load_peak=MiB)]})
    assert (config.models[0].memory.weights, config.models[0].memory.activation) == (8 * GiB, 70272)


def test_the_config_reference_states_the_rule():
    from lessor.api.reference import config_reference
    from lessor.daemon.units import SIZE_RULE
    assert config_reference().startswith(SIZE_RULE)
    assert "`8G` = `8GiB`" in SIZE_RULE and "`8GB` = 8 × 10^9 = 7.45 GiB" in SIZE_RULE
    assert format_bytes(parse_size("8GB")) == "7.5 GiB"  # what plans and status print
