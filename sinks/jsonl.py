"""JSONL sink: append records to a local file, one JSON object per line.

The reference (what it talks to, parameters, metrics, examples) is
docs/sinks/jsonl.md (which renders the parameters from the class docstring).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from flows import BatchingSink, Retry

__all__ = ["JSONLSink"]

_FATAL_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENOENT}
"""I/O errors that are the sink's own fault: retrying cannot help."""


class JSONLSink(BatchingSink):
    """Sink: append records to a JSON Lines file, fsync-ed before the ack.

    Parameters:
        path: the file (created if missing; its directory must exist).
        batch_size: records per write (and fsync) at most (default 1000).
        flush_interval: longest a record waits before its write (s,
            default 1.0).
        rotate_bytes: rotate the file before a write that would take it past
            this size (default None: never rotate).
        keep: how many rotated files (``path.1`` ... ``path.<keep>``) to
            keep, deleting older ones (default None: keep all). Needs
            ``rotate_bytes``.
        fsync: fsync the file after each write (default True).
        retry: retry policy for I/O errors (default: forever, backoff).
        write_timeout: longest one write may take (s, default 30); past it
            the write is abandoned and retried.
        unready_after: the flow is not ready while a write has been failing
            or in progress this long (s, default 30).
        name: the actor's name (default ``jsonl``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        rotate_bytes: int | None = None,
        keep: int | None = None,
        fsync: bool = True,
        retry: Retry | None = None,
        write_timeout: float | None = 30.0,
        unready_after: float = 30.0,
        name: str = "jsonl",
    ) -> None:
        if rotate_bytes is not None and rotate_bytes < 1:
            raise ValueError(f"rotate_bytes must be > 0 (or None), got {rotate_bytes!r}")
        if keep is not None:
            if rotate_bytes is None:
                raise ValueError("keep limits rotated files: it needs rotate_bytes")
            if keep < 1:
                raise ValueError(f"keep must be >= 1 (or None), got {keep!r}")
        self.path = Path(path)
        super().__init__(
            name=name, batch_size=batch_size, flush_interval=flush_interval, retry=retry,
            write_timeout=write_timeout, unready_after=unready_after,
        )
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.fsync = fsync
        self._encoder = msgspec.json.Encoder()
        self._file: BinaryIO | None = None
        self._size = 0  # bytes of the current file that whole writes put there
        self._rotated = re.compile(re.escape(self.path.name) + r"\.([1-9][0-9]*)")

    # -- actor hooks -------------------------------------------------------

    async def open(self) -> None:
        if self._file is None:
            await self.run_in_thread(self._open_sync)

    async def close(self) -> None:
        if self._file is not None:
            await self.run_in_thread(self._close_sync)

    async def write(self, records: list[Any]) -> None:
        # Encode everything before touching the file: a record msgspec
        # rejects (TypeError and the like: not transient) fails the write
        # with nothing written, and the base class isolates it.
        data = self._encoder.encode_lines(records)
        await self.run_in_thread(self._write_sync, data)

    def is_fatal(self, exc: Exception) -> bool:
        return isinstance(exc, OSError) and exc.errno in _FATAL_ERRNOS

    # -- worker thread -----------------------------------------------------

    def _close_sync(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def _open_sync(self) -> None:
        directory = self.path.parent
        if not directory.is_dir():
            raise FileNotFoundError(
                f"JSONL sink {self.name!r}: directory {str(directory)!r} of {str(self.path)!r} "
                "does not exist (create it first)"
            )
        created = not self.path.exists()
        f: BinaryIO = open(self.path, "ab", buffering=0)  # noqa: SIM115 (kept open)
        try:
            self._size = os.fstat(f.fileno()).st_size
            if self._size and not _ends_with_newline(self.path, self._size):
                # a torn last line from an earlier process: start ours on a new line
                logging.getLogger(f"flows.sink.{self.name}").warning(
                    "%s does not end with a newline (a torn last line?); appending one", self.path
                )
                _write_all(f, b"\n")
                self._size += 1
            if created and self.fsync:
                _fsync_dir(directory)
        except BaseException:
            f.close()
            raise
        self._file = f

    def _write_sync(self, data: bytes) -> None:
        if self._file is None:  # closed by a rotation that failed half way
            self._open_sync()
        if (
            self.rotate_bytes is not None
            and self._size > 0
            and self._size + len(data) > self.rotate_bytes
        ):
            self._rotate_sync()
            self._open_sync()  # creates the new file; its fsync of the directory keeps the renames
        f = self._file
        assert f is not None
        fd = f.fileno()
        if os.fstat(fd).st_size > self._size:
            os.ftruncate(fd, self._size)  # the tail of a write that failed
        try:
            _write_all(f, data)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, self._size)
            except OSError:
                pass  # cut off before the next write instead
            raise
        self._size += len(data)

    def _rotate_sync(self) -> None:
        """``path.i`` -> ``path.i+1`` (newest first), ``path`` -> ``path.1``.

        Only the run ``.1, .2, ...`` up to the first missing number shifts,
        so a rotation interrupted by an error is completed, not repeated,
        by the retry.
        """
        assert self._file is not None
        f, self._file = self._file, None
        f.close()
        directory = self.path.parent
        existing = set()
        for entry in os.listdir(directory):
            match = self._rotated.fullmatch(entry)
            if match:
                existing.add(int(match.group(1)))
        gap = 1
        while gap in existing:
            gap += 1
        if self.keep is not None:
            for i in sorted(existing, reverse=True):
                # after the shift, i < gap is numbered i + 1
                if (i + 1 if i < gap else i) > self.keep:
                    os.unlink(self._name(i))
                    existing.discard(i)
        for i in range(gap - 1, 0, -1):
            if i in existing:
                os.rename(self._name(i), self._name(i + 1))
        os.rename(self.path, self._name(1))
        self._size = 0

    def _name(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")


def _write_all(f: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        if n is None:  # non-blocking file: not ours, but do not spin silently
            raise BlockingIOError("write would block")
        view = view[n:]


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def _fsync_dir(directory: Path) -> None:
    """Make a created or renamed entry in ``directory`` durable (POSIX)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
