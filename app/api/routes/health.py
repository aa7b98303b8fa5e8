from fastapi import APIRouter
from sqlalchemy import exists, select, text
from sqlalchemy.orm import Session

from app.api.deps import RunnerDep, SessionDep
from app.api.errors import RETRY_AFTER_SECONDS, database_problem
from app.db.models import Image, ImageStatus
from app.errors import ServiceUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The process is up, its database answers and its storage takes images")
def readyz(session: SessionDep, runner: RunnerDep) -> dict[str, str]:
    retry_after = {"Retry-After": RETRY_AFTER_SECONDS}
    try:
        session.execute(text("SELECT 1"))
        transient_failure = runner.transient_failure()
        waiting = transient_failure is not None and images_wait_for_retry(session)
    except Exception as exc:
        raise ServiceUnavailable(
            f"the database does not answer ({database_problem(exc)})", headers=retry_after
        ) from exc
    if transient_failure is not None:
        # The failure may be the storage check of a process that runs no image (Celery's
        # API), or outlive the images it delayed (their request was deleted).
        detail = (
            f"images wait to be retried after a transient failure ({transient_failure})"
            if waiting
            else f"the outputs' storage does not take images ({transient_failure})"
        )
        raise ServiceUnavailable(detail, headers=retry_after, transient_failure=transient_failure)
    return {"status": "ready"}


def images_wait_for_retry(session: Session) -> bool:
    return bool(
        session.scalar(
            select(
                exists().where(
                    Image.status.in_((ImageStatus.PENDING, ImageStatus.PROCESSING)),
                    Image.retry_at.is_not(None),
                )
            )
        )
    )
