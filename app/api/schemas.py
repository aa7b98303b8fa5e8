"""Response bodies. Routes build these from rows; ORM objects never leave the API layer."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row

from app.db.models import ImageStatus, ProcessingRequest, RequestStatus, WebhookDelivery, WebhookEvent
from app.services.results import ProductWithImages
from app.storage import OutputUrls

REQUEST_ID_EXAMPLE = "9b2f6c1e-4f7a-4f55-9f4e-2f2d0c6a7b10"


def totals(request: ProcessingRequest) -> tuple[int, int]:
    """The products and images a request holds; while it is `importing`, those its CSV
    holds (the stored ones catch up)."""
    if request.status == RequestStatus.IMPORTING and request.expected_products is not None:
        return request.expected_products, request.expected_images or 0
    return request.total_products, request.total_images


class UploadAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": REQUEST_ID_EXAMPLE,
                    "status": "pending",
                    "status_url": f"http://127.0.0.1:8000/status/{REQUEST_ID_EXAMPLE}",
                    "total_products": 8,
                    "total_images": 24,
                }
            ]
        }
    )

    request_id: str
    status: str
    status_url: str
    total_products: int
    total_images: int


class Progress(BaseModel):
    total_images: int
    succeeded_images: int = Field(description="images that succeeded")
    processed_images: int = Field(
        description="the same as succeeded_images, under its earlier name (kept for existing clients)"
    )
    failed_images: int
    cancelled_images: int = Field(0, description="images a cancel stopped before they started")
    reused_images: int = Field(
        0, description="of the succeeded images, those that reused an earlier import's output"
    )
    percent: float = Field(description="share of images finished: succeeded, failed or cancelled")


class ImageError(BaseModel):
    code: str = Field(examples=["http_404"])
    message: str


class ImageResult(BaseModel):
    input_url: str
    output_url: str | None
    status: ImageStatus = Field(examples=["succeeded"])
    error: ImageError | None
    input_bytes: int | None
    output_bytes: int | None
    width: int | None
    height: int | None
    kept_original: bool = Field(
        False, description="keep_smaller: the input was smaller than its re-encoding, so it is the output"
    )
    retry_at: datetime | None = Field(
        None,
        description="a pending image that failed transiently (its origin or the storage): "
        "not tried again before this; `error` holds the last failure",
    )
    reused: bool = Field(
        False, description="the source had not changed since an earlier import: its output was reused"
    )

    @classmethod
    def of(cls, image: Row, urls: OutputUrls) -> "ImageResult":
        return cls(
            input_url=image.input_url,
            output_url=urls.url(image.output_key),
            # A copy waits for the row of the same URL that is processed.
            status=ImageStatus.PENDING if image.status == ImageStatus.COPY else image.status,
            kept_original=bool(image.kept_original),
            retry_at=image.retry_at if image.status == ImageStatus.PENDING and image.error_code else None,
            reused=bool(image.reused),
            error=ImageError(code=image.error_code, message=image.error_message or "")
            if image.error_code
            else None,
            input_bytes=image.input_bytes,
            output_bytes=image.output_bytes,
            width=image.width,
            height=image.height,
        )


class ProductResult(BaseModel):
    serial_number: int
    product_name: str
    input_image_urls: list[str]
    output_image_urls: list[str] = Field(description="same order and length; '' where an image failed")
    images: list[ImageResult]

    @classmethod
    def of(cls, item: ProductWithImages, urls: OutputUrls) -> "ProductResult":
        images = [ImageResult.of(image, urls) for image in item.images]
        return cls(
            serial_number=item.product.serial_number,
            product_name=item.product.product_name,
            input_image_urls=[image.input_url for image in images],
            output_image_urls=[image.output_url or "" for image in images],
            images=images,
        )


class WebhookDeliveryOut(BaseModel):
    attempt: int
    attempted_at: datetime
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    duration_ms: int

    @classmethod
    def of(cls, delivery: WebhookDelivery) -> "WebhookDeliveryOut":
        return cls(
            attempt=delivery.attempt,
            attempted_at=delivery.attempted_at,
            status_code=delivery.status_code,
            error=delivery.error,
            response_excerpt=delivery.response_excerpt,
            duration_ms=delivery.duration_ms,
        )


class WebhookStatus(BaseModel):
    url: str
    webhook_id: str | None = None
    state: str = Field(examples=["delivered"], description="waiting, pending, delivered or failed")
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None

    @classmethod
    def of(cls, request: ProcessingRequest, event: WebhookEvent | None) -> "WebhookStatus | None":
        if not request.callback_url:
            return None
        if event is None:
            return cls(url=request.callback_url, state="waiting")
        return cls(
            url=event.url,
            webhook_id=event.webhook_id,
            state=event.state,
            attempts=event.attempts,
            last_status_code=event.last_status_code,
            last_error=event.last_error,
            next_attempt_at=event.next_attempt_at if event.state == "pending" else None,
            delivered_at=event.delivered_at,
        )


class RequestSummary(BaseModel):
    request_id: str
    status: RequestStatus = Field(
        examples=["completed"],
        description=(
            "importing (a large CSV, checked and answered, whose rows are being stored), pending, "
            "processing, cancelling (a cancel is under way), deleting (a DELETE is under way), "
            "or finished: completed, completed_with_errors, failed, cancelled"
        ),
    )
    cancel_requested_at: datetime | None = Field(
        None, description="when a cancel came; the request ends `cancelled` once nothing of it is in flight"
    )
    created_at: datetime
    completed_at: datetime | None
    callback_url: str | None
    total_products: int
    stored_products: int = Field(
        description="products stored so far: fewer than total_products only while `importing`"
    )
    progress: Progress
    status_url: str
    download_url: str | None = Field(description="set once the request has finished")

    @classmethod
    def of(cls, request: ProcessingRequest, base_url: str, **extra) -> "RequestSummary":
        finished = request.succeeded_images + request.failed_images + request.cancelled_images
        total_products, total_images = totals(request)
        return cls(
            request_id=request.request_id,
            status=request.status,
            cancel_requested_at=request.cancelled_at,
            created_at=request.created_at,
            completed_at=request.completed_at,
            callback_url=request.callback_url,
            total_products=total_products,
            stored_products=request.total_products,
            progress=Progress(
                total_images=total_images,
                succeeded_images=request.succeeded_images,
                processed_images=request.succeeded_images,
                failed_images=request.failed_images,
                cancelled_images=request.cancelled_images,
                reused_images=request.reused_images,
                percent=round(100 * finished / total_images, 2) if total_images else 100.0,
            ),
            status_url=f"{base_url}/status/{request.request_id}",
            download_url=f"{base_url}/download/{request.request_id}" if request.completed_at else None,
            **extra,
        )


class OutputOptionsOut(BaseModel):
    quality: int = Field(examples=[50])
    format: str = Field(examples=["jpeg"], description="jpeg, webp or avif")
    max_width: int | None = None
    max_height: int | None = None
    keep_smaller: bool = False
    progressive: bool = False


class RetryAccepted(RequestSummary):
    retried_images: int = Field(
        description="images (rows) back to pending; 0 when the request had no failed image with those codes"
    )


class RequestStatusOut(RequestSummary):
    options: OutputOptionsOut = Field(description="the output options the request was uploaded with")
    webhook: WebhookStatus | None
    products: list[ProductResult]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class RequestList(BaseModel):
    items: list[RequestSummary]
    next_cursor: str | None


class WebhookDeliveryList(BaseModel):
    webhook: WebhookStatus | None
    deliveries: list[WebhookDeliveryOut]
