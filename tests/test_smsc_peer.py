"""The SMSC peer (tests/smsc/smsc.js, node-smpp) against our PDU layer over a
plain socket: bind checks, submit_sm answers, receipts and MO, the control
commands the end-to-end tests rely on."""

from __future__ import annotations

import socket

from mailbridge.providers import smpp_pdu as p
from tests.smsc_peer import PASSWORD, SYSTEM_ID, Smsc


class Esme:
    """A blocking ESME of a few lines: our PDU layer on a socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.seq = 0

    def send(self, command: int, **fields: int | bytes) -> int:
        self.seq += 1
        self.sock.sendall(p.encode(p.Pdu(command, self.seq, fields=fields)))
        return self.seq

    def read(self) -> p.Pdu:
        head = self._exact(4)
        return p.decode(head + self._exact(p.frame_length(head) - 4))

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def bind(self, system_id: str = SYSTEM_ID, password: str = PASSWORD) -> p.Pdu:
        self.send(
            p.BIND_TRANSCEIVER, system_id=system_id.encode(), password=password.encode(),
            interface_version=p.INTERFACE_VERSION,
        )  # fmt: skip
        return self.read()


def test_bind_refusals(smsc: Smsc) -> None:
    assert Esme(smsc.port).bind(password="wrong").status == p.ESME_RINVPASWD
    assert Esme(smsc.port).bind(system_id="nobody").status == p.ESME_RINVSYSID
    resp = Esme(smsc.port).bind()
    assert resp.command_id == p.BIND_TRANSCEIVER_RESP and resp.status == 0
    assert resp.text("system_id") == "node-smsc"


def test_submit_receipt_mo_unbind(smsc: Smsc) -> None:
    esme = Esme(smsc.port)
    assert esme.bind().status == 0
    parts = p.split_parts("€" * 100, "gsm7", reference=9)
    for part in parts:
        esme.send(
            p.SUBMIT_SM, source_addr=b"MaSociete", source_addr_ton=5,
            destination_addr=b"33601020304", dest_addr_ton=1, dest_addr_npi=1,
            esm_class=part.esm_class, data_coding=part.data_coding, registered_delivery=1,
            short_message=part.short_message,
        )  # fmt: skip
    ids = []
    for _ in parts:
        resp = esme.read()
        assert resp.command_id == p.SUBMIT_SM_RESP and resp.status == 0
        ids.append(resp.text("message_id"))
    # node-smpp decoded our septets and UDH back to the very text.
    assert smsc.texts("33601020304") == ["€" * 100]
    assert smsc.call("receipts", stat="DELIVRD")["sent"] == 2
    for _ in parts:
        dlr = esme.read()
        assert dlr.command_id == p.DELIVER_SM and dlr.num("esm_class") == p.ESM_CLASS_RECEIPT
        tlv = dlr.tlv(p.TLV_RECEIPTED_MESSAGE_ID)
        assert tlv is not None and tlv.rstrip(b"\0").decode() in ids
        receipt = p.parse_receipt(dlr.text("short_message"))
        assert receipt is not None and receipt.stat == "DELIVRD"
        esme.sock.sendall(p.encode(p.response(dlr)))
    assert smsc.call("mo", **{"from": "+33601020304", "to": "36111", "text": "STOP"})["sent"]
    mo = esme.read()
    assert mo.text("source_addr") == "33601020304" and mo.text("short_message") == "STOP"
    esme.sock.sendall(p.encode(p.response(mo)))
    esme.send(p.ENQUIRE_LINK)
    assert esme.read().command_id == p.ENQUIRE_LINK_RESP
    esme.send(p.UNBIND)
    assert esme.read().command_id == p.UNBIND_RESP
    assert smsc.state()["receipts_acked"] == 2
    assert [e["kind"] for e in smsc.events() if e["kind"] in ("unbind", "close")][:1] == ["unbind"]


def test_throttle_and_reject(smsc: Smsc) -> None:
    esme = Esme(smsc.port)
    esme.bind()
    smsc.call("throttle", n=1)
    smsc.call("reject", n=1, status=p.ESME_RINVDSTADR)
    statuses = []
    for _ in range(3):
        esme.send(p.SUBMIT_SM, destination_addr=b"33601020304", short_message=b"hi")
        statuses.append(esme.read().status)
    assert statuses == [p.ESME_RTHROTTLED, p.ESME_RINVDSTADR, 0]
