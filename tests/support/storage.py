"""A local storage whose disk the test can fill and empty at will."""

import errno
import os
import threading

from app.storage import StoreFailure
from app.storage.local import LocalFileStorage


class FillableStorage(LocalFileStorage):
    """LocalFileStorage that, while `full` is set, refuses every save as a full filesystem
    does (ENOSPC, reported as the store stage reports it)."""

    def __init__(self, root):
        super().__init__(root)
        self.full = threading.Event()
        self.refused = 0

    def save(self, key: str, data: bytes, content_type: str = "image/jpeg") -> None:
        if self.full.is_set():
            self.refused += 1
            error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise StoreFailure(f"could not store the output: {error.strerror}") from error
        return super().save(key, data, content_type)
