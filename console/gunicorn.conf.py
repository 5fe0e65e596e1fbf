"""gunicorn settings for the console: one process, many threads, the worker thread once.

The queue worker, the inbox watcher, the DICOM receiver (which owns its port)
and the SSE fan-out live in the process, so the console runs exactly one
gunicorn worker process (``gthread``); its threads serve requests, and each
open screen's ``/api/stream`` holds one thread. The background threads start in
``post_worker_init``, after the fork, in that one process; a DICOM port that is
taken stops the boot ("Worker failed to boot", exit 3) instead of running half
a console.

    gunicorn -c console/gunicorn.conf.py
    HEMOTRIAGE_CONSOLE_BIND=0.0.0.0:5000 gunicorn -c console/gunicorn.conf.py
"""

import os
import signal

from client.constants import DEFAULT_CONSOLE_PORT, ENV_PREFIX

wsgi_app = "console:create_app()"
bind = os.environ.get(f"{ENV_PREFIX}CONSOLE_BIND", f"127.0.0.1:{DEFAULT_CONSOLE_PORT}")
worker_class = "gthread"
# One process: the queue, the inbox watcher, the DICOM port and the SSE broker are not shared.
workers = 1
# Requests plus one per open screen (SSE); raise for many screens.
threads = int(os.environ.get(f"{ENV_PREFIX}CONSOLE_THREADS", "32"))
# Uploads of whole series take a while on slow links.
timeout = 120
graceful_timeout = 30
keepalive = 5
# Never preload: the app (and its SQLite connections) is built after the fork.
preload_app = False
accesslog = "-"
# No query strings in the access log ("%(U)s", not "%(r)s"); they never carry PHI, but stay safe.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'

logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        # pynetdicom narrates every association and C-STORE at INFO; console.dicom_node and
        # console.ingest log what matters (listening, refusals, what was stored).
        "pynetdicom": {"level": "WARNING"},
    },
}


def post_worker_init(worker):
    """Start the DICOM receiver, queue worker and inbox watcher in the (only) worker process.

    Also end the open SSE streams as soon as the worker is told to stop
    (SIGTERM: graceful; SIGINT/SIGQUIT: ``worker_int``). A stream never ends
    by itself, so otherwise every stop would wait out ``graceful_timeout`` and
    end with a SIGKILL. gunicorn has no hook for SIGTERM in the worker, so its
    handler is wrapped here, after gunicorn installed it.
    """
    from console.services import EXTENSION_KEY

    services = worker.wsgi.extensions[EXTENSION_KEY]
    services.start()
    graceful_exit = signal.getsignal(signal.SIGTERM)

    def end_streams_then_exit(signum, frame):
        services.broker.close()
        graceful_exit(signum, frame)

    signal.signal(signal.SIGTERM, end_streams_then_exit)


def worker_int(worker):
    """Ctrl-C / SIGQUIT in the worker: end the SSE streams before it exits."""
    from console.services import EXTENSION_KEY

    app = getattr(worker, "wsgi", None)  # absent when the signal comes during boot
    if app is not None and hasattr(app, "extensions"):
        app.extensions[EXTENSION_KEY].broker.close()


def worker_exit(server, worker):
    """Let the current batch finish and stop the background threads.

    gunicorn also calls this in the master for a worker that died on its own;
    there is no app there (``preload_app`` is off), so nothing to stop.
    """
    from console.services import EXTENSION_KEY

    app = getattr(worker, "wsgi", None)
    if app is not None and hasattr(app, "extensions"):
        app.extensions[EXTENSION_KEY].stop()
