"""Store stage: put an output JPEG where it is served, atomically.

The file name comes from database ids only, never from user input, and the same image
always gets the same name, so processing an image twice overwrites rather than adds.
Bytes go to a temporary name first and are moved into place, so a reader never sees a
half-written file.
"""

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

    def save(self, key: str, data: bytes) -> str:
        target = self.root / key
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.temp_dir.mkdir(parents=True, exist_ok=True)
            temp = self.temp_dir / f"{uuid.uuid4().hex}.part"
            with open(temp, "wb") as handle:
                handle.write(data)
            os.replace(temp, target)
        except OSError as exc:
            raise StoreFailure(f"could not store the output: {exc.strerror or exc}") from exc
        return f"{self.base_url}/{key}"

    def remove_stale_temp_files(self) -> None:
        """Drop partial files left by a crash; they were never visible under a real name."""
        if self.temp_dir.is_dir():
            for leftover in self.temp_dir.glob("*.part"):
                leftover.unlink(missing_ok=True)
