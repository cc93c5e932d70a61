"""Redaction: secrets out of whatever a flow shows (reprs, errors, logs, /status).

``redact(text)`` masks, in any text (a URL, a DSN, an error message, a log
line):

- the password of a URL's user info (``scheme://user:***@host``; user
  info without a password, which may be a token, is masked whole:
  ``scheme://***@host``);
- URL query (and fragment) parameters whose name says secret: it holds
  ``key``, ``token``, ``secret``, ``pass``, ``pwd``, ``auth``,
  ``signature`` or ``credential``, or is ``sig`` or ``p`` (InfluxDB 1.x's
  password parameter);
- ``name=value`` and ``name: value`` pairs (quoted or not: libpq's
  key=value DSNs, ``repr`` of keyword arguments and dicts, header lines)
  whose name holds ``password``, ``passwd``, ``pwd``, ``secret``,
  ``token``, ``apikey``/``api_key``/``api-key``, ``signature``,
  ``credential`` or ``access_key``/``private_key``;
- ``Authorization`` values (the scheme word, ``Bearer`` or ``Token``, is
  kept) and ``Bearer`` tokens;
- every secret registered with ``add_secret`` or learnt by
  ``redact(url, learn=True)`` (components register the passwords, tokens
  and API keys of their configuration), wherever it appears, so a server
  that echoes a key in an error body is masked too.

The mask is ``***``. Redaction is for display: the component keeps the
real value to connect with.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import unquote

__all__ = ["MASK", "add_secret", "redact"]

MASK = "***"

_MIN_SECRET = 4  # shorter registered values would mask too much ordinary text

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{0,30}://[^\s'\"<>`]+")
_URL_PARAM_NAME = re.compile(
    r"key|token|secret|pass|pwd|auth|signature|credential|^sig$|^p$", re.IGNORECASE
)
_NAME = (
    r"[A-Za-z0-9_.-]*(?:passw(?:or)?d|pwd|secret|token|api[_-]?key|signature|credential"
    r"|access[_-]?key|private[_-]?key)[A-Za-z0-9_.-]*"
)
_PAIR = re.compile(
    rf"""(?P<head>(?P<q>["']?)\b{_NAME}(?P=q)\s*[=:]\s*)
        (?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s&;,'"}})\]]+)""",
    re.IGNORECASE | re.VERBOSE,
)
_AUTHORIZATION = re.compile(
    r"""(?P<head>\b(?:proxy-)?authorization["']?\s*[=:]\s*["']?(?:(?:bearer|token|basic|digest)\s+)?)
        (?P<value>[^\s"',;}})\]]+)""",
    re.IGNORECASE | re.VERBOSE,
)
_BEARER = re.compile(r"\b(?P<head>Bearer\s+)(?P<value>[A-Za-z0-9._~+/=-]{4,})")

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()  # longest first


def add_secret(*values: str | None) -> None:
    """Mask these exact strings wherever ``redact`` runs from now on.

    For the passwords, tokens and API keys a component is configured with.
    ``None``, empty and very short values (under 4 characters: masking
    them would spoil ordinary text) are ignored; the structural rules of
    ``redact`` still mask such a value where it appears as a password or a
    ``password=...`` pair.
    """
    global _secrets
    new = {v for v in values if isinstance(v, str) and len(v) >= _MIN_SECRET}
    if not new or new.issubset(_secrets):
        return
    with _lock:
        _secrets = tuple(sorted(set(_secrets) | new, key=len, reverse=True))


class _Masker:
    """One ``redact`` call; with ``found`` set, it collects what it masked."""

    def __init__(self, found: set[str] | None) -> None:
        self.found = found

    def _note(self, value: str) -> None:
        if self.found is not None and value and value != MASK:
            self.found.add(value)
            self.found.add(unquote(value))

    def value(self, match: re.Match[str]) -> str:
        value = match["value"]
        if value[:1] in "\"'" and len(value) >= 2 and value[-1] == value[0]:
            self._note(value[1:-1])
            self._note(re.sub(r"\\(.)", r"\1", value[1:-1]))
            return f"{match['head']}{value[0]}{MASK}{value[0]}"
        self._note(value)
        return match["head"] + MASK

    def params(self, text: str) -> str:
        """Mask the values of secret-named ``name=value`` parameters in
        ``text`` (a query string or fragment, with its leading ``?`` or ``#``)."""
        parts = re.split(r"([&;?#])", text)
        for i, part in enumerate(parts):
            name, eq, value = part.partition("=")
            if eq and value and value != MASK and _URL_PARAM_NAME.search(name):
                self._note(value)
                parts[i] = f"{name}={MASK}"
        return "".join(parts)

    def url(self, url: str) -> str:
        query_at = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=len(url))
        head, tail = url[:query_at], url[query_at:]
        scheme_end = head.index("://") + 3
        slash = head.find("/", scheme_end)
        authority_end = len(head) if slash < 0 else slash
        at = head.rfind("@", scheme_end, authority_end)  # the last: a password may hold an "@"
        if at >= 0:
            userinfo = head[scheme_end:at]
            user, colon, password = userinfo.partition(":")
            masked = f"{user}:{MASK}" if colon else MASK
            if userinfo != masked:
                if colon:  # (a user name alone is masked here, not learnt)
                    self._note(password)
                head = head[:scheme_end] + masked + head[at:]
        if tail:
            tail = self.params(tail)
        return head + tail

    def plain(self, text: str) -> str:
        text = _AUTHORIZATION.sub(self.value, text)
        text = _BEARER.sub(self.value, text)
        return _PAIR.sub(self.value, text)

    def text(self, text: str) -> str:
        if "://" not in text:
            return self.plain(text)
        out: list[str] = []
        end = 0
        for match in _URL.finditer(text):
            out.append(self.plain(text[end : match.start()]))
            out.append(self.url(match.group()))
            end = match.end()
        out.append(self.plain(text[end:]))
        return "".join(out)


def redact(value: object, *, learn: bool = False) -> str:
    """``value`` as text with its secrets masked (see the module docstring).

    ``learn=True`` also registers what it masked (as ``add_secret`` does),
    so the same password or token is masked wherever it shows up later, in
    whatever form: for a component's configured URL or DSN.

    Usage:

    ```python
    >>> redact("http://reader:s3cret@influx:8086/write?db=m&p=s3cret")
    'http://reader:***@influx:8086/write?db=m&p=***'
    >>> redact("host=db user=flows password='a b' dbname=market")
    "host=db user=flows password='***' dbname=market"
    ```
    """
    text = value if isinstance(value, str) else str(value)
    if learn:  # learn from the text as given, before a known secret hides part of one
        masker = _Masker(set())
        masker.text(text)
        if masker.found:
            add_secret(*masker.found)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return _Masker(None).text(text)
