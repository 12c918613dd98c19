"""Someone else's app that uses the queue: its own task kind, its own pages.

From this folder, after ``pip install "flask-live-queue[server]"``::

    gunicorn -c gunicorn.conf.py    # http://127.0.0.1:8000/, the dashboard at /queue/

Settings come from the environment with Flask's prefix, FLASK_QUEUE_WORKERS=4
or FLASK_QUEUE_URL=sqlite:///queue.db; the first request starts the workers.
"""

import logging
import time

from flask import Flask, current_app, redirect, render_template, request, url_for

from dashboard import Int, QueueError, QueueExtension, Registry, Str, current_queue
from dashboard.web import bp as dashboard_bp

registry = Registry()  # this app's task kinds; only these can run


@registry.task("send_report", params={"user_id": Int(1, 10**9), "fmt": Str(choices=("pdf", "csv"))})
def send_report(ctx, user_id, fmt="pdf"):
    """Builds one user's report, a row at a time."""
    rows = 20
    for row in range(1, rows + 1):
        if ctx.cancelled:  # stop early when asked
            return
        time.sleep(0.05)  # the real work; a Flask app context is active
        ctx.progress(row / rows, f"row {row} of {rows}")
    current_app.logger.info("report for user %d is ready (%s)", user_id, fmt)


queue_ext = QueueExtension(registry=registry)


def create_app(test_config=None):
    logging.basicConfig(level=logging.INFO)  # the queue logs what it does at INFO
    app = Flask(__name__)
    app.config["QUEUE_WORKERS"] = 2  # any QUEUE_ setting from the README's table
    app.config.from_prefixed_env()  # FLASK_QUEUE_WORKERS=4, FLASK_QUEUE_URL=...
    if test_config:
        app.config.update(test_config)
    queue_ext.init_app(app)
    app.register_blueprint(dashboard_bp, url_prefix="/queue")  # the dashboard, if you want it

    @app.get("/")
    def home():
        return render_template("reports/home.html", users=(1, 2, 42))

    @app.post("/reports/<int:user_id>")
    def order_report(user_id):
        try:
            task_id = current_queue.submit(
                "send_report", user_id=user_id, fmt=request.form.get("fmt", "pdf")
            )
        except QueueError as exc:  # says what is wrong; .status is the HTTP status for it
            return str(exc), exc.status
        return redirect(url_for("dashboard.task_detail", task_id=task_id), 303)

    return app
