from fastapi import APIRouter
from sqlalchemy import text

from app.api.deps import RunnerDep, SessionDep
from app.errors import ServiceUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The process is up, its database answers and its storage takes images")
def readyz(session: SessionDep, runner: RunnerDep) -> dict[str, str]:
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:
        raise ServiceUnavailable(f"the database does not answer: {exc.__class__.__name__}") from exc
    transient_failure = runner.transient_failure()
    if transient_failure is not None:
        raise ServiceUnavailable(
            f"images wait to be retried after a transient failure ({transient_failure})",
            transient_failure=transient_failure,
        )
    return {"status": "ready"}
