"""Small helpers the real-server fixtures share."""

from __future__ import annotations

import os
import shutil
import socket

__all__ = ["free_port", "find_binary"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(name: str, *fallbacks: str) -> str | None:
    """Path of executable ``name`` on PATH or at one of ``fallbacks``, else None."""
    found = shutil.which(name)
    if found:
        return found
    return next((path for path in fallbacks if os.access(path, os.X_OK)), None)
