"""How storing sinks map a record type to a table: name, columns, key, time.

A storing sink (SQLite, PostgreSQL, InfluxDB, Redis Streams) asks
``record_schema(type(record))`` and gets a ``RecordSchema``: a table (or
measurement, or stream) per record type, one column per Struct field in
field order, the key that makes a write idempotent and the field that holds
the record's time. The built-in records:

=========  ===========  ===================================  =========
record     table        key                                  time
=========  ===========  ===================================  =========
``Tick``   ``ticks``    ``source, symbol, ts``               ``ts``
``Trade``  ``trades``   ``source, symbol, trade_id``         ``ts``
``Candle`` ``candles``  ``source, symbol, start, width``     ``start``
``Gap``    ``gaps``     none (appended)                      ``start``
=========  ===========  ===================================  =========

A user's msgspec Struct declares its own with class variables (all
optional)::

    class BookTop(msgspec.Struct, frozen=True):
        __table__: ClassVar[str] = "book_tops"        # default: book_top (the class name)
        __key__: ClassVar[tuple[str, ...]] = ("source", "symbol", "ts")  # default: none
        __time__: ClassVar[str] = "ts"                # default: "ts" when it is a field

        source: str
        symbol: str
        ts: float
        bid: float
        ask: float

Without ``__key__`` its rows are appended (a redelivered batch is stored
again). Column kinds: ``float``, ``int``, ``str``, ``bool``, and ``json``
for anything else (lists, dicts, tuples, nested Structs, unions of several
types), stored as JSON text; ``X | None`` makes a nullable column.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from typing import Any

import attrs
import msgspec

from ._records import Candle, Gap, Tick, Trade

__all__ = ["Column", "RecordSchema", "record_schema"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BUILT_IN: dict[type, tuple[str, tuple[str, ...] | None, str | None]] = {
    Tick: ("ticks", ("source", "symbol", "ts"), "ts"),
    Trade: ("trades", ("source", "symbol", "trade_id"), "ts"),
    Candle: ("candles", ("source", "symbol", "start", "width"), "start"),
    Gap: ("gaps", None, "start"),
}
_KINDS = {
    msgspec.inspect.FloatType: "float",
    msgspec.inspect.IntType: "int",
    msgspec.inspect.StrType: "str",
    msgspec.inspect.BoolType: "bool",
}
_json = msgspec.json.Encoder()


@attrs.frozen
class Column:
    """One column: a Struct field's ``name``, its ``kind`` (``float``,
    ``int``, ``str``, ``bool`` or ``json``) and whether it may be None."""

    name: str
    kind: str
    optional: bool


@attrs.frozen
class RecordSchema:
    """A record type as a table: ``table``, ``columns`` (field order),
    ``key`` (column names that identify a record; None: rows are appended)
    and ``time`` (the column holding epoch seconds, or None)."""

    type: type
    table: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] | None
    time: str | None
    _values: Callable[[Any], tuple[Any, ...]] = attrs.field(repr=False, eq=False)

    @property
    def names(self) -> tuple[str, ...]:
        """The column names, in order."""
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        """The column called ``name``."""
        return next(c for c in self.columns if c.name == name)

    def rows(self, records: list[Any]) -> list[tuple[Any, ...]]:
        """``records`` as rows: their values in column order, ``json``
        columns as JSON text."""
        return list(map(self._values, records))


def record_schema(record_type: type) -> RecordSchema:
    """The ``RecordSchema`` of a msgspec Struct type (cached); TypeError for
    another type, ValueError for a declaration that does not fit its fields."""
    return _schema(record_type)


@functools.cache
def _schema(record_type: type) -> RecordSchema:
    if not (isinstance(record_type, type) and issubclass(record_type, msgspec.Struct)):
        raise TypeError(f"a storing sink stores msgspec Structs, not {record_type.__name__}")
    columns = tuple(_column(f) for f in msgspec.inspect.type_info(record_type).fields)
    names = [c.name for c in columns]
    if record_type in _BUILT_IN:
        table, key, time = _BUILT_IN[record_type]
    else:
        table = getattr(record_type, "__table__", None) or _snake(record_type.__name__)
        key = getattr(record_type, "__key__", None)
        time = getattr(record_type, "__time__", None) or ("ts" if "ts" in names else None)
    what = f"record type {record_type.__name__}"
    if not isinstance(table, str) or not _IDENT.match(table):
        raise ValueError(f"{what}: table {table!r} is not a plain SQL identifier")
    if key is not None:
        key = tuple(key)
        if not key or any(k not in names for k in key):
            raise ValueError(f"{what}: key {key!r} must name some of its fields {names}")
    if time is not None and time not in names:
        raise ValueError(f"{what}: time {time!r} is not one of its fields {names}")
    return RecordSchema(record_type, table, columns, key, time, _values_of(columns))


def _column(field: Any) -> Column:
    kinds = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else (field.type,)
    optional = any(isinstance(k, msgspec.inspect.NoneType) for k in kinds)
    named = {_KINDS.get(type(k), "json") for k in kinds if not isinstance(k, msgspec.inspect.NoneType)}
    if isinstance(field.type, msgspec.inspect.LiteralType):
        named = {"str" if all(isinstance(v, str) for v in field.type.values) else "json"}
    kind = named.pop() if len(named) == 1 else "json"
    return Column(field.name, kind, optional)


def _values_of(columns: tuple[Column, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """record -> its row (one C call when no column is JSON)."""
    names = [c.name for c in columns]
    get = operator.attrgetter(*names)
    if len(names) == 1:
        one = get
        get = lambda record: (one(record),)
    encoded = [i for i, c in enumerate(columns) if c.kind == "json"]
    if not encoded:
        return get
    encode = _json.encode

    def values(record: Any) -> tuple[Any, ...]:
        row = list(get(record))
        for i in encoded:
            if row[i] is not None:
                row[i] = encode(row[i]).decode()
        return tuple(row)

    return values


def _snake(name: str) -> str:
    """``BookTop`` -> ``book_top``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
