import pytest

from lessor.daemon.units import GiB, MiB, format_bytes, parse_duration, parse_size


@pytest.mark.parametrize("text,expected", [
    ("8GiB", 8 * GiB), ("8GB", 8 * 10**9), ("512MiB", 512 * MiB), ("1.5G", int(1.5 * GiB)),
    (1024, 1024), ("1024", 1024), ("  2 gib ", 2 * GiB), ("70272B", 70272),
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
