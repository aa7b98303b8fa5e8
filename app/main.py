"""The application: create_app() wires settings, database, pipeline and runner together.

Reading order for a newcomer: api/routes/upload.py -> services/batches.py ->
workers/inprocess.py -> pipeline/process.py -> pipeline/stages.py (fetch.py, compress.py,
store.py) -> workers/processes.py -> webhooks/delivery.py.
"""

import logging
import math
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import install_error_handlers, problem_response
from app.api.html import STATIC_DIR
from app.api.routes import download, health, pages, status, thumbnails, upload
from app.api.routes.media import mount_processed_images
from app.config import Settings, get_settings
from app.db.session import build_engine, reader_sessionmaker, writer_sessionmaker
from app.guarded_http import AddressPolicy, guarded_session, parse_allowlist
from app.pipeline.compress import warm_up
from app.pipeline.decoding import NOTES_DIR_NAME, charge_dead_notes, open_note
from app.pipeline.memory import MIB
from app.pipeline.process import ImagePipeline
from app.pipeline.stages import ImageStages, StageConfig, StageRunner
from app.storage import OutputUrls, StorageConfig, build_storage
from app.storage.local import LocalFileStorage
from app.webhooks.delivery import WebhookDeliverer
from app.workers.inprocess import PARALLEL_DELIVERIES, InProcessRunner
from app.workers.processes import ImageProcesses

log = logging.getLogger(__name__)

MULTIPART_OVERHEAD_BYTES = 64 * 1024


class UploadSizeLimit:
    """Refuse an upload body past MAX_CSV_BYTES before it is spooled to disk."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/upload":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            response = problem_response(
                413,
                "The upload is too large",
                self._detail(),
                slug="payload-too-large",
                headers={"Connection": "close"},
            )
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # An HTTPException passes through the form parser to the handlers.
                    raise StarletteHTTPException(413, self._detail())
            return message

        await self.app(scope, limited_receive, send)

    def _detail(self) -> str:
        return f"the upload is larger than {self.max_body_bytes - MULTIPART_OVERHEAD_BYTES} bytes"


def storage_config(settings: Settings) -> StorageConfig:
    return StorageConfig(
        backend=settings.storage_backend,
        media_root=settings.media_root,
        s3_bucket=settings.s3_bucket,
        s3_prefix=settings.s3_prefix,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_region=settings.s3_region,
        s3_presign_seconds=settings.s3_presign_seconds,
    )


def stage_config(settings: Settings) -> StageConfig:
    """The stages' settings; the limits are each worker process's part of the whole."""
    processes = settings.image_processes
    return StageConfig(
        allow_private_hosts=settings.allow_private_hosts,
        download_timeout_seconds=settings.download_timeout_seconds,
        max_image_bytes=settings.max_image_bytes,
        jpeg_quality=settings.jpeg_quality,
        max_image_pixels=settings.max_image_pixels,
        storage=storage_config(settings),
        downloads=math.ceil(settings.worker_concurrency / max(processes, 1)),
        compress_slots=math.ceil(settings.compress_concurrency / max(processes, 1)),
        memory_budget_bytes=settings.worker_memory_mb * MIB,
    )


def decoding_notes_folder(settings: Settings) -> Path:
    """Where web processes that decode on their own threads note what they decode."""
    return settings.media_root / NOTES_DIR_NAME


def build_stages(settings: Settings) -> StageRunner:
    """Where fetch -> compress -> store runs: IMAGE_PROCESSES worker processes sharing the
    downloads and compressions between them, or threads in this process when it is 0."""
    processes = settings.image_processes
    config = stage_config(settings)
    if processes == 0:
        warm_up()
        # A decoder crash here takes this process down: the note outlives it.
        note = open_note(decoding_notes_folder(settings), config.compress_slots)
        return ImageStages.from_config(config, decoding_slots=note)
    return ImageProcesses(config, processes=processes, threads=config.downloads)


def build_runner(
    settings: Settings, engine, stages: StageRunner
) -> tuple[InProcessRunner, list[Callable[[], None]]]:
    # Its own allowlist: a host allowed as an image source must not become a target any
    # client can POST to and read the reply of (the delivery log keeps an excerpt).
    webhook_http = guarded_session(
        AddressPolicy(parse_allowlist(settings.webhook_allow_private_hosts)), pool_size=PARALLEL_DELIVERIES
    )
    writer_sessions = writer_sessionmaker(engine)
    pipeline = ImagePipeline(
        sessions=writer_sessions,
        stages=stages,
        lease_seconds=settings.lease_seconds,
        public_base_url=settings.base_url,
        retry_base_seconds=settings.transient_retry_base_seconds,
        retry_max_seconds=settings.transient_retry_max_seconds,
    )
    deliverer = WebhookDeliverer(
        sessions=writer_sessions,
        http=webhook_http,
        secret=settings.webhook_secret,
        timeout_seconds=settings.webhook_timeout_seconds,
        max_attempts=settings.webhook_max_attempts,
        retry_base_seconds=settings.webhook_retry_base_seconds,
    )
    runner = InProcessRunner(
        pipeline,
        deliverer,
        concurrency=settings.worker_concurrency,
        lease_seconds=settings.lease_seconds,
        recovery_interval_seconds=settings.recovery_interval_seconds,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
    )
    return runner, [webhook_http.close]


def create_app(settings: Settings | None = None, stages: StageRunner | None = None) -> FastAPI:
    """`stages` replaces those build_stages(settings) would make (e.g. another storage);
    the app closes them on shutdown."""
    settings = settings or get_settings()
    settings.media_root.mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = build_engine(settings.database_url)
        if settings.storage_backend == "local":
            LocalFileStorage(settings.media_root).remove_stale_temp_files()
        image_stages = stages or build_stages(settings)
        runner, closers = build_runner(settings, engine, image_stages)
        charge_dead_notes(decoding_notes_folder(settings), runner.pipeline.charge_crashes)
        app.state.settings = settings
        app.state.engine = engine
        app.state.sessions = reader_sessionmaker(engine)
        app.state.writer_sessions = writer_sessionmaker(engine)
        app.state.runner = runner
        app.state.storage = storage
        runner.start()
        try:
            yield
        finally:
            runner.stop()
            # In-flight images had the runner's grace period; what is left was handed back.
            image_stages.close()
            for close in closers:
                close()
            engine.dispose()

    app = FastAPI(
        title="Batch image service",
        version="1.0.0",
        summary="Upload a CSV of products with image URLs; get 50%-quality JPEGs and a result CSV.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(
        UploadSizeLimit,
        max_body_bytes=settings.max_csv_bytes + MULTIPART_OVERHEAD_BYTES,
    )
    # Pages first: their routes match only browsers and let JSON clients through.
    app.include_router(pages.router)
    for module in (upload, status, download, health, thumbnails):
        app.include_router(module.router)
    app.include_router(pages.request_pages)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    storage = build_storage(storage_config(settings))
    app.state.output_urls = OutputUrls(settings.output_url_base)
    mount_processed_images(app, settings, storage)

    @app.get("/", include_in_schema=False)
    def index() -> dict[str, str]:
        return {
            "service": "batch image service",
            "upload": "POST /upload (multipart: file, webhook_url)",
            "requests": "/requests",
            "docs": "/docs",
        }

    return app
