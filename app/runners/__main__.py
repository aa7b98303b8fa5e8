"""`python -m app.runners` (what `make worker` runs): check the settings and the
database, then become a Celery worker (exec, same PID) with a node name unique on this
host, so several workers run side by side on one machine; WORKER_NAME names it instead.
Extra arguments go to `celery worker` (e.g. `--loglevel DEBUG`)."""

import os
import sys

from app.config import settings_or_exit
from app.db.migrate import database_or_exit
from app.runners.celery_app import worker_settings_problem


def worker_command(worker_name: str, extra: list[str]) -> list[str]:
    # Celery expands %h to the host name; the PID is this process's, kept across exec.
    name = worker_name or f"worker-{os.getpid()}@%h"
    return [
        sys.executable,
        "-m",
        "celery",
        "--app",
        "app.runners.celery_worker",
        "worker",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        name,
        *extra,
    ]


def main() -> None:
    settings = settings_or_exit()
    problem = worker_settings_problem(settings)
    if problem:
        raise SystemExit(f"the worker cannot start: {problem}")
    database_or_exit(settings.database_url)
    command = worker_command(settings.worker_name, sys.argv[1:])
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
