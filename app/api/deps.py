"""Request dependencies. Each request gets one session; the boundary commits or rolls back.

Dependencies that never block are `async def`: FastAPI runs a plain `def` dependency on
a thread of its pool, and each such hop is a thread switch that waits for the GIL while
the web process also claims and records images (it showed in the latency of status polls).
"""

import hashlib
import hmac
from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.models import ProcessingRequest
from app.errors import Unauthorized
from app.ledger.image_ledger import ImageLedger
from app.metrics import ServiceMetrics
from app.runners import Runner
from app.services.imports import Importer
from app.services.results import get_request
from app.storage import ImageStorage, OutputUrls

_AFTER_COMMIT = "after_commit"


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_runner(request: Request) -> Runner:
    return request.app.state.runner


async def get_importer(request: Request) -> Importer:
    return request.app.state.importer


async def get_ledger(request: Request) -> ImageLedger:
    return request.app.state.ledger


async def get_storage(request: Request) -> ImageStorage:
    return request.app.state.storage


async def get_output_urls(request: Request) -> OutputUrls:
    return request.app.state.output_urls


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_reader_sessions(request: Request) -> sessionmaker[Session]:
    """For work that needs sessions of its own: a response streamed after the request's
    session closed, or a read that must see another transaction's commit."""
    return request.app.state.sessions


async def get_writer_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.writer_sessions


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run `action` once the request's transaction has committed, never when it rolls
    back: work leaves only when a runner can read its rows."""
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


def _session_scope(factory) -> Iterator[Session]:
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        for action in session.info.pop(_AFTER_COMMIT, ()):
            action()


def get_session(request: Request) -> Iterator[Session]:
    yield from _session_scope(request.app.state.sessions)


def get_writer_session(request: Request) -> Iterator[Session]:
    """For requests that write: takes SQLite's write lock at BEGIN (see app.db.session)."""
    yield from _session_scope(request.app.state.writer_sessions)


async def get_owner(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str | None:
    return owner_of(request, settings)


def owner_of(request: Request, settings: Settings) -> str | None:
    """The caller's identity when API keys are configured: a digest of their key."""
    keys = settings.api_key_list
    if not keys:
        return None
    presented = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization", "")
    if not presented and authorization[:7].lower() == "bearer ":
        presented = authorization[7:].strip()
    if presented and any(hmac.compare_digest(presented.encode(), key.encode()) for key in keys):
        return hashlib.sha256(presented.encode()).hexdigest()[:32]
    raise Unauthorized(
        "send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


SettingsDep = Annotated[Settings, Depends(get_settings)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
ImporterDep = Annotated[Importer, Depends(get_importer)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
WriterSessionDep = Annotated[Session, Depends(get_writer_session, scope="function")]
OwnerDep = Annotated[str | None, Depends(get_owner)]
LedgerDep = Annotated[ImageLedger, Depends(get_ledger)]
StorageDep = Annotated[ImageStorage, Depends(get_storage)]
OutputUrlsDep = Annotated[OutputUrls, Depends(get_output_urls)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
ReaderSessionsDep = Annotated[sessionmaker[Session], Depends(get_reader_sessions)]
WriterSessionsDep = Annotated[sessionmaker[Session], Depends(get_writer_sessions)]


def get_processing_request(request_id: str, session: SessionDep, owner: OwnerDep) -> ProcessingRequest:
    return get_request(session, request_id, owner)


ProcessingRequestDep = Annotated[ProcessingRequest, Depends(get_processing_request)]
