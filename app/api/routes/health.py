from fastapi import APIRouter
from sqlalchemy import text

from app.api.deps import SessionDep
from app.api.errors import ServiceUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The process is up and its database answers")
def readyz(session: SessionDep) -> dict[str, str]:
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:
        raise ServiceUnavailable(f"the database does not answer: {exc.__class__.__name__}") from exc
    return {"status": "ready"}
