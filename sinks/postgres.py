"""PostgreSQL sink: store ticks in a PostgreSQL table, idempotently, through COPY.

The reference (what it talks to, parameters, metrics, examples) is
docs/sinks/postgres.md (which renders the parameters from the class docstring).
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
from collections.abc import Mapping
from typing import Any

import attrs
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from flows import BatchingSink, Retry, Tick, record_schema, redact

__all__ = ["PostgresSink"]

_TICKS = {Tick}  # a write of Ticks only takes their own path

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_COLUMNS = ("source", "symbol", "ts", "price", "bid", "ask", "volume")

# SQLSTATE classes: the records' fault (22 data exception, 23 integrity
# constraint violation, 54 program limit exceeded: a value too long to index)
# and the sink's own (28 invalid authorization, 3D invalid catalog name,
# 3F invalid schema name, 42 syntax error or access rule violation: a missing
# privilege, a table of another shape; 0A feature not supported).
_REJECTED_CLASSES = ("22", "23", "54")
_FATAL_CLASSES = ("28", "3D", "3F", "42", "0A")
# libpq reports a refused connection without a SQLSTATE: its message
# (PostgreSQL's own, in the server's language; English by default) tells.
_FATAL_MESSAGES = (
    "password authentication failed",
    "authentication failed for user",
    "no pg_hba.conf entry",
    "does not exist",  # role, database
    "is not permitted to log in",
    "permission denied",
    "password is required",
    "no password supplied",
    "invalid connection option",
    "invalid integer value",
    "invalid sslmode value",
    "server does not support SSL",
)

log = logging.getLogger("flows.sink.postgres")


class PostgresSink(BatchingSink):
    """Sink: store Ticks in a PostgreSQL table.

    Parameters:
        dsn: a libpq connection string or URI
            (``postgresql://user@host:5432/db``); libpq's ``PG*``
            environment variables fill in what it leaves out. A password
            in it (``user:password@``, ``password=...``) is masked
            wherever the sink is shown (``flows.redact``).
        table: the Ticks' table name, optionally ``schema.table`` (created
            if missing; used as written: quoted, so case-sensitive).
        tables: table names for other record types (default: each type's
            ``record_schema`` table: ``trades``, ``candles``, ...).
        batch_size: rows per transaction at most (default 1000).
        flush_interval: longest a row waits before its write (s, default 1.0).
        retry: retry policy for transient errors (default: forever, backoff).
        connect_timeout: how long one connection attempt may take (s,
            default 5.0; libpq's minimum is 2).
        write_timeout: longest one write may take (s, default 30; also the
            session's ``statement_timeout`` and the socket's
            ``tcp_user_timeout``); past it the write is abandoned, its
            socket shut down, and it is retried.
        unready_after: the flow is not ready while a write has been failing
            or in progress this long (s, default 30).
        name: the actor's name.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "ticks",
        tables: Mapping[type, str] | None = None,
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        retry: Retry | None = None,
        connect_timeout: float = 5.0,
        write_timeout: float | None = 30.0,
        unready_after: float = 30.0,
        name: str = "postgres",
    ) -> None:
        if not _IDENT.match(table):
            raise ValueError(f"table name {table!r} is not a plain SQL identifier (or schema.table)")
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be > 0")
        self.tables = dict(tables or {})
        for other in self.tables.values():
            if not _IDENT.match(other):
                raise ValueError(f"table name {other!r} is not a plain SQL identifier (or schema.table)")
        self._plans: dict[type, _Plan] = {}
        self._created: set[str] = set()  # tables created on the current connection
        self.dsn = dsn
        self._shown_dsn = redact(dsn, learn=True)  # the password never shows
        self.table = table
        super().__init__(
            name=name, batch_size=batch_size, flush_interval=flush_interval, retry=retry,
            write_timeout=write_timeout, unready_after=unready_after,
        )
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._conn_lock = threading.Lock()  # closing vs. abort() shutting the socket down
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

    def _connect_options(self) -> dict[str, Any]:
        """libpq options that bound the time a connection can hang; what the
        DSN sets itself is kept."""
        options: dict[str, Any] = {
            "connect_timeout": max(2, math.ceil(self.connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        if self.write_timeout is not None:
            options["tcp_user_timeout"] = math.ceil(self.write_timeout * 1000)
        try:
            given = conninfo_to_dict(self.dsn)
        except psycopg.Error:
            given = {}  # a bad DSN: psycopg.connect says why
        return {k: v for k, v in options.items() if k not in given}

    def __repr__(self) -> str:
        return f"PostgresSink({self._shown_dsn!r}, table={self.table!r}, name={self.name!r})"

    def _connect(self) -> psycopg.Connection[Any]:
        self._created.clear()
        conn = psycopg.connect(
            self.dsn,
            autocommit=True,  # transactions are explicit: conn.transaction()
            application_name=f"flows-{self.name}",
            **self._connect_options(),
        )
        try:
            if self.write_timeout is not None:
                conn.execute(
                    "SELECT set_config('statement_timeout', %s, false)",
                    [f"{math.ceil(self.write_timeout * 1000)}ms"],
                )
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

    def _connection(self) -> psycopg.Connection[Any]:
        """The current connection, or a new one if it is gone."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._drop_connection(conn)
            conn = self._connect()
            with self._conn_lock:
                self._conn = conn
        return conn

    def _write_sync(self, rows: list[tuple[Any, ...]]) -> None:
        conn = self._connection()
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
        except psycopg.Error as exc:
            if _rejected(exc) and not conn.broken:
                raise  # the records' fault: the transaction rolled back, the connection is fine
            self._drop_connection(conn)
            raise
        except BaseException:
            # lost, refused, restarted, or in an unknown state: start afresh on retry
            self._drop_connection(conn)
            raise

    def _drop_connection(self, conn: psycopg.Connection[Any] | None = None) -> None:
        """Close ``conn`` (default: the current connection); forget it if current."""
        with self._conn_lock:
            if conn is None:
                conn = self._conn
            if conn is self._conn:
                self._conn = None
            if conn is None:
                return
            try:
                conn.close()
            except Exception:  # pragma: no cover - closing a broken connection
                log.debug("closing a broken connection failed", exc_info=True)

    def abort(self) -> None:
        """Shut the current connection's socket down (both ways), so that a
        worker thread blocked on it (a server that stopped answering) gets
        an error at once. The socket stays open (libpq closes it)."""
        if not self._conn_lock.acquire(blocking=False):
            return  # being closed right now: nothing to shut down
        try:
            conn = self._conn
            if conn is None or conn.closed:
                return
            try:
                fd = conn.pgconn.socket
                sock = socket.socket(fileno=os.dup(fd))
            except (psycopg.Error, OSError):
                return  # no socket any more
        finally:
            self._conn_lock.release()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.close()

    async def open(self) -> None:
        """Nothing blocking: the first write connects (the database may be down now)."""

    async def close(self) -> None:
        if self._conn is not None:
            await self.run_in_thread(self._drop_connection)

    async def write(self, records: list[Any]) -> None:
        if set(map(type, records)) == _TICKS:  # the Ticks' own path
            rows = [(t.source, t.symbol, t.ts, t.price, t.bid, t.ask, t.volume) for t in records]
            await self.run_in_thread(self._write_sync, rows)
        else:
            await self.run_in_thread(self._write_groups_sync, self._groups(records))

    # -- other record types: a table per type ------------------------------------

    def _groups(self, records: list[Any]) -> list[tuple[_Plan, list[tuple[Any, ...]]]]:
        """(plan, rows) per record type; Ticks go to ``table`` as always."""
        by_type: dict[type, list[Any]] = {}
        for r in records:
            by_type.setdefault(type(r), []).append(r)
        groups = []
        for kind, same in by_type.items():
            plan = self._plans.get(kind)
            if plan is None:
                plan = self._plans[kind] = self._plan(kind)
            if kind is Tick:
                rows = [(t.source, t.symbol, t.ts, t.price, t.bid, t.ask, t.volume) for t in same]
            else:
                rows = record_schema(kind).rows(same)
            groups.append((plan, rows))
        return groups

    def _plan(self, kind: type) -> _Plan:
        if kind is Tick:
            return _Plan(self.table, None, self._copy_direct, self._stage, self._copy,
                         self._insert)
        schema = record_schema(kind)
        table = self.tables.get(kind, schema.table)
        target = sql.Identifier(*table.split("."))
        cols = sql.SQL(", ").join(map(sql.Identifier, schema.names))
        stage = sql.Identifier(f"flows_staging_{len(self._plans)}")
        defs = [sql.SQL("{} {}{}").format(sql.Identifier(c.name), sql.SQL(_PG_TYPES[c.kind]),
                                          sql.SQL("" if c.optional else " NOT NULL"))
                for c in schema.columns]
        insert = None
        if schema.key:
            key = sql.SQL(", ").join(map(sql.Identifier, schema.key))
            whole = all(not schema.column(k).optional for k in schema.key)
            defs.append(sql.SQL("PRIMARY KEY ({})" if whole else "UNIQUE ({})").format(key))
            insert = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) DO NOTHING"
                             ).format(target, cols, cols, stage, key)
        create = sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
            target, sql.SQL(", ").join(defs))
        return _Plan(
            table, create, sql.SQL("COPY {} ({}) FROM STDIN").format(target, cols),
            sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(stage, target),
            sql.SQL("COPY {} ({}) FROM STDIN").format(stage, cols), insert,
        )

    def _write_groups_sync(self, groups: list[tuple[_Plan, list[tuple[Any, ...]]]]) -> None:
        """Every group in one transaction: COPYed straight in; on a key stored
        already, again through staging tables, idempotently (as ``_write_sync``)."""
        conn = self._connection()
        try:
            for plan, _ in groups:
                if plan.create is not None and plan.table not in self._created:
                    self._create_table(conn, plan.create)
                    self._created.add(plan.table)
            try:
                with conn.transaction(), conn.cursor() as cur:
                    for plan, rows in groups:
                        _copy(cur, plan.copy_direct, rows)
                return
            except psycopg.errors.UniqueViolation:
                pass  # some rows are stored already (a redelivery): dedupe through staging
            with conn.transaction(), conn.cursor() as cur:
                for plan, rows in groups:
                    if plan.insert is None:  # no key: appended
                        _copy(cur, plan.copy_direct, rows)
                        continue
                    cur.execute(plan.stage)
                    _copy(cur, plan.copy, rows)
                    cur.execute(plan.insert)
        except psycopg.Error as exc:
            if _rejected(exc) and not conn.broken:
                raise
            self._drop_connection(conn)
            raise
        except BaseException:
            self._drop_connection(conn)
            raise

    @staticmethod
    def _create_table(conn: psycopg.Connection[Any], create: Any) -> None:
        try:
            with conn.transaction():
                conn.execute(create)
        except (psycopg.IntegrityError, psycopg.errors.DuplicateObject,
                psycopg.errors.DuplicateTable):
            with conn.transaction():  # created by another connection at the same moment
                conn.execute(create)

    def is_transient(self, exc: Exception) -> bool:
        # Anything not the records' fault (nor the configuration's, see
        # is_fatal): connection lost or refused, shutdown, timeouts,
        # serialization failures, deadlocks, a full disk.
        if isinstance(exc, psycopg.Error):
            return not _rejected(exc)
        return isinstance(exc, (OSError, TimeoutError))

    def is_fatal(self, exc: Exception) -> bool:
        if not isinstance(exc, psycopg.Error):
            return False
        state = exc.sqlstate
        if state is not None:
            return state[:2] in _FATAL_CLASSES
        if isinstance(exc, (psycopg.ProgrammingError, psycopg.NotSupportedError)):
            return True  # an invalid DSN, a client-side misuse
        message = str(exc)
        return any(m in message for m in _FATAL_MESSAGES)


_PG_TYPES = {"float": "double precision", "int": "bigint", "str": "text", "bool": "boolean",
             "json": "jsonb"}


@attrs.frozen
class _Plan:
    """The statements that store one record type."""

    table: str
    create: Any  # None: created when connecting (the Ticks' table)
    copy_direct: Any
    stage: Any
    copy: Any
    insert: Any  # None: no key, rows are appended


def _copy(cur: Any, statement: Any, rows: list[tuple[Any, ...]]) -> None:
    with cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def _rejected(exc: psycopg.Error) -> bool:
    """The records' fault: the server refused their values."""
    state = exc.sqlstate
    if state is not None:
        return state[:2] in _REJECTED_CLASSES
    return isinstance(exc, (psycopg.DataError, psycopg.IntegrityError))
