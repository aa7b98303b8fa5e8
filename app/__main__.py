"""`python -m app`: apply migrations, then serve on HOST:PORT (what `make run` does)."""

import logging

import uvicorn

from app.composition import storage_config
from app.config import settings_or_exit
from app.db.migrate import database_or_exit, upgrade_to_head
from app.logs import configure_logging, secrets_of
from app.storage import build_storage

log = logging.getLogger("app")


def main() -> None:
    settings = settings_or_exit()
    database_or_exit(settings.database_url)
    upgrade_to_head(settings.database_url)
    # After the migrations: Alembic's env.py installs logging of its own (alembic.ini).
    configure_logging(settings.log_format, settings.log_level, secrets=secrets_of(settings))
    # The API starts anyway (its pages and /readyz say what is wrong), but the operator
    # reads it here first rather than when every image waits.
    storage_problem = build_storage(storage_config(settings)).check()
    if storage_problem:
        log.error("storage check at start-up: %s", storage_problem)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        proxy_headers=False,
        # Our own access line (app/api/middleware.py) names the route, not the raw path.
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
    )


if __name__ == "__main__":
    main()
