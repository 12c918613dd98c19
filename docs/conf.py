"""Sphinx configuration: `make docs` builds the site into docs/_build/html.

Nitpicky, with warnings as errors (the Makefile passes -W -n): a broken link or
reference fails the build. No network: intersphinx is not used, so the few
stdlib and third-party names the signatures show are listed in nitpick_ignore.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]

_project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

project = "flask-live-queue"
author = _project["authors"][0]["name"]
copyright = f"the {project} authors"
release = version = _project["version"]

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx_click",
    "sphinxcontrib.autohttp.flask",
    "queue_docs",  # docs/_ext/queue_docs.py: the settings table, from dashboard.config
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "examples", "_ext"]

myst_enable_extensions = ["colon_fence", "deflist"]
# README-style `[x](page.md#some-heading)` links: anchors for headings down to ###.
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"{project} {release}"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}

nitpicky = True
# Names from the standard library and the libraries we build on: without
# intersphinx (no network at build time) Sphinx cannot link them.
nitpick_ignore_regex = [
    (r"py:(class|exc|obj|data|func|meth)",
     r"(typing|collections\.abc|datetime|enum|threading|logging|concurrent\.futures"
     r"|contextlib|pathlib|types|random|abc|flask|werkzeug|click|blinker|rq|redis|sqlite3)\..*"),
    (r"py:class", r"(Any|Callable|Mapping|MutableMapping|Iterable|Iterator|Sequence"
                  r"|Flask|Blueprint|Response|datetime|timedelta|Path|Enum|str|int|float"
                  r"|bool|bytes|None|dict|list|tuple|set|frozenset|object|type"
                  r"|Exception|BaseException|TimeoutError|ValueError|KeyError)"),
    (r"py:exc", r"(TimeoutError|ValueError|KeyError|LookupError|RuntimeError)"),
    # The in-process backend's internals, which WorkQueue's constructor takes:
    # not part of the public API, so not documented.
    (r"py:class", r"(Store|TaskRecord|Runner|dashboard\.local\.queue\._Default)"),
]
