"""What the providers' callback parsers share: numbers, times, raw text, keys.

Each adapter module has the pure function that reads its provider's callback
(`cm.parse_callback`, `smsmode.parse_delivery_callback`, ...); these helpers
keep them short and alike. A value a provider documents as required and that
is missing or unreadable raises `CallbackError` (the receiver answers 400);
an optional one that cannot be read (a time in an unexpected format) is left
out, never a reason to refuse a report.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from mailbridge.providers import CallbackError

_NUMBER_RE = re.compile(r"\+?[0-9]{6,15}\Z")
# JSON with a comma before a closing bracket, as Kcell's own examples write it.
_TRAILING_COMMA_RE = re.compile(r",(\s*[}\]])")


def lower_keys(query: Mapping[str, str]) -> dict[str, str]:
    """Parameter names in lower case (CM writes them upper case, others lower)."""
    return {k.lower(): v for k, v in query.items()}


def required(values: Mapping[str, Any], name: str) -> str:
    value = values.get(name)
    if value is None or str(value).strip() == "":
        raise CallbackError(f"{name} is missing")
    return str(value).strip()


def e164(value: str, name: str) -> str:
    """A number as providers write it (`+336…`, `00336…`, `336…`) -> `+336…`."""
    number = value.strip().replace(" ", "")
    if number.startswith("00"):
        number = number[2:]
    number = number.removeprefix("+")
    if not _NUMBER_RE.match(number):
        raise CallbackError(f"{name} {value!r} is not a phone number")
    return "+" + number


def timestamp(value: str | None, formats: tuple[str, ...], zone: str) -> float | None:
    """A provider's local time as a POSIX timestamp; None when absent or unreadable."""
    if not value:
        return None
    for fmt in formats:
        try:
            return datetime.strptime(value.strip(), fmt).replace(tzinfo=ZoneInfo(zone)).timestamp()
        except ValueError:
            continue
    return None


def raw_query(query: Mapping[str, str]) -> str:
    """The query as received (sorted), to keep beside the event for operators."""
    return urlencode(sorted(query.items()))


def dedupe_key(provider: str, *parts: object) -> str:
    """A key that is the same for the same callback sent twice."""
    text = "\x1f".join("" if p is None else str(p) for p in parts)
    if len(text) <= 200:
        return f"{provider}:{text}"
    return f"{provider}:sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def lenient_json(body: bytes) -> Any:
    """JSON, also with the trailing commas of Kcell's documented examples."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise CallbackError("body is not UTF-8") from None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return json.loads(_TRAILING_COMMA_RE.sub(r"\1", text))
    except ValueError as err:
        raise CallbackError(f"body is not JSON ({err})") from None
