"""Small helpers the real-server fixtures share."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from types import TracebackType
from typing import Any

__all__ = ["ManagedServer", "find_binary", "free_port", "terminate"]


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


def terminate(process: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM ``process``, then SIGKILL if it has not exited within ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ManagedServer:
    """``with Server() as s:`` runs ``start()`` and ``stop()``."""

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
