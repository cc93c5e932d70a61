"""Small helpers the real-server fixtures share."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
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
    """A server run as a child process: ``with Server() as s:`` runs
    ``start()`` and ``stop()``.

    A subclass sets ``name`` and ``ready_timeout``, calls ``_launch(cmd,
    log_path)`` from ``start()`` and says in ``_is_ready()`` when the server
    answers; ``_launch`` waits for that (failing with the server's log when
    it exits or does not answer in time) and stops the server on failure.
    """

    name = "server"
    ready_timeout = 10.0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def log(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _launch(self, cmd: list[str], log_path: Path, *, cwd: Path | None = None) -> None:
        if self.process is not None:
            raise RuntimeError(f"this {type(self).__name__} is already started")
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {code} before it was ready; its log:\n{self.log()}"
                )
            if self._is_ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} was not ready within {self.ready_timeout:g}s ({self!r}); "
                    f"its log:\n{self.log()}"
                )
            time.sleep(0.02)

    def _terminate(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; idempotent."""
        process, self.process = self.process, None
        terminate(process, timeout)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
