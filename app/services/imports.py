"""Large uploads, stored after their answer.

An upload of more than BACKGROUND_IMPORT_ROWS rows is read and checked in full before the
answer, as every upload is (a bad row is a 422, and nothing is stored), and its good rows
are spooled to a file under IMPORT_DIR named after the request. The request is created
`importing`, with what the CSV holds (`expected_products`, `expected_images`), and the
upload is answered. The Importer then stores the rows IMPORT_CHUNK_ROWS at a time, each
chunk its own transaction (SQLite's write lock is held for a chunk, not the whole file),
the request's totals growing with them, in a process of its own. The last transaction
links the copies, adds the hosts and makes the request `pending`; the runner takes it
from there. No claim serves an
importing request (app/ledger/turns.py serves pending and processing ones).

- A cancel makes the request `cancelling`: the chunk under way finds it no longer
  importing and is rolled back, and the import stops. The cancel takes what was stored;
  the request then shows what was stored as its totals (the API shows the expected
  counts only while `importing`).
- A restart: Importer.resume() at start-up finds the importing requests whose file is in
  its IMPORT_DIR, deletes what was stored of them, and imports them again.
- An import that fails (the database away) is tried again after RETRY_SECONDS.
- An import whose file is nowhere to be found (another server's, which does not come back)
  makes no progress: the retention sweep cancels it after STALLED_IMPORT_SECONDS
  (app/services/lifecycle.py).
"""

import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.base import utcnow
from app.db.maintenance import refresh_statistics_after_upload
from app.db.models import ProcessingRequest, RequestStatus
from app.db.session import build_engine, writer_sessionmaker
from app.errors import ServiceUnavailable
from app.ledger.units import OutputOptions
from app.logs import configure_logging
from app.services.bulk_insert import RepeatedUrls, insert_hosts, insert_rows, link_copies
from app.services.csv_checks import URL_SEPARATOR, CsvLimits, SpooledRows, check_csv
from app.services.lifecycle import delete_rows

log = logging.getLogger(__name__)

IMPORT_CHUNK_ROWS = 20_000
RETRY_SECONDS = 5.0
SPOOL_SUFFIX = ".rows"
PARTIAL_SUFFIX = ".partial"


def spool_path(import_dir: Path, request_id: str) -> Path:
    return import_dir / f"{request_id}{SPOOL_SUFFIX}"


def create_importing_request(
    session: Session,
    csv_file: BinaryIO,
    limits: CsvLimits,
    import_dir: Path,
    *,
    webhook_url: str | None,
    owner: str | None,
    options: OutputOptions | None,
) -> ProcessingRequest:
    """Check the whole CSV into a file of its good rows under import_dir (raising as
    check_csv does, leaving no file), then add the request, `importing`, to the caller's
    transaction. The file is on disk before the caller commits, so a restart after the
    answer finds it."""
    request_id = str(uuid.uuid4())
    partial = spool_path(import_dir, request_id).with_suffix(PARTIAL_SUFFIX)
    try:
        try:
            import_dir.mkdir(parents=True, exist_ok=True)
            with open(partial, "w+b") as spool:
                checked = check_csv(csv_file, limits, spool)
                spool.flush()
                os.fsync(spool.fileno())
        except OSError as exc:  # IMPORT_DIR missing or read-only, a full disk
            reason = exc.strerror or exc.__class__.__name__  # not the path: it is the server's
            raise ServiceUnavailable(f"the upload could not be kept for its import: {reason}") from exc
        request = ProcessingRequest(
            request_id=request_id,
            status=RequestStatus.IMPORTING,
            owner=owner,
            callback_url=webhook_url,
            options=options.to_json() if options is not None else None,
            total_products=0,
            total_images=0,
            expected_products=checked.row_count,
            expected_images=checked.total_images,
            import_progress_at=utcnow(),
        )
        session.add(request)
        session.flush()
        os.replace(partial, spool_path(import_dir, request_id))
    except BaseException:
        with contextlib.suppress(OSError):  # no folder to have left it in, say
            partial.unlink(missing_ok=True)
        raise
    return request


class StopFlag:
    """Set from a signal handler: a plain attribute, no lock (a handler that waited for a
    lock the code it interrupted holds, as threading.Event's does, would wait for ever)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class _NoLongerImporting(Exception):
    """The request was cancelled (or is gone) while a chunk was being stored."""


def import_request(
    sessions: sessionmaker[Session],
    import_dir: Path,
    request_pk: int,
    request_id: str,
    *,
    stopping: threading.Event | StopFlag,
    chunk_rows: int = IMPORT_CHUNK_ROWS,
    on_chunk_stored: Callable[[int], None] | None = None,
) -> bool:
    """Store an importing request's spooled rows; True once it is `pending`. False when
    there was nothing to import (the request is no longer importing: its file is removed;
    or its file is not here) or the import stopped:
    `stopping` was set (the file stays, for resume at the next start) or the request was
    cancelled meanwhile (the file is removed). What an interrupted import stored before is
    deleted first. `on_chunk_stored` is told the products stored so far after each
    chunk's commit."""
    path = spool_path(import_dir, request_id)
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed below, the lock with it
    except FileNotFoundError:
        log.warning("request %s: its import's file is not here", request_id, extra={"request_id": request_id})
        return False
    with file:
        # Another process holding the file (an import of a stopped server finishing its
        # chunk, or a second process sharing IMPORT_DIR) imports it; this one waits, and
        # then finds the request imported, or the rest to do.
        fcntl.flock(file, fcntl.LOCK_EX)
        with sessions() as session:
            stored = session.scalar(
                select(ProcessingRequest.total_products).where(*_still_importing(request_pk))
            )
        if stored is None:  # cancelled, deleted or imported already
            path.unlink(missing_ok=True)
            return False
        if stored:
            delete_rows(sessions, request_pk)
        _start_over(sessions, request_pk)
        try:
            _store(sessions, request_pk, file, stopping, chunk_rows, on_chunk_stored)
        except _Stopped:
            return False
        except _NoLongerImporting:
            log.info("request %s: cancelled while importing", request_id, extra={"request_id": request_id})
            path.unlink(missing_ok=True)
            return False
    path.unlink(missing_ok=True)
    return True


class _Stopped(Exception):
    """A stop came: the import ends after the chunk under way."""


def _store(
    sessions: sessionmaker[Session],
    request_pk: int,
    file: BinaryIO,
    stopping: threading.Event | StopFlag,
    chunk_rows: int,
    on_chunk_stored: Callable[[int], None] | None,
) -> None:
    hosts: set[str] = set()
    repeated = RepeatedUrls(os.fstat(file.fileno()).st_size)
    rows = iter(SpooledRows.reopen(file))
    stored = 0
    while chunk := list(islice(rows, chunk_rows)):
        if stopping.is_set():
            raise _Stopped
        images = sum(urls.count(URL_SEPARATOR) + 1 for _serial, _name, urls in chunk)
        with sessions.begin() as session:
            connection = session.connection()
            insert_rows(connection, request_pk, chunk, len(chunk), hosts, repeated, chunk_rows)
            _count_stored(connection, request_pk, len(chunk), images)
        stored += len(chunk)
        if on_chunk_stored is not None:
            on_chunk_stored(stored)
    with sessions.begin() as session:
        connection = session.connection()
        link_copies(connection, request_pk, repeated.flagged)
        insert_hosts(connection, hosts)
        finished = connection.execute(
            update(ProcessingRequest.__table__)
            .where(*_still_importing(request_pk))
            .values(status=RequestStatus.PENDING, host_count=len(hosts), import_progress_at=None)
        ).rowcount
        if not finished:
            raise _NoLongerImporting


def _still_importing(request_pk: int) -> tuple:
    return ProcessingRequest.id == request_pk, ProcessingRequest.status == RequestStatus.IMPORTING


def _count_stored(connection, request_pk: int, products: int, images: int) -> None:
    """Add a stored chunk to the request's totals, in the chunk's transaction, if it is
    still importing; else raise, and the chunk is rolled back. On PostgreSQL the update
    waits for a cancel that holds the row, and then sees its status."""
    counted = connection.execute(
        update(ProcessingRequest.__table__)
        .where(*_still_importing(request_pk))
        .values(
            total_products=ProcessingRequest.total_products + products,
            total_images=ProcessingRequest.total_images + images,
            import_progress_at=utcnow(),
        )
    ).rowcount
    if not counted:
        raise _NoLongerImporting


def _start_over(sessions: sessionmaker[Session], request_pk: int) -> None:
    """Nothing stored (what an interrupted import stored is deleted), progress now."""
    with sessions.begin() as session:
        session.execute(
            update(ProcessingRequest.__table__)
            .where(*_still_importing(request_pk))
            .values(total_products=0, total_images=0, import_progress_at=utcnow())
        )


# How an import process ends (its exit code): imported (or nothing left to import), or
# stopped (a stop, or the request cancelled). Any other code: it failed.
IMPORTED_EXIT = 0
STOPPED_EXIT = 3
PR_SET_PDEATHSIG = 1  # prctl(2)


def _import_process_main(
    database_url: str,
    import_dir: str,
    request_pk: int,
    request_id: str,
    chunk_rows: int,
    log_format: str,
    log_level: str,
) -> None:
    """One import, in a process of its own: formatting a million rows for the database
    holds the interpreter's lock for half a minute, which the web process's status polls
    would wait on. SIGTERM stops it at the end of the chunk under way."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the web process decides
    stopping = StopFlag()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.set())
    _stop_with_parent()
    configure_logging(log_format, log_level)
    engine = build_engine(database_url)
    try:
        imported = import_request(
            writer_sessionmaker(engine),
            Path(import_dir),
            request_pk,
            request_id,
            stopping=stopping,
            chunk_rows=chunk_rows,
        )
    finally:
        engine.dispose()
    sys.exit(IMPORTED_EXIT if imported else STOPPED_EXIT)


def _stop_with_parent() -> None:
    """SIGTERM when the web process dies, however (Linux): an import outliving it would
    hold its file while the restarted service waits to resume it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the call: nobody waits for this import
        sys.exit(STOPPED_EXIT)


class Importer:
    """Imports the requests submitted to it one at a time (two large imports at once
    would only share the same cores), each in a process of its own, and on each import
    done calls `on_imported(request_pk, images)`: dispatch the work, refresh the
    statistics. An import that fails (the database away, say) is tried again after
    RETRY_SECONDS, from the start, until it works or the request is cancelled."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        import_dir: Path,
        on_imported: Callable[[int, int], None],
        *,
        database_url: str,
        log_format: str = "text",
        log_level: str = "INFO",
        chunk_rows: int | None = None,
    ):
        self.sessions = sessions
        self.import_dir = import_dir
        self.on_imported = on_imported
        self.database_url = database_url
        self.log_format = log_format
        self.log_level = log_level
        self.chunk_rows = chunk_rows or IMPORT_CHUNK_ROWS
        self._context = multiprocessing.get_context("spawn")  # the web process has threads
        self._queue: queue.SimpleQueue[tuple[int, str] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._process = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="imports", daemon=True)
        self._thread.start()

    def submit(self, request_pk: int, request_id: str) -> None:
        self._queue.put((request_pk, request_id))

    def resume(self) -> int:
        """Submit the importing requests whose file is here; remove files no import
        needs (a request gone or imported; an upload stopped while checking). Called at
        start-up, before any upload: no file is being written then."""
        with self.sessions() as session:
            importing = session.execute(
                select(ProcessingRequest.id, ProcessingRequest.request_id)
                .where(ProcessingRequest.status == RequestStatus.IMPORTING)
                .order_by(ProcessingRequest.id)
            ).all()
        needed = set()
        for request_pk, request_id in importing:
            if spool_path(self.import_dir, request_id).exists():
                needed.add(spool_path(self.import_dir, request_id).name)
                self.submit(request_pk, request_id)
        if self.import_dir.is_dir():
            for path in self.import_dir.iterdir():
                if path.suffix in (SPOOL_SUFFIX, PARTIAL_SUFFIX) and path.name not in needed:
                    path.unlink(missing_ok=True)
        if needed:
            log.info("resuming %d imports interrupted by a stop", len(needed))
        return len(needed)

    def stop(self, timeout: float = 30.0) -> None:
        """The import under way stops at the end of its chunk; its file stays, and the
        next start resumes it."""
        self._stopping.set()
        self._queue.put(None)
        process = self._process
        if process is not None and process.is_alive():
            process.terminate()
            process.join(timeout)
            if process.is_alive():
                process.kill()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None and not self._stopping.is_set():
            request_pk, request_id = item
            process = self._context.Process(
                target=_import_process_main,
                args=(
                    self.database_url,
                    str(self.import_dir),
                    request_pk,
                    request_id,
                    self.chunk_rows,
                    self.log_format,
                    self.log_level,
                ),
                name=f"import-{request_pk}",
                daemon=True,
            )
            self._process = process
            process.start()
            if self._stopping.is_set():  # stop() came between the queue and the start
                process.terminate()
            process.join()
            self._process = None
            if self._stopping.is_set() or process.exitcode == STOPPED_EXIT:
                continue
            if process.exitcode != IMPORTED_EXIT:
                log.error(
                    "request %s: the import failed (exit code %s); trying again in %.0f s",
                    request_id,
                    process.exitcode,
                    RETRY_SECONDS,
                    extra={"request_id": request_id},
                )
                if not self._stopping.wait(RETRY_SECONDS):
                    self.submit(request_pk, request_id)
                continue
            with self.sessions() as session:
                images = session.scalar(
                    select(ProcessingRequest.total_images).where(ProcessingRequest.id == request_pk)
                )
            log.info("request %s imported", request_id, extra={"request_id": request_id})
            self.on_imported(request_pk, images or 0)


def statistics_and_dispatch(engine: Engine, dispatch: Callable[[int], None]) -> Callable[[int, int], None]:
    """What follows an import, as what follows an upload stored before its answer."""

    def imported(request_pk: int, images: int) -> None:
        dispatch(request_pk)
        refresh_statistics_after_upload(engine, images)

    return imported
