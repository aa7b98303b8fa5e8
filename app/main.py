"""The application: create_app() composes the API over the service's parts.

Reading order for a newcomer, following one image: docs/architecture.md.
"""

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.api.errors import install_error_handlers
from app.api.html import STATIC_DIR
from app.api.middleware import MULTIPART_OVERHEAD_BYTES, AccessLog, BrowserRequestGuard, UploadSizeLimit
from app.api.routes import docs, download, health, lifecycle, metrics, pages, status, thumbnails, upload
from app.api.routes.media import mount_processed_images
from app.composition import build_parts, storage_config
from app.config import Settings, get_settings
from app.metrics import ServiceMetrics
from app.pipeline.stages import StageRunner
from app.runners import build_runner
from app.services.imports import Importer, statistics_and_dispatch
from app.storage import OutputUrls, build_storage


def create_app(settings: Settings | None = None, stages: StageRunner | None = None) -> FastAPI:
    """`stages` replaces those the composition would make (e.g. another storage); the app
    closes them on shutdown."""
    settings = settings or get_settings()
    settings.media_root.mkdir(parents=True, exist_ok=True)
    service_metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runs_images = settings.task_backend == "inprocess"
        parts = build_parts(
            settings, runs_images=runs_images, stages=stages, metrics=service_metrics, storage=storage
        )
        pending = service_metrics.watch_pending_images(parts.reader_sessions)
        hosts_in_backoff = service_metrics.watch_hosts_in_backoff(parts.reader_sessions)
        runner = build_runner(parts)
        importer = Importer(
            parts.writer_sessions,
            settings.import_dir,
            statistics_and_dispatch(parts.engine, runner.dispatch),
            database_url=settings.database_url,
            log_format=settings.log_format,
            log_level=settings.log_level,
        )
        app.state.settings = settings
        app.state.engine = parts.engine
        app.state.sessions = parts.reader_sessions
        app.state.writer_sessions = parts.writer_sessions
        app.state.ledger = parts.ledger
        app.state.runner = runner
        app.state.importer = importer
        runner.start()
        importer.resume()
        importer.start()
        try:
            yield
        finally:
            importer.stop()
            runner.stop()
            service_metrics.registry.unregister(pending)
            service_metrics.registry.unregister(hosts_in_backoff)
            parts.close()

    app = FastAPI(
        title="Batch image service",
        version="1.0.0",
        summary=(
            "Upload a CSV of products with image URLs; get re-compressed images "
            "(50%-quality JPEGs by default) and a result CSV."
        ),
        lifespan=lifespan,
        # Swagger UI is served from this service (routes/docs.py); FastAPI's own /docs and
        # /redoc would load it from a CDN, and no OAuth2 flow needs the redirect page.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.settings = settings
    app.state.metrics = service_metrics
    install_error_handlers(app)
    app.add_middleware(
        UploadSizeLimit,
        max_body_bytes=settings.max_csv_bytes + MULTIPART_OVERHEAD_BYTES,
    )
    # Outside the size limit: a refused cross-site upload is not read at all.
    app.add_middleware(BrowserRequestGuard, settings=settings)
    # Added last, so outermost: it times and logs every answer, the 413s above included.
    app.add_middleware(AccessLog, metrics=service_metrics)
    # Pages first: their routes match only browsers and let JSON clients through.
    app.include_router(pages.router)
    for module in (upload, status, lifecycle, download, health, metrics, thumbnails, docs):
        app.include_router(module.router)
    app.include_router(pages.request_pages)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    storage = build_storage(storage_config(settings))
    app.state.storage = storage
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
