"""Bearer-token auth for the admin API's mutating calls and event stream.

The token comes from LESSOR_ADMIN_TOKEN or the token file; a missing file is created with a
fresh random token (mode 0600), so a new install is never open. Compared in constant time;
never logged.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from aiohttp import web

from ..daemon.errors import Unauthorized

ENV_TOKEN = "LESSOR_ADMIN_TOKEN"


def resolve_token(token_path: Path, create: bool) -> str | None:
    env = os.environ.get(ENV_TOKEN, "").strip()
    if env:
        return env
    try:
        return token_path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        if not create:
            return None
    token_path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


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
