"""Cancelling and deleting a request (app/services/lifecycle.py)."""

from fastapi import APIRouter, Response

from app.api.deps import (
    LedgerDep,
    ProcessingRequestDep,
    ReaderSessionsDep,
    RunnerDep,
    SettingsDep,
    StorageDep,
    WriterSessionsDep,
)
from app.api.routes.problems import PROBLEM_RESPONSES
from app.api.schemas import RequestSummary
from app.services.lifecycle import cancel_request, delete_request
from app.services.results import get_request

router = APIRouter(tags=["batches"], responses=PROBLEM_RESPONSES)

CONFLICT = {
    "description": "the request has already finished (cancel) or is still running (delete)",
    "content": {"application/problem+json": {}},
}


@router.post(
    "/requests/{request_id}/cancel",
    status_code=202,
    response_model=RequestSummary,
    responses={409: CONFLICT},
    summary="Cancel a request: images not yet started are never fetched",
    description=(
        "Images not yet started become `cancelled`; images in flight finish. The request "
        "ends `cancelled` once none is in flight (at once if none was), its webhook fires "
        'with `"status": "cancelled"`, and its result CSV holds what finished. Cancelling '
        "a cancelled request again answers 202; one that finished otherwise, 409."
    ),
)
def cancel(
    request: ProcessingRequestDep,
    ledger: LedgerDep,
    sessions: ReaderSessionsDep,
    runner: RunnerDep,
    settings: SettingsDep,
) -> RequestSummary:
    cancellation = cancel_request(ledger, request)
    runner.cancel(request.request_id)
    if cancellation.event_id is not None:
        runner.notify_webhooks()
    with sessions() as session:
        fresh = get_request(session, request.request_id, None)
        return RequestSummary.of(fresh, settings.base_url)


@router.delete(
    "/requests/{request_id}",
    status_code=204,
    response_class=Response,
    responses={409: CONFLICT},
    summary="Delete a finished request, its outputs and its webhook log",
    description=(
        "Removes the request's rows, output images, webhook events and deliveries and its "
        "Idempotency-Key. Its status, download and output URLs answer 404 afterwards. A "
        "request still running is a 409: cancel it first."
    ),
)
def delete(request: ProcessingRequestDep, sessions: WriterSessionsDep, storage: StorageDep) -> Response:
    delete_request(sessions, storage, request)
    return Response(status_code=204)
