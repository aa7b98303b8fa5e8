from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Response, UploadFile

from app.api.deps import (
    EngineDep,
    ImporterDep,
    OwnerDep,
    RunnerDep,
    SessionDep,
    SettingsDep,
    WriterSessionDep,
    after_commit,
)
from app.api.routes.problems import PROBLEM_RESPONSES
from app.api.schemas import UploadAccepted, totals
from app.db.maintenance import refresh_statistics_after_upload
from app.db.models import ProcessingRequest, RequestStatus
from app.errors import InvalidInput
from app.pipeline.options import MAX_DIMENSION, options_from_form
from app.services.batches import BackgroundImports, checked_webhook_url, create_batch
from app.services.csv_checks import CsvLimits
from app.services.idempotency import check_key, find_original, payload_fingerprint, remember

router = APIRouter(tags=["batches"])


@router.post(
    "/upload",
    status_code=202,
    response_model=UploadAccepted,
    responses=PROBLEM_RESPONSES,
    summary="Upload a products CSV",
    description=(
        "Multipart form with `file` (the CSV: `S. No.,Product Name,Input Image Urls`, "
        "the last column a list of image URLs separated by commas, semicolons or "
        "whitespace; an unquoted list spilling into extra columns is accepted), an optional "
        "`webhook_url` to POST to when the batch finishes, and optional output options "
        "(`quality`, `max_width`, `max_height`, `format`, `keep_smaller`, `progressive`; "
        "an invalid one is a 422 naming it). Answers at once with a request id; the images "
        "are processed in the background. A URL named by several rows is fetched and "
        "compressed once, and every such row gets its output URL."
    ),
)
def upload_csv(
    response: Response,
    read_session: SessionDep,
    session: WriterSessionDep,
    runner: RunnerDep,
    engine: EngineDep,
    settings: SettingsDep,
    owner: OwnerDep,
    importer: ImporterDep,
    file: Annotated[UploadFile | None, File(description="the products CSV")] = None,
    webhook_url: Annotated[str | None, Form(description="http(s) URL notified when done")] = None,
    quality: Annotated[
        str | None, Form(description="output quality, 1-95; default JPEG_QUALITY", examples=["50"])
    ] = None,
    max_width: Annotated[
        str | None,
        Form(
            description=f"largest output width, 1-{MAX_DIMENSION}; the aspect ratio is kept, never enlarged"
        ),
    ] = None,
    max_height: Annotated[
        str | None,
        Form(
            description=f"largest output height, 1-{MAX_DIMENSION}; the aspect ratio is kept, never enlarged"
        ),
    ] = None,
    output_format: Annotated[
        str | None,
        Form(
            alias="format",
            description="jpeg (default), webp, or avif when this server's Pillow can write it",
            examples=["jpeg"],
        ),
    ] = None,
    keep_smaller: Annotated[
        str | None,
        Form(description="true: an input smaller than its re-encoding in the same format is kept as it is"),
    ] = None,
    progressive: Annotated[
        str | None, Form(description="true: progressive JPEGs; default JPEG_PROGRESSIVE")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(description="retrying with the same key and file returns the first answer"),
    ] = None,
) -> UploadAccepted:
    if file is None:
        raise InvalidInput("the form needs a 'file' field holding the CSV")
    webhook_url = checked_webhook_url(webhook_url)
    given = (quality, max_width, max_height, output_format, keep_smaller, progressive)
    options = options_from_form(
        quality=quality,
        max_width=max_width,
        max_height=max_height,
        output_format=output_format,
        keep_smaller=keep_smaller,
        progressive=progressive,
        default_quality=settings.jpeg_quality,
        default_progressive=settings.jpeg_progressive,
    )
    remember_key = None
    if idempotency_key is not None:
        key = check_key(idempotency_key)
        fingerprint = payload_fingerprint(
            file.file, webhook_url, options.to_json() if any(v is not None for v in given) else None
        )
        original = find_original(read_session, owner, key, fingerprint)
        if original is not None:
            response.headers["Idempotent-Replayed"] = "true"
            return _accepted(response, original, settings.base_url)

        def remember_key(request):
            remember(session, owner, key, fingerprint, request.id, settings.idempotency_key_ttl_seconds)

    request = create_batch(
        session,
        file.file,
        CsvLimits(
            settings.max_csv_bytes, settings.max_line_bytes, settings.max_rows, settings.max_urls_per_row
        ),
        webhook_url=webhook_url,
        owner=owner,
        on_request_created=remember_key,
        options=options,
        background=BackgroundImports(settings.background_import_rows, settings.import_dir),
    )
    request_pk, request_id, total_images = request.id, request.request_id, request.total_images
    if request.status == RequestStatus.IMPORTING:
        after_commit(session, lambda: importer.submit(request_pk, request_id))
    else:
        after_commit(session, lambda: runner.dispatch(request_pk))
        after_commit(session, lambda: refresh_statistics_after_upload(engine, total_images))
    return _accepted(response, request, settings.base_url)


def _accepted(response: Response, request: ProcessingRequest, base_url: str) -> UploadAccepted:
    status_url = f"{base_url}/status/{request.request_id}"
    response.headers["Location"] = status_url
    total_products, total_images = totals(request)
    return UploadAccepted(
        request_id=request.request_id,
        status=request.status,  # a replay tells the status now, not the first answer's
        status_url=status_url,
        total_products=total_products,
        total_images=total_images,
    )
