"""What an exchange format implements: routes, request weight, the normal
answer, and its own shapes for refusals and server errors."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Collection
from decimal import Decimal
from typing import Any, ClassVar

import attrs

from ._faults import Field
from ._limits import RateLimit, Verdict
from ._market import Asset, Market, Quote

__all__ = ["ExchangeAPI", "Reply", "Request", "as_numbers", "fixed", "iso_z", "plain"]


@attrs.define
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    query_string: str = ""
    body: bytes = b""  # a POST's body (LiveCoinWatch takes JSON bodies)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@attrs.define
class Reply:
    """An answer before faults are applied.

    ``fields`` lists, per record, the price fields a bad-value fault may
    spoil; ``served`` the quotes the records carry, by symbol; ``empty`` the
    body with no records (``None``: the empty-results fault does not apply).
    """

    status: int
    body: Any
    headers: list[tuple[str, str]] = attrs.Factory(list)
    content_type: str = "application/json"
    fields: list[list[Field]] = attrs.Factory(list)
    served: dict[str, Quote] = attrs.Factory(dict)
    empty: Any = None


def fixed(value: Decimal, places: int | None = None) -> str:
    """``value`` in positional notation (never ``2E-8``)."""
    if places is not None:
        return f"{value:.{places}f}"
    return format(value, "f")


def plain(value: Decimal) -> str:
    """Positional notation without trailing zeros: ``67187.3``, ``67000``."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def as_numbers(record: dict[str, Any], keys: Collection[str] | None = None,
               ints: Collection[str] = ()) -> dict[str, Any]:
    """``record`` with its numeric strings (those of ``keys``; None: all) as
    JSON numbers, ``ints`` as integers: an exchange that sends numbers where
    its documentation says strings."""
    out = dict(record)
    for key, value in record.items():
        if isinstance(value, str) and (keys is None or key in keys):
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                out[key] = int(value) if key in ints else number
    return out


def iso_z(epoch: float) -> str:
    """``2024-03-25T08:45:00.123456Z``"""
    moment = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ExchangeAPI:
    """One exchange's public ticker API."""

    name: ClassVar[str]
    default_limit: ClassVar[RateLimit | None]
    endpoints: ClassVar[tuple[str, ...]]
    methods: ClassVar[tuple[str, ...]] = ("GET",)
    cacheable: ClassVar[bool] = True  # answers depend only on path, query and Authorization

    def __init__(self, market: Market) -> None:
        self.market = market
        self.by_symbol: dict[str, Asset] = {
            a.symbol(self.name): a for a in market.universe
        }
        self.hidden: frozenset[Asset] = frozenset()
        """Assets answered as unknown (the ``delisted`` fault; set per request)."""
        self.throttle_error: str | None = None
        """The error text of a refusal, where the exchange has several (set per request)."""

    def find(self, lookup: dict[str, Asset], name: str) -> Asset | None:
        """``lookup[name]``, unless unknown or delisted."""
        asset = lookup.get(name)
        return None if asset is None or asset in self.hidden else asset

    def listed(self) -> list[Asset]:
        """Every asset of the universe that is not delisted."""
        hidden = self.hidden
        return [a for a in self.market.universe if a not in hidden]

    def symbols(self) -> list[str]:
        """Every symbol as this API names it."""
        return [a.symbol(self.name) for a in self.market.universe]

    def route(self, path: str) -> tuple[str, dict[str, str]] | None:
        """(endpoint, path parameters) for ``path``, or ``None``."""
        raise NotImplementedError

    def cost(self, endpoint: str, request: Request) -> int:
        """The request's weight for the limiter."""
        return 1

    def handle(self, endpoint: str, request: Request, params: dict[str, str]) -> Reply:
        raise NotImplementedError

    def refused(self, verdict: Verdict, limit: RateLimit | None) -> Reply:
        """The answer to a request over the rate limit (``verdict.status``
        429 or 418)."""
        raise NotImplementedError

    def server_error(self, status: int) -> Reply:
        """The exchange's own JSON answer to an internal error."""
        raise NotImplementedError

    def retyped(self, body: Any) -> Any | None:
        """A copy of ``body`` with the values the exchange is known to send
        either as numbers or as strings the other way; None: it has none."""
        return None

    def limit_headers(
        self, verdict: Verdict, limit: RateLimit | None
    ) -> list[tuple[str, str]]:
        """Headers every answer carries (Binance's used weight)."""
        return []

    def quotes(self, assets: list[Asset]) -> list[Quote]:
        quote = self.market.quote
        return [quote(self.name, a) for a in assets]
