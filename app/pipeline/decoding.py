"""Which units a process is decoding right now, kept where its crash cannot erase it.

A decoder that crashes takes its whole process down, so that process cannot say which
image did it. Instead, around the compress step, each process writes (image id, attempt)
into a slot of shared memory: two stores, no system call, no message. Whoever outlives it
reads the slots, and only the units named there are charged with the crash:

    worker processes   a shared array per worker, read by the web process when the
                       worker dies (app/pipeline/processes.py)
    IMAGE_PROCESSES=0  a memory-mapped note file per web process under MEDIA_ROOT/.decoding,
                       read by the next start of the service (charge_dead_notes)

A note file is locked (flock) for as long as its process lives; the kernel drops the lock
when the process dies, so a note whose lock can be taken belongs to a dead process.
"""

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import queue
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

NOTES_DIR_NAME = ".decoding"
SLOT_BYTES = 16  # image id and attempt, 64 bits each
Claim = tuple[int, int]  # (image id, attempt)


def claims_in(buffer) -> set[Claim]:
    """The units named in a slot buffer (empty slots hold image id 0)."""
    values = memoryview(buffer).cast("B").cast("q").tolist()
    return {(values[n], values[n + 1]) for n in range(0, len(values), 2) if values[n]}


class DecodingSlots:
    """As many slots as images decoded at once; taking a slot is also the limit on
    concurrent decodes (callers block until one is free)."""

    def __init__(self, buffer, *, note: "NoteFile | None" = None):
        self._buffer = buffer
        self._values = memoryview(buffer).cast("B").cast("q")
        self._note = note
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(len(self._values) // 2):
            self._free.put(slot)

    @classmethod
    def in_memory(cls, slots: int) -> "DecodingSlots":
        """Slots nobody outlives this process to read (tools and tests)."""
        return cls(bytearray(SLOT_BYTES * slots))

    @contextlib.contextmanager
    def take(self, image_id: int, attempt: int) -> Iterator[None]:
        """Hold a slot naming this unit while the block runs (decode and encode)."""
        slot = self._free.get()
        values = self._values
        # The attempt first: a reader that sees the image id sees its attempt too.
        values[2 * slot + 1] = attempt
        values[2 * slot] = image_id
        try:
            yield
        finally:
            values[2 * slot] = 0
            self._free.put(slot)

    def claims(self) -> set[Claim]:
        return claims_in(self._buffer)

    def close(self) -> None:
        if self._note is not None:
            self._values.release()
            self._note.close()


class NoteFile:
    """This process's note under a notes folder, locked for as long as the process lives."""

    def __init__(self, folder: Path, slots: int):
        folder.mkdir(parents=True, exist_ok=True)
        # Locked before it gets the name scanners look for, so no scanner takes a note
        # being created for a dead one.
        partial = folder / f"{uuid.uuid4().hex}.new"
        self.fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Written, not truncated to size: a sparse page would be allocated on the first
            # store into the map, and on a full disk that store kills the process (SIGBUS).
            size = SLOT_BYTES * slots
            if os.write(self.fd, bytes(size)) != size:
                raise OSError(errno.ENOSPC, "the decoding note could not be written")
            self.path = partial.with_suffix(".slots")
            os.rename(partial, self.path)
        except OSError:
            os.close(self.fd)
            partial.unlink(missing_ok=True)
            raise
        self.memory = mmap.mmap(self.fd, SLOT_BYTES * slots)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self.memory.close()
        os.close(self.fd)


def open_note(folder: Path, slots: int) -> DecodingSlots:
    """Slots that outlive this process, in a note file under `folder`; slots in memory
    (a crash then charges nothing) when the note cannot be made, e.g. on a full disk."""
    try:
        note = NoteFile(folder, slots)
    except OSError as exc:
        log.warning("no decoding note under %s (%s): decoder crashes will not be charged", folder, exc)
        return DecodingSlots.in_memory(slots)
    return DecodingSlots(note.memory, note=note)


def read_notes(folder: Path) -> set[Claim]:
    """Every unit named in a note under `folder`, live processes' and dead ones'."""
    found: set[Claim] = set()
    for path in folder.glob("*.slots"):
        with contextlib.suppress(FileNotFoundError):
            found |= claims_in(bytearray(path.read_bytes()))
    return found


def charge_dead_notes(folder: Path, charge: Callable[[list[Claim]], None]) -> None:
    """Charge the units named in the notes of dead processes, then drop those notes. A
    note whose charge fails stays for the next start."""
    if not folder.is_dir():
        return
    for partial in folder.glob("*.new"):  # a process died while creating its note
        with contextlib.suppress(OSError), open(partial, "rb") as file:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            partial.unlink()
    for path in sorted(folder.glob("*.slots")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # its process closed it just now
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive
                continue
            claims = sorted(claims_in(bytearray(os.read(fd, os.fstat(fd).st_size))))
            if claims:
                log.warning("a process died while decoding images %s; charging them", claims)
                charge(claims)
            path.unlink(missing_ok=True)
        except Exception:
            log.exception("could not charge the images named in %s; keeping it for the next start", path)
        finally:
            os.close(fd)
