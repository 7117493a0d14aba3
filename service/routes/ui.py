"""/ui: the review page for people (static HTML, CSS and JavaScript; no build step, nothing fetched from outside)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service import auth
from service.errors import NotFound

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
MEDIA_TYPES = {"app.js": "text/javascript", "style.css": "text/css"}

# The page loads only its own files and talks only to this service: a browser refuses anything else.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(tags=["ui"], include_in_schema=False)


@router.get("/ui")
def page(_: auth.Public) -> FileResponse:
    """The review page: datasets, the review queue with explanations, labelling, calibration, entities."""
    return FileResponse(UI_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/ui/{asset}")
def asset(asset: str, _: auth.Public) -> FileResponse:
    """The page's script and style sheet (only those names: nothing else on disk is reachable)."""
    if asset not in MEDIA_TYPES:
        raise NotFound(f"No page asset {asset!r}; open /ui for the review page.")
    return FileResponse(UI_DIR / asset, media_type=f"{MEDIA_TYPES[asset]}; charset=utf-8", headers=HEADERS)
