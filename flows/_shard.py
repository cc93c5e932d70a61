"""Sharding a symbol universe over N processes with rendezvous hashing.

Each symbol goes to the shard with the highest score ``hash(symbol, shard)``.
Shards are disjoint and cover the universe; going from N to N+1 shards
moves only the symbols the new shard wins, about 1/(N+1) of them, where
modulo hashing would move almost all. The hash is BLAKE2b, so every process
on every machine agrees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import attrs

__all__ = ["Shard", "shard_of"]


def _score(key: str, shard: int) -> int:
    digest = hashlib.blake2b(f"{shard}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shard_of(key: str, count: int) -> int:
    """The shard (0 .. count-1) that owns ``key``."""
    if count < 1:
        raise ValueError("shard count must be >= 1")
    return max(range(count), key=lambda shard: _score(key, shard))


@attrs.frozen
class Shard:
    """Shard ``index`` of ``count`` (``--shard k/N``)."""

    index: int
    count: int

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= k < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"k/N"`` -> Shard(k, N), with a clear error otherwise."""
        k, sep, n = text.partition("/")
        try:
            if not sep:
                raise ValueError
            return cls(int(k), int(n))
        except ValueError:
            raise ValueError(f"--shard {text!r}: expected k/N with 0 <= k < N, e.g. 0/2") from None

    def owns(self, key: str) -> bool:
        return self.count == 1 or shard_of(key, self.count) == self.index

    def select(self, keys: Iterable[str]) -> list[str]:
        """The keys of ``keys`` this shard owns, in their order."""
        return [k for k in keys if self.owns(k)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
