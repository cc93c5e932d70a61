"""Small helpers the real-server fixtures share."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["ManagedServer", "PortInUse", "find_binary", "free_port", "on_a_free_port", "port_in_use",
           "terminate"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago.

    Another process may bind it before the caller's server does: a server
    started on it should go through ``on_a_free_port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortInUse(RuntimeError):
    """The server exited while starting because its port was taken."""


def port_in_use(log: str) -> bool:
    """Whether a server's log says it could not bind its port (Redis,
    influxd and PostgreSQL all say "address already in use")."""
    return "address already in use" in log.lower()


def on_a_free_port(start: Callable[[int], Any], port: int, *, fixed: bool, attempts: int = 5) -> Any:
    """``start(port)``; unless the port is ``fixed`` (given by the caller, or
    a restart's), again on a new free port while it raises ``PortInUse``:
    between ``free_port`` and the server's bind, another process may take
    the port (a machine shared by several test runs)."""
    for attempt in range(attempts):
        try:
            return start(port)
        except PortInUse:
            if fixed or attempt == attempts - 1:
                raise
            port = free_port()
    raise AssertionError("unreachable")


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

    def log(self, since: int = 0) -> str:
        """What the server wrote to stdout and stderr so far (from byte ``since``)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_bytes()[since:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _launch(self, cmd: list[str], log_path: Path, *, cwd: Path | None = None) -> None:
        """Run ``cmd`` and wait until ready; raises ``PortInUse`` when it exits
        because its port was taken (see ``on_a_free_port``)."""
        if self.process is not None:
            raise RuntimeError(f"this {type(self).__name__} is already started")
        self.log_path = log_path
        with open(log_path, "ab") as log:
            logged_before = log.tell()
            self.process = subprocess.Popen(
                cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(logged_before)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, logged_before: int) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                error = PortInUse if port_in_use(self.log(since=logged_before)) else RuntimeError
                raise error(
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
