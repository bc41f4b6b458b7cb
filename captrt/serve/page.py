"""The web page of `captrt serve`: GET / and its script and stylesheet under /ui/.

The files ship as package data (captrt/serve/ui/); nothing is fetched from another origin. Every
response carries a Content-Security-Policy that allows only this origin's scripts and styles (no
inline code). The routes are not part of the API, so they stay out of the OpenAPI schema.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import Response

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
# URL path -> (file under captrt/serve/ui/, media type)
ASSETS = {"/": ("index.html", "text/html"), "/ui/app.js": ("app.js", "text/javascript"),
          "/ui/style.css": ("style.css", "text/css")}


@cache
def asset(name: str) -> bytes:
    """The bytes of one packaged UI file (read once)."""
    return (files("captrt.serve") / "ui" / name).read_bytes()


def _handler(name: str, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def get() -> Response:
        return Response(asset(name), media_type=media_type, headers=HEADERS)
    return get


def ui_router() -> APIRouter:
    """The page's routes, hidden from the OpenAPI schema."""
    router = APIRouter(include_in_schema=False)
    for path, (name, media_type) in ASSETS.items():
        router.add_api_route(path, _handler(name, media_type), methods=["GET"])
    return router
