"""SMPP 3.4 provider (SPEC section 10): SmsMessage -> parts -> submit_sm; receipts
and replies from deliver_sm.

Input: a batch of `SmsMessage`. Each becomes the parts mailbridge counted
(smpp_pdu.split_parts: concatenation UDH, esm_class 0x40, data_coding 0 or
`data_coding_gsm7` for GSM-7 and 8 for UCS-2), each one submit_sm with
`registered_delivery` 1 on every part (a receipt per part), sent one after the
other on the binds of providers/smpp_session.py; the messages of a batch go
side by side, within the window and the throughput.

Addresses: an alphanumeric sender id TON 5 / NPI 0, a numeric one (with or
without '+') TON 1 / NPI 1 without '+'; no sender: empty, TON 0 / NPI 0 (the
SMSC's default). Recipients TON 1 / NPI 1, international digits without '+'.
validity_period: the time left until `expires_at`, in SMPP's relative form
(`YYMMDDhhmmss000R`): it needs no agreement on clocks with the SMSC.

Output: one `Outcome` per message; `provider_message_id` is the message id of
every part, space-separated (smpp_pdu.join_ids), each normalised by
`message_id_format` to how receipts write it, so that each part's receipt finds
its recipient (the store keeps each part's id: store/events.record_parts).

Answers, per part (submit_sm_resp command_status):
- 0: the next part; after the last, code 0.
- ESME_RTHROTTLED / ESME_RMSGQFUL: every bind pauses (1 s, doubling to 30 s
  while the SMSC keeps pushing back) and the same part is submitted again; no
  code is spent. Past the message's `expires_at`: 29.
- ESME_RINVDSTADR: 7; ESME_RINVSRCADR: 33; anything else: 999 (codes.smpp_failure).
  The remaining parts are not sent.
- Not written (no bind up within response_timeout_s): the message is retried
  later (`retry`, `unsent`: the next attempt is not in doubt), unless earlier
  parts were accepted: then the rest wait up to PARTS_PATIENCE_S for a bind,
  then 999.
- In doubt (written, and no submit_sm_resp before the bind dropped or within
  response_timeout_s): 999 at once, and not sent again: SMPP has no idempotency
  key, and a duplicate SMS is worse than a 999 in a Not. A message that comes
  `in_doubt` (an earlier attempt was cut by a crash or a stop) gets 999 the same.
- Every bind refused (ESME_RBINDFAIL, ESME_RINVPASWD, ESME_RINVSYSID) before
  anything of the batch was written: ProviderAuthError (refused credentials, SPEC 8).

deliver_sm: `parse_deliver` (pure) turns each into a DeliveryEvent (esm_class
receipt: id from the receipted_message_id TLV, else from the `id:` text;
state from the message_state TLV, else `stat:`) or a ReplyEvent (MO). The
events name `smpp:<provider name>` as their provider type. The worker's sink
stores it; only then is deliver_sm_resp written (smpp_session). A receipt we
cannot read is stored raw (it never matches: an orphan for the operator) and
acknowledged, so that an odd SMSC never loops on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import httpx

from mailbridge.codes import Code, provider_code, smpp_failure
from mailbridge.config import SmppProviderConfig
from mailbridge.model import IN_PROGRESS, DeliveryEvent, InboundEvent, ReplyEvent
from mailbridge.providers import (
    Outcome,
    ProviderAuthError,
    SmsMessage,
    TemporaryProviderError,
)
from mailbridge.providers import smpp_pdu as pdu
from mailbridge.providers.callbacks import dedupe_key
from mailbridge.providers.smpp_pdu import Pdu
from mailbridge.providers.smpp_session import InDoubt, NotSent, SmppPool

log = logging.getLogger(__name__)

PARTS_PATIENCE_S = 60.0  # a message half sent waits this long for a bind to finish it
THROTTLE_LIMIT_S = 3600.0  # without an expiry, how long one part may be pushed back
MIN_VALIDITY_S = 60
ALPHA_TON, ALPHA_NPI = 5, 0
INTL_TON, INTL_NPI = 1, 1

EventSink = Callable[[Sequence[InboundEvent]], Awaitable[None]]


def source_address(sender: str | None) -> tuple[bytes, int, int]:
    """(source_addr, TON, NPI) for a sender id (SPEC 10)."""
    if not sender:
        return b"", 0, 0
    digits = sender.removeprefix("+")
    if digits.isdigit():
        return digits.encode("ascii"), INTL_TON, INTL_NPI
    return sender.encode("latin-1", "replace")[:20], ALPHA_TON, ALPHA_NPI


def submit_fields(
    m: SmsMessage, part: pdu.Part, config: SmppProviderConfig, now: float
) -> dict[str, pdu.FieldValue]:
    """The submit_sm fields of one part of `m`."""
    source, ton, npi = source_address(m.sender)
    fields: dict[str, pdu.FieldValue] = {
        "source_addr_ton": ton,
        "source_addr_npi": npi,
        "source_addr": source,
        "dest_addr_ton": INTL_TON,
        "dest_addr_npi": INTL_NPI,
        "destination_addr": m.to.removeprefix("+").encode("ascii"),
        "esm_class": part.esm_class,
        "registered_delivery": 1 if config.registered_delivery else 0,
        "data_coding": part.data_coding,
        "short_message": part.short_message,
    }
    if m.expires_at is not None:
        left = max(MIN_VALIDITY_S, m.expires_at - now)
        fields["validity_period"] = pdu.relative_time(left).encode("ascii")
    return fields


class SmppProvider:
    """An SMSC over SMPP 3.4; see the module docstring."""

    max_batch = 1000

    def __init__(self, name: str, config: SmppProviderConfig) -> None:
        self.name = name
        self._config = config
        self._sink: EventSink | None = None
        self.pool = SmppPool(name, config, self._on_deliver)

    async def start(self, sink: EventSink) -> None:
        """Open the binds now (receipts and replies come over them even when
        nothing is sent); `sink` stores the events they bring."""
        self._sink = sink
        self.pool.start()

    async def send(self, batch: Sequence[SmsMessage]) -> list[Outcome]:
        """Submit the batch; one Outcome per message (see the module docstring)."""
        results = await asyncio.gather(*(self._send_one(m) for m in batch))
        if results and all(refused for _, refused in results):
            raise ProviderAuthError(f"{self.name}: {self.pool.refused or 'bind refused'}")
        return [outcome for outcome, _ in results]

    async def _send_one(self, m: SmsMessage) -> tuple[Outcome, bool]:
        """The message's Outcome, and whether it failed on refused credentials."""
        if m.in_doubt:
            why = (
                "in doubt: an earlier submission may have reached the SMSC; SMPP has no"
                " idempotency key, so it is not sent again"
            )
            log.warning("%s: %s: %s: code 999", self.name, m.to, why)
            return Outcome(m.key, Code.ERROR, detail=why), False
        try:
            parts = pdu.split_parts(
                m.text, m.encoding, reference=random.randrange(256),
                data_coding_gsm7=self._config.data_coding_gsm7,
            )  # fmt: skip
        except ValueError as err:
            return Outcome(
                m.key, Code.ERROR, detail=f"cannot be sent as {m.encoding}: {err}"
            ), False
        ids: list[str] = []
        limit = m.expires_at if m.expires_at is not None else time.time() + THROTTLE_LIMIT_S
        for number, part in enumerate(parts, 1):
            where = f"part {number}/{len(parts)}"
            while True:
                fields = submit_fields(m, part, self._config, time.time())
                try:
                    resp = await self.pool.submit(
                        fields,
                        None if not ids else max(PARTS_PATIENCE_S, self._config.response_timeout_s),
                    )
                except NotSent as err:
                    if not ids:
                        detail = f"not sent: {err}"
                        out = Outcome(m.key, Code.ERROR, detail=detail, retry=True, unsent=True)
                        return out, err.refused
                    detail = f"{where} not sent after {len(ids)} accepted: {err}"
                    return Outcome(m.key, Code.ERROR, pdu.join_ids(ids), detail), False
                except InDoubt as err:
                    detail = f"{where} in doubt, not sent again: {err}"
                    log.warning("%s: %s: %s: code 999", self.name, m.to, detail)
                    return Outcome(m.key, Code.ERROR, pdu.join_ids(ids) or None, detail), False
                if resp.status in pdu.SLOW_DOWN:
                    if time.time() >= limit:
                        detail = f"{where}: {pdu.status_name(resp.status)} until its validity ended"
                        return Outcome(
                            m.key, Code.OVERFLOW, pdu.join_ids(ids) or None, detail
                        ), False
                    pause = self.pool.pause()
                    log.info("%s: %s: pausing %.1fs, then the same part again", self.name,
                             pdu.status_name(resp.status), pause)  # fmt: skip
                    continue
                break
            if resp.status != pdu.ESME_ROK:
                code = provider_code(smpp_failure(resp.status))
                detail = f"{where}: {pdu.status_name(resp.status)}"
                return Outcome(m.key, code, pdu.join_ids(ids) or None, detail), False
            ids.append(pdu.submitted_id(resp.text("message_id"), self._config.message_id_format))
        detail = f"accepted, {len(parts)} part(s)"
        return Outcome(m.key, Code.SENT, pdu.join_ids(ids), detail), False

    async def check(self) -> str:
        """Bind and report: the bind proves the credentials without sending an SMS."""
        self.pool.start()
        if await self.pool.wait_bound(self._config.response_timeout_s * 2):
            return f"bound to {self._config.host}:{self._config.port} ({self.pool.bound} bind(s))"
        if self.pool.refused is not None:
            raise ProviderAuthError(self.pool.refused)
        raise TemporaryProviderError(f"{self.name}: {self.pool.last_error or 'no bind'}")

    async def aclose(self) -> None:
        """Unbind and close the connections."""
        await self.pool.close()

    async def _on_deliver(self, message: Pdu) -> int:
        """A deliver_sm: stored through the sink, then acknowledged (smpp_session)."""
        if self._sink is None:
            return pdu.ESME_RX_T_APPN  # nowhere to keep it yet: the SMSC tries again
        event = parse_deliver(self.name, message, self._config.message_id_format, time.time())
        if isinstance(event, DeliveryEvent) and event.message_id is None:
            log.warning("%s: unreadable receipt stored raw and acknowledged: %s", self.name,
                        event.raw[:300])  # fmt: skip
        await self._sink([event])
        return pdu.ESME_ROK


def build(name: str, config: SmppProviderConfig, http: httpx.AsyncClient) -> SmppProvider:
    """Factory used by the provider registry (SMPP needs no HTTP client)."""
    return SmppProvider(name, config)


# -- deliver_sm -> events (pure) ---------------------------------------------------------


def _payload(message: Pdu) -> bytes:
    return message.octets("short_message") or (message.tlv(pdu.TLV_MESSAGE_PAYLOAD) or b"")


def describe(message: Pdu) -> str:
    """A deliver_sm as text, kept with its event for operators."""
    tlvs = " ".join(f"{tag:04x}={value.hex()}" for tag, value in message.tlvs)
    return (
        f"deliver_sm source_addr={message.text('source_addr')!r}"
        f" (ton {message.num('source_addr_ton')}) destination_addr="
        f"{message.text('destination_addr')!r} esm_class=0x{message.num('esm_class'):02x}"
        f" data_coding={message.num('data_coding')} short_message={_payload(message)!r}"
        + (f" tlvs {tlvs}" if tlvs else "")
    )


def is_receipt(message: Pdu) -> bool:
    """esm_class says SMSC delivery receipt (or intermediate notification), or it
    carries receipted_message_id."""
    kind = message.num("esm_class") & pdu.ESM_CLASS_TYPE_MASK
    return kind in (0x04, 0x20) or message.tlv(pdu.TLV_RECEIPTED_MESSAGE_ID) is not None


def parse_deliver(name: str, message: Pdu, id_format: pdu.IdFormat, now: float) -> InboundEvent:
    """One deliver_sm -> its delivery or reply event (never raises)."""
    provider_type = f"smpp:{name}"
    raw = describe(message)
    payload = _payload(message)
    if is_receipt(message):
        text = payload.decode("latin-1")
        receipt = pdu.parse_receipt(text)
        tlv_id = message.tlv(pdu.TLV_RECEIPTED_MESSAGE_ID)
        raw_id = tlv_id.rstrip(b"\0").decode("latin-1").strip() if tlv_id else ""
        raw_id = raw_id or (receipt.message_id if receipt else "")
        state = message.tlv(pdu.TLV_MESSAGE_STATE)
        stat = pdu.MESSAGE_STATES.get(state[0]) if state else None
        stat = stat or (receipt.stat if receipt else None)
        if not raw_id or stat is None:
            digest = hashlib.sha256(raw.encode()).hexdigest()[:32]
            return DeliveryEvent(
                provider_type=provider_type, message_id=None, number=None, status=IN_PROGRESS,
                text="unreadable receipt", occurred_at=None,
                dedupe_key=dedupe_key("smpp", name, "unreadable", digest), raw=raw,
            )  # fmt: skip
        status = pdu.receipt_status(stat)
        err = receipt.err if receipt else None
        words = "" if status == "DELIVRE" else f"stat:{stat}" + (f" err:{err}" if err else "")
        message_id = pdu.receipted_id(raw_id, id_format)
        return DeliveryEvent(
            provider_type=provider_type, message_id=message_id, number=None, status=status,
            text=words, occurred_at=receipt.done_date if receipt else None,
            dedupe_key=dedupe_key("smpp", name, message_id, stat, text), raw=raw,
        )  # fmt: skip
    source = message.text("source_addr").strip()
    digits = source.removeprefix("+")
    number = "+" + digits if digits.isdigit() else source
    text = pdu.part_text(payload, message.num("esm_class"), message.num("data_coding"))
    return ReplyEvent(
        provider_type=provider_type, message_id=None, number=number,
        to=message.text("destination_addr") or None, text=text, occurred_at=now,
        # No id in an MO: the same deliver_sm again (after a lost resp) within
        # the minute is the same reply.
        dedupe_key=dedupe_key("smpp", name, "mo", source, message.text("destination_addr"),
                              payload.hex(), int(now // 60)),
        raw=raw,
    )  # fmt: skip
