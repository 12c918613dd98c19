"""The monitoring guide's signals example (docs/monitoring.md): every failure sent
to Sentry. tests/test_docs_examples.py runs it with a stand-in ``sentry_sdk``."""

from flask import Flask

from dashboard import Float, QueueExtension, Registry

registry = Registry()


@registry.task("divide", params={"by": Float(-1e9, 1e9)})
def divide(ctx, by):
    return 1 / by


def create_app(test_config=None):
    app = Flask(__name__)
    app.config.update(test_config or {})
    QueueExtension(app, registry=registry)
    report_failures_to_sentry(app)
    return app


# [signals]
import sentry_sdk
from dashboard import task_failed


def report_failures_to_sentry(app):
    @task_failed.connect_via(app)
    def report_failure(sender, task, error, exception=None, **extra):
        tags = {"task.kind": task.kind}
        about = {"task.id": task.id, "task.params": task.params, "task.attempts": task.attempts}
        if exception is not None:
            sentry_sdk.capture_exception(exception, tags=tags, extra=about)
        else:                              # a time limit, a result that could not be kept
            sentry_sdk.capture_message(f"task {task.id} ({task.kind}) failed: {error}",
                                       level="error", tags=tags, extra=about)
# [/signals]
