"""The `lessor` command's side of the admin API: where it is, which token to send (and, when the
daemon refuses it, where the CLI looked), and whether the daemon reached runs the config given."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..daemon.config.schema import LessorConfig, load_config
from .auth import ENV_TOKEN

DEFAULT_ADMIN = "http://127.0.0.1:8470"
ENV_CONFIG = "LESSOR_CONFIG"
# Where the service reads its config (systemd's ConfigurationDirectory=lessor): with no config
# named, the CLI finds the daemon through it, as an operator on the box would.
DEFAULT_CONFIG = Path("/etc/lessor/lessor.yaml")


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any], hint: str = "") -> None:
        self.status, self.body, self.hint = status, body, hint
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.type, self.message = error.get("type", "error"), error.get("message", str(body))
        super().__init__(f"{status} {self.type}: {self.message}")


class Client:
    def __init__(self, base: str, token: str | None, token_note: str = "") -> None:
        self.base, self.token = base.rstrip("/"), token
        self.token_note = token_note  # where the token came from, or where the CLI looked for one

    def _open(self, method: str, path: str, body: dict | None = None, timeout: float | None = 3600,
              accept: str = "application/json"):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("Accept", accept)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read())
            except json.JSONDecodeError:
                payload = {"error": {"message": exc.reason}}
            raise ApiError(exc.code, payload, self._token_hint() if exc.code == 401 else "") from None
        except urllib.error.URLError as exc:
            raise SystemExit(f"lessor: cannot reach the admin API at {self.base}: {exc.reason} (is lessord running?)") from None

    def _token_hint(self) -> str:
        return (f"{self.token_note}; give the daemon's token with --config FILE (the admin.token in its "
                f"state_dir), --token TOKEN or ${ENV_TOKEN}")

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    def text(self, path: str) -> str:
        with self._open("GET", path, accept="text/plain") as response:
            return response.read().decode("utf-8", errors="replace")

    def stream(self, path: str):
        """A response read as it comes (no timeout: an idle stream gets keep-alive comments)."""
        return self._open("GET", path, timeout=None, accept="text/event-stream")


def config_path(args: argparse.Namespace) -> str | None:
    """The config the user named: --config (before or after the command), else $LESSOR_CONFIG."""
    return getattr(args, "config", None) or os.environ.get(ENV_CONFIG, "").strip() or None


def _found_config() -> tuple[str | None, str]:
    """The service's config when none is named, or None and why not (said if the default address is used)."""
    if not DEFAULT_CONFIG.exists():
        return None, f"{DEFAULT_CONFIG} does not exist"
    if not os.access(DEFAULT_CONFIG, os.R_OK):
        return None, f"{DEFAULT_CONFIG} is not readable by this user (sudo, or the lessor group)"
    return str(DEFAULT_CONFIG), ""


def find_token(given: str | None, config: LessorConfig | None) -> tuple[str | None, str]:
    """The token and where it came from: --token, then $LESSOR_ADMIN_TOKEN, then the token file."""
    if given:
        return given, "the token given with --token was refused"
    env = os.environ.get(ENV_TOKEN, "").strip()
    if env:
        return env, f"the token in ${ENV_TOKEN} was refused"
    path = (config.token_path() if config else Path(os.environ.get("STATE_DIRECTORY", "var/lessor")) / "admin.token").absolute()
    if path.is_file() and os.access(path, os.R_OK):
        return path.read_text().strip() or None, f"the token read from {path} was refused (another daemon's file?)"
    where = "the token file of the config's state_dir" if config else "no --config given, so only the default state dir"
    return None, f"no token sent: {path} ({where}) is {'not readable' if path.exists() else 'missing'}"


def daemon_address(args: argparse.Namespace) -> tuple[str, str | None, str]:
    """(admin URL, config file, a note): --admin, $LESSOR_ADMIN_URL, then the admin.listen of the
    config (named, or the service's, looked for only when no address is given); the built-in
    address as the last resort, and the note then says so and why."""
    given = args.admin or os.environ.get("LESSOR_ADMIN_URL")
    path, why_none = config_path(args), ""
    if path is None and not given:
        path, why_none = _found_config()
    if given:
        return given, path, ""
    if path:
        return f"http://{load_config(path).admin.listen}", path, ""
    return DEFAULT_ADMIN, None, (f"asking {DEFAULT_ADMIN}, the default admin address: no --admin or $LESSOR_ADMIN_URL, "
                                 f"no --config or ${ENV_CONFIG}, and {why_none}")


def make_client(args: argparse.Namespace) -> Client:
    base, path, note = daemon_address(args)
    if note:
        print(f"lessor: {note}", file=sys.stderr)
    config = load_config(path) if path else None
    token, where = find_token(args.token, config)
    client = Client(base, token, where)
    if path and getattr(args, "command", None) != "reload":  # reload is how an edited file is applied
        warn_if_other_config(client, path)
    return client


def warn_if_other_config(client: Client, path: str) -> None:
    """One line on stderr when the daemon reached does not run `path` (another lessord on the
    port), or runs an older read of it (edited since, not reloaded)."""
    from ..daemon.controller import config_source  # only with --config: the daemon's code is slow to import

    try:
        running = client.call("GET", "/admin/v1/status").get("config")
    except ApiError:
        return
    if not running:
        return
    mine = config_source(path)
    if running["path"] != mine["path"]:
        print(f"lessor: the daemon at {client.base} runs {running['path']}, not {path} (is another lessord on that port?)",
              file=sys.stderr)
    elif running["digest"] != mine["digest"]:
        print(f"lessor: the daemon at {client.base} runs {path} as it was when read (digest {running['digest']}); "
              f"the file changed since ({mine['digest']}): `lessor reload` (or SIGHUP) applies it", file=sys.stderr)
