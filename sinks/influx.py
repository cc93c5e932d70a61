"""InfluxDB sink: write records as line protocol over HTTP.

The reference (what it talks to, parameters, metrics, examples) is
docs/sinks/influx.md (which renders the parameters from the class docstring).
"""

from __future__ import annotations

import base64
import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal

import httpx
import msgspec

from flows import BatchingSink, Retry, Tick, add_secret, record_schema, redact

__all__ = ["InfluxConfigError", "InfluxSink", "InfluxWriteError", "LineProtocolError", "timestamp"]

Precision = Literal["ns", "us", "ms", "s"]
FieldSpec = Sequence[str] | Mapping[str, "str | Callable[[Any], Any]"]

_SCALE = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_V1_PRECISION = {"ns": "n", "us": "u", "ms": "ms", "s": "s"}  # 1.x reads "us" as ns
_HEAD_CACHE = 65_536  # tag sets whose escaped text is kept (about one per symbol)
_MIN_NS, _MAX_NS = -9223372036854775806, 9223372036854775806  # InfluxDB's time range

_MEASUREMENT = str.maketrans({",": "\\,", " ": "\\ "})
_KEY = str.maketrans({",": "\\,", " ": "\\ ", "=": "\\="})
_STRING = str.maketrans({"\\": "\\\\", '"': '\\"'})
_TICKS = {Tick}
_DEFAULT_MAPPING = ("ticks", ("source", "symbol"), ("price", "bid", "ask", "volume"), "ts")
_json = msgspec.json.Encoder()


class LineProtocolError(ValueError):
    """A record cannot be written as line protocol (it is rejected)."""


class InfluxConfigError(Exception):
    """The server refuses the sink itself (credentials, database or bucket)."""


class InfluxWriteError(Exception):
    """The server answered a write with an error status.

    ``status`` is the HTTP status, ``message`` the server's error text.
    Transient (retried) for 5xx, 408 and 429.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message

    @property
    def transient(self) -> bool:
        return self.status >= 500 or self.status in (408, 429)

    @property
    def refuses_the_sink(self) -> bool:
        """401, 403, 404: credentials, permissions, database or bucket."""
        return self.status in (401, 403, 404)


def timestamp(ts: float, precision: str = "ns") -> int:
    """Epoch seconds ``ts`` as an integer count of ``precision`` units.

    Rounds to the nearest unit (ties to even). For ``ns`` the decimal value
    ``repr(ts)`` shows is used, so a float that reads as whole microseconds
    gives whole microseconds, not the binary float's noise.
    """
    scale = _SCALE[precision]
    if type(ts) is int:
        n = ts * scale
    else:
        ts = float(ts)
        if not math.isfinite(ts):
            raise LineProtocolError(f"timestamp {ts!r} is not finite")
        if not -1e10 < ts < 1e10:
            raise LineProtocolError(f"timestamp {ts!r} is outside InfluxDB's range (years 1677-2262)")
        if scale <= 1_000_000:
            n = round(ts * scale)
        else:
            us = round(ts * 1e6)
            n = us * 1000 if us / 1000000.0 == ts else _ns_of_repr(ts)
    ns_per_unit = 1_000_000_000 // scale
    if not _MIN_NS <= n * ns_per_unit <= _MAX_NS:
        raise LineProtocolError(f"timestamp {ts!r} is outside InfluxDB's range (years 1677-2262)")
    return n


def _ns_of_repr(ts: float) -> int:
    """Nanoseconds of the decimal value ``repr(ts)`` shows (rounded to even)."""
    text = repr(ts)
    whole, _, fraction = text.partition(".")
    if len(fraction) <= 9 and "e" not in text:
        return int(whole + fraction.ljust(9, "0"))
    return int(Decimal(text).scaleb(9).to_integral_value())


def _check_name(what: str, name: object, *, measurement: bool = False) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, not {name!r}")
    if "\\" in name or "\n" in name or "\r" in name:
        raise ValueError(f"{what} {name!r} must not hold a backslash or a line break")
    if measurement and name.startswith("#"):
        raise ValueError(f"{what} {name!r} must not start with '#' (a comment line)")
    if not measurement and name == "time":
        raise ValueError(f"{what} 'time' is reserved by InfluxDB")
    return name


def _specs(what: str, spec: FieldSpec) -> list[tuple[str, str, str | Callable[[Any], Any]]]:
    """(key, escaped "key=", attribute name or function) for each tag or field."""
    if isinstance(spec, str):
        raise ValueError(f"{what} must be a sequence or mapping of names, not the string {spec!r}")
    items = spec.items() if isinstance(spec, Mapping) else ((name, name) for name in spec)
    out: list[tuple[str, str, str | Callable[[Any], Any]]] = []
    for key, source in items:
        _check_name(f"{what[:-1]} key", key)
        if any(key == k for k, _, _ in out):
            raise ValueError(f"{what[:-1]} key {key!r} is given twice")
        if not (callable(source) or (isinstance(source, str) and source)):
            raise ValueError(f"{what[:-1]} {key!r}: expected an attribute name or a function, not {source!r}")
        out.append((key, key.translate(_KEY) + "=", source))
    return out


def _getter(sources: list[str | Callable[[Any], Any]]) -> Callable[[Any], tuple[Any, ...]]:
    """One function: record -> tuple of values (one C call for plain attributes)."""
    if not sources:
        return lambda record: ()
    if all(isinstance(s, str) for s in sources):
        if len(sources) > 1:
            return operator.attrgetter(*sources)  # type: ignore[arg-type]
        one = operator.attrgetter(sources[0])  # type: ignore[arg-type]
        return lambda record: (one(record),)
    getters = [operator.attrgetter(s) if isinstance(s, str) else s for s in sources]
    return lambda record: tuple([get(record) for get in getters])


def _field_value(value: Any) -> str | None:
    """A field value as line protocol, ``None`` when it is to be omitted."""
    kind = type(value)
    if kind is float:
        return repr(value) if math.isfinite(value) else None
    if value is None:
        return None
    if kind is str:
        return '"' + value.translate(_STRING) + '"'
    if kind is bool:
        return "true" if value else "false"
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise LineProtocolError(f"cannot write a {kind.__name__} as a field value") from None
    return repr(number) if math.isfinite(number) else None


def _tag_value(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if text.endswith("\\") or "\n" in text or "\r" in text:
        raise LineProtocolError(
            f"tag value {text!r} cannot be written (ends in a backslash or holds a line break)"
        )
    return text.translate(_KEY)


def _error_message(response: httpx.Response) -> str:
    text = response.text.strip()
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message"):
            if isinstance(body.get(key), str):
                text = body[key]
                break
    text = text or response.headers.get("X-Influxdb-Error", "") or response.reason_phrase
    return text if len(text) <= 1000 else text[:1000] + "..."


class _Lines:
    """Encoding records as lines, from the mapping attributes that
    ``_set_mapping`` sets (an InfluxSink's own, or a ``_Layout``'s)."""

    _prefix: str
    _tag_prefixes: list[str]
    _tag_values: Callable[[Any], tuple[Any, ...]]
    _field_prefixes: list[str]
    _field_values: Callable[[Any], tuple[Any, ...]]
    _heads: dict[tuple[Any, ...], str]
    _time: Callable[[Any], Any]
    precision: str

    def _set_mapping(self, measurement: str, tag_specs: list[Any], field_specs: list[Any]) -> None:
        """Set the mapping attributes ``_lines`` reads."""
        self._prefix = measurement.translate(_MEASUREMENT)
        self._tag_prefixes = [prefix for _, prefix, _ in tag_specs]
        self._tag_values = _getter([source for _, _, source in tag_specs])
        self._field_prefixes = [prefix for _, prefix, _ in field_specs]
        self._field_values = _getter([source for _, _, source in field_specs])
        self._heads = {}  # tag values -> "measurement,tags"

    def encode_lines(self, records: list[Any]) -> list[str]:
        """The lines of ``records`` (the hot path: locals, one timestamp
        conversion per run of equal times, cached tag heads)."""
        tag_values, heads, make_head = self._tag_values, self._heads, self._head
        field_prefixes, field_values = self._field_prefixes, self._field_values
        time_of, precision = self._time, self.precision
        last_ts: Any = None
        stamp = ""
        lines: list[str] = []
        append = lines.append
        for record in records:
            values = tag_values(record)
            try:
                head = heads.get(values)
            except TypeError:  # an unhashable tag value
                head = None
            if head is None:
                head = make_head(values)
            fields = []
            for prefix, value in zip(field_prefixes, field_values(record)):
                if type(value) is float:
                    if value - value == 0.0:  # finite
                        fields.append(prefix + repr(value))
                elif value is not None:
                    try:
                        text = _field_value(value)
                    except LineProtocolError as exc:
                        raise LineProtocolError(f"field {prefix[:-1]!r}: {exc}") from None
                    if text is not None:
                        fields.append(prefix + text)
            if not fields:
                raise LineProtocolError("no field to write (all are None, NaN or infinite)")
            ts = time_of(record)
            if ts != last_ts:
                stamp = str(timestamp(ts, precision))
                last_ts = ts
            append(f"{head} {','.join(fields)} {stamp}")
        return lines

    def _head(self, values: tuple[Any, ...]) -> str:
        """``measurement,tag=value,...`` for these tag values (cached when all are str)."""
        parts = [self._prefix]
        for prefix, value in zip(self._tag_prefixes, values):
            if value is None or value == "":
                continue
            parts.append(",")
            parts.append(prefix)
            parts.append(_tag_value(value))
        head = "".join(parts)
        if all(type(v) is str for v in values):
            if len(self._heads) >= _HEAD_CACHE:
                self._heads.clear()
            self._heads[values] = head
        return head


class _Layout(_Lines):
    """A record type's own mapping (the sink's default mapping fits Ticks)."""

    def __init__(self, measurement: str, tags: FieldSpec, fields: FieldSpec, time: str,
                 precision: str) -> None:
        _check_name("measurement", measurement, measurement=True)
        self._set_mapping(measurement, sorted(_specs("tags", tags), key=operator.itemgetter(0)),
                     _specs("fields", fields))
        self._time = operator.attrgetter(time)
        self.precision = precision


def _json_getter(name: str) -> Callable[[Any], Any]:
    get = operator.attrgetter(name)
    return lambda record: None if (v := get(record)) is None else _json.encode(v).decode()


class InfluxSink(_Lines, BatchingSink):
    """Sink: write records to InfluxDB (or QuestDB, VictoriaMetrics) as line protocol.

    Usage:

    ```python
    InfluxSink("http://127.0.0.1:8086", database="market")
    InfluxSink("https://influx:8086", bucket="market", org="me", token="...")
    ```

    Parameters:
        url: the server's base URL (``http`` or ``https``; may hold a path prefix).
        database: InfluxDB 1.x database: writes go to ``/write?db=...``.
        bucket: InfluxDB 2.x/3.x bucket: writes go to ``/api/v2/write``.
            With neither ``database`` nor ``bucket``: ``/write`` without
            ``db`` (QuestDB, VictoriaMetrics).
        org: InfluxDB 2.x/3.x organization (required with ``bucket``).
        token: sent as ``Authorization: Token <token>`` (default: none).
        measurement: the measurement (default ``"ticks"``).
        tags: attribute names, or a mapping key -> attribute name or function
            (default ``("source", "symbol")``).
        fields: same form (default ``("price", "bid", "ask", "volume")``).
        time: attribute name or function giving epoch seconds (default ``"ts"``).
        measurements: measurement names for other record types, with the
            default mapping (default: each type's ``record_schema`` table:
            ``trades``, ``candles``, ...).
        precision: ``"ns"``, ``"us"``, ``"ms"`` or ``"s"`` (default ``"ns"``).
        batch_size: write (one HTTP request) once this many records are pending
            (default 5000).
        flush_interval: longest a record waits before its write (s, default 1.0).
        retry: retry policy for transient errors (default: forever, backoff).
        timeout: HTTP connect/read/write timeout (s, default 10.0).
        write_timeout: longest one write (the whole request) may take (s,
            default 30); past it the request is cancelled and retried.
        unready_after: the flow is not ready while a write has been failing
            or in progress this long (s, default 30).
        name: the actor's name (default ``"influx"``).
    """

    def __init__(
        self,
        url: str,
        *,
        database: str | None = None,
        bucket: str | None = None,
        org: str | None = None,
        token: str | None = None,
        measurement: str = "ticks",
        tags: FieldSpec = ("source", "symbol"),
        fields: FieldSpec = ("price", "bid", "ask", "volume"),
        time: str | Callable[[Any], float] = "ts",
        measurements: Mapping[type, str] | None = None,
        precision: Precision = "ns",
        batch_size: int = 5000,
        flush_interval: float = 1.0,
        retry: Retry | None = None,
        timeout: float = 10.0,
        write_timeout: float | None = 30.0,
        unready_after: float = 30.0,
        name: str = "influx",
    ) -> None:
        shown = redact(url, learn=True)  # the URL as repr() and messages show it
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            parsed = httpx.URL()
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"url {shown!r} must be an http:// or https:// URL")
        add_secret(token, parsed.password)
        if database is not None and bucket is not None:
            raise ValueError("give database (InfluxDB 1.x) or bucket (2.x), not both")
        if bucket is not None and not org:
            raise ValueError("bucket needs org (InfluxDB 2.x)")
        if org is not None and bucket is None:
            raise ValueError("org goes with bucket (InfluxDB 2.x)")
        if precision not in _SCALE:
            raise ValueError(f"precision must be one of {sorted(_SCALE)}, not {precision!r}")
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        _check_name("measurement", measurement, measurement=True)
        tag_specs = sorted(_specs("tags", tags), key=operator.itemgetter(0))
        field_specs = _specs("fields", fields)
        if not field_specs:
            raise ValueError("fields must name at least one field")
        clash = {k for k, _, _ in tag_specs} & {k for k, _, _ in field_specs}
        if clash:
            raise ValueError(f"{sorted(clash)} cannot be both a tag and a field")
        if isinstance(time, str) and time:
            self._time = operator.attrgetter(time)
        elif callable(time):
            self._time = time
        else:
            raise ValueError(f"time must be an attribute name or a function, not {time!r}")

        # Credentials in the URL go in a header, not in the client's base URL,
        # which httpx shows in its log lines and errors.
        self.url = str(parsed.copy_with(username=None, password=None)).rstrip("/")
        self._shown_url = shown.rstrip("/")
        self.database = database
        self.bucket = bucket
        self.org = org
        self.measurement = measurement
        self.precision = precision
        super().__init__(
            name=name, batch_size=batch_size, flush_interval=flush_interval, retry=retry,
            write_timeout=write_timeout, unready_after=unready_after,
        )
        self.timeout = timeout
        self._set_mapping(measurement, tag_specs, field_specs)
        # the default mapping: a Struct type other than Tick gets its own (record_schema)
        self._by_type = (measurement, tuple(tags), tuple(fields), time) == _DEFAULT_MAPPING
        self.measurements = dict(measurements or {})
        for other in self.measurements.values():
            _check_name("measurement", other, measurement=True)
        self._layouts: dict[type, _Lines] = {}
        if bucket is not None:
            self._path = "/api/v2/write"
            self._params = {"org": org, "bucket": bucket, "precision": precision}
        else:
            self._path = "/write"
            self._params = {"precision": _V1_PRECISION[precision]}
            if database is not None:
                self._params = {"db": database, **self._params}
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if token:
            self._headers["Authorization"] = f"Token {token}"
        if parsed.username or parsed.password:  # as httpx does with a URL's user info
            pair = f"{parsed.username}:{parsed.password}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        self._client: httpx.AsyncClient | None = None
        self._log = logging.getLogger(f"flows.sink.{name}")

    def __repr__(self) -> str:
        target = (
            f"database={self.database!r}" if self.database is not None
            else f"bucket={self.bucket!r}" if self.bucket is not None else "no database"
        )
        return f"InfluxSink({self._shown_url!r}, {target}, measurement={self.measurement!r})"

    # -- encoding ---------------------------------------------------------

    def encode(self, record: Any) -> str:
        """One record as one line of line protocol (no trailing newline).

        Raises ``LineProtocolError`` when the record cannot be written.
        """
        return self._lines([record])[0]

    def _lines(self, records: list[Any]) -> list[str]:
        """The lines of ``records``: with the default mapping, a Struct type
        other than Tick is written by its own (``_layout``)."""
        if not self._by_type or set(map(type, records)) == _TICKS:
            return _Lines.encode_lines(self, records)
        by_type: dict[type, list[Any]] = {}
        for r in records:
            by_type.setdefault(type(r), []).append(r)
        lines: list[str] = []
        for kind, same in by_type.items():
            typed = kind is not Tick and issubclass(kind, msgspec.Struct)
            lines += _Lines.encode_lines(self._layout(kind) if typed else self, same)
        return lines

    def _layout(self, kind: type) -> _Lines:
        """How records of ``kind`` become lines: measurement, tags, fields
        and time from its ``record_schema``."""
        layout = self._layouts.get(kind)
        if layout is None:
            schema = record_schema(kind)
            if schema.time is None:
                raise LineProtocolError(f"record type {kind.__name__} has no time field "
                                        "(declare __time__)")
            if schema.key:
                tags = [k for k in schema.key if k != schema.time]
            else:
                tags = [n for n in ("source", "symbol") if n in schema.names]
            fields: dict[str, Any] = {}
            for c in schema.columns:
                if c.name not in tags and c.name != schema.time:
                    fields[c.name] = _json_getter(c.name) if c.kind == "json" else c.name
            layout = self._layouts[kind] = _Layout(
                self.measurements.get(kind, schema.table), tags, fields, schema.time,
                self.precision)
        return layout

    def encode_batch(self, records: list[Any]) -> bytes:
        """The request body for ``records``: their lines, UTF-8."""
        return "\n".join(self._lines(records)).encode()

    # -- BatchingSink -----------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        client = httpx.AsyncClient(
            base_url=self.url,
            headers=self._headers,
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
        )
        try:
            await self._probe(client)
        except BaseException:
            await client.aclose()
            raise
        self._client = client

    async def _probe(self, client: httpx.AsyncClient) -> None:
        """An empty write: fails on a wrong database, bucket or token."""
        try:
            response = await client.post(self._path, params=self._params, content=b"")
        except httpx.HTTPError as exc:
            self._log.info("%r: server not reachable at open (%r); writes will retry", self, exc)
            return
        if response.status_code in (401, 403, 404):
            raise InfluxConfigError(
                f"{self!r}: the server refuses writes: HTTP {response.status_code}: "
                f"{_error_message(response)}"
            )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def write(self, records: list[Any]) -> None:
        assert self._client is not None, "write() before open()"
        body = self.encode_batch(records)
        response = await self._client.post(self._path, params=self._params, content=body)
        if response.is_success:
            return
        error = InfluxWriteError(response.status_code, _error_message(response))
        self._log.debug("write of %d records: %s", len(records), error)
        raise error

    def is_transient(self, exc: Exception) -> bool:
        if isinstance(exc, InfluxWriteError):
            return exc.transient
        return isinstance(
            exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, OSError)
        )

    def is_fatal(self, exc: Exception) -> bool:
        if isinstance(exc, InfluxWriteError):
            return exc.refuses_the_sink
        return isinstance(exc, (InfluxConfigError, httpx.UnsupportedProtocol))
