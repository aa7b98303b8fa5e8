"""Apply Alembic migrations programmatically (the schema's only source)."""

from alembic.config import Config

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
