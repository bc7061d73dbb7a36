"""The SMPP provider and its binds (providers/smpp.py, smpp_session.py) against the
node-smpp SMSC (tests/smsc): parts, TON/NPI, validity, window, throttling, error
mapping, refused binds, drops and in-doubt parts, receipts stored before they are
acknowledged, MO, unbind. The pure deliver_sm parser is tested without a peer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from mailbridge.config import SmppProviderConfig
from mailbridge.model import DeliveryEvent, InboundEvent, ReplyEvent
from mailbridge.providers import ProviderAuthError, SmsMessage
from mailbridge.providers import smpp_pdu as p
from mailbridge.providers.smpp import SmppProvider, parse_deliver, source_address
from tests.smsc_peer import PASSWORD, SYSTEM_ID, Smsc


def config(smsc: Smsc, **kw: Any) -> SmppProviderConfig:
    values: dict[str, Any] = {
        "type": "smpp", "host": "127.0.0.1", "port": smsc.port, "system_id": SYSTEM_ID,
        "password": PASSWORD, "response_timeout_s": 5, "throughput": 0,
    }  # fmt: skip
    values.update(kw)
    return SmppProviderConfig.model_validate(values)


def sms(n: int, text: str = "Bonjour", sender: str | None = "MaSociete", **kw: Any) -> SmsMessage:
    from mailbridge.gsm import segment

    seg = segment(text)
    return SmsMessage(
        key=f"k{n}", to=f"+336{n:08d}", sender=sender, text=text, encoding=seg.encoding,
        parts=seg.parts, max_parts=5, reference=None, request_id=1, **kw,
    )  # fmt: skip


class Sink:
    """Stores events in a list; optionally slow or failing, to test ack timing."""

    def __init__(self) -> None:
        self.events: list[InboundEvent] = []
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def __call__(self, events: Sequence[InboundEvent]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("store down")
        self.events.extend(events)


@pytest.fixture
async def provider(smsc: Smsc) -> AsyncIterator[tuple[SmppProvider, Sink]]:
    prov = SmppProvider("smsc", config(smsc))
    sink = Sink()
    await prov.start(sink)
    try:
        yield prov, sink
    finally:
        await prov.aclose()


async def until(predicate: Any, timeout: float = 20, what: str = "condition") -> Any:
    """Poll with a bound (the SMSC is another process)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_one_sms_addresses_and_validity(smsc: Smsc, provider: Any) -> None:
    prov, _ = provider
    expires = time.time() + 3600
    [out] = await prov.send([sms(1, expires_at=expires)])
    assert out.code == 0 and out.provider_message_id and " " not in out.provider_message_id
    [sub] = smsc.submits()
    assert sub["source_addr"] == "MaSociete"
    assert (sub["source_addr_ton"], sub["source_addr_npi"]) == (5, 0)
    assert sub["destination_addr"] == "33600000001"
    assert (sub["dest_addr_ton"], sub["dest_addr_npi"]) == (1, 1)
    assert sub["registered_delivery"] == 1 and sub["esm_class"] == 0 and sub["data_coding"] == 0
    assert sub["text"] == "Bonjour" and sub["message_id"] == out.provider_message_id
    # Relative validity, as node-smpp reads it: about an hour from now.
    assert abs(sub["validity_period"] / 1000 - expires) < 120


def test_source_addresses() -> None:
    assert source_address("+33612345678") == (b"33612345678", 1, 1)
    assert source_address("36111") == (b"36111", 1, 1)
    assert source_address("INFO") == (b"INFO", 5, 0)
    assert source_address(None) == (b"", 0, 0)


async def test_three_parts_and_ucs2(smsc: Smsc, provider: Any) -> None:
    prov, _ = provider
    long_text = "€" * 100 + "a" * 200  # 400 septets: 76 euros, 24 euros and 105 a, 95 a
    ucs2 = "Привет ça va ? 😀 " * 6
    outs = await prov.send([sms(2, long_text), sms(3, ucs2)])
    by_key = {o.key: o for o in outs}
    assert len(by_key["k2"].provider_message_id.split()) == 3
    assert smsc.texts("33600000002") == [long_text]
    assert smsc.texts("33600000003") == [ucs2]
    parts = [s for s in smsc.submits() if s["destination_addr"] == "33600000003"]
    assert {s["data_coding"] for s in parts} == {8}
    assert all(s["esm_class"] & 0x40 and s["registered_delivery"] == 1 for s in parts)


async def test_window_and_throughput(smsc: Smsc) -> None:
    smsc.call("delay", ms=50)
    prov = SmppProvider("smsc", config(smsc, window=4, binds=2, throughput=200))
    await prov.start(Sink())
    try:
        started = time.monotonic()
        outs = await prov.send([sms(n) for n in range(100)])
        took = time.monotonic() - started
    finally:
        await prov.aclose()
    assert all(o.code == 0 for o in outs)
    state = smsc.state()
    assert state["max_outstanding"] <= 4 and state["binds"] == 2
    assert took >= 99 / 200 * 0.9  # 200 parts/s at most
    times = sorted(s["received"] for s in smsc.submits())
    for i in range(len(times) - 40):  # no 40 parts in less than 40/200 s (ms clock)
        assert times[i + 40] - times[i] >= 190


async def test_throttled_parts_are_sent_again(smsc: Smsc, provider: Any) -> None:
    prov, _ = provider
    smsc.call("throttle", n=3)
    outs = await prov.send([sms(n, "x" * 200) for n in range(4)])
    assert [o.code for o in outs] == [0, 0, 0, 0]
    assert smsc.state()["throttled"] == 3
    for n in range(4):
        assert smsc.texts(f"3360000000{n}") == ["x" * 200]


async def test_error_mapping(smsc: Smsc, provider: Any) -> None:
    prov, _ = provider
    smsc.call("reject", n=1, status=p.ESME_RINVDSTADR)
    [a] = await prov.send([sms(1)])
    smsc.call("reject", n=1, status=p.ESME_RINVSRCADR)
    [b] = await prov.send([sms(2)])
    smsc.call("reject", n=1, status=p.ESME_RSYSERR)
    [c] = await prov.send([sms(3)])
    assert (a.code, b.code, c.code) == (7, 33, 999)
    assert not (a.retry or b.retry or c.retry)


async def test_refused_bind_is_refused_credentials(smsc: Smsc) -> None:
    prov = SmppProvider("smsc", config(smsc, password="wrong"))
    await prov.start(Sink())
    try:
        with pytest.raises(ProviderAuthError, match="ESME_RINVPASWD"):
            await prov.send([sms(1)])
        with pytest.raises(ProviderAuthError):
            await prov.check()
    finally:
        await prov.aclose()
    assert smsc.submits(None) == [] and smsc.state()["refused_binds"] >= 1


async def test_no_smsc_is_a_retry_not_in_doubt(smsc: Smsc) -> None:
    smsc.stop()
    prov = SmppProvider("smsc", config(smsc, response_timeout_s=0.5))
    await prov.start(Sink())
    try:
        [out] = await prov.send([sms(1)])
    finally:
        await prov.aclose()
    assert out.retry and out.unsent and out.code == 999


async def test_drop_mid_batch_in_doubt_never_resent(smsc: Smsc) -> None:
    smsc.call("drop", after=5)
    prov = SmppProvider("smsc", config(smsc, window=3))
    await prov.start(Sink())
    try:
        outs = await prov.send([sms(n) for n in range(20)])
        by_key = {o.key: o for o in outs}
        doubtful = [o for o in outs if o.code == 999 and not o.retry]
        assert 1 <= len(doubtful) <= 3  # in flight when it dropped (the window)
        # Those never written were sent after the reconnect, or are retried later.
        assert all(o.code == 0 or (o.retry and o.unsent) for o in outs if o not in doubtful)
        # An in-doubt message given again (after a crash) is never resent.
        again = await prov.send([sms(int(doubtful[0].key[1:]), in_doubt=True)])
        assert again[0].code == 999
    finally:
        await prov.aclose()
    seen = [s["destination_addr"] for s in smsc.submits(None)]
    assert len(seen) == len(set(seen))  # no number got two submit_sm
    assert by_key


async def test_receipt_stored_before_ack_and_parts(smsc: Smsc, provider: Any) -> None:
    prov, sink = provider
    [out] = await prov.send([sms(1, "y" * 300)])
    ids = out.provider_message_id.split()
    sink.gate = asyncio.Event()
    smsc.call("receipts", stat="DELIVRD")
    await until(lambda: smsc.state()["receipts_sent"] == 2, what="2 receipts sent")
    await asyncio.sleep(0.3)  # give a wrong implementation the time to ack early
    assert smsc.state()["receipts_acked"] == 0  # not stored yet: not acknowledged
    sink.gate.set()
    await until(lambda: smsc.state()["receipts_acked"] == 2, what="2 receipts acked")
    assert sorted(e.message_id for e in sink.events) == sorted(ids)
    assert all(isinstance(e, DeliveryEvent) and e.status == "DELIVRE" for e in sink.events)


async def test_store_failure_answers_rx_t_appn(smsc: Smsc, provider: Any) -> None:
    prov, sink = provider
    await prov.send([sms(1)])
    sink.fail = True
    smsc.call("receipts", stat="DELIVRD")
    await until(lambda: smsc.state()["deliver_nacks"] == 1, what="a refused deliver_sm")
    assert smsc.state()["bound"] == 1  # the bind stays


async def test_unreadable_receipt_stored_raw_and_acked(smsc: Smsc, provider: Any) -> None:
    prov, sink = provider
    await prov.send([sms(1)])
    smsc.call("receipts", stat="DELIVRD", tlv=0, text=0)
    await until(lambda: smsc.state()["receipts_acked"] == 1, what="receipt acked")
    [event] = sink.events
    assert isinstance(event, DeliveryEvent) and event.message_id is None
    assert "this receipt says nothing readable" in event.raw


async def test_mo_reply(smsc: Smsc, provider: Any) -> None:
    prov, sink = provider
    await prov.send([sms(1)])
    smsc.call("mo", **{"from": "+33600000001", "to": "36111", "text": "Oui merci ç"})
    await until(lambda: sink.events, what="MO stored")
    [event] = sink.events
    assert isinstance(event, ReplyEvent)
    assert (event.number, event.to, event.text) == ("+33600000001", "36111", "Oui merci ç")
    assert event.provider_type == "smpp:smsc"


async def test_unbind_on_close(smsc: Smsc) -> None:
    prov = SmppProvider("smsc", config(smsc))
    await prov.start(Sink())
    await prov.send([sms(1)])
    await prov.aclose()
    await until(lambda: smsc.state()["unbinds"] == 1, what="unbind")


async def test_enquire_link_when_idle(smsc: Smsc) -> None:
    prov = SmppProvider("smsc", config(smsc, enquire_link_s=0.2))
    await prov.start(Sink())
    try:
        await until(lambda: smsc.state()["enquire_links"] >= 2, what="enquire_link")
    finally:
        await prov.aclose()


async def test_reconnects_after_a_drop(smsc: Smsc, provider: Any) -> None:
    prov, _ = provider
    await prov.send([sms(1)])
    smsc.call("drop", after=0)
    await prov.send([sms(2)])  # this one is in doubt (dropped unanswered)
    [out] = await prov.send([sms(3)])
    assert out.code == 0
    assert smsc.state()["binds"] == 2


# -- parse_deliver, pure ---------------------------------------------------------------------


def deliver(esm: int, text: bytes, tlvs: tuple[tuple[int, bytes], ...] = (), **kw: Any) -> p.Pdu:
    fields = {"esm_class": esm, "short_message": text, "source_addr": b"33601020304", **kw}
    return p.Pdu(p.DELIVER_SM, 1, fields=fields, tlvs=tlvs)


def test_parse_receipt_tlv_first_and_id_format() -> None:
    text = (
        b"id:255 sub:001 dlvrd:000 submit date:2401011200 done date:240101120130"
        b" stat:UNDELIV err:0A3"
    )
    e = parse_deliver("s", deliver(4, text, ((p.TLV_RECEIPTED_MESSAGE_ID, b"FF\0"),)), "same", 0)
    assert isinstance(e, DeliveryEvent) and e.message_id == "FF" and e.status == "NON_DELIVRE"
    assert e.text == "stat:UNDELIV err:0A3" and e.occurred_at is not None
    e = parse_deliver("s", deliver(4, text), "hex_to_dec", 0)
    assert isinstance(e, DeliveryEvent) and e.message_id == "255"
    state = ((p.TLV_RECEIPTED_MESSAGE_ID, b"7\0"), (p.TLV_MESSAGE_STATE, b"\x02"))
    e = parse_deliver("s", deliver(4, b"", state), "same", 0)
    assert isinstance(e, DeliveryEvent) and (e.message_id, e.status) == ("7", "DELIVRE")
