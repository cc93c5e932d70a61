"""A throw-away InfluxDB 1.x server for tests (``influxd`` as a child process).

The server listens on 127.0.0.1 only, on free ports (or the ones you give),
keeps its meta, data and WAL directories under a directory of its own
(a temporary one, deleted at ``stop()``, unless you pass ``data_dir``), and
has usage reporting and the ``_internal`` monitor database switched off.
``start()`` returns once ``GET /ping`` answers 204; if it does not within
``ready_timeout`` seconds (or influxd exits), it raises ``RuntimeError``
with the server's log. There is no ``influx`` CLI here: talk HTTP.

Usage::

    with InfluxServer() as server:
        create_database(server.url, "test")
        httpx.post(f"{server.url}/write?db=test", content=b"m v=1 1")

    server = InfluxServer().start()      # or start and stop by hand
    ...
    server.stop()

Restart on the same port and data (a database coming back after an outage)::

    server = InfluxServer(port=p, data_dir=d).start()
    server.stop()
    server = InfluxServer(port=p, data_dir=d).start()

``influxd_path()`` is the binary found on ``PATH`` (or ``/usr/bin/influxd``),
``None`` if there is none: tests skip on that.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx

from ._ports import ManagedServer, find_binary, free_port, on_a_free_port

__all__ = ["InfluxServer", "create_database", "free_port", "influxd_path", "query"]


def influxd_path() -> str | None:
    """Path of the ``influxd`` binary, or ``None`` when it is not installed."""
    return find_binary("influxd", "/usr/bin/influxd")


_CONFIG = """\
reporting-enabled = false
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root}/meta"
  retention-autocreate = true
  logging-enabled = false

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  wal-fsync-delay = "0s"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{port}"
  auth-enabled = {auth}
  log-enabled = false
  pprof-enabled = false
"""


class InfluxServer(ManagedServer):
    """One ``influxd`` child process bound to 127.0.0.1.

    Parameters:
        port: HTTP port (default: a free one).
        data_dir: directory for meta, data, WAL, config and log (default: a
            new temporary directory, deleted at ``stop()``; a given one is kept).
        ready_timeout: how long ``start()`` waits for ``/ping`` (s, default 15).
        binary: the influxd to run (default: ``influxd_path()``).
        admin: ``(user, password)``: turn authentication on and create this
            admin user at start (pass ``auth=admin`` to ``query()``).
    """

    name = "influxd"

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: str | Path | None = None,
        ready_timeout: float = 15.0,
        binary: str | None = None,
        admin: tuple[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self._port_fixed = port is not None  # else another is taken if this one goes meanwhile
        self.admin = admin
        self._own_dir = data_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="influxd-") if data_dir is None else data_dir)
        self.ready_timeout = ready_timeout
        self.binary = binary or influxd_path()

    def start(self) -> InfluxServer:
        """Start influxd and wait until ``GET /ping`` is 204; returns ``self``."""
        if self.binary is None:
            raise RuntimeError("influxd is not installed (Debian: apt-get install influxdb)")
        on_a_free_port(self._start_on, self.port, fixed=self._port_fixed)
        self._port_fixed = True  # a restart keeps it
        if self.admin:
            user, password = self.admin
            # allowed without credentials while no admin exists
            query(self.url, f"CREATE USER \"{_quote(user)}\" WITH PASSWORD '{_quote_str(password)}' "
                  "WITH ALL PRIVILEGES", method="POST")
        return self

    def _start_on(self, port: int) -> None:
        assert self.binary is not None
        self.port = port
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "influxdb.conf"
        config.write_text(_CONFIG.format(root=self.dir, port=port, rpc_port=free_port(),
                                         auth="true" if self.admin else "false"))
        self._launch([self.binary, "run", "-config", str(config)], self.dir / "influxd.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _is_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ping", timeout=1.0).status_code == 204
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); idempotent.

        Deletes the data directory if the server made it.
        """
        self._terminate(timeout)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        state = "running" if self.process is not None else "stopped"
        return f"InfluxServer({self.url}, {state})"


def query(url: str, q: str, *, db: str | None = None, epoch: str | None = None, method: str = "GET",
          auth: tuple[str, str] | None = None) -> dict:
    """Run InfluxQL ``q`` over HTTP (``/query``) and return the decoded JSON;
    ``auth`` is ``(user, password)`` when the server requires it.

    Raises ``RuntimeError`` with the server's message when a statement fails.
    """
    params = {"q": q}
    if db is not None:
        params["db"] = db
    if epoch is not None:
        params["epoch"] = epoch
    with httpx.Client(timeout=10.0, auth=auth) as client:
        if method == "POST":
            response = client.post(f"{url}/query", data=params)
        else:
            response = client.get(f"{url}/query", params=params)
    body = response.json()
    errors = [body.get("error")] + [r.get("error") for r in body.get("results", [])]
    errors = [e for e in errors if e]
    if response.status_code >= 400 or errors:
        raise RuntimeError(f"query {q!r} failed ({response.status_code}): {'; '.join(errors)}")
    return body


def create_database(url: str, name: str, *, auth: tuple[str, str] | None = None) -> None:
    """``CREATE DATABASE name`` (a no-op if it exists) via ``POST /query``."""
    query(url, f'CREATE DATABASE "{_quote(name)}"', method="POST", auth=auth)


def _quote(identifier: str) -> str:
    return identifier.replace("\\", "\\\\").replace('"', '\\"')


def _quote_str(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
