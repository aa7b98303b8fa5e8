"""Apply Alembic migrations programmatically (the schema's only source), and say in one
line why a process cannot start when its database is missing or does not answer."""

from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from alembic import command
from app.config import PROJECT_ROOT


def alembic_config(database_url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    config.attributes["database_url"] = database_url
    return config


def upgrade_to_head(database_url: str) -> None:
    from app.db.session import build_engine

    build_engine(database_url).dispose()  # creates the SQLite file's folder if needed
    command.upgrade(alembic_config(database_url), "head")


def database_problem(database_url: str) -> str | None:
    """None when the database answers; otherwise one line saying what is wrong and, for a
    PostgreSQL database that does not exist, how to create it. Never the password."""
    from app.db.session import build_engine

    url = make_url(database_url)
    engine = build_engine(database_url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        missing = f'database "{url.database}" does not exist'
        if url.get_backend_name() == "postgresql" and url.database and missing in reason:
            options = " ".join(
                f"{flag} {value}"
                for flag, value in (("-h", url.host), ("-p", url.port), ("-U", url.username))
                if value
            )
            return (
                f"database {url.database} does not exist on {url.host or 'localhost'}: create it "
                f"with `createdb {options} {url.database}` (or CREATE DATABASE in psql), then start again"
            )
        where = url.render_as_string(hide_password=True)
        return f"the database {where} cannot be used: {reason}"
    finally:
        engine.dispose()
    return None


def database_or_exit(database_url: str) -> None:
    """For a process's entry point: stop with the one line database_problem gives."""
    problem = database_problem(database_url)
    if problem:
        raise SystemExit(f"the service cannot start: {problem}")
