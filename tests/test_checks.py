"""check_request: the codes of SPEC section 3, texts, STOP mention, cutting."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from mailbridge.app import build_rules
from mailbridge.checks import CheckedRequest, check_request
from mailbridge.envoi import parse_envoi
from mailbridge.quiet_hours import PARIS
from tests.support import KEYID, envoi_body, make_config

TUESDAY_NOON = datetime(2026, 11, 24, 12, 0, tzinfo=PARIS)
SUNDAY_NOON = datetime(2026, 11, 29, 12, 0, tzinfo=PARIS)


def check(
    tmp_path: Path,
    fields: dict[str, str],
    *,
    now: datetime = TUESDAY_NOON,
    attachments: dict[str, bytes] | None = None,
    **account: Any,
) -> CheckedRequest:
    config = make_config(tmp_path, **account)
    rules = build_rules(config)[KEYID]
    body = envoi_body(**{"keyid": KEYID, "emailId": "1", **fields})
    return check_request(parse_envoi(body), attachments or {}, rules, now)


def codes(result: CheckedRequest) -> list[int | None]:
    return [r.code for r in result.recipients]


def test_plain_request(tmp_path: Path) -> None:
    result = check(tmp_path, {"num": "0601020304", "sms": "Salut ca va ?"})
    assert result.ack_code == 0 and not result.numbered
    (r,) = result.recipients
    assert (r.number, r.text, r.encoding, r.parts, r.code) == (
        "+33601020304", "Salut ca va ?", "gsm7", 1, None,
    )  # fmt: skip
    assert result.sender == "MaSociete"


def test_line_break_character(tmp_path: Path) -> None:
    result = check(tmp_path, {"num": "0601020304", "sms": "ligne 1Öligne 2"})
    assert result.recipients[0].text == "ligne 1\nligne 2"


def test_missing_email_id_is_ack_2(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    rules = build_rules(config)[KEYID]
    for body in (
        envoi_body(keyid=KEYID, num="0601020304", sms="x"),
        envoi_body(keyid=KEYID, num="0601020304", sms="x", emailId="  "),
    ):
        assert check_request(parse_envoi(body), {}, rules, TUESDAY_NOON).ack_code == 2


def test_no_message_at_all_is_ack_3(tmp_path: Path) -> None:
    assert check(tmp_path, {"num": "0601020304"}).ack_code == 3


def test_no_number_gives_one_code_6(tmp_path: Path) -> None:
    result = check(tmp_path, {"sms": "x"})
    assert [(r.tel, r.code) for r in result.recipients] == [("", 6)]


def test_numbered_with_personal_and_common_texts(tmp_path: Path) -> None:
    result = check(
        tmp_path,
        {"num1": "0601020304", "num3": "0601020305", "sms1": "perso", "sms": "commun"},
    )
    assert result.numbered
    assert [r.text for r in result.recipients] == ["perso", "commun"]


def test_number_without_any_text_gets_999(tmp_path: Path) -> None:
    result = check(tmp_path, {"num1": "0601020304", "num2": "0601020305", "sms1": "x"})
    assert codes(result) == [None, 999]


def test_more_than_500_numbers(tmp_path: Path) -> None:
    fields = {f"num{i}": "0601020304" for i in range(1, 502)}
    result = check(tmp_path, {**fields, "sms": "x"})
    assert result.ack_code == 0
    assert set(codes(result)) == {23} and len(result.recipients) == 501
    exactly_500 = check(tmp_path, {**{f"num{i}": "0601020304" for i in range(1, 501)}, "sms": "x"})
    assert set(codes(exactly_500)) == {None}


def test_num_index_beyond_500(tmp_path: Path) -> None:
    assert codes(check(tmp_path, {"num501": "0601020304", "sms": "x"})) == [23]


@pytest.mark.parametrize(
    ("emetteur", "code"),
    [
        ("", 16),
        ("AB", 33),  # too short
        ("ABCDEFGHIJKL", 33),  # too long
        ("12345", 33),  # only digits
        ("Ma Societe", 33),  # a space
        ("Autre", 33),  # not in the account's senders
        ("MaSociete", None),
    ],
)
def test_sender_id(tmp_path: Path, emetteur: str, code: int | None) -> None:
    result = check(
        tmp_path, {"num": "0601020304", "sms": "x", "emetteur": emetteur}, senders=["MaSociete"]
    )
    assert codes(result) == [code]


@pytest.mark.parametrize(("smslong", "code"), [("x", 34), ("1.5", 34), ("0", 34), (" 2 ", None)])
def test_smslong(tmp_path: Path, smslong: str, code: int | None) -> None:
    assert codes(check(tmp_path, {"num": "0601020304", "sms": "x", "smslong": smslong})) == [code]


def test_request_codes_take_precedence_over_number_codes(tmp_path: Path) -> None:
    result = check(tmp_path, {"num1": "12", "num2": "0601020304", "sms": "x", "emetteur": ""})
    assert codes(result) == [16, 16]


def test_quiet_hours_reject_and_defer(tmp_path: Path) -> None:
    fields = {"num": "0601020304", "sms": "promo"}
    rejected = check(tmp_path, fields, now=SUNDAY_NOON, commercial=True)
    assert codes(rejected) == [24]
    deferred = check(tmp_path, fields, now=SUNDAY_NOON, commercial=True, quiet_hours="defer")
    assert codes(deferred) == [None]
    assert deferred.due_at == datetime(2026, 11, 30, 8, 0, tzinfo=PARIS)
    weekday = check(tmp_path, fields, commercial=True)
    assert codes(weekday) == [None] and weekday.due_at is None
    alerts = check(tmp_path, fields, now=SUNDAY_NOON, commercial=False)
    assert codes(alerts) == [None]


def test_stop_mention(tmp_path: Path) -> None:
    fields = {"num": "0601020304", "sms": "promo"}
    assert check(tmp_path, fields, commercial=True).recipients[0].text == (
        "promo\nSTOP SMS au 36111"
    )
    # nostop is honoured only when the account allows it.
    nostop = {**fields, "nostop": "1"}
    text = check(tmp_path, nostop, commercial=True).recipients[0].text
    assert text is not None and text.endswith("36111")
    allowed = check(tmp_path, nostop, commercial=True, nostop_allowed=True)
    assert allowed.recipients[0].text == "promo"
    # No sender id (numeric sender or none): no mention.
    numeric = check(tmp_path, fields, commercial=True, default_sender="+33612345678")
    assert numeric.recipients[0].text == "promo"
    assert check(tmp_path, fields, commercial=False).recipients[0].text == "promo"


def test_long_text_is_cut_and_the_stop_line_kept(tmp_path: Path) -> None:
    long = "a" * 400
    result = check(tmp_path, {"num": "0601020304", "sms": long, "smslong": "1"}, commercial=True)
    (r,) = result.recipients
    assert r.text is not None and r.text.endswith("\nSTOP SMS au 36111")
    assert (r.parts, r.max_parts, len(r.text)) == (1, 1, 160)
    capped = check(tmp_path, {"num": "0601020304", "sms": long * 10, "smslong": "9"}, max_parts=2)
    assert (capped.recipients[0].parts, capped.recipients[0].max_parts) == (2, 2)


def test_french_text_is_ucs2_unless_transliterated(tmp_path: Path) -> None:
    fields = {"num": "0601020304", "sms": "Noël, ça coûte « peu » — très"}
    kept = check(tmp_path, fields).recipients[0]
    assert (kept.encoding, kept.text) == ("ucs2", "Noël, ça coûte « peu » — très")
    gsm = check(tmp_path, fields, transliterate=True).recipients[0]
    assert (gsm.encoding, gsm.text) == ("gsm7", 'Noel, ca coute " peu " - très')


def test_csv_request(tmp_path: Path) -> None:
    mobiles = "0601020304;;Michel\n0601020305;;Sarah;;x\n\n".encode("cp1252")
    result = check(
        tmp_path,
        {},
        attachments={"mobiles.csv": mobiles, "message.csv": "Bonjour [1]Ö[2]".encode()},
    )
    assert result.numbered
    assert [r.text for r in result.recipients] == ["Bonjour Michel\n", "Bonjour Sarah\nx"]


def test_csv_without_message_uses_sms_tag_as_template(tmp_path: Path) -> None:
    result = check(tmp_path, {"sms": "Hi [1]"}, attachments={"mobiles.csv": b"0601020304;;Bob"})
    assert [r.text for r in result.recipients] == ["Hi Bob"]


def test_unreadable_attachment_is_ack_3(tmp_path: Path) -> None:
    result = check(tmp_path, {"sms": "x"}, attachments={"mobiles.csv": b"\x00\x01binary"})
    assert result.ack_code == 3
