"""The web UI's presentation: Jinja2 templates, the static files (vendored htmx included), and the HTML rendering
of a session's events. The routes that serve it are in ``service.api.routes.ui`` and ``ui_auth``; docs/ui.md
describes the whole of it."""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles

from service.web.render import Templates

STATIC_DIR = Path(__file__).resolve().parent / "static"


class WebAssets:
    """What the UI routes share, built once per application: the templates and the static files."""

    def __init__(self) -> None:
        self.templates = Templates()
        self.static = StaticFiles(directory=STATIC_DIR)
