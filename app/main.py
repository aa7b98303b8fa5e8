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
from app.api.routes import download, health, status, upload
from app.config import Settings, get_settings
from app.db.session import build_engine, reader_sessionmaker, writer_sessionmaker
from app.pipeline.compress import warm_up
from app.pipeline.decoding import NOTES_DIR_NAME, charge_dead_notes, open_note
from app.pipeline.fetch import AddressPolicy, guarded_session, parse_allowlist
from app.pipeline.process import ImagePipeline
from app.pipeline.stages import ImageStages, StageConfig, StageRunner
from app.pipeline.store import LocalFileStorage
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


class ProcessedImages(StaticFiles):
    """Output images; hidden entries (the store's .incoming folder of partial files) are
    never served."""

    def lookup_path(self, path: str):
        if any(part.startswith(".") for part in path.replace("\\", "/").split("/")):
            return "", None
        return super().lookup_path(path)


def decoding_notes_folder(settings: Settings) -> Path:
    """Where web processes that decode on their own threads note what they decode."""
    return settings.media_root / NOTES_DIR_NAME


def build_stages(settings: Settings) -> StageRunner:
    """Where fetch -> compress -> store runs: IMAGE_PROCESSES worker processes sharing the
    downloads and compressions between them, or threads in this process when it is 0."""
    processes = settings.image_processes
    config = StageConfig(
        allow_private_hosts=settings.allow_private_hosts,
        download_timeout_seconds=settings.download_timeout_seconds,
        max_image_bytes=settings.max_image_bytes,
        jpeg_quality=settings.jpeg_quality,
        max_image_pixels=settings.max_image_pixels,
        media_root=settings.media_root,
        media_url=settings.media_url,
        downloads=math.ceil(settings.worker_concurrency / max(processes, 1)),
        compress_slots=math.ceil(settings.compress_concurrency / max(processes, 1)),
    )
    if processes == 0:
        warm_up()
        # A decoder crash here takes this process down: the note outlives it.
        note = open_note(decoding_notes_folder(settings), config.compress_slots)
        return ImageStages.from_config(config, note)
    return ImageProcesses(config, processes=processes, threads=config.downloads)


def build_runner(
    settings: Settings, engine, stages: StageRunner
) -> tuple[InProcessRunner, list[Callable[[], None]]]:
    webhook_http = guarded_session(
        AddressPolicy(parse_allowlist(settings.allow_private_hosts)), pool_size=PARALLEL_DELIVERIES
    )
    writer_sessions = writer_sessionmaker(engine)
    pipeline = ImagePipeline(
        sessions=writer_sessions,
        stages=stages,
        lease_seconds=settings.lease_seconds,
        public_base_url=settings.base_url,
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.media_root.mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = build_engine(settings.database_url)
        LocalFileStorage(settings.media_root, settings.media_url).remove_stale_temp_files()
        stages = build_stages(settings)
        runner, closers = build_runner(settings, engine, stages)
        charge_dead_notes(decoding_notes_folder(settings), runner.pipeline.charge_crashes)
        app.state.settings = settings
        app.state.engine = engine
        app.state.sessions = reader_sessionmaker(engine)
        app.state.writer_sessions = writer_sessionmaker(engine)
        app.state.runner = runner
        runner.start()
        try:
            yield
        finally:
            runner.stop()
            # In-flight images had the runner's grace period; what is left was handed back.
            stages.close()
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
    for module in (upload, status, download, health):
        app.include_router(module.router)
    app.mount(
        "/processed_images",
        ProcessedImages(directory=settings.media_root, check_dir=False),
        name="processed_images",
    )

    @app.get("/", include_in_schema=False)
    def index() -> dict[str, str]:
        return {
            "service": "batch image service",
            "upload": "POST /upload (multipart: file, webhook_url)",
            "requests": "/requests",
            "docs": "/docs",
        }

    return app
