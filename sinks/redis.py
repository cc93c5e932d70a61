"""Redis Streams sink: append records to a stream (scale-out between processes).

The reference (what it talks to, parameters, metrics, examples) is
docs/sinks/redis.md (which renders the parameters from the class docstring).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as _RedisRetry
from redis.typing import EncodableT, FieldT

from flows import BatchingSink, Retry, Tick, record_schema, redact

__all__ = ["FIELD", "EntryTooLarge", "RedisStreamSink", "encode_record", "no_retry"]

FIELD = b"t"
"""The one field of every entry: the record, JSON-encoded."""

_encoder = msgspec.json.Encoder()

_TRANSIENT_REPLIES = (
    redis.exceptions.OutOfMemoryError,  # OOM
    redis.exceptions.ReadOnlyError,  # READONLY (a replica, after a failover)
    redis.exceptions.TryAgainError,  # TRYAGAIN
    redis.exceptions.ClusterDownError,  # CLUSTERDOWN, MASTERDOWN
)
"""Error replies that say Redis cannot take writes for now (redis-py maps
them to these classes; ``LOADING`` is a ConnectionError). ``BUSY`` (a
script running) is left as redis-py leaves it: a ResponseError whose text
starts with the code."""


class EntryTooLarge(ValueError):
    """A record whose entry is larger than ``max_entry_bytes`` (rejected)."""


def encode_record(record: Any) -> bytes:
    """The value of an entry's ``t`` field for ``record`` (msgspec JSON)."""
    return _encoder.encode(record)


def no_retry() -> _RedisRetry:
    """redis-py's client retry switched off: flows retries (and counts) itself."""
    return _RedisRetry(NoBackoff(), 0)


class RedisStreamSink(BatchingSink):
    """Sink: append records to a Redis stream, one entry per record.

    Parameters:
        url: the server, ``redis://[user:password@]host:port/db`` (or
            ``rediss://``, ``unix://``), as redis-py's ``from_url`` takes it;
            the password is masked wherever the sink is shown.
        stream: the stream's key (for Ticks, and records that are not
            msgspec Structs).
        streams: stream keys for other record types (default: each Struct
            type's ``record_schema`` table: ``trades``, ``candles``, ...).
        maxlen: cap the stream at about this many entries (``MAXLEN ~``);
            ``None``: no cap.
        batch_size: entries per pipeline at most (default 1000).
        flush_interval: longest a record waits before its write (s, default 0.5).
        retry: retry policy for Redis errors (default: forever, backoff).
        socket_timeout: seconds one write may wait on the server before it
            fails (and is retried).
        max_entry_bytes: a record whose JSON is larger is rejected (default
            512 MiB, Redis' default ``proto-max-bulk-len``; set it to your
            server's).
        write_timeout: longest one write (the whole pipeline) may take (s,
            default 30); past it the write is abandoned and retried.
        unready_after: the flow is not ready while a write has been failing
            or in progress this long (s, default 30).
        name: the actor's name.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        stream: str = "ticks",
        streams: Mapping[type, str] | None = None,
        maxlen: int | None = None,
        batch_size: int = 1000,
        flush_interval: float = 0.5,
        retry: Retry | None = None,
        socket_timeout: float = 10.0,
        max_entry_bytes: int = 512 << 20,
        write_timeout: float | None = 30.0,
        unready_after: float = 30.0,
        name: str = "redis",
    ) -> None:
        if maxlen is not None and maxlen < 1:
            raise ValueError("maxlen must be >= 1 (or None for no cap)")
        if not stream:
            raise ValueError("stream must not be empty")
        if not socket_timeout > 0:
            raise ValueError("socket_timeout must be > 0")
        if max_entry_bytes < 1:
            raise ValueError("max_entry_bytes must be >= 1")
        self.url = url
        self._shown_url = redact(url, learn=True)  # the password never shows
        self.stream = stream
        self.streams: dict[type, str] = {Tick: stream, **(streams or {})}
        if not all(self.streams.values()):
            raise ValueError("streams must not be empty")
        self.maxlen = maxlen
        super().__init__(
            name=name, batch_size=batch_size, flush_interval=flush_interval, retry=retry,
            write_timeout=write_timeout, unready_after=unready_after,
        )
        self.socket_timeout = socket_timeout
        self.max_entry_bytes = max_entry_bytes
        self._client: redis.Redis | None = None

    def __repr__(self) -> str:
        return f"RedisStreamSink({self._shown_url!r}, stream={self.stream!r}, name={self.name!r})"

    async def open(self) -> None:
        if self._client is None:
            # from_url does not connect: the first write does (and is retried)
            self._client = redis.Redis.from_url(
                self.url,
                retry=no_retry(),
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=min(self.socket_timeout, 5.0),
            )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await self.run_in_thread(client.close)

    def _write_sync(self, records: list[Any]) -> None:
        assert self._client is not None
        encode, maxlen, limit = _encoder.encode, self.maxlen, self.max_entry_bytes
        entries: list[dict[FieldT, EncodableT]] = []
        for r in records:  # a bad record fails before any XADD
            data = encode(r)
            if len(data) > limit:
                raise EntryTooLarge(f"entry of {len(data)} bytes > max_entry_bytes ({limit})")
            entries.append({FIELD: data})
        kinds = set(map(type, records))
        if len(kinds) == 1:
            streams = [self.streams.get(type(records[0])) or self._stream_of(type(records[0]))]
            streams *= len(records)
        else:
            streams = [self.streams.get(type(r)) or self._stream_of(type(r)) for r in records]
        with self._client.pipeline(transaction=False) as pipe:
            for stream, fields in zip(streams, entries):
                pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)
            pipe.execute()

    def _stream_of(self, kind: type) -> str:
        """The stream of a record type: its ``record_schema`` table for a
        Struct, else ``stream``."""
        is_struct = isinstance(kind, type) and issubclass(kind, msgspec.Struct)
        stream = self.streams[kind] = record_schema(kind).table if is_struct else self.stream
        return stream

    async def write(self, records: list[Any]) -> None:
        await self.run_in_thread(self._write_sync, records)

    def abort(self) -> None:
        client = self._client
        if client is not None:
            # shuts the sockets down (in use ones too): a blocked read fails now
            client.connection_pool.disconnect(inuse_connections=True)

    def is_transient(self, exc: Exception) -> bool:
        # Redis cannot take writes for now. Neither this nor is_fatal: the
        # record's fault (it cannot be encoded, or is too large).
        if isinstance(exc, redis.ResponseError):
            return isinstance(exc, _TRANSIENT_REPLIES) or str(exc).startswith("BUSY ")
        if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError,
                            redis.DataError)):
            return False
        return isinstance(exc, (redis.RedisError, OSError, TimeoutError))

    def is_fatal(self, exc: Exception) -> bool:
        # The sink's configuration: credentials, ACL, a key of another type,
        # any other error reply.
        if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
            return True
        return isinstance(exc, redis.ResponseError) and not self.is_transient(exc)
