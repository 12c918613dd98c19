"""The README is part of the product: its table and its example must match the code."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from flask import Flask

from dashboard import Int, QueueExtension, Registry, Str, current_queue, get_queue
from dashboard.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_config_table_lists_every_setting_with_its_default():
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| `([^`]*)` \|", README, re.M))
    assert set(rows) == {s.key for s in SETTINGS}
    for setting in SETTINGS:
        assert rows[setting.key] == str(setting.default), setting.key


def test_readme_says_which_settings_may_not_exceed_others():
    """check_config refuses QUEUE_MAX_BATCH > QUEUE_MAX_QUEUED and QUEUE_WORKERS > QUEUE_MAX_WORKERS: say so."""
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| `[^`]*` \| (.*) \|$", README, re.M))
    assert "not be larger than `QUEUE_MAX_QUEUED`" in rows["QUEUE_MAX_BATCH"]
    assert "not more than `QUEUE_MAX_WORKERS`" in rows["QUEUE_WORKERS"]


def test_readme_gives_the_two_commands_first():
    commands = README.index("## Two commands")
    assert commands < README.index("## How it works")
    assert "make demo" in README[commands:] and "make test" in README[commands:]


def test_the_readme_shows_the_example_app_as_it_is():
    """The README's "Use it in your own app" shows examples/reports/app.py whole, and
    installs the package by its name: neither can drift from what is tested."""
    section = README[README.index("## Use it in your own app"):]
    section = section[:section.index("\n## ")]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, re.M | re.S)
    assert len(blocks) == 1, "one Python block: the example's file"
    assert blocks[0] == (ROOT / "examples" / "reports" / "app.py").read_text()
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert f'pip install "{name}[server]"' in section


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


def test_files_the_readme_links_to_exist():
    root = Path(__file__).resolve().parent.parent
    targets = re.findall(r"\]\(((?!https?://|#)[^)\s]+)\)", README)
    assert "docs/screenshot.png" in targets
    for target in targets:
        assert (root / target).exists(), target


def test_the_readme_documents_the_operators_view_where_people_look():
    """"Finding and fixing tasks" follows "Using the dashboard", shows its screenshot
    (docs/operator.png, made by tests/test_browser_operator.py), and every route and
    command of it is in the HTTP table and the terminal's table."""
    using, finding = README.index("## Using the dashboard"), README.index(
        "## Finding and fixing tasks")
    assert using < finding < README.index("## How it works")
    assert "](docs/operator.png)" in README[finding:README.index("## How it works")]
    http = README[README.index("## HTTP"):README.index("## Choosing a store")]
    for route in ("`GET /tasks`", "`GET /tasks/live`", "`GET /tasks/bulk`, `POST /tasks/bulk`",
                  "`GET /api/tasks`", "`POST /api/tasks/bulk`", "`GET /api/kinds`"):
        assert f"| {route} |" in http, route
    terminal = README[README.index("## From the terminal"):README.index("## Task features")]
    for command in ("| `find [", "| `bulk {retry,cancel,purge}", "| `kinds [--json]` |"):
        assert command in terminal, command
