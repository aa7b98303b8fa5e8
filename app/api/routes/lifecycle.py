"""Cancelling, retrying and deleting a request (app/services/lifecycle.py)."""

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Form, Query, Response

from app.api.deps import (
    LedgerDep,
    ProcessingRequestDep,
    ReaderSessionsDep,
    RunnerDep,
    SettingsDep,
    StorageDep,
    WriterSessionDep,
    WriterSessionsDep,
    after_commit,
)
from app.api.image_errors import parse_error_codes
from app.api.routes.problems import PROBLEM_RESPONSES
from app.api.schemas import RequestSummary, RetryAccepted
from app.services.lifecycle import (
    DELETE_CHUNK_ROWS,
    cancel_request,
    cancel_the_rest,
    delete_request,
    finish_deleting,
    more_to_cancel,
    retry_failed_images,
)
from app.services.results import get_request

router = APIRouter(tags=["batches"], responses=PROBLEM_RESPONSES)

CONFLICT = {
    "description": "the request has already finished (cancel), is still running (retry, delete) "
    "or was cancelled (retry)",
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
        "is `cancelling` (no image of it is started any more; a large one's images are "
        "cancelled in batches in the background) and "
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
    background: BackgroundTasks,
) -> RequestSummary:
    cancellation = cancel_request(ledger, request)
    runner.cancel(request.request_id)
    if cancellation.event_id is not None:
        runner.notify_webhooks()
    if more_to_cancel(cancellation):
        request_pk, after_image_id = request.id, cancellation.last_image_id

        def cancel_rest() -> None:
            if cancel_the_rest(ledger, request_pk, after_image_id):
                runner.notify_webhooks()

        background.add_task(cancel_rest)
    with sessions() as session:
        fresh = get_request(session, request.request_id, None)
        return RequestSummary.of(fresh, settings.base_url)


CODES_DESCRIPTION = (
    "error codes of the images to retry, e.g. `http_404,http_429`; all failed images when not given"
)


@router.post(
    "/requests/{request_id}/retry",
    status_code=202,
    response_model=RetryAccepted,
    responses={409: CONFLICT},
    summary="Retry the failed images of a finished request",
    description=(
        "The failed images of a finished request (those with one of the error codes in "
        "`codes`, a form field or query parameter, or all) go back to pending, and rows "
        "naming the same URL follow them. The request is `processing` again at once, "
        "finishes once more when they are done, and its webhook fires again with a new "
        "`webhook-id`; the result CSV then holds the new outputs. A request with no such "
        "failed image answers 202 and is left as it is (`retried_images: 0`). An unknown "
        "code is a 422 naming it; a request still running, or cancelled, is a 409."
    ),
)
def retry_failed(
    request: ProcessingRequestDep,
    session: WriterSessionDep,
    ledger: LedgerDep,
    runner: RunnerDep,
    settings: SettingsDep,
    codes: Annotated[str | None, Query(description=CODES_DESCRIPTION)] = None,
    form_codes: Annotated[str | None, Form(alias="codes", description=CODES_DESCRIPTION)] = None,
) -> RetryAccepted:
    error_codes = parse_error_codes(" ".join(filter(None, (codes, form_codes))))
    retry = retry_failed_images(session, ledger, request, error_codes)
    if retry.retried_images:
        request_pk = request.id
        after_commit(session, lambda: runner.dispatch(request_pk))
    fresh = get_request(session, request.request_id, None)
    return RetryAccepted.of(fresh, settings.base_url, retried_images=retry.retried_images)


@router.delete(
    "/requests/{request_id}",
    status_code=204,
    response_class=Response,
    responses={
        202: {
            "description": "a large request: it is `deleting`, and gone once its rows and outputs are",
            "model": RequestSummary,
        },
        409: CONFLICT,
    },
    summary="Delete a finished request, its outputs and its webhook log",
    description=(
        "Removes the request's rows, output images, webhook events and deliveries and its "
        "Idempotency-Key. Its status, download and output URLs answer 404 afterwards. A "
        "request still running is a 409: cancel it first. A request of more than "
        f"{DELETE_CHUNK_ROWS} rows (products and images) answers 202 at once with its "
        "status `deleting`: it is removed in batches in the background, and its status "
        "answers 404 once it is gone."
    ),
)
def delete(
    request: ProcessingRequestDep,
    sessions: WriterSessionsDep,
    reader_sessions: ReaderSessionsDep,
    storage: StorageDep,
    settings: SettingsDep,
    background: BackgroundTasks,
) -> Response:
    if delete_request(sessions, storage, request):
        return Response(status_code=204)
    background.add_task(finish_deleting, sessions, storage, request.id, request.request_id)
    with reader_sessions() as session:
        fresh = get_request(session, request.request_id, None)
        summary = RequestSummary.of(fresh, settings.base_url)
    return Response(summary.model_dump_json(), status_code=202, media_type="application/json")
