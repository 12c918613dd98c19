"""gunicorn's gthread worker could hang on SIGQUIT/SIGINT for good: its handler
calls the thread pool's shutdown(), which takes the lock that the interrupted
main thread holds inside submit(). The worker then never left, its queue never
closed, and the master killed it after graceful_timeout (the SIGINT server test
failed so under load, now and then). gunicorn.conf.py's quit_safely leaves at
once when interrupted there. Shown here deterministically, with the lock held."""

from __future__ import annotations

import importlib.util
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def gunicorn_conf():
    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "gunicorn.conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_worker(pool):
    ints = []
    worker = SimpleNamespace(tpool=pool, alive=True,
                             cfg=SimpleNamespace(worker_int=ints.append))
    return worker, ints


def gunicorns_quit(worker):
    """What gthread's handle_quit does first: shut the pool down."""
    def quit(signum, frame):
        worker.tpool.shutdown(wait=False)
        raise SystemExit(0)
    return quit


def run_with_deadline(fn, seconds=5.0):
    outcome = {}

    def target():
        try:
            fn()
        except SystemExit as exc:
            outcome["exit"] = exc.code

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive(), outcome


def test_interrupted_inside_submit_the_worker_leaves_instead_of_waiting_for_ever():
    pool = ThreadPoolExecutor(1)
    worker, ints = fake_worker(pool)
    handler = gunicorn_conf().quit_safely(worker, gunicorns_quit(worker))
    with pool._shutdown_lock:  # as submit() holds it when the signal lands
        hung, outcome = run_with_deadline(lambda: handler(2, None))
    assert not hung, "the quit handler waited on the pool's lock"
    assert outcome == {"exit": 0} and worker.alive is False and ints == [worker]
    pool.shutdown()


def test_anywhere_else_gunicorns_own_quit_runs():
    pool = ThreadPoolExecutor(1)
    worker, ints = fake_worker(pool)
    handler = gunicorn_conf().quit_safely(worker, gunicorns_quit(worker))
    hung, outcome = run_with_deadline(lambda: handler(2, None))
    assert not hung and outcome == {"exit": 0}
    assert pool._shutdown and ints == []  # gunicorn's path: the pool was shut down
    assert not pool._shutdown_lock.locked()
