"""The chat page: `GET /` and `GET /chat` serve static/chat.html, `GET /static/chat.js|chat.css` its
script and style. Plain files shipped in the package (no build step); the page loads nothing from any
other host and talks only to this server's /v1 routes.

Every response carries a Content-Security-Policy that allows scripts and styles from this origin only
(no inline script, no eval), images and video from this origin and data:/blob: URLs (the user's own
attachments), and connections to this origin only; the page itself never parses text as HTML.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
FILES = {
    "chat.html": "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def add_page_routes(app: FastAPI) -> None:
    files = {name: _read(name) for name in FILES}  # read once: a few kB

    def serve(name: str) -> Response:
        return Response(files[name], media_type=FILES[name], headers=HEADERS)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return serve("chat.html")

    @app.api_route("/chat", methods=["GET", "HEAD"], include_in_schema=False)
    async def chat():
        return serve("chat.html")

    @app.api_route("/static/chat.js", methods=["GET", "HEAD"], include_in_schema=False)
    async def script():
        return serve("chat.js")

    @app.api_route("/static/chat.css", methods=["GET", "HEAD"], include_in_schema=False)
    async def style():
        return serve("chat.css")
