"""A throw-away PostgreSQL server for tests (like ``pytest-postgresql``, smaller).

Starts the Debian ``postgresql-15`` binaries (``/usr/lib/postgresql/15/bin``)
as a child process listening on 127.0.0.1 on a free port, with a fresh data
directory under ``/tmp`` (``initdb`` once per server, about 1 s) that is
removed at the end. As root, the server runs as the OS user ``postgres``
(PostgreSQL refuses to run as root), so the data directory must sit where
that user can reach it: not inside pytest's ``tmp_path`` (mode 0700).

Authentication is ``trust`` for the superuser ``postgres``; ``fsync`` is off
(a test server: fast, not crash-safe, though a clean ``stop()`` checkpoints).
``stop()`` sends SIGINT (PostgreSQL's "fast" shutdown: clients are
disconnected, the data is kept) and ``start()`` brings the same data
directory back on the same port: what an outage test needs. ``kill()``
SIGKILLs the server and its backends (the next ``start()`` runs crash
recovery).

Example::

    from flows.testing.postgres import postgres_server

    with postgres_server() as pg:
        conn = psycopg.connect(pg.dsn)      # postgresql://postgres@127.0.0.1:PORT/postgres
        ...
        pg.stop()                            # an outage
        pg.start()                           # same port, same data

``pause()`` SIGSTOPs the postmaster and every backend (a hung server: it
accepts TCP connections and data into the kernel's buffers, and answers
nothing); ``resume()`` SIGCONTs them (``stop()`` resumes a paused server
first).

``start_postgres()`` returns a started server to ``close()`` yourself (a
pytest fixture's teardown); a server left running is stopped at interpreter
exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from ._ports import PortInUse, free_port, on_a_free_port, port_in_use

__all__ = ["PG_BIN", "PostgresError", "PostgresServer", "postgres_server", "start_postgres"]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
"""Where the server binaries are looked for by default."""


class PostgresError(RuntimeError):
    """The server could not be set up, started or stopped; the message holds its log."""


class _PortTaken(PostgresError, PortInUse):
    """postgres exited at start: another process had bound its port."""





class PostgresServer:
    """One PostgreSQL server on 127.0.0.1, owning its data directory.

    Use ``start_postgres()`` or ``postgres_server()`` rather than this
    constructor (which only initializes the data directory).

    Parameters:
        base_dir: where the server's directory is created (default
            ``/tmp``); the user ``postgres`` must be able to reach it.
        bin_dir: the PostgreSQL binaries (default ``PG_BIN``).
        port: the TCP port (default: a free one, kept across restarts).
        timeout: seconds ``initdb``, ``start()`` and ``stop()`` may take.

    Attributes: ``port``, ``dsn``, ``data_dir``, ``log_path``, ``running``.
    """

    def __init__(
        self,
        base_dir: str | Path | None = None,
        *,
        bin_dir: str | Path = PG_BIN,
        port: int | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.bin_dir = Path(bin_dir)
        if not (self.bin_dir / "postgres").exists():
            raise PostgresError(f"no PostgreSQL server binary in {self.bin_dir}")
        self.timeout = timeout
        self.port = free_port() if port is None else port
        self._port_fixed = port is not None  # else picked again at start, after initdb
        self.root = Path(tempfile.mkdtemp(prefix="flows-pg-", dir=base_dir or "/tmp"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._as_postgres = os.geteuid() == 0
        try:
            if self._as_postgres:
                shutil.chown(self.root, "postgres", "postgres")
            self._initdb()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        atexit.register(self.close)

    @property
    def dsn(self) -> str:
        """A libpq URI for the superuser's default database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _user_args(self) -> dict:
        if self._as_postgres:
            return {"user": "postgres", "group": "postgres", "extra_groups": []}
        return {}

    def _initdb(self) -> None:
        cmd = [
            str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
            "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
        ]
        try:
            done = subprocess.run(
                cmd, cwd=self.root, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=self.timeout, check=False, **self._user_args(),
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(f"initdb took more than {self.timeout:g}s") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise PostgresError(f"initdb failed (exit {done.returncode}):\n{output}")

    def start(self) -> None:
        """Start the server (on the same port and data) and wait until it accepts connections.

        Raises PostgresError with the server's log if it exits or is not
        ready within ``timeout`` seconds.
        """
        if self._closed:
            raise PostgresError("this server was closed")
        if self.running:
            return
        # a port picked before initdb (seconds ago) may be gone: pick it now
        port = self.port if self._port_fixed else free_port()
        on_a_free_port(self._start_on, port, fixed=self._port_fixed)
        self._port_fixed = True  # a restart keeps it

    def _start_on(self, port: int) -> None:
        self.port = port
        cmd = [
            str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-h", "127.0.0.1",
            "-p", str(port), "-k", str(self.root), "-c", "fsync=off",
        ]
        with open(self.log_path, "ab") as log:
            logged_before = log.tell()
            self._proc = subprocess.Popen(
                cmd, cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, **self._user_args(),
            )
        deadline = time.monotonic() + self.timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                taken = port_in_use(self.log_path.read_bytes()[logged_before:].decode(errors="replace"))
                raise (_PortTaken if taken else PostgresError)(
                    f"postgres exited with {code} while starting:\n{self.log()}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise PostgresError(
                    f"postgres not ready on port {self.port} after {self.timeout:g}s:\n{self.log()}"
                )
            time.sleep(0.05)

    def _ready(self) -> bool:
        probe = subprocess.run(
            [str(self.bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-t", "1"],
            stdin=subprocess.DEVNULL, capture_output=True, check=False,
        )
        return probe.returncode == 0

    def stop(self) -> None:
        """Stop the server with SIGINT (fast shutdown) and wait for it to exit
        (a paused server is resumed first)."""
        self.resume()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self._killpg(proc)
                raise PostgresError(
                    f"postgres did not stop within {self.timeout:g}s; killed:\n{self.log()}"
                ) from None

    def pids(self) -> list[int]:
        """The postmaster's pid then its children's (backends, background
        workers: they are in sessions of their own, so not in its process
        group); empty when the server is not running."""
        if not self.running:
            return []
        assert self._proc is not None
        root = self._proc.pid
        return [root, *_children(root)]

    def pause(self) -> None:
        """SIGSTOP the postmaster, then every process it forked."""
        if not self.running:
            raise PostgresError("the server is not running")
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)  # first: it forks no more
        stopped: set[int] = set()
        while True:
            fresh = set(_children(self._proc.pid)) - stopped
            if not fresh:
                return
            for pid in fresh:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            stopped |= fresh

    def resume(self) -> None:
        """SIGCONT the postmaster and every process it forked (safe to call
        on a server that is not paused)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the server and its backends (a crash) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._killpg(proc)

    @staticmethod
    def _killpg(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the server's own session: backends too
        except ProcessLookupError:
            pass
        proc.wait()

    def close(self) -> None:
        """Stop the server and remove its directory; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log(self, tail: int = 4000) -> str:
        """The end of the server's log."""
        try:
            return self.log_path.read_bytes()[-tail:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "closed" if self._closed else "stopped"
        return f"<PostgresServer {self.dsn} {state}>"


def _children(parent: int) -> list[int]:
    """Pids whose parent is ``parent`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) "
        if len(fields) > 1 and int(fields[1]) == parent:
            out.append(int(entry))
    return out


def start_postgres(base_dir: str | Path | None = None, **options: object) -> PostgresServer:
    """A new, started server; ``close()`` it when done. Options as ``PostgresServer``."""
    server = PostgresServer(base_dir, **options)  # type: ignore[arg-type]
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@contextmanager
def postgres_server(base_dir: str | Path | None = None, **options: object) -> Iterator[PostgresServer]:
    """``with postgres_server() as pg:`` a started server, stopped and removed at the end."""
    server = start_postgres(base_dir, **options)
    try:
        yield server
    finally:
        server.close()
