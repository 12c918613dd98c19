"""gunicorn settings for the example: ``gunicorn -c gunicorn.conf.py`` in this folder.

One process: the in-memory queue lives in it, so one process means one queue
(with FLASK_QUEUE_URL=sqlite:///queue.db several can share one). Its threads
serve the pages; the queue's own threads run the tasks, started by the first
request the process serves. No server hooks are needed: on SIGTERM the queue
stops taking work and running tasks get QUEUE_SHUTDOWN_TIMEOUT to finish.
"""

import os

wsgi_app = "app:create_app()"
bind = [os.environ.get("BIND", "127.0.0.1:8000")]
workers = 1
worker_class = "gthread"
threads = 8
# Longer than QUEUE_SHUTDOWN_TIMEOUT (10 s unless set), or a stop cuts running tasks off.
graceful_timeout = 15
