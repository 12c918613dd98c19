"""A local Sphinx extension: the settings table, drawn from ``dashboard.config.SETTINGS``.

A page puts the line ``<!-- queue-settings -->`` where the table goes; at build
time it becomes one row per setting (key, default, what it does), so the docs
and the code cannot disagree. Each setting's doc is Markdown: its links are
written relative to ``docs/`` (``[Monitoring](monitoring.md#monitoring)``) and
rewritten here for the page that shows them, so myst-parser checks each one and
a link to a page or heading that does not exist fails the build (``-W -n``).

:func:`settings_markdown` needs no Sphinx: the tests call it.
"""

from __future__ import annotations

import posixpath
import re

PLACEHOLDER = "<!-- queue-settings -->"

#: ``[text](page.md#anchor)``, a link to a page of the docs.
_DOCS_LINK = re.compile(r"\]\(((?![a-z]+://)[^)#\s]+\.md)(#[^)\s]*)?\)")


def _default(value: object) -> str:
    return f"`{value}`" if value != "" else "(empty)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_markdown(page: str = "reference/settings") -> str:
    """The settings as a Markdown table, its links made relative to ``page``
    (a docname: a path under ``docs/`` without ``.md``)."""
    from dashboard.config import SETTINGS

    here = posixpath.dirname(page)

    def relink(match: re.Match[str]) -> str:
        return f"]({posixpath.relpath(match.group(1), here or '.')}{match.group(2) or ''})"

    lines = ["| key | default | meaning |", "|---|---|---|"]
    for setting in SETTINGS:
        doc = _DOCS_LINK.sub(relink, _cell(setting.doc))
        lines.append(f"| `{setting.key}` | {_default(setting.default)} | {doc} |")
    return "\n".join(lines) + "\n"


def _fill(app, docname: str, source: list[str]) -> None:
    if PLACEHOLDER in source[0]:
        source[0] = source[0].replace(PLACEHOLDER, settings_markdown(docname))


def setup(app):  # run by sphinx-build
    app.connect("source-read", _fill)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


def http_app():
    """The demo app, for ``autoflask`` to read its URL map: no worker threads, no
    scheduler, no signal handlers (nothing runs while Sphinx builds)."""
    from dashboard import create_app

    return create_app({"QUEUE_WORKERS": 0, "QUEUE_SCHEDULES": False,
                       "QUEUE_HANDLE_SIGNALS": False})
