"""The sha256 digests that tie exported files to their manifest entry.

The exporter records ``sha256`` per file; the server, the device runtime, the Android assets copier and the
golden-vector tool check it.  All of them compute it here.
"""
from __future__ import annotations

import hashlib
import os


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data`` (bytes already in memory, e.g. a file about to be loaded or served)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at ``path``."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
