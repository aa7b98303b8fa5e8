"""Store stage: put an output JPEG where it is served, atomically.

The file name comes from database ids only, never from user input, and the same image
always gets the same name, so processing an image twice overwrites rather than adds.
Bytes go to a temporary name first and are moved into place, so a reader never sees a
half-written file.
"""

import contextlib
import itertools
import os
import uuid
from pathlib import Path
from typing import Protocol

from app.pipeline.failures import StoreFailure

TEMP_DIR_NAME = ".incoming"


def output_key(request_id: str, image_id: int) -> str:
    return f"{request_id}/{image_id}.jpg"


class ImageStorage(Protocol):
    def save(self, key: str, data: bytes) -> str:
        """Store data under key and return its public URL."""


class LocalFileStorage:
    def __init__(self, root: Path, base_url: str):
        self.root = Path(root)
        self.base_url = base_url.rstrip("/")
        self.temp_dir = self.root / TEMP_DIR_NAME
        self._known_folders: set = set()
        # Temporary names only need to be unique among live writers; a counter is cheaper
        # than uuid4, whose urandom call showed up in profiles.
        self._temp_prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._temp_numbers = itertools.count()

    def save(self, key: str, data: bytes) -> str:
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
        return f"{self.base_url}/{key}"

    def _ensure_folder(self, folder) -> None:
        if folder not in self._known_folders:
            os.makedirs(folder, exist_ok=True)
            self._known_folders.add(folder)

    def remove_stale_temp_files(self) -> None:
        """Drop partial files left by a crash; they were never visible under a real name."""
        if self.temp_dir.is_dir():
            for leftover in self.temp_dir.glob("*.part"):
                leftover.unlink(missing_ok=True)
