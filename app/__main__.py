"""`python -m app`: apply migrations, then serve on HOST:PORT (what `make run` does)."""

import logging

import uvicorn

from app.config import settings_or_exit
from app.db.migrate import upgrade_to_head


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_or_exit()
    upgrade_to_head(settings.database_url)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        proxy_headers=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
    )


if __name__ == "__main__":
    main()
