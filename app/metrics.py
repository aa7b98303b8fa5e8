"""Prometheus metrics of one process, in a registry of its own.

Image work is counted where its outcome is recorded (the ledger's caller, see
ImageLedger.record_outcomes), not where it ran: outcomes already cross back from the image
worker processes with their sizes and stage times, so no multiprocess mode is needed, and
an outcome ignored as stale (its claim expired) is not counted. The API serves its
registry at GET /metrics; a Celery worker serves its own on METRICS_PORT.

No label carries a request id, a URL or a product name: `code` is a failure code (a small
fixed set), `route` the route's template (`/status/{request_id}`) or `unmatched`, `method`
one of STANDARD_METHODS or `other`, `status` a status code the service sent. Every label
value comes from a fixed set, never from what a client chose, so no client can add series.
"""

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.base import utcnow
from app.db.models import UNFINISHED_REQUEST_STATUSES, Image, ImageStatus, ProcessingRequest
from app.ledger.hosts import hosts_in_backoff
from app.ledger.units import ImageOutcome

# The *_created series double every family and nobody graphs them.
disable_created_metrics()

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED_ROUTE = "unmatched"
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"


def method_label(method: str) -> str:
    """The method as metrics and access lines name it: a client may send any token as its
    method, and each new label value would be a new series kept for good."""
    return method if method in STANDARD_METHODS else OTHER_METHOD


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.images = Counter(
            "image_service_images",
            "Images finished, by outcome and error code (empty on success)",
            ["outcome", "code"],
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "image_service_stage_seconds",
            "Time spent in each stage of an image (compress leaves out waits for memory and a slot)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.bytes = Counter(
            "image_service_bytes",
            "Image bytes decoded (in) and stored (out); a reused output counts neither",
            ["direction"],
            registry=registry,
        )
        self.reused = Counter(
            "image_service_images_reused",
            "Images that succeeded by reusing an earlier import's output (the source had not changed)",
            registry=registry,
        )
        self.webhook_deliveries = Counter(
            "image_service_webhook_deliveries",
            "Webhook delivery attempts: delivered, failed (to be retried) or exhausted (the last one)",
            ["outcome"],
            registry=registry,
        )
        self.http_seconds = Histogram(
            "image_service_http_request_seconds",
            "HTTP requests served, by method, route template and status",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.origin_slow_downs = Counter(
            "image_service_origin_slow_downs",
            "Answers of image origins asking for fewer requests (HTTP 429 or 503), by status",
            ["status"],
            registry=registry,
        )
        self.host_backoffs = Counter(
            "image_service_host_backoffs",
            "Times an origin host was put in backoff after failing (a round of its images)",
            registry=registry,
        )
        self._slow_downs = {
            f"http_{status}": self.origin_slow_downs.labels(str(status)) for status in (429, 503)
        }
        # Children resolved once: .labels() costs more than the increment it leads to.
        self._fetch = self.stage_seconds.labels("fetch")
        self._compress = self.stage_seconds.labels("compress")
        self._store = self.stage_seconds.labels("store")
        self._bytes_in = self.bytes.labels("in")
        self._bytes_out = self.bytes.labels("out")
        self._succeeded = self.images.labels("succeeded", "")
        self._failed: dict[str, Counter] = {}

    def count_outcomes(self, outcomes: Sequence[ImageOutcome]) -> None:
        """Outcomes the ledger has just recorded (each once): final ones are counted as
        images; every one that ran a stage has its time observed."""
        for outcome in outcomes:
            if outcome.cancelled:
                continue
            if outcome.fetch_seconds is not None:
                self._fetch.observe(outcome.fetch_seconds)
            if outcome.compress_seconds is not None:
                self._compress.observe(outcome.compress_seconds)
            if outcome.store_seconds is not None:
                self._store.observe(outcome.store_seconds)
            if outcome.origin_failure and outcome.error_code in self._slow_downs:
                self._slow_downs[outcome.error_code].inc()
            if outcome.retry_later:
                continue
            if outcome.error_code is None:
                self._succeeded.inc()
                if outcome.reused:
                    self.reused.inc()
                elif outcome.input_bytes:
                    self._bytes_in.inc(outcome.input_bytes)
                if outcome.output_bytes and not outcome.reused:
                    self._bytes_out.inc(outcome.output_bytes)
            else:
                counter = self._failed.get(outcome.error_code)
                if counter is None:
                    counter = self._failed[outcome.error_code] = self.images.labels(
                        "failed", outcome.error_code
                    )
                counter.inc()

    def count_host_backoffs(self, hosts: int) -> None:
        self.host_backoffs.inc(hosts)

    def count_webhook_attempt(self, outcome: str) -> None:
        self.webhook_deliveries.labels(outcome).inc()

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_seconds.labels(method, route, str(status)).observe(seconds)

    def watch_pending_images(self, sessions: sessionmaker[Session]) -> "ScrapedCount":
        """`image_service_images_pending`, counted when scraped, instead of a gauge every
        uploader, claimer and canceller keeps. Only unfinished requests have pending
        images: the count reads their ranges of the fair-claim index."""
        return self._watch(
            ScrapedCount(
                "image_service_images_pending",
                "Images waiting in the ledger to be claimed (pending, including those waiting for a retry)",
                sessions,
                _pending_images,
            )
        )

    def watch_hosts_in_backoff(self, sessions: sessionmaker[Session]) -> "ScrapedCount":
        """`image_service_hosts_in_backoff`, counted when scraped (a partial index holds
        only hosts with trouble). No host name as a label: their number is unbounded."""
        return self._watch(
            ScrapedCount(
                "image_service_hosts_in_backoff",
                "Origin hosts whose images wait for their backoff to run out",
                sessions,
                lambda session: hosts_in_backoff(session.connection(), utcnow()),
            )
        )

    def _watch(self, collector: "ScrapedCount") -> "ScrapedCount":
        self.registry.register(collector)
        return collector


def _pending_images(session: Session) -> int | None:
    return session.scalar(
        select(func.count())
        .select_from(ProcessingRequest)
        .join(Image, Image.request_pk == ProcessingRequest.id)
        .where(
            ProcessingRequest.status.in_(UNFINISHED_REQUEST_STATUSES),
            Image.status == ImageStatus.PENDING,
        )
    )


class ScrapedCount:
    """A gauge counted from the database when Prometheus scrapes, by `count(session)`."""

    def __init__(
        self, name: str, help: str, sessions: sessionmaker[Session], count: Callable[[Session], int | None]
    ):
        self.name = name
        self.help = help
        self.sessions = sessions
        self.count = count

    def describe(self):
        return [GaugeMetricFamily(self.name, self.help)]

    def collect(self):
        with self.sessions() as session:
            value = self.count(session)
        yield GaugeMetricFamily(self.name, self.help, value=value or 0)
