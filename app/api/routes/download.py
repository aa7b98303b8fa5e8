from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.api.deps import OutputUrlsDep, ProcessingRequestDep, ReaderSessionsDep, SettingsDep
from app.api.routes.problems import PROBLEM_RESPONSES
from app.db.models import RequestStatus
from app.errors import Conflict
from app.services.results import result_csv_lines

router = APIRouter(tags=["batches"])


@router.get(
    "/download/{request_id}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/csv": {}}, "description": "the result CSV"},
        409: {
            "description": "the request has not finished",
            "content": {"application/problem+json": {}},
        },
        **PROBLEM_RESPONSES,
    },
    summary="The result CSV: input rows with an Output Image Urls column",
)
def download_results(
    request: ProcessingRequestDep,
    sessions: ReaderSessionsDep,
    output_urls: OutputUrlsDep,
    settings: SettingsDep,
) -> StreamingResponse:
    if request.completed_at is None or request.status == RequestStatus.DELETING:
        # A request being deleted loses its rows in chunks: its CSV would be cut short.
        raise Conflict(
            f"request {request.request_id} is {request.status}; the CSV is ready when it finishes",
            request_status=request.status,
        )
    return StreamingResponse(
        result_csv_lines(
            sessions,
            request.id,
            output_urls,
            escape_formulas=settings.csv_escape_formulas,
        ),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{request.request_id}.csv"'},
    )
