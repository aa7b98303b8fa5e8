"""Cancelling and deleting a request (app/services/lifecycle.py)."""

from fastapi import APIRouter, Request, Response

from app.api.deps import ProcessingRequestDep, RunnerDep, SettingsDep
from app.api.routes.problems import PROBLEM_RESPONSES
from app.api.schemas import RequestSummary
from app.services.batches import get_request
from app.services.lifecycle import cancel_request, delete_request

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
    request: ProcessingRequestDep, http_request: Request, runner: RunnerDep, settings: SettingsDep
) -> RequestSummary:
    state = http_request.app.state
    cancellation = cancel_request(state.ledger, request)
    runner.cancel(request.request_id)
    if cancellation.event_id is not None:
        runner.notify_webhooks()
    with state.sessions() as session:
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
def delete(request: ProcessingRequestDep, http_request: Request) -> Response:
    state = http_request.app.state
    delete_request(state.writer_sessions, state.storage, request)
    return Response(status_code=204)
