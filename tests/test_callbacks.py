"""The providers' callback parsers (SPEC section 7), on the payloads of the seeds.

Pure functions: a callback's query and body in, typed delivery and reply
events out, or CallbackError for what cannot be read (the receiver's 400).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mailbridge.model import DeliveryEvent, ReplyEvent
from mailbridge.providers import CallbackError, cm, kcell, smsmode


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


# -- CM (seed 000, "Rapport d'état webhook") ---------------------------------------------

CM_DELIVERED = {
    "CREATED_S": "2026-12-02T09:15:02", "DATETIME_S": "2026-12-02T09:15:03",
    "GSM": "0033601020304", "REFERENCE": "cmd4521", "STATUS": "2",
    "STATUSDESCRIPTION": "Delivered", "STANDARDERRORTEXT": "", "ID": "778899",
    "OPERATOR": "20801", "RECIPIENT": "0033601020304",
    "STATUSISSUCCESS": "1",
}  # fmt: skip


def test_cm_delivered() -> None:
    (event,) = cm.parse_callback(CM_DELIVERED, b"")
    assert isinstance(event, DeliveryEvent)
    assert (event.provider_type, event.message_id, event.number, event.status) == (
        "cm", "cmd4521", "+33601020304", "DELIVRE",
    )  # fmt: skip
    assert event.text == "Delivered"
    assert event.occurred_at == utc(2026, 12, 2, 9, 15, 2)
    assert "REFERENCE=cmd4521" in event.raw


@pytest.mark.parametrize(
    "status, expected", [("0", "EN_COURS"), ("1", "REJETE"), ("2", "DELIVRE"), ("3", "NON_DELIVRE")]
)
def test_cm_statuses(status: str, expected: str) -> None:
    (event,) = cm.parse_callback({**CM_DELIVERED, "STATUS": status}, b"")
    assert isinstance(event, DeliveryEvent) and event.status == expected


def test_cm_error_text_and_lower_case_names() -> None:
    query = {k.lower(): v for k, v in CM_DELIVERED.items()}
    query.update(status="3", standarderrortext="Absent subscriber", gsm="+33601020304")
    (event,) = cm.parse_callback(query, b"")
    assert (event.text, event.number) == ("Absent subscriber", "+33601020304")


def test_cm_same_report_same_key_other_status_other_key() -> None:
    (a,) = cm.parse_callback(CM_DELIVERED, b"")
    (b,) = cm.parse_callback(dict(CM_DELIVERED), b"")
    (c,) = cm.parse_callback({**CM_DELIVERED, "STATUS": "0"}, b"")
    assert a.dedupe_key == b.dedupe_key != c.dedupe_key


@pytest.mark.parametrize(
    "change", [{"STATUS": "7"}, {"STATUS": ""}, {"GSM": "", "RECIPIENT": ""}, {"GSM": "abc"}]
)
def test_cm_malformed(change: dict[str, str]) -> None:
    with pytest.raises(CallbackError):
        cm.parse_callback({**CM_DELIVERED, **change}, b"")


# -- sMsmode (seed 002, items 12 and 14) -------------------------------------------------

SMSMODE_DLR = {
    "numero": "33601020304", "date_reception": "2010-03-25 09:52:17", "statut": "11",
    "smsID": "S7EpYZ5kmS87", "refClient": "12azer34", "mcc_mnc": "20801",
}  # fmt: skip


def test_smsmode_delivery() -> None:
    (event,) = smsmode.parse_delivery_callback(SMSMODE_DLR, b"")
    assert isinstance(event, DeliveryEvent)
    assert (event.message_id, event.number, event.status, event.text) == (
        "S7EpYZ5kmS87", "+33601020304", "DELIVRE", "Reçu",
    )  # fmt: skip
    assert event.occurred_at == utc(2010, 3, 25, 8, 52, 17)  # Paris, winter time


@pytest.mark.parametrize(
    "statut, expected",
    [("13", "EN_COURS"), ("14", "DELIVRE"), ("21", "NON_DELIVRE"), ("22", "REJETE"),
     ("37", "EXPIRE"), ("3501", "EN_COURS"), ("3524", "REJETE"), ("4242", "EN_COURS")],
)  # fmt: skip
def test_smsmode_statuses(statut: str, expected: str) -> None:
    (event,) = smsmode.parse_delivery_callback({**SMSMODE_DLR, "statut": statut}, b"")
    assert isinstance(event, DeliveryEvent) and event.status == expected


@pytest.mark.parametrize("missing", ["numero", "statut", "smsID"])
def test_smsmode_delivery_malformed(missing: str) -> None:
    with pytest.raises(CallbackError):
        smsmode.parse_delivery_callback({k: v for k, v in SMSMODE_DLR.items() if k != missing}, b"")
    with pytest.raises(CallbackError):
        smsmode.parse_delivery_callback({**SMSMODE_DLR, "statut": "reçu"}, b"")


SMSMODE_MO = {
    "numero": "36034", "message": "bonjour", "emetteur": "33601020304",
    "date_reception": "01012013-122233", "smsID": "abcd1234", "refClient": "monclient123",
    "responseID": "azertyu123",
}  # fmt: skip


def test_smsmode_reply() -> None:
    (event,) = smsmode.parse_reply_callback(SMSMODE_MO, b"")
    assert isinstance(event, ReplyEvent)
    assert (event.message_id, event.number, event.to, event.text) == (
        "abcd1234", "+33601020304", "36034", "bonjour",
    )  # fmt: skip
    assert event.occurred_at == utc(2013, 1, 1, 11, 22, 33)
    with pytest.raises(CallbackError):
        smsmode.parse_reply_callback({k: v for k, v in SMSMODE_MO.items() if k != "emetteur"}, b"")


# -- Kcell (seed 003, "Получение отчетов (DR)") -------------------------------------------

# Exactly as the seed's example with HTTP headers writes it.
KCELL_DLR = (
    (
        b'{"delivery_report":[{"status":"DELIVERED","client_message_id":"batch_tst1104",\n'
        b'"error_code":null,"error_message":null,"segment_count":1,"init_time":"2016-\n'
        b'04-11 17:49:39","sent_time":"2016-04-11 17:49:39","status_time":"2016-04-11\n'
        b'17:49:42","message_id":5916504923,"sent_confirm_time":"2016-04-11\n'
        b'17:49:39","rn_code":"02","retry_count":0}]}'
    )
    .replace(b"-\n", b"-")
    .replace(b"11\n", b"11 ")
)
# The seed's other example: trailing commas, a status with a leading space.
KCELL_DLR_LOOSE = b"""{
  "delivery_report": [
    {
      "client_message_id" : "3",
      "message_id"       : "34524",
      "status"           : " UNDELIVERABLE",
      "error_code"       : "11",
      "error_message"    : "Invalid recipient / destination address ",
      "segment_count"    : 1,
      "init_time"        : "2014-12-24 16:33:05",
      "status_time"      : "2014-12-24 16:33:05",
    },
  ]
}"""
KCELL_MO = """{"incoming_report": [{"message_id": 456795, "sender": "77010000000",
 "recipient": "9090", "text": "исходящее от абонента", "segment_count": 1,
 "receive_time": "2014-12-24 16:33:06", "rn_code": "02"}]}""".encode()


def test_kcell_delivery() -> None:
    (event,) = kcell.parse_callback({}, KCELL_DLR)
    assert isinstance(event, DeliveryEvent)
    assert (event.message_id, event.number, event.status) == ("batch_tst1104", None, "DELIVRE")
    assert event.occurred_at == utc(2016, 4, 11, 11, 49, 42)  # Almaty, UTC+6 in 2016


def test_kcell_loose_json_and_error_text() -> None:
    (event,) = kcell.parse_callback({}, KCELL_DLR_LOOSE)
    assert isinstance(event, DeliveryEvent)
    assert (event.message_id, event.status) == ("3", "NON_DELIVRE")
    assert event.text == "11 Invalid recipient / destination address"


def test_kcell_reply() -> None:
    (event,) = kcell.parse_callback({}, KCELL_MO)
    assert isinstance(event, ReplyEvent)
    assert (event.number, event.to, event.text, event.message_id) == (
        "+77010000000", "9090", "исходящее от абонента", None,
    )  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[]", b'{"other": []}', b'{"delivery_report": {}}',
     b'{"delivery_report": [{"status": "DELIVERED"}]}', b'{"incoming_report": [{"text": "x"}]}',
     b"\xff\xfe"],
)  # fmt: skip
def test_kcell_malformed(body: bytes) -> None:
    with pytest.raises(CallbackError):
        kcell.parse_callback({}, body)
