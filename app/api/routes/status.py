from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import select

from app.api.deps import (
    OutputUrlsDep,
    OwnerDep,
    ProcessingRequestDep,
    RunnerDep,
    SessionDep,
    SettingsDep,
    WriterSessionDep,
    after_commit,
)
from app.api.html import accepts_html, render_page
from app.api.routes.problems import PROBLEM_RESPONSES
from app.api.schemas import (
    ProductResult,
    RequestList,
    RequestStatusOut,
    RequestSummary,
    WebhookDeliveryList,
    WebhookDeliveryOut,
    WebhookStatus,
)
from app.db.models import ProcessingRequest, WebhookDelivery, WebhookEvent
from app.errors import Conflict
from app.pipeline.options import stored_options
from app.services.results import (
    decode_cursor,
    encode_cursor,
    products_page,
    requests_page,
)
from app.webhooks.events import latest_event, redeliver

router = APIRouter(tags=["batches"], responses=PROBLEM_RESPONSES)

Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Cursor = Annotated[str | None, Query(description="next_cursor from the previous page")]


def _webhook_status(session, request: ProcessingRequest) -> WebhookStatus | None:
    # An event exists only once the request has finished (create_finished_event): status
    # polls of a running batch skip the query.
    finished = request.callback_url and request.completed_at is not None
    return WebhookStatus.of(request, latest_event(session, request.id) if finished else None)


@router.get(
    "/status/{request_id}",
    response_model=RequestStatusOut,
    summary="Status of a request",
)
def get_status(
    request: ProcessingRequestDep,
    session: SessionDep,
    settings: SettingsDep,
    output_urls: OutputUrlsDep,
    http_request: Request,
    limit: Limit = 100,
    cursor: Cursor = None,
    format: Annotated[
        Literal["json", "html"] | None,
        Query(description="json or html; by default browsers (Accept: text/html) get html"),
    ] = None,
) -> Response:
    page, next_id = products_page(session, request.id, after_id=decode_cursor(cursor), limit=limit)
    body = RequestStatusOut.of(
        request,
        settings.base_url,
        options=stored_options(
            request.options,
            default_quality=settings.jpeg_quality,
            default_progressive=settings.jpeg_progressive,
        ).as_dict(),
        webhook=_webhook_status(session, request),
        products=[ProductResult.of(item, output_urls) for item in page],
        next_cursor=encode_cursor(next_id) if next_id is not None else None,
    )
    wants_html = format == "html" or (format is None and accepts_html(http_request.headers.get("accept", "")))
    if wants_html:
        return _status_snapshot(http_request, body, limit, cursor)
    return json_response(body)


def _status_snapshot(request: Request, body: RequestStatusOut, limit: int, cursor: str | None) -> Response:
    """The status as it is now, for a browser sent to status_url; the request's page
    (/requests/{id}) is the one that follows progress."""
    query = {"limit": limit, **({"cursor": cursor} if cursor else {})}
    next_query = urlencode({"limit": limit, "cursor": body.next_cursor}) if body.next_cursor else None
    return render_page(
        request,
        "status_snapshot.html",
        {
            "page": "status",
            "body": body,
            "json_query": urlencode({**query, "format": "json"}),
            "next_query": next_query,
        },
    )


def json_response(body: BaseModel) -> Response:
    """Serialise an already validated model directly: status is polled often while
    batches run, and FastAPI would otherwise validate the whole page a second time."""
    return Response(body.model_dump_json(), media_type="application/json")


@router.get("/requests", response_model=RequestList, summary="All requests, newest first")
def list_requests(
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> RequestList:
    items, next_id = requests_page(session, owner, before_id=decode_cursor(cursor), limit=limit)
    return RequestList(
        items=[RequestSummary.of(item, settings.base_url) for item in items],
        next_cursor=encode_cursor(next_id) if next_id is not None else None,
    )


@router.get(
    "/requests/{request_id}/webhook-deliveries",
    response_model=WebhookDeliveryList,
    summary="Webhook delivery attempts of a request",
)
def list_webhook_deliveries(request: ProcessingRequestDep, session: SessionDep) -> WebhookDeliveryList:
    deliveries = session.scalars(
        select(WebhookDelivery)
        .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
        .where(WebhookEvent.request_pk == request.id)
        .order_by(WebhookDelivery.id)
    )
    return WebhookDeliveryList(
        webhook=_webhook_status(session, request),
        deliveries=[WebhookDeliveryOut.of(d) for d in deliveries],
    )


@router.post(
    "/requests/{request_id}/webhook-deliveries/redeliver",
    status_code=202,
    response_model=WebhookDeliveryList,
    summary="Send the finished-request webhook again (same webhook-id)",
)
def redeliver_webhook(
    request: ProcessingRequestDep, session: WriterSessionDep, runner: RunnerDep
) -> WebhookDeliveryList:
    if not request.callback_url:
        raise Conflict("this request has no webhook URL")
    if request.completed_at is None:
        raise Conflict("the request has not finished; its webhook will be sent when it does")
    redeliver(session, request.id)
    after_commit(session, runner.notify_webhooks)
    return WebhookDeliveryList(webhook=_webhook_status(session, request), deliveries=[])
