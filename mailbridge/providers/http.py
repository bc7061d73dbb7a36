"""HTTP transport errors and statuses -> typed failures: one rule for every HTTP adapter.

Input: what an httpx call raised, or the response it answered. Output: the
response when it is the API's own answer (the adapter reads it), else a
`CallFailure` whose kind says what becomes of the call's messages:
- TEMPORARY: connect errors, timeouts, any other transport error, HTTP 5xx:
  retried with backoff by the dispatcher, then failed over, then 999;
- THROTTLED: HTTP 429: retried the same way, and 29 when the retries are spent;
- REFUSED: HTTP 401/403 (credentials) or a status saying the configured url is
  wrong (404/405 by default): an operator problem, `ProviderAuthError`, the work
  is held instead of failing its recipients;
- PERMANENT: the messages of this call fail for good (999). The rule below never
  gives it by itself: adapters use it for answers their API does not define.

Adapters add only their API's own codes on top (CM 101/103, sMsmode 31/32/50,
Kcell's duplicate key...). Exceptions are mapped here, at the boundary, as
httpx's own model has it (`TimeoutException`, `ConnectError`, `HTTPError`);
nothing here retries or sleeps. Every call is summarised at DEBUG (method,
url, sizes, status, time, the start of the answer; never a request body, which
holds CM's token). URLs in the texts lose their query and user info: sMsmode
puts its access token in the query.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Collection, Sequence
from dataclasses import dataclass
from enum import Enum

import httpx

from mailbridge.codes import Code
from mailbridge.providers import (
    Outcome,
    ProviderAuthError,
    ProviderError,
    SmsMessage,
    TemporaryProviderError,
)

CREDENTIAL_STATUSES: frozenset[int] = frozenset({401, 403})
WRONG_URL_STATUSES: frozenset[int] = frozenset({404, 405})  # 405: any method but the API's
_EXCERPT = 200  # characters of an answer's body kept in a detail
log = logging.getLogger("mailbridge.providers")


class Failure(Enum):
    """What kind of failure an HTTP call had, as a whole."""

    TEMPORARY = "temporary"
    THROTTLED = "throttled"
    REFUSED = "refused"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class CallFailure:
    """Why an HTTP call failed as a whole, and what its messages get."""

    kind: Failure
    detail: str  # in words, for the outcomes, the logs and `status`
    # True when the request cannot have reached the provider (no connection):
    # the next attempt of its messages is then not in doubt.
    unsent: bool = False

    @property
    def code(self) -> Code:
        """The messages' code if this failure is their last word."""
        return Code.OVERFLOW if self.kind is Failure.THROTTLED else Code.ERROR

    @property
    def temporary(self) -> bool:
        """True when the same call may pass later (TEMPORARY or THROTTLED)."""
        return self.kind in (Failure.TEMPORARY, Failure.THROTTLED)

    def outcomes(self, messages: Sequence[SmsMessage], detail: str | None = None) -> list[Outcome]:
        """One outcome per message of the failed call.

        Retried unless PERMANENT: a refusal too, because the operator may fix
        the credentials (the dispatcher holds refused work, see dispatch.py).
        """
        retry = self.kind is not Failure.PERMANENT
        text = self.detail if detail is None else detail
        return [
            Outcome(m.key, self.code, detail=text, retry=retry, unsent=self.unsent)
            for m in messages
        ]

    def error(self, context: str) -> ProviderError:
        """The exception for a call outside a batch's outcomes (first request, `check`).

        REFUSED gives `ProviderAuthError`; anything else `TemporaryProviderError`
        (a check that failed proves nothing lasting about the provider).
        """
        message = f"{context}: {self.detail}"
        if self.kind is Failure.REFUSED:
            return ProviderAuthError(message)
        return TemporaryProviderError(message, throttled=self.kind is Failure.THROTTLED)


def status_text(resp: httpx.Response) -> str:
    """`HTTP 503 Service Unavailable`."""
    return f"HTTP {resp.status_code} {resp.reason_phrase}".rstrip()


def public_url(url: httpx.URL) -> str:
    """The url without query, fragment or user info (no secret in logs)."""
    return str(url.copy_with(query=None, fragment=None, userinfo=b""))


def _excerpt(resp: httpx.Response) -> str:
    try:
        text = resp.text.strip()
    except (UnicodeDecodeError, LookupError):  # an unknown or lying charset
        return ""
    return f": {text[:_EXCERPT]}" if text else ""


@dataclass(frozen=True, slots=True)
class HttpRules:
    """The shared rule, set up for one configured provider."""

    provider: str  # the configured name, for "check providers.<name>.url"
    timeout_s: float
    credentials: str = "credentials"  # what 401/403 refuse, in the API's words
    wrong_url: Collection[int] = WRONG_URL_STATUSES

    async def call(self, pending: Awaitable[httpx.Response]) -> httpx.Response | CallFailure:
        """Await an httpx call; its response, or the failure it was."""
        started = time.perf_counter()
        try:
            resp = await pending
        except httpx.HTTPError as exc:
            failed = self.transport_failure(exc)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s after %.0f ms", self.provider, failed.detail,
                          (time.perf_counter() - started) * 1000)  # fmt: skip
            return failed
        if log.isEnabledFor(logging.DEBUG):
            req = resp.request
            log.debug(
                "%s: %s %s (%s bytes) -> %s in %.0f ms, %d bytes%s", self.provider, req.method,
                public_url(req.url), req.headers.get("content-length", "?"), status_text(resp),
                (time.perf_counter() - started) * 1000, len(resp.content), _excerpt(resp),
            )  # fmt: skip
        # The response is read and closed: its stream, which points back at it,
        # goes. That cycle (~40 objects of httpx and httpcore a call) kept the
        # request's and the answer's bodies until the cyclic GC ran.
        resp.stream = httpx.ByteStream(b"")
        failure = self.status_failure(resp)
        return resp if failure is None else failure

    def transport_failure(self, exc: httpx.HTTPError) -> CallFailure:
        """A raised httpx error: always TEMPORARY, in words that say whether it may
        have reached the provider (a read timeout may have been accepted)."""
        name = type(exc).__name__
        what = f"{name}: {exc}" if str(exc) else name
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return CallFailure(Failure.TEMPORARY, f"unreachable: {what}", unsent=True)
        if isinstance(exc, httpx.TimeoutException):
            detail = (
                f"timed out: no answer in time ({name}, timeout {self.timeout_s:g} s);"
                " the request may have been accepted"
            )
            return CallFailure(Failure.TEMPORARY, detail)
        return CallFailure(Failure.TEMPORARY, f"request failed: {what}")

    def status_failure(self, resp: httpx.Response) -> CallFailure | None:
        """An HTTP status that fails the call as a whole; None for an answer the
        adapter reads (2xx, and the 4xx an API uses for its own refusals)."""
        status = resp.status_code
        if status in CREDENTIAL_STATUSES:
            return CallFailure(Failure.REFUSED, f"{self.credentials} refused ({status_text(resp)})")
        if status in self.wrong_url:
            where = public_url(resp.request.url)
            detail = f"configuration refused: {status_text(resp)} at {where}"
            return CallFailure(Failure.REFUSED, f"{detail}: check providers.{self.provider}.url")
        if status == 429:
            detail = f"throttled ({status_text(resp)}){_excerpt(resp)}"
            return CallFailure(Failure.THROTTLED, detail)
        if status >= 500 or status < 200:
            detail = f"provider error ({status_text(resp)}){_excerpt(resp)}"
            return CallFailure(Failure.TEMPORARY, detail)
        return None
