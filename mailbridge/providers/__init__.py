"""The provider seam: one batch of SMS in, one outcome per message out.

An adapter translates a batch into the fewest requests its API allows and
classifies every answer:
- per-message results become `Outcome`s (code 0 = accepted, else the SPEC code,
  through `codes.provider_code`);
- a failure of the whole call that may succeed later (connect error, timeout,
  HTTP 5xx, 429) raises `TemporaryProviderError`; the dispatcher retries it
  with backoff, then fails over;
- credentials or configuration the provider rejects raise `ProviderAuthError`:
  an operator problem, so the work stays pending instead of failing recipients.

HTTP adapters classify transport errors and statuses with the shared rule of
`providers/http.py` and add only their API's own codes. Adapters never retry by
themselves and never touch the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    import httpx

    from mailbridge.config import ProviderConfig
    from mailbridge.model import InboundEvent

Encoding = Literal["gsm7", "ucs2"]


# SmsMessage and Outcome are NamedTuples (immutable, and built several times faster
# than frozen dataclasses: one of each per recipient). Build SmsMessage with keywords.


class SmsMessage(NamedTuple):
    """One recipient's SMS, ready for a provider."""

    key: str  # stable, unique per recipient, <= 64 chars: the idempotency key
    to: str  # E.164 with a leading '+'
    sender: str | None  # None: the provider's default sender
    text: str  # the final text (STOP mention included, already cut to fit)
    encoding: Encoding
    parts: int
    max_parts: int  # the part limit the text was cut for
    reference: str | None  # the client's tracker
    request_id: int
    # True when an earlier submission of this very message may have reached the
    # provider (crash or lost response): adapters that can, deduplicate on `key`.
    in_doubt: bool = False
    # POSIX time after which the SMS is worthless (dispatch.validity_s): handed to
    # the providers that take an expiry, so the operator's network stops trying too.
    expires_at: float | None = None


class Outcome(NamedTuple):
    """The provider's verdict on one message."""

    key: str
    code: int  # SPEC section 3 code: 0 accepted
    provider_message_id: str | None = None
    detail: str = ""  # the provider's own words, for logs and `status`
    # True: this message failed in a way worth retrying (e.g. throttled inside a
    # batch); `code` is what it gets if retries run out.
    retry: bool = False
    # True (with retry): the provider certainly did not get this message, so the
    # next attempt is not `in_doubt` (SMPP knows which parts it never wrote).
    unsent: bool = False


class ProviderError(Exception):
    """Base of the errors an adapter raises for a whole batch."""


class TemporaryProviderError(ProviderError):
    """The call failed but may succeed later (network, timeout, 5xx, 429)."""

    def __init__(self, message: str, *, throttled: bool = False) -> None:
        super().__init__(message)
        self.throttled = throttled


class ProviderAuthError(ProviderError):
    """The provider refused our credentials or configuration: an operator error."""


class Provider(Protocol):
    """A configured SMS provider."""

    name: str
    # The most messages one `send` call may carry; the dispatcher splits batches.
    max_batch: int

    async def send(self, batch: Sequence[SmsMessage]) -> list[Outcome]:
        """Submit the batch; return one Outcome per message, in any order."""
        ...

    async def check(self) -> str:
        """A harmless authenticated call; returns a human-readable verdict or raises."""
        ...

    async def aclose(self) -> None:
        """Release files and connections."""
        ...


# Stores delivery and reply events durably (the worker's store), then returns.
EventSink = Callable[[Sequence["InboundEvent"]], Awaitable[None]]


@runtime_checkable
class ListeningProvider(Protocol):
    """A provider that keeps connections open and gets its delivery reports and
    replies over them (SMPP), not through the HTTP receiver."""

    async def start(self, sink: EventSink) -> None:
        """Open the connections; events that come over them go to `sink`."""
        ...


# Provider type (config `type:`) -> the module whose `build(name, config, http)` makes it.
PROVIDER_MODULES = {
    "outbox": "mailbridge.providers.outbox",
    "cm": "mailbridge.providers.cm",
    "smsmode": "mailbridge.providers.smsmode",
    "kcell": "mailbridge.providers.kcell",
    "smpp": "mailbridge.providers.smpp",
}


def build_provider(name: str, config: ProviderConfig, http: httpx.AsyncClient) -> Provider:
    """Make the configured provider `name`."""
    import importlib

    module = importlib.import_module(PROVIDER_MODULES[config.type])
    provider: Provider = module.build(name, config, http)
    return provider


class CallbackError(ValueError):
    """A provider's callback (delivery report, reply) that cannot be read: the
    HTTP receiver answers 400 and stores nothing."""
