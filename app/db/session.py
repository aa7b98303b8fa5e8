"""Engine and session factories.

SQLite runs in WAL mode with a busy timeout so readers never wait on the workers. Worker
transactions take SQLite's write lock up front (BEGIN IMMEDIATE): a transaction that
reads and later writes would otherwise fail at once with "database is locked" when
another writer got in between, instead of waiting its turn.
"""

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


def build_engine(database_url: str) -> Engine:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        options = {}
        if url.get_driver_name() == "psycopg2":
            # Guarded UPDATEs of many outcomes at once go in pages (psycopg2's
            # execute_batch), not one round trip a row.
            options["executemany_mode"] = "values_plus_batch"
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, **options)

    if url.database and url.database != ":memory:":
        from pathlib import Path

        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={
            "check_same_thread": False,
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
        },
        pool_size=20,
        max_overflow=20,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Let SQLAlchemy, not the driver, decide when a transaction begins.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        immediate = connection.get_execution_options().get("sqlite_begin_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def reader_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def writer_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for work that writes: takes the SQLite write lock at BEGIN."""
    return sessionmaker(engine.execution_options(sqlite_begin_immediate=True), expire_on_commit=False)
