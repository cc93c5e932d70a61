"""SQLite sink: the embedded default store for ticks (a local file, Python's sqlite3).

The reference (table, idempotence, errors, timeouts, parameters, metrics)
is the docs page ``docs/sinks/sqlite.md``.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows import BatchingSink, Retry, Tick, record_schema

__all__ = ["SQLiteSink"]

_TICKS = {Tick}  # a write of Ticks only takes their own path

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Primary result codes (the low byte of an extended one): worth retrying, or
# the sink's own fault. The rest (CONSTRAINT, TOOBIG, MISMATCH, RANGE, ...)
# and errors raised before SQLite sees a row are the records' fault.
_TRANSIENT_CODES = {
    5,  # SQLITE_BUSY
    6,  # SQLITE_LOCKED
    7,  # SQLITE_NOMEM
    9,  # SQLITE_INTERRUPT (write_timeout)
    10,  # SQLITE_IOERR
    13,  # SQLITE_FULL
    15,  # SQLITE_PROTOCOL
    17,  # SQLITE_SCHEMA
}
_FATAL_CODES = {
    1,  # SQLITE_ERROR: no such table or column (a table of another shape)
    3,  # SQLITE_PERM
    8,  # SQLITE_READONLY
    11,  # SQLITE_CORRUPT
    14,  # SQLITE_CANTOPEN
    23,  # SQLITE_AUTH
    26,  # SQLITE_NOTADB
}


class SQLiteSink(BatchingSink):
    """Sink: store Ticks in a SQLite table.

    Parameters:
        path: the database file (created if missing).
        table: the Ticks' table name (created if missing).
        tables: table names for other record types (default: each type's
            ``record_schema`` table: ``trades``, ``candles``, ...).
        batch_size: rows per transaction at most (default 1000).
        flush_interval: longest a row waits before its write (s, default 1.0).
        retry: retry policy for transient errors (default: forever, backoff).
        busy_timeout: how long one write waits on a lock held by another
            connection before it fails and is retried (s).
        write_timeout: longest one write may take (s, default 30); past it
            the write is interrupted and retried.
        unready_after: the flow is not ready while a write has been failing
            or in progress this long (s, default 30).
        name: the actor's name.
    """

    def __init__(
        self,
        path: str | Path = "ticks.db",
        *,
        table: str = "ticks",
        tables: Mapping[type, str] | None = None,
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        retry: Retry | None = None,
        busy_timeout: float = 5.0,
        write_timeout: float | None = 30.0,
        unready_after: float = 30.0,
        name: str = "sqlite",
    ) -> None:
        if not _IDENT.match(table):
            raise ValueError(f"table name {table!r} is not a plain SQL identifier")
        self.tables = dict(tables or {})
        for other in self.tables.values():
            if not _IDENT.match(other):
                raise ValueError(f"table name {other!r} is not a plain SQL identifier")
        self.path = Path(path)
        self.table = table
        self._plans: dict[type, tuple[str, str, Any]] = {}  # type -> (create, insert, schema)
        self._created: set[str] = set()  # create statements run on this connection
        super().__init__(
            name=name, batch_size=batch_size, flush_interval=flush_interval, retry=retry,
            write_timeout=write_timeout, unready_after=unready_after,
        )
        self.busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._insert = (
            f"INSERT INTO {table} (source, symbol, ts, price, bid, ask, volume) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source, symbol, ts) DO NOTHING"
        )

    def _connect(self) -> sqlite3.Connection:
        self._created.clear()
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, check_same_thread=False,
                             isolation_level=None)
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
            self._db = await self.run_in_thread(self._connect)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await self.run_in_thread(db.close)

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
        if set(map(type, records)) == _TICKS:  # the Ticks' own path
            rows = [(t.source, t.symbol, t.ts, t.price, t.bid, t.ask, t.volume) for t in records]
            await self.run_in_thread(self._write_sync, rows)
        else:
            await self.run_in_thread(self._write_groups_sync, self._groups(records))

    # -- other record types: a table per type ------------------------------------

    def _groups(self, records: list[Any]) -> list[tuple[str | None, str, list[tuple[Any, ...]]]]:
        """(create statement, insert statement, rows) per record type."""
        by_type: dict[type, list[Any]] = {}
        for r in records:
            by_type.setdefault(type(r), []).append(r)
        groups: list[tuple[str | None, str, list[tuple[Any, ...]]]] = []
        for kind, same in by_type.items():
            if kind is Tick:
                rows = [(t.source, t.symbol, t.ts, t.price, t.bid, t.ask, t.volume) for t in same]
                groups.append((None, self._insert, rows))
            else:
                create, insert, schema = self._plan(kind)
                groups.append((create, insert, schema.rows(same)))
        return groups

    def _plan(self, kind: type) -> tuple[str, str, Any]:
        plan = self._plans.get(kind)
        if plan is None:
            schema = record_schema(kind)
            plan = self._plans[kind] = (*_statements(self.tables.get(kind, schema.table), schema),
                                        schema)
        return plan

    def _write_groups_sync(self, groups: list[tuple[str | None, str, list[tuple[Any, ...]]]]) -> None:
        assert self._db is not None
        db = self._db
        created = []
        db.execute("BEGIN")
        try:
            for create, insert, rows in groups:
                if create is not None and create not in self._created:
                    db.execute(create)
                    created.append(create)
                db.executemany(insert, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._created.update(created)

    def abort(self) -> None:
        db = self._db
        if db is not None:
            db.interrupt()  # thread-safe: the statement in progress fails with "interrupted"

    def is_transient(self, exc: Exception) -> bool:
        # locked/busy, disk full, I/O error, interrupted
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code is None:  # no code: a closed database, a misuse
                return isinstance(exc, sqlite3.OperationalError)
            return code & 0xFF in _TRANSIENT_CODES
        return isinstance(exc, (OSError, TimeoutError))

    def is_fatal(self, exc: Exception) -> bool:
        # read-only or unopenable file, corrupt database, a table of another shape
        code = getattr(exc, "sqlite_errorcode", None)
        return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _FATAL_CODES


_SQL_TYPES = {"float": "REAL", "int": "INTEGER", "str": "TEXT", "bool": "INTEGER", "json": "TEXT"}


def _statements(table: str, schema: Any) -> tuple[str, str]:
    """(CREATE TABLE, INSERT) for a record type's ``schema`` in ``table``:
    a column per field, unique on its key (rows with a NULL in the key are
    all kept), the insert idempotent on it."""
    columns = [f'"{c.name}" {_SQL_TYPES[c.kind]}{"" if c.optional else " NOT NULL"}'
               for c in schema.columns]
    names = ", ".join(f'"{n}"' for n in schema.names)
    marks = ", ".join("?" for _ in schema.columns)
    insert = f"INSERT INTO {table} ({names}) VALUES ({marks})"
    if schema.key:
        key = ", ".join(f'"{k}"' for k in schema.key)
        columns.append(f"UNIQUE ({key})")
        insert += f" ON CONFLICT ({key}) DO NOTHING"
    return f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(columns)})", insert
