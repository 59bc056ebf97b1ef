"""The admin token file (issue 39, finding 7): a start on a full disk left `admin.token` empty and
every later start died at an assert with a traceback. The file is written whole or not at all; an
empty or damaged one is repaired, or lessord says in one line which file and what to do."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess

from lessor.api.auth import TokenFileError, resolve_token
from lessor.engines.process import free_port

from ..support.clients import Admin
from ..support.configs import config_file
from ..support.lessord import running_lessord
from ..support.paths import BIN
from ..support.waiting import HANG_S


def full_disk() -> None:
    """In the child: no file may grow past 0 bytes, as on a full disk (EFBIG instead of ENOSPC)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def lessord_on_a_full_disk(config) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "LESSOR_ADMIN_TOKEN"}
    proc = subprocess.run([str(BIN / "lessord"), "--config", str(config), "--sim", "--admin-listen",
                           f"127.0.0.1:{free_port()}", "--router-listen", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=HANG_S, env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
                          preexec_fn=full_disk)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def test_a_start_on_a_full_disk_says_so_in_one_line_and_the_next_start_works(tmp_path):
    config = config_file(tmp_path, [])
    token_file = tmp_path / "state" / "admin.token"
    status, said = lessord_on_a_full_disk(config)
    assert status != 0 and "Traceback" not in said, said
    (line,) = [line for line in said.splitlines() if "admin token" in line]
    assert str(token_file) in line and "free space" in line and "LESSOR_ADMIN_TOKEN" in line
    assert [name for name in os.listdir(token_file.parent) if "admin.token" in name] == []  # nor a temporary

    with running_lessord(config) as (_, url, _):  # space is back
        token = token_file.read_text().strip()
        assert token and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert Admin(url, tmp_path / "state").call("POST", "/admin/v1/reload")[0] != 401


def test_an_empty_token_file_left_by_an_older_lessord_is_repaired_at_start(tmp_path):
    config = config_file(tmp_path, [])
    token_file = tmp_path / "state" / "admin.token"
    token_file.parent.mkdir()
    token_file.touch(0o600)  # what the old write left on a full disk
    with running_lessord(config) as (_, url, _):
        token = token_file.read_text().strip()
        assert len(token) > 30 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert Admin(url, tmp_path / "state").call("POST", "/admin/v1/reload")[0] != 401


def test_a_token_file_lessord_cannot_read_is_refused_in_one_line(tmp_path):
    config = config_file(tmp_path, [])
    (tmp_path / "state" / "admin.token").mkdir(parents=True)  # a folder in its place: no rights fix it
    proc = subprocess.run([str(BIN / "lessord"), "--config", str(config), "--sim", "--admin-listen",
                           f"127.0.0.1:{free_port()}", "--router-listen", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=HANG_S,
                          env={k: v for k, v in os.environ.items() if k != "LESSOR_ADMIN_TOKEN"})
    said = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 1 and "Traceback" not in said, said
    assert said.splitlines()[-1] == (f"lessord: cannot read the admin token file {tmp_path / 'state' / 'admin.token'} "
                                     "(Is a directory): make it readable by lessord's user, remove it to have a fresh "
                                     "one written, or set $LESSOR_ADMIN_TOKEN")


def test_damaged_token_files(tmp_path, monkeypatch):
    monkeypatch.delenv("LESSOR_ADMIN_TOKEN", raising=False)
    path = tmp_path / "admin.token"
    for damaged in (b"", b"\n  \n", b"\0\0\0\0", b"\xff\xfe", b"half\ntoken", "jeton-\u00e9".encode()):
        path.write_bytes(damaged)
        assert resolve_token(path, create=False) is None  # the CLI sends none rather than garbage
        token = resolve_token(path, create=True)
        assert token and path.read_text() == token + "\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert resolve_token(path, create=True) == token  # kept from then on
    path.write_text("  chosen-by-the-admin  \n")
    assert resolve_token(path, create=True) == "chosen-by-the-admin"
    assert sorted(os.listdir(tmp_path)) == ["admin.token"]  # no temporary left


def test_a_token_that_cannot_be_written_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("LESSOR_ADMIN_TOKEN", raising=False)
    path = tmp_path / "admin.token"
    path.write_bytes(b"")
    real_fsync = os.fsync

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    try:
        resolve_token(path, create=True)
    except TokenFileError as exc:
        assert str(exc) == (f"cannot write the admin token file {path} (it is empty; No space left on device): "
                            "free space on its disk or make its folder writable, then start again; or set "
                            "$LESSOR_ADMIN_TOKEN")
    else:
        raise AssertionError("no error")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(os.listdir(tmp_path)) == ["admin.token"] and path.read_bytes() == b""
