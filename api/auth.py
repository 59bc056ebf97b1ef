"""Bearer-token auth for the admin API's mutating calls and event stream.

The token comes from LESSOR_ADMIN_TOKEN or the token file; a missing file is created with a
fresh random token (mode 0600), so a new install is never open. The file is written whole or not
at all (a temporary file in the same folder, fsync, rename): a full disk or a crash leaves no empty
token file behind. One left by an older lessord (empty, or bytes no client could send) is
repaired the same way when lessord may create the file, or refused with one line naming the file
and the fix. Compared in constant time; never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

from aiohttp import web

from ..daemon.errors import Unauthorized

ENV_TOKEN = "LESSOR_ADMIN_TOKEN"
log = logging.getLogger("lessor.auth")


class TokenFileError(OSError):
    """The token file cannot be read or written: one line with the file, the reason and the fix
    (lessord's main prints an OSError's text as its last line)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def resolve_token(token_path: Path, create: bool) -> str | None:
    """The admin token. With `create` (lessord) never None: a missing, empty or damaged file is
    replaced by a fresh token, or TokenFileError says why it cannot be."""
    env = os.environ.get(ENV_TOKEN, "").strip()
    if env:
        return env
    try:
        token, damage = _read(token_path)
    except FileNotFoundError:
        if not create:
            return None
        return _write_fresh(token_path, replace=False, why="")
    if damage is None:
        return token
    if not create:
        return None
    log.warning("the admin token file %s %s (an interrupted write?): writing a fresh token; clients that read "
                "it take the new one", token_path, damage)
    return _write_fresh(token_path, replace=True, why=damage)


def _read(token_path: Path) -> tuple[str, str | None]:
    """The token and, when no client could send it, what is wrong with the file."""
    try:
        raw = token_path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise TokenFileError(exc.errno, f"cannot read the admin token file {token_path} ({exc.strerror}): make it "
                             f"readable by lessord's user, remove it to have a fresh one written, or set "
                             f"${ENV_TOKEN}") from None
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "", "is not text"
    if not token:
        return "", "is empty"
    if not (token.isascii() and token.isprintable()):  # an Authorization header carries printable ASCII only
        return "", "holds bytes no client can send (not one line of printable ASCII)"
    return token, None


def _write_fresh(token_path: Path, replace: bool, why: str) -> str:
    token = secrets.token_urlsafe(32)
    try:
        token_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(token_path, (token + "\n").encode(), replace)
    except FileExistsError:  # another lessord wrote it first: that one is the token
        return resolve_token(token_path, create=True)  # type: ignore[return-value]
    except OSError as exc:
        found = f"it {why}; " if why else ""
        raise TokenFileError(exc.errno, f"cannot write the admin token file {token_path} ({found}{exc.strerror}): "
                             f"free space on its disk or make its folder writable, then start again; or set "
                             f"${ENV_TOKEN}") from None
    return token


def _write_atomically(path: Path, data: bytes, replace: bool) -> None:
    """`data` in `path` whole, mode 0600, or `path` untouched: written to a temporary file in the
    same folder, flushed to disk, then renamed over (`replace`) or linked in (never over a file
    another process created meanwhile)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def check_bearer(request: web.Request, token: str) -> None:
    header = request.headers.get("Authorization", "")
    if not header.isascii():  # aiohttp hands on undecodable bytes as surrogates, which no token holds
        raise Unauthorized("the Authorization header is not ASCII text; send 'Authorization: Bearer <token>' "
                           "with the token as the admin token file or LESSOR_ADMIN_TOKEN holds it")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("this call needs 'Authorization: Bearer <token>' (the admin token file or LESSOR_ADMIN_TOKEN)")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("the bearer token is wrong")


def holds_token(request: web.Request, token: str) -> bool:
    """Whether the request carries the admin token (a public route then answers it whole)."""
    try:
        check_bearer(request, token)
    except Unauthorized:
        return False
    return True
