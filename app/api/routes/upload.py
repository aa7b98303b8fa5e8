from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from app.api.deps import OwnerDep, RunnerDep, SettingsDep, WriterSessionDep
from app.api.errors import InvalidInput
from app.api.routes.problems import PROBLEM_RESPONSES
from app.api.schemas import UploadAccepted
from app.services.batches import CsvLimits, create_batch

router = APIRouter(tags=["batches"])


@router.post(
    "/upload",
    status_code=202,
    response_model=UploadAccepted,
    responses=PROBLEM_RESPONSES,
    summary="Upload a products CSV",
    description=(
        "Multipart form with `file` (the CSV: `S. No.,Product Name,Input Image Urls`, "
        "the last column a quoted, comma-separated list of image URLs) and an optional "
        "`webhook_url` to POST to when the batch finishes. Answers at once with a "
        "request id; the images are processed in the background."
    ),
)
def upload_csv(
    response: Response,
    session: WriterSessionDep,
    runner: RunnerDep,
    settings: SettingsDep,
    owner: OwnerDep,
    file: Annotated[UploadFile | None, File(description="the products CSV")] = None,
    webhook_url: Annotated[str | None, Form(description="http(s) URL notified when done")] = None,
) -> UploadAccepted:
    if file is None:
        raise InvalidInput("the form needs a 'file' field holding the CSV")
    request, image_ids = create_batch(
        session,
        file.file,
        webhook_url=(webhook_url or "").strip() or None,
        owner=owner,
        limits=CsvLimits(settings.max_csv_bytes, settings.max_rows, settings.max_urls_per_row),
    )
    # Work leaves only after the commit: a runner must never see ids it cannot read.
    session.commit()
    runner.dispatch(image_ids)
    status_url = f"{settings.base_url}/status/{request.request_id}"
    response.headers["Location"] = status_url
    return UploadAccepted(
        request_id=request.request_id,
        status=request.status,
        status_url=status_url,
        total_products=request.total_products,
        total_images=request.total_images,
    )
