"""The package as someone else gets it: built, installed, used by an app of its own.

The sdist is built from this checkout, the wheel from the unpacked sdist (so
the sdist holds what the wheel needs), the wheel installed with its
``server`` extra into a fresh virtualenv outside the repository, and
``examples/reports`` copied out and served by that virtualenv's gunicorn.
Nothing here can reach the checkout's ``dashboard``: every command runs
outside the repository, without PYTHONPATH.

The build uses the hatchling pinned in requirements-dev.txt (no build
isolation, so no download); the install takes Flask and gunicorn from the
package index, or pip's cache, at the versions requirements.txt pins.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tomllib
import urllib.parse
import zipfile
from pathlib import Path
from typing import Mapping

import pytest

from servers import HOST, Server, free_port, server_env
from support import wait_for

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "reports"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DIST = PROJECT["name"].replace("-", "_")
VERSION = PROJECT["version"]

#: Deadlines that only bound a failure; a passing run takes a small part of them.
STEP_TIMEOUT = 120.0
WAIT = 30.0

#: Files the dashboard cannot work without, as they are laid out in the wheel.
MUST_SHIP = [
    "dashboard/__init__.py",
    "dashboard/web/blueprint.py",
    "dashboard/templates/dashboard/base.html",
    "dashboard/templates/dashboard/index.html",
    "dashboard/static/dashboard.css",
    "dashboard/static/dashboard.js",
    "dashboard/static/favicon.svg",
    "dashboard/static/htmx/htmx.min.js",
    "dashboard/static/htmx/ext/hx-ptag.min.js",
    "dashboard/static/htmx/LICENSE",
    f"{DIST}-{VERSION}.dist-info/licenses/LICENSE",
]


#: Environment that could let the checkout's package, or another Python's, in.
_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")


def _clean_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in _ENV_DROP}


def _run(args: list[str], cwd: Path, what: str) -> str:
    """Run a command to its end; fail naming ``what`` with its output if it fails."""
    try:
        done = subprocess.run(args, cwd=cwd, env=_clean_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{what}: still running after {STEP_TIMEOUT:g}s: {args}") from exc
    if done.returncode != 0:
        raise AssertionError(
            f"{what} failed ({done.returncode}): {args}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The sdist built from the checkout and the wheel built from that sdist."""
    try:
        import hatchling  # noqa: F401
    except ImportError:
        pytest.fail("the build backend is missing: hatchling is pinned in requirements-dev.txt "
                    "(`make test` installs it)")
    out = tmp_path_factory.mktemp("dist")
    build_sdist = "import sys, hatchling.build as b; print(b.build_sdist(sys.argv[1]))"
    name = _run([sys.executable, "-c", build_sdist, str(out)], ROOT,
                "building the sdist").strip().splitlines()[-1]
    sdist = out / name
    unpacked = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    (source,) = unpacked.iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(out), str(source)], unpacked, "building the wheel from the sdist")
    return {"sdist": sdist, "wheel": out / f"{DIST}-{VERSION}-py3-none-any.whl"}


def _files(folder: str) -> list[str]:
    """The checkout's files under ``folder``, relative to it."""
    base = ROOT / folder
    return sorted(str(p.relative_to(base)) for p in base.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def test_the_wheel_holds_the_package_its_templates_and_static_files_only(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(f"{DIST}-{VERSION}.dist-info/METADATA").decode()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"dashboard", f"{DIST}-{VERSION}.dist-info"}, sorted(tops)
    for name in MUST_SHIP:
        assert name in names, name
    for folder in ("templates", "static"):
        for relative in _files(folder):
            assert f"dashboard/{folder}/{relative}" in names, f"{folder}/{relative} not in wheel"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]

    assert "License-Expression: MIT" in metadata
    assert "Requires-Python: >=3.11" in metadata
    requires = re.findall(r"^Requires-Dist: (.*)$", metadata, re.M)
    assert not [r for r in requires if r.startswith("gunicorn") and "extra ==" not in r], \
        "gunicorn is the server extra's, not a dependency of the library"
    assert {e for e in re.findall(r"^Provides-Extra: (.*)$", metadata, re.M)} >= {
        "server", "redis", "metrics"}


def test_the_sdist_holds_what_the_wheel_is_built_from(built):
    with tarfile.open(built["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for folder in ("templates", "static"):
        for relative in _files(folder):
            assert f"{folder}/{relative}" in names, f"{folder}/{relative} not in the sdist"
    assert {"pyproject.toml", "README.md", "LICENSE", "dashboard/web/blueprint.py",
            "examples/reports/app.py", "docs/index.md", "docs/examples/quickstart.py",
            "docs/conf.py", "docs/screenshot.png"} <= names
    assert not [n for n in names if n.startswith("docs/_build/")]
    assert not [n for n in names if n.startswith((".venv/", "instance/", ".git/"))]


def _http(port: int, method: str, path: str, form: dict[str, str] | None = None
          ) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        headers = {}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_the_example_app_runs_from_the_wheel_in_a_fresh_virtualenv(built, tmp_path):
    # A venv without pip of its own (made in a blink); the test's pip installs into it.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path,
         "creating the virtualenv")
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
          "--constraint", str(ROOT / "requirements.txt"), f"{built['wheel']}[server]"],
         tmp_path, "installing the wheel with its server extra")

    where = _run([str(python), "-c",
                  "import sysconfig, dashboard, dashboard.web as v; "
                  "print(sysconfig.get_paths()['purelib']); print(dashboard.__file__); "
                  "print(v.bp.template_folder); print(v.bp.static_folder)"],
                 tmp_path, "importing the installed package").splitlines()
    site, module, templates, static = (Path(line) for line in where[-4:])
    assert site.is_relative_to(venv), site
    assert module == site / "dashboard" / "__init__.py", "the package came from elsewhere"
    assert templates == site / "dashboard" / "templates" and (templates / "dashboard" / "index.html").is_file()
    assert static == site / "dashboard" / "static"

    app_dir = tmp_path / "reports"
    shutil.copytree(EXAMPLE, app_dir, ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    # gunicorn 27's control socket sits at one path per user; a test must not take it.
    server = Server("example", [str(venv / "bin" / "gunicorn"), "-c", "gunicorn.conf.py",
                                "--no-control-socket"],
                    tmp_path / "example.log", _clean_env(server_env({"BIND": f"{HOST}:{port}"})),
                    port, cwd=app_dir)
    server.start()
    try:
        _exercise(server, port)
        # No server hooks: SIGTERM stops it cleanly, the queue's exit-time shutdown included.
        server.send(signal.SIGTERM)
        assert server.wait_exit(WAIT) == 0, server.log_tail()
        assert "shutdown: done" in server.log(), server.log_tail()
    finally:
        server.stop()


def _exercise(server: Server, port: int) -> None:
    def home():
        if server.exited():
            raise AssertionError(f"the example exited before it answered:\n{server.log_tail()}")
        try:
            return _http(port, "GET", "/")
        except OSError:
            return None

    status, headers, body = wait_for(home, WAIT, f"the example answering on port {port}", 0.05)
    assert status == 200, body
    assert b'action="/reports/42"' in body
    # The app's own pages are its own: the dashboard's headers stay on its routes.
    for name in ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options"):
        assert name not in headers, name

    # Ordered from the app's own view, run by the queue, shown on the dashboard.
    status, headers, body = _http(port, "POST", "/reports/42", {"fmt": "csv"})
    assert status == 303, body
    task_id = int(re.fullmatch(r"/queue/tasks/(\d+)", headers["Location"])[1])

    def finished():
        status, _, body = _http(port, "GET", f"/queue/api/tasks/{task_id}")
        assert status == 200, body
        info = json.loads(body)
        return info if info["state"] not in ("queued", "running") else None

    try:
        info = wait_for(finished, WAIT, f"task {task_id} finished")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log:\n{server.log_tail()}") from None
    assert info["state"] == "done", info
    assert info["params"] == {"user_id": 42, "fmt": "csv"} and info["progress"] == 1.0
    assert "report for user 42 is ready (csv)" in server.log()

    status, headers, body = _http(port, "GET", "/queue/")
    assert status == 200 and "Content-Security-Policy" in headers
    assert b'id="queue-depth" class="big">0<' in body
    assert f'id="task-{task_id}"'.encode() in body
    assert _http(port, "GET", f"/queue/tasks/{task_id}")[0] == 200  # where the order led

    for path, source in (("/queue/static/dashboard.css", "static/dashboard.css"),
                         ("/queue/static/htmx/htmx.min.js", "static/htmx/htmx.min.js")):
        status, _, body = _http(port, "GET", path)
        assert status == 200, path
        assert body == (ROOT / source).read_bytes(), f"{path} differs from {source}"

    status, _, body = _http(port, "POST", "/reports/42", {"fmt": "doc"})
    assert status == 400 and b"fmt must be one of: pdf, csv" in body
