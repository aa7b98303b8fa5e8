"""Outputs as files under MEDIA_ROOT, written atomically.

Bytes go to a temporary name first and are moved into place, so a reader never sees a
half-written file; the temporary folder is hidden from /processed_images/.
"""

import contextlib
import itertools
import os
import uuid
from pathlib import Path

from app.pipeline.failures import StoreFailure
from app.storage import JPEG_CONTENT_TYPE

TEMP_DIR_NAME = ".incoming"


class LocalFileStorage:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.temp_dir = self.root / TEMP_DIR_NAME
        self._known_folders: set = set()
        # Temporary names only need to be unique among live writers; a counter is cheaper
        # than uuid4, whose urandom call showed up in profiles.
        self._temp_prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-"
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

    def _ensure_folder(self, folder) -> None:
        if folder not in self._known_folders:
            os.makedirs(folder, exist_ok=True)
            self._known_folders.add(folder)

    def remove_stale_temp_files(self) -> None:
        """Drop partial files left by a crash; they were never visible under a real name."""
        if self.temp_dir.is_dir():
            for leftover in self.temp_dir.glob("*.part"):
                leftover.unlink(missing_ok=True)

    def path_for(self, key: str) -> Path:
        return self.root / key

    def open(self, key: str) -> bytes:
        with open(self.path_for(key), "rb") as stored:
            return stored.read()

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
