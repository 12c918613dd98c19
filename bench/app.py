"""The app the HTTP benchmarks serve: the dashboard plus a bare route.

``/bare`` returns a short string from the same app, server and config as
the dashboard's own routes: the baseline each HTTP row is a ratio to.
``POST /bench/live-cache`` sets how long a rendered poll is reused
(``seconds=0``: every changed poll renders), for the row that times the
render itself.
"""

from __future__ import annotations

from flask import Flask, request

from dashboard import create_app as create_dashboard
from dashboard.web import live as views


def create_app() -> Flask:
    app = create_dashboard()

    @app.get("/bare")
    def bare() -> str:
        return "ok"

    @app.post("/bench/live-cache")
    def live_cache() -> str:
        previous = views.LIVE_CACHE_SECONDS
        views.LIVE_CACHE_SECONDS = float(request.form["seconds"])
        return str(previous)

    return app
