"""The dashboard: a blueprint to mount where an app wants it.

``app.register_blueprint(bp, url_prefix="/queue")``. Its modules, each a
concern: :mod:`.blueprint` (the guard, headers, filters), :mod:`.pages`,
:mod:`.live` (polled regions and their caches), :mod:`.controls` (forms),
:mod:`.api` (JSON), :mod:`.metrics` (Prometheus), :mod:`.operator` (finding
tasks, acting on many, each kind's health; views read by :mod:`.search`), over
:mod:`.actions` and :mod:`.answers`. It talks to the
queue through the :class:`~dashboard.backend.Backend` seam only.
"""

from . import api, controls, live, metrics, operator, pages  # noqa: F401  each registers its routes on bp
from .blueprint import bp

__all__ = ["bp"]
