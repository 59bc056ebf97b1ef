"""The dashboard at the admin address `/`: one static page (api/static/) that draws everything from
the admin API's JSON. No server-side state and no cookie.

Read-only for everyone: the page polls the public status once a second. Given the admin token,
it keeps it in the tab's sessionStorage (its own origin only: other servers on the same host, on
other ports, would be sent a cookie but cannot read that) and sends it as a bearer header, never in
a URL: for the event stream too, read with fetch (EventSource cannot send a header). No cookie
means no ambient credential, so no other page can make a browser load or unload.

The page arrives with its first state inside (what the public /status, /history and /fingerprints
answer at that moment, as a JSON data block the script reads and never runs), so its first paint
shows the devices and models: a browser, screenshot or crawler that does not wait for a poll sees
them, not "connecting…". Nothing goes in that those public routes do not give anyone: the secrets
an error may quote are redacted as those routes redact them for a caller without the token.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from importlib import resources
from typing import Any

from aiohttp import web

log = logging.getLogger("lessor.api")

# The page runs only its own files: no inline script, no other origin, no framing (its buttons
# load and unload), and no form ever submits (the token field must never become a query string).
# The first state is a data block (type application/json): not a script, so the policy allows it.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# dashboard.html holds this empty block; each page request fills it.
SLOT = b'<script type="application/json" id="initial-state"></script>'


@cache
def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static").joinpath(name).read_bytes()  # one part a call before 3.11


def _file(name: str, content_type: str) -> web.Response:
    return web.Response(body=_static(name), content_type=content_type, charset="utf-8", headers=HEADERS)


def embed(state: dict[str, Any]) -> bytes:
    """JSON that cannot end its <script> block or open a comment, whatever a model's name or an error says:
    <, > and & as \\u escapes, which JSON.parse reads back unchanged."""
    text = json.dumps(state, separators=(",", ":"), allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    return text.encode()


def first_state(controller) -> dict[str, Any]:
    """What the public routes would answer now: /status, /history and /fingerprints, nothing else."""
    return {"status": controller.status(), "history": controller.history.to_dict(),
            "fingerprints": controller.fingerprints()}


def render_page(state: dict[str, Any] | None) -> bytes:
    page = _static("dashboard.html")
    if state is None:
        return page
    return page.replace(SLOT, SLOT.replace(b"></script>", b">" + embed(state) + b"</script>"), 1)


async def get_page(request: web.Request) -> web.Response:
    from .admin import CONTROLLER, shown  # here, not at the top: admin imports this module for its routes
    try:
        state = shown(request, first_state(request.app[CONTROLLER]))
    except Exception:
        # The page still works without it (its first poll draws it, or says why it cannot);
        # a page that answers 500 would say nothing at all.
        log.exception("the dashboard's first state could not be read; the page polls for it")
        state = None
    return web.Response(body=render_page(state), content_type="text/html", charset="utf-8", headers=HEADERS)


async def get_script(request: web.Request) -> web.Response:
    return _file("dashboard.js", "text/javascript")


async def get_style(request: web.Request) -> web.Response:
    return _file("dashboard.css", "text/css")
