"""Outputs as files under MEDIA_ROOT, written atomically.

Bytes go to a temporary name first and are moved into place, so a reader never sees a
half-written file; the temporary folder is hidden from /processed_images/. A copy is a
hard link (no bytes written; each name goes with its own request's folder), or a real
copy where the file system has no hard links.
"""

import contextlib
import errno
import itertools
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from app.storage import JPEG_CONTENT_TYPE, StoreFailure

TEMP_DIR_NAME = ".incoming"
# A partial file of a writer on another machine (a shared folder) is left this long.
FOREIGN_PARTIAL_FILE_SECONDS = 3600


class LocalFileStorage:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.temp_dir = self.root / TEMP_DIR_NAME
        self._known_folders: set = set()
        # Temporary names only need to be unique among live writers; a counter is cheaper
        # than uuid4, whose urandom call showed up in profiles.
        self._temp_prefix = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._temp_numbers = itertools.count()

    def save(self, key: str, data: bytes, content_type: str = JPEG_CONTENT_TYPE) -> None:
        target = os.path.join(self.root, key)
        temp = os.path.join(self.temp_dir, f"{self._temp_prefix}{next(self._temp_numbers)}.part")
        try:
            self._ensure_folder(os.path.dirname(target))
            self._ensure_folder(self.temp_dir)
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                remaining = memoryview(data)
                while remaining:
                    remaining = remaining[os.write(descriptor, remaining) :]
            finally:
                os.close(descriptor)
            os.replace(temp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise StoreFailure(f"could not store the output: {exc.strerror or exc}") from exc

    def copy(self, source_key: str, target_key: str) -> None:
        source = os.path.join(self.root, source_key)
        target = os.path.join(self.root, target_key)
        temp = os.path.join(self.temp_dir, f"{self._temp_prefix}{next(self._temp_numbers)}.part")
        try:
            self._ensure_folder(os.path.dirname(target))
            self._ensure_folder(self.temp_dir)
            try:
                os.link(source, temp)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise FileNotFoundError(f"no stored output {source_key}") from exc
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                    raise
                shutil.copyfile(source, temp)
            os.replace(temp, target)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise StoreFailure(f"could not store the output: {exc.strerror or exc}") from exc

    def _ensure_folder(self, folder) -> None:
        if folder not in self._known_folders:
            os.makedirs(folder, exist_ok=True)
            self._known_folders.add(folder)

    def remove_stale_temp_files(self) -> None:
        """Drop partial files left by a crash; they were never visible under a real name.
        Files of live writers (other worker processes starting beside this one) stay: a
        file is stale when its writer's process is gone from this machine, or, written on
        another machine, when it is an hour old."""
        if not self.temp_dir.is_dir():
            return
        host = socket.gethostname()
        for leftover in self.temp_dir.glob("*.part"):
            writer_host, pid = _writer_of(leftover.name)
            with contextlib.suppress(OSError):
                if writer_host == host and pid is not None:
                    stale = not _process_exists(pid)
                else:
                    stale = time.time() - leftover.stat().st_mtime > FOREIGN_PARTIAL_FILE_SECONDS
                if stale:
                    leftover.unlink()

    def path_for(self, key: str) -> Path:
        return self.root / key

    def open(self, key: str) -> bytes:
        with open(self.path_for(key), "rb") as stored:
            return stored.read()

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def delete_prefix(self, key_prefix: str) -> int:
        folder = self.root / key_prefix
        if not key_prefix.strip("/") or not folder.is_dir():
            return 0
        removed = 0
        # Deepest first, so the thumbs/ folder is empty by the time it is reached.
        for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
                removed += 1
        with contextlib.suppress(OSError):
            folder.rmdir()
        return removed

    def check(self) -> str | None:
        try:
            self._ensure_folder(self.temp_dir)
        except OSError as exc:
            return f"the media folder cannot be written: {exc.strerror or exc}"
        if not os.access(self.temp_dir, os.W_OK):
            return "the media folder cannot be written: permission denied"
        return None


def _writer_of(partial_name: str) -> tuple[str, int | None]:
    """The host and process id in a partial file's name, "{host}-{pid}-{random}-{n}.part"."""
    host_and_pid = partial_name.removesuffix(".part").rsplit("-", 2)[0]
    host, _, pid = host_and_pid.rpartition("-")
    return host, int(pid) if pid.isdigit() else None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
