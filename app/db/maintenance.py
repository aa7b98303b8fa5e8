"""Keeping PostgreSQL's planner statistics in step with bulk uploads."""

import logging
import threading

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)

# Autovacuum analyses a table only after about a minute and 10% new rows; until then a
# table that grew from empty by a big upload has no statistics, and the planner reads
# every image row for each status page instead of using the index.
ANALYZE_AFTER_ROWS = 10_000


def refresh_statistics_after_upload(engine: Engine, rows_inserted: int) -> None:
    if engine.dialect.name != "postgresql" or rows_inserted < ANALYZE_AFTER_ROWS:
        return

    def analyze() -> None:
        try:
            with engine.connect() as connection:
                connection.execute(text("ANALYZE products"))
                connection.execute(text("ANALYZE images"))
                connection.commit()
        except Exception:
            log.exception("ANALYZE after a large upload failed; autovacuum will catch up")

    threading.Thread(target=analyze, name="analyze-after-upload", daemon=True).start()
