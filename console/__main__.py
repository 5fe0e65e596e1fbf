"""Command line of the console: database, accounts, API tokens and the retention purge.

    python -m console init-db
    python -m console create-admin --username admin
    python -m console create-user --username nurse --role clinician
    python -m console create-token --username admin --name pacs-bridge   # upload-only
    python -m console revoke-token --name pacs-bridge
    python -m console purge                                              # RETENTION_DAYS

The commands are Flask's CLI on :func:`console.create_app`, so ``HEMOTRIAGE_*``
variables configure them exactly as they configure the served app. Flask's
default ``run`` (the development server) is left out on purpose: the console
is served by gunicorn (``console/gunicorn.conf.py``), which also starts the
queue worker.
"""

from __future__ import annotations

import logging.config

from flask.cli import FlaskGroup

from console import create_app


def main() -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
            "root": {"level": "INFO", "handlers": ["stderr"]},
        }
    )
    FlaskGroup(
        create_app=create_app,
        add_default_commands=False,
        add_version_option=False,
        help="HemoTriage console commands.",
    )(prog_name="python -m console")


if __name__ == "__main__":
    main()
