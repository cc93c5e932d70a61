"""PostgreSQL sink: store ticks in a PostgreSQL table, idempotently, through COPY.

Talks to PostgreSQL 12+ through psycopg 3 (``pip install flows[postgres]``),
with the synchronous client in a worker thread (psycopg's async API runs on
asyncio only), one connection per sink. One table (default ``ticks``),
created if missing:

    source text, symbol text, ts double precision, price double precision,
    bid double precision, ask double precision, volume double precision,
    PRIMARY KEY (source, symbol, ts)

Each write is one transaction: the rows are COPYed straight into the table
(the fast path). When that hits a key already stored (a redelivered batch)
the transaction rolls back and the write takes the safe path: the rows are
COPYed into a temporary staging table (``ON COMMIT DROP``), then moved with
``INSERT ... SELECT ... ON CONFLICT (source, symbol, ts) DO NOTHING``. A batch delivered twice (a
retry after a lost commit acknowledgement, a replayed source) is stored
once, so delivery is at-least-once and storage exactly-once per key.

Outages: the sink connects lazily, at its first write, so a flow can start
while the database is down. A lost connection, a refused connection, a
server restart, a timeout (``OperationalError``, ``InterfaceError``, OS
errors) and any other failure that is not the records' fault drop the
connection; the write is retried with backoff on a new one (``retry``,
default: forever), and the flow backs up behind the sink meanwhile: nothing
is dropped while PostgreSQL is away. Records the database refuses for good
(``DataError``, ``IntegrityError`` such as a CHECK constraint of a table you
created) are isolated by splitting the write, and only they are dropped,
counted with reason ``rejected``. (A table of another shape or a missing
privilege is retried too, logged at each attempt: fix it and the flow
resumes.)

Metrics: the core component set plus ``flows_sink_write_seconds``,
``flows_sink_batch_records``, ``flows_sink_write_errors_total`` and
``flows_sink_retries_total``; errors by type (``OperationalError``, ...)
in ``flows_errors_total``.

Example::

    Flow("crypto", sources=[SyntheticMarket()], stages=[ChangeDetector()],
         sinks=[PostgresSink("postgresql://flows@db.internal/market",
                             batch_size=5000, flush_interval=0.5)])
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import psycopg
import trio
from psycopg import sql

from flows import BatchingSink, Retry, redact

__all__ = ["PostgresSink"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_COLUMNS = ("source", "symbol", "ts", "price", "bid", "ask", "volume")

log = logging.getLogger("flows.sink.postgres")


class PostgresSink(BatchingSink):
    """Sink: store Ticks in a PostgreSQL table.

    Parameters:
        dsn: a libpq connection string or URI
            (``postgresql://user@host:5432/db``); libpq's ``PG*``
            environment variables fill in what it leaves out. A password
            in it (``user:password@``, ``password=...``) is masked
            wherever the sink is shown (``flows.redact``).
        table: table name, optionally ``schema.table`` (created if
            missing; used as written: quoted, so case-sensitive).
        batch_size: rows per transaction at most (default 1000).
        flush_interval: longest a row waits before its write (s, default 1.0).
        retry: retry policy for transient errors (default: forever, backoff).
        connect_timeout: how long one connection attempt may take (s,
            default 5.0; libpq's minimum is 2).
        name: the actor's name.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "ticks",
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        retry: Retry | None = None,
        connect_timeout: float = 5.0,
        name: str = "postgres",
    ) -> None:
        if not _IDENT.match(table):
            raise ValueError(f"table name {table!r} is not a plain SQL identifier (or schema.table)")
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be > 0")
        self.dsn = dsn
        self._shown_dsn = redact(dsn, learn=True)  # the password never shows
        self.table = table
        super().__init__(
            name=name, batch_size=batch_size, flush_interval=flush_interval, retry=retry
        )
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        target = sql.Identifier(*table.split("."))
        cols = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        self._create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            "source text NOT NULL, symbol text NOT NULL, ts double precision NOT NULL, "
            "price double precision NOT NULL, bid double precision, ask double precision, "
            "volume double precision, PRIMARY KEY (source, symbol, ts))"
        ).format(target)
        self._stage = sql.SQL(
            "CREATE TEMP TABLE flows_staging (source text, symbol text, ts double precision, "
            "price double precision, bid double precision, ask double precision, "
            "volume double precision) ON COMMIT DROP"
        )
        self._copy = sql.SQL("COPY flows_staging ({}) FROM STDIN").format(cols)
        self._copy_direct = sql.SQL("COPY {} ({}) FROM STDIN").format(target, cols)
        self._insert = sql.SQL(
            "INSERT INTO {} ({}) SELECT {} FROM flows_staging "
            "ON CONFLICT (source, symbol, ts) DO NOTHING"
        ).format(target, cols, cols)

    def __repr__(self) -> str:
        return f"PostgresSink({self._shown_dsn!r}, table={self.table!r}, name={self.name!r})"

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self.dsn,
            autocommit=True,  # transactions are explicit: conn.transaction()
            connect_timeout=max(2, math.ceil(self.connect_timeout)),
            application_name=f"flows-{self.name}",
        )
        try:
            try:
                with conn.transaction():
                    conn.execute(self._create)
            except (psycopg.IntegrityError, psycopg.errors.DuplicateObject,
                    psycopg.errors.DuplicateTable):
                # Another connection created the table at the same moment
                # (a duplicate in the catalog): it exists now.
                with conn.transaction():
                    conn.execute(self._create)
        except BaseException:
            conn.close()
            raise
        return conn

    def _write_sync(self, rows: list[tuple[Any, ...]]) -> None:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._drop_connection()
            conn = self._conn = self._connect()
        try:
            try:
                # The common case, a batch never stored before: COPY straight in.
                with conn.transaction(), conn.cursor() as cur, cur.copy(self._copy_direct) as copy:
                    for row in rows:
                        copy.write_row(row)
                return
            except psycopg.errors.UniqueViolation:
                pass  # some rows are stored already (a redelivery): dedupe through staging
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(self._stage)
                with cur.copy(self._copy) as copy:
                    for row in rows:
                        copy.write_row(row)
                cur.execute(self._insert)
        except (psycopg.DataError, psycopg.IntegrityError):
            raise  # the records' fault: the transaction rolled back, the connection is fine
        except BaseException:
            # lost, refused, restarted, or in an unknown state: start afresh on retry
            self._drop_connection()
            raise

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # pragma: no cover - closing a broken connection
                log.debug("closing a broken connection failed", exc_info=True)

    async def open(self) -> None:
        """Nothing blocking: the first write connects (the database may be down now)."""

    async def close(self) -> None:
        if self._conn is not None:
            await trio.to_thread.run_sync(self._drop_connection)

    async def write(self, records: list[Any]) -> None:
        rows = [(t.source, t.symbol, t.ts, t.price, t.bid, t.ask, t.volume) for t in records]
        await trio.to_thread.run_sync(self._write_sync, rows)

    def is_transient(self, exc: Exception) -> bool:
        # Only the records themselves are worth dropping; anything else
        # (connection lost or refused, shutdown, timeouts, serialization
        # failures, a table of the wrong shape) is retried.
        if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
            return False
        return isinstance(exc, (psycopg.Error, OSError, TimeoutError))
