"""The README and the docs are part of the product: their tables, examples and links
must match the code. (The examples themselves run in tests/test_docs_examples.py;
`make docs` checks every link and reference inside the site.)"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from flask import Flask

from dashboard import Int, QueueExtension, Registry, Str, current_queue, get_queue
from dashboard.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()

sys.path.insert(0, str(DOCS / "_ext"))
from queue_docs import settings_markdown  # noqa: E402  (docs/_ext is not a package)


def _slug(heading: str) -> str:
    """A heading's anchor, as GitHub and myst-parser make it."""
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.*)$", text, re.M)}


def test_the_settings_table_lists_every_setting_with_its_default():
    """The table in docs/reference/settings.md is generated from SETTINGS."""
    assert "<!-- queue-settings -->" in (DOCS / "reference" / "settings.md").read_text()
    table = settings_markdown()
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]*) \|", table, re.M))
    assert set(rows) == {s.key for s in SETTINGS}
    for setting in SETTINGS:
        shown = "(empty)" if setting.default == "" else f"`{setting.default}`"
        assert rows[setting.key] == shown, setting.key


def test_the_settings_table_says_which_settings_may_not_exceed_others():
    """check_config refuses QUEUE_MAX_BATCH > QUEUE_MAX_QUEUED and QUEUE_WORKERS > QUEUE_MAX_WORKERS: say so."""
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| [^|]* \| (.*) \|$", settings_markdown(), re.M))
    assert "not be larger than `QUEUE_MAX_QUEUED`" in rows["QUEUE_MAX_BATCH"]
    assert "not more than `QUEUE_MAX_WORKERS`" in rows["QUEUE_WORKERS"]


def test_the_settings_links_lead_to_a_heading_of_the_docs():
    """A setting's doc links to a page of docs/ and a heading on it; the table
    rewrites each link for the page that shows it."""
    links = [link for s in SETTINGS for link in re.findall(r"\]\(([^)]+)\)", s.doc)]
    assert links, "the settings link to the guides"
    for link in links:
        page, _, anchor = link.partition("#")
        assert (DOCS / page).is_file(), link
        assert anchor in _anchors(DOCS / page), link
    assert "](../stores.md#what-each-store-keeps)" in settings_markdown("reference/settings")
    assert "](stores.md#what-each-store-keeps)" in settings_markdown("index")


def test_readme_gives_the_two_commands_first():
    commands = README.index("## Two commands")
    assert commands < README.index("## How it works")
    assert "make demo" in README[commands:] and "make test" in README[commands:]


def test_the_readme_is_a_front_door():
    """Short, with the picture and a way into each part of the docs."""
    assert len(README.splitlines()) < 150
    for page in ("quickstart", "stores", "tasks", "dashboard", "operator", "servers", "security",
                 "cli", "monitoring", "rq", "performance", "changelog", "reference/settings",
                 "reference/http", "reference/cli", "reference/python"):
        assert f"](docs/{page}.md)" in README, page
    assert "make docs" in README


def test_the_readme_shows_the_quickstart_example_as_it_is():
    """The README's one Python block is docs/examples/quickstart.py, which
    tests/test_docs_examples.py runs; it installs the package by its name."""
    blocks = re.findall(r"^```python\n(.*?)^```$", README, re.M | re.S)
    assert len(blocks) == 1, "one Python block: the quickstart's file"
    assert blocks[0] == (DOCS / "examples" / "quickstart.py").read_text()
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert f'pip install "{name}[server]"' in README


def test_the_embedding_example_works_in_another_app():
    """What the README's "Use it in your own app" uses, on a registry of its own."""
    registry = Registry()
    done = []

    @registry.task("send_report", params={"user_id": Int(1, 10**9), "fmt": Str(choices=("pdf", "csv"))})
    def send_report(ctx, user_id, fmt="pdf"):
        for i in range(3):
            ctx.progress((i + 1) / 3, f"row {i + 1} of 3")
        done.append((user_id, fmt))

    from dashboard.web import bp

    app = Flask("someone_elses_app")
    app.config.update(QUEUE_WORKERS=0, QUEUE_HANDLE_SIGNALS=False, QUEUE_DEFAULT_KIND="send_report")
    QueueExtension(registry=registry).init_app(app)
    app.register_blueprint(bp, url_prefix="/queue")

    @app.post("/reports/<int:user_id>")
    def order_report(user_id):
        return {"id": current_queue.submit("send_report", user_id=user_id, fmt="csv")}, 202

    try:
        client = app.test_client()
        task_id = client.post("/reports/42").json["id"]
        assert get_queue(app).get(task_id).params == {"user_id": 42, "fmt": "csv"}
        page = client.get("/queue/")
        assert page.status_code == 200
        assert b'id="queue-depth" class="big">1<' in page.data
        assert b'href="/queue/static/dashboard.css"' in page.data
        assert b'hx-get="/queue/live?queue=' in page.data
        with client.get("/queue/static/dashboard.css") as css:
            assert css.status_code == 200
        assert get_queue(app).run_pending() == 1
        assert done == [(42, "csv")]
        bad = client.post("/queue/tasks", data={"kind": "send_report", "fmt": "doc"})
        assert bad.status_code == 303 and bad.headers["Location"].startswith("/queue/?refused=")
        shown = client.get(bad.headers["Location"])
        assert shown.status_code == 200 and b"fmt must be one of: pdf, csv" in shown.data
    finally:
        get_queue(app).shutdown()


def test_every_relative_link_in_the_readme_resolves():
    """Each link to a file of the repository names one that exists, and a link
    with an anchor names a heading of that page."""
    targets = re.findall(r"\]\(((?![a-z]+://|mailto:)[^)\s]+)\)", README)
    assert "docs/screenshot.png" in targets
    for target in targets:
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), target
        if anchor:
            assert anchor in _anchors(ROOT / path), target


def test_the_docs_document_the_operators_view_where_people_look():
    """"Finding and fixing tasks" follows "Using the dashboard" among the guides,
    shows its screenshot (docs/operator.png, made by tests/test_browser_operator.py),
    and every route and command of it is in the HTTP guide and the CLI guide."""
    index = (DOCS / "index.md").read_text()
    assert index.index("\ndashboard\n") < index.index("\noperator\n")
    assert "](operator.png)" in (DOCS / "operator.md").read_text()
    http = (DOCS / "http.md").read_text()
    for route in ("`GET /tasks`", "`GET /tasks/live`", "`GET /tasks/bulk`, `POST /tasks/bulk`",
                  "`GET /api/tasks`", "`POST /api/tasks/bulk`", "`GET /api/kinds`"):
        assert f"| {route} |" in http, route
    terminal = (DOCS / "cli.md").read_text()
    for command in ("| `find [", "| `bulk {retry,cancel,purge}", "| `kinds [--json]` |"):
        assert command in terminal, command


def test_every_guide_is_in_the_table_of_contents():
    """A page left out of the toctree is a page nobody finds (Sphinx warns too)."""
    index = (DOCS / "index.md").read_text()
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).with_suffix("").as_posix()
        if name != "index" and not name.startswith(("_build/", "examples/")):
            assert f"\n{name}\n" in index, name
