"""GET /metrics: this process's metrics in the Prometheus text format (app/metrics.py)."""

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import MetricsDep, SettingsDep, owner_of
from app.errors import Unauthorized

router = APIRouter(tags=["health"])


def _bearer(request: Request) -> str:
    authorization = request.headers.get("authorization", "")
    return authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description=(
        "The text exposition format. With METRICS_TOKEN set it needs `Authorization: Bearer "
        "<METRICS_TOKEN>`; otherwise, with API_KEYS set, any API key."
    ),
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(request: Request, settings: SettingsDep, service_metrics: MetricsDep) -> Response:
    if settings.metrics_token:
        if not hmac.compare_digest(_bearer(request).encode(), settings.metrics_token.encode()):
            raise Unauthorized(
                "send the metrics token as 'Authorization: Bearer <METRICS_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
    else:
        owner_of(request, settings)  # open unless API_KEYS is set
    return Response(generate_latest(service_metrics.registry), media_type=CONTENT_TYPE_LATEST)
