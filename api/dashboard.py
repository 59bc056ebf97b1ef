"""The dashboard at the admin address `/`: one static page (api/static/) that draws everything from
the admin API's JSON. No server-side state and no cookie.

Read-only for everyone: the page polls the public status once a second. Given the admin token,
it keeps it in the tab's sessionStorage (its own origin only: other servers on the same host, on
other ports, would be sent a cookie but cannot read that) and sends it as a bearer header, never in
a URL: for the event stream too, read with fetch (EventSource cannot send a header). No cookie
means no ambient credential, so no other page can make a browser load or unload.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web

# The page runs only its own files: no inline script, no other origin, no framing (its buttons
# load and unload), and no form ever submits (the token field must never become a query string).
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _file(name: str, content_type: str) -> web.Response:
    return web.Response(body=_static(name), content_type=content_type, charset="utf-8", headers=HEADERS)


async def get_page(request: web.Request) -> web.Response:
    return _file("dashboard.html", "text/html")


async def get_script(request: web.Request) -> web.Response:
    return _file("dashboard.js", "text/javascript")


async def get_style(request: web.Request) -> web.Response:
    return _file("dashboard.css", "text/css")
