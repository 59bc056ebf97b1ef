"""A listener that cannot bind stops lessord with one line naming the field and what to change
(the README's seed commands beside the demo used to collide on 8470 with a bare errno)."""

import socket

import pytest
import yaml

from lessor.api import service


def _config(tmp_path, admin: str, router: str):
    path = tmp_path / "lessor.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"),
        "admin": {"listen": admin}, "router": {"listen": router},
        "devices": {"probe": "sim", "simulated": [{"name": "sim", "total": "8GiB"}]},
        "models": [],
    }))
    return str(path)


@pytest.fixture
def taken():
    """A loopback port held open (listening) for the test's whole life."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def _free() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("field", ["admin.listen", "router.listen"])
def test_a_port_in_use_names_the_field_and_the_way_out(tmp_path, capsys, taken, field):
    admin, router = (taken, _free()) if field == "admin.listen" else (_free(), taken)
    assert service.main(["--config", _config(tmp_path, admin, router)]) == 1
    # The config's own warnings (no models configured) are log lines of their own; the refusal is one line.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if " WARNING " not in line]
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"lessord: cannot listen on {taken} ({field}): the address is in use")
    assert f"--{field.split('.')[0]}-listen" in line and "Errno" not in line
