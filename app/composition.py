"""One composition of the service's parts, settings -> engine -> storage -> stages ->
ledger -> webhooks, shared by the FastAPI app (app/main.py), the in-process runner and
the Celery worker (app/runners/celery_worker.py), so they cannot drift apart."""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.session import build_engine, reader_sessionmaker, writer_sessionmaker
from app.ledger.hosts import HostPoliteness
from app.ledger.image_ledger import ImageLedger
from app.ledger.units import OUTPUT_PIPELINE_VERSION, EncodingKeys, OutputOptions
from app.metrics import ServiceMetrics
from app.net.guard import AddressPolicy, guarded_session, parse_allowlist
from app.pipeline.compress import warm_up
from app.pipeline.decoding import NOTES_DIR_NAME, charge_dead_notes, open_note
from app.pipeline.memory import MIB
from app.pipeline.processes import ImageProcesses
from app.pipeline.stages import ImageStages, StageConfig, StageRunner
from app.storage import ImageStorage, StorageConfig, build_storage, delete_requests_outputs
from app.storage.local import LocalFileStorage
from app.webhooks.delivery import PARALLEL_DELIVERIES, WebhookDeliverer

log = logging.getLogger(__name__)


def storage_config(settings: Settings) -> StorageConfig:
    return StorageConfig(
        backend=settings.storage_backend,
        media_root=settings.media_root,
        s3_bucket=settings.s3_bucket,
        s3_prefix=settings.s3_prefix,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_region=settings.s3_region or settings.aws_default_region,
        s3_presign_seconds=settings.s3_presign_seconds,
        s3_access_key_id=settings.aws_access_key_id,
        s3_secret_access_key=settings.aws_secret_access_key,
        s3_session_token=settings.aws_session_token,
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
        downloads=math.ceil(settings.image_concurrency / max(processes, 1)),
        compress_slots=math.ceil(settings.compress_concurrency / max(processes, 1)),
        memory_budget_bytes=settings.image_memory_mb * MIB,
        log_format=settings.log_format,
        log_level=settings.log_level,
        jpeg_optimize=settings.jpeg_optimize,
        jpeg_progressive=settings.jpeg_progressive,
        metadata=settings.metadata,
        color_profile=settings.color_profile,
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
    return ImageProcesses(
        config, processes=processes, threads=config.downloads, niceness=settings.image_process_niceness
    )


@dataclass
class Parts:
    """The parts a process of the service works with; close() releases them."""

    settings: Settings
    engine: Engine
    reader_sessions: sessionmaker[Session]
    writer_sessions: sessionmaker[Session]
    storage: ImageStorage
    ledger: ImageLedger
    deliverer: WebhookDeliverer
    metrics: ServiceMetrics
    stages: StageRunner | None = None  # only in a process that runs images
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        # In-flight images had the runner's grace period; what is left was handed back.
        if self.stages is not None:
            self.stages.close()
        for close in self.closers:
            close()
        self.engine.dispose()


def host_politeness(settings: Settings) -> HostPoliteness:
    return HostPoliteness(
        per_host=settings.fetch_per_host_concurrency,
        retry_window_seconds=settings.fetch_retry_window_seconds,
        retry_after_max_seconds=settings.fetch_retry_after_max_seconds,
        backoff_base_seconds=settings.fetch_host_backoff_base_seconds,
        backoff_max_seconds=settings.fetch_host_backoff_max_seconds,
        breaker_failures=settings.fetch_breaker_failures,
    )


def output_policy(settings: Settings) -> str:
    """The settings that change an output's bytes beside its options, for EncodingKeys."""
    return (
        f"metadata={settings.metadata};colour={settings.color_profile};"
        f"optimize={int(settings.jpeg_optimize)};pipeline={OUTPUT_PIPELINE_VERSION}"
    )


def build_parts(
    settings: Settings,
    *,
    runs_images: bool,
    stages: StageRunner | None = None,
    metrics: ServiceMetrics | None = None,
    storage: ImageStorage | None = None,
) -> Parts:
    """The parts of one process. With runs_images, also the stages (`stages` replaces
    those build_stages would make), after charging the images a dead predecessor of this
    process was decoding. Image outcomes and webhook attempts are counted in `metrics`
    (the process's own registry when not given); `storage` is the one the process already
    has, if any."""
    metrics = metrics or ServiceMetrics()
    engine = build_engine(settings.database_url)
    writer_sessions = writer_sessionmaker(engine)
    reader_sessions = reader_sessionmaker(engine)
    # Its own allowlist: a host allowed as an image source must not become a target any
    # client can POST to and read the reply of (the delivery log keeps an excerpt).
    webhook_http = guarded_session(
        AddressPolicy(parse_allowlist(settings.webhook_allow_private_hosts)), pool_size=PARALLEL_DELIVERIES
    )
    storage = storage or build_storage(storage_config(settings))
    ledger = ImageLedger(
        sessions=writer_sessions,
        reader_sessions=reader_sessions,
        lease_seconds=settings.lease_seconds,
        public_base_url=settings.base_url,
        retry_base_seconds=settings.transient_retry_base_seconds,
        retry_max_seconds=settings.transient_retry_max_seconds,
        politeness=host_politeness(settings),
        on_recorded=metrics.count_outcomes,
        on_requests_gone=lambda request_ids: delete_requests_outputs(storage, request_ids),
        on_host_backoffs=metrics.count_host_backoffs,
        # What a request uploaded without options gets (ImageStages.default_encoding).
        encodings=EncodingKeys(
            OutputOptions(quality=settings.jpeg_quality, progressive=settings.jpeg_progressive),
            policy=output_policy(settings),
        ),
    )
    parts = Parts(
        settings=settings,
        engine=engine,
        reader_sessions=reader_sessions,
        writer_sessions=writer_sessions,
        storage=storage,
        ledger=ledger,
        deliverer=WebhookDeliverer(
            sessions=writer_sessions,
            http=webhook_http,
            secret=settings.webhook_secret,
            timeout_seconds=settings.webhook_timeout_seconds,
            max_attempts=settings.webhook_max_attempts,
            retry_base_seconds=settings.webhook_retry_base_seconds,
            on_attempt=metrics.count_webhook_attempt,
        ),
        metrics=metrics,
        closers=[webhook_http.close],
    )
    if runs_images:
        if settings.storage_backend == "local":
            LocalFileStorage(settings.media_root).remove_stale_temp_files()
        parts.stages = stages or build_stages(settings)
        charge_dead_notes(decoding_notes_folder(settings), ledger.charge_crashes)
    return parts
