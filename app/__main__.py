"""`python -m app`: apply migrations, then serve on HOST:PORT (what `make run` does)."""

import uvicorn

from app.config import settings_or_exit
from app.db.migrate import upgrade_to_head
from app.logs import configure_logging, secrets_of


def main() -> None:
    settings = settings_or_exit()
    upgrade_to_head(settings.database_url)
    # After the migrations: Alembic's env.py installs logging of its own (alembic.ini).
    configure_logging(settings.log_format, settings.log_level, secrets=secrets_of(settings))
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
