"""A throw-away Redis server for tests (``redis-server`` as a child process).

The server listens on 127.0.0.1 only, on a free port (or the one you give),
with persistence off (``--save '' --appendonly no``) and its working
directory and log in a temporary directory that ``stop()`` deletes.
``start()`` returns once the server answers ``PING`` (about 20 ms); if it
does not within ``ready_timeout`` seconds, or exits first, it raises
``RuntimeError`` with the server's log (a port picked here that another
process took meanwhile is replaced by another free one). Readiness is
probed with a raw socket, so this module needs no Redis client library.

Usage::

    from flows.testing.redis import RedisServer, redis_server_path

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)   # redis://127.0.0.1:PORT/0
        ...

    server = RedisServer().start()      # or start and stop by hand
    ...
    server.stop()

An outage test can point a client at ``RedisServer(port=p)`` before
starting it, or ``stop()`` a server and start a new one on the same port
(the data does not survive: nothing is persisted).

``redis_server_path()`` is the binary found on ``PATH`` (or
``/usr/bin/redis-server``), ``None`` if there is none: tests skip on that.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from ._ports import ManagedServer, find_binary, free_port, on_a_free_port

__all__ = ["RedisServer", "free_port", "redis_server_path"]


def redis_server_path() -> str | None:
    """Path of the ``redis-server`` binary, or ``None`` when it is not installed."""
    return find_binary("redis-server", "/usr/bin/redis-server")


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up (with a password)
    except OSError:
        return False


class RedisServer(ManagedServer):
    """One ``redis-server`` child process bound to 127.0.0.1.

    Parameters:
        port: TCP port (default: a free one).
        ready_timeout: how long ``start()`` waits for ``PING`` (s, default 10).
        binary: the redis-server to run (default: ``redis_server_path()``).
        password: when given, the server requires it (``--requirepass``) and
            ``url`` holds it (``redis://:PASSWORD@127.0.0.1:PORT/0``).

    Attributes: ``port``, ``url`` (``redis://127.0.0.1:PORT/0``), ``dir``,
    ``process`` (``None`` when stopped).
    """

    name = "redis-server"

    def __init__(
        self,
        *,
        port: int | None = None,
        ready_timeout: float = 10.0,
        binary: str | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self._port_fixed = port is not None  # else another is taken if this one goes meanwhile
        self.password = password
        self.ready_timeout = ready_timeout
        self.binary = binary or redis_server_path()
        self.dir: Path | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> RedisServer:
        """Start redis-server and wait until it answers ``PING``; returns ``self``."""
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        if self.process is not None:
            raise RuntimeError("this RedisServer is already started")
        on_a_free_port(self._start_on, self.port, fixed=self._port_fixed)
        self._port_fixed = True  # a restart keeps it
        return self

    def _start_on(self, port: int) -> None:
        assert self.binary is not None
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="flows-redis-"))
        cmd = [
            self.binary, "--bind", "127.0.0.1", "--port", str(port),
            "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        self._launch(cmd, self.dir / "redis.log", cwd=self.dir)

    def _is_ready(self) -> bool:
        return _pong(self.port)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``) and delete
        its directory; idempotent."""
        self._terminate(timeout)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __repr__(self) -> str:
        where = f"redis://127.0.0.1:{self.port}/0"  # never the password
        return f"RedisServer({where}, {'running' if self.running else 'stopped'})"
