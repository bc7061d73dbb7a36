"""The SMPP PDU layer (mailbridge/providers/smpp_pdu.py): every PDU we write parses
back, splitting matches mailbridge.gsm and never cuts an escape or a surrogate pair,
receipts in the forms SMSCs really write, message_id_format."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.gsm import segment
from mailbridge.providers import smpp_pdu as p

EURO = "€"
EMOJI = "\U0001f600"

# -- PDUs ----------------------------------------------------------------------------------

c_string = st.binary(max_size=15).map(lambda b: b.replace(b"\0", b"x"))


def c_field(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=size - 1).map(lambda b: b.replace(b"\0", b"x"))


def field_values(layout: tuple[tuple[str, str, int], ...]) -> st.SearchStrategy[dict[str, object]]:
    parts: dict[str, st.SearchStrategy[object]] = {}
    for name, kind, size in layout:
        if kind == "i":
            parts[name] = st.integers(0, 256**size - 1)
        elif kind == "c":
            parts[name] = c_field(size)
        else:
            parts[name] = st.binary(max_size=size)
    return st.fixed_dictionaries(parts)


tlv = st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=300))


@st.composite
def pdus(draw: st.DrawFn) -> p.Pdu:
    command = draw(st.sampled_from(sorted(p.LAYOUTS)))
    fields = draw(field_values(p.LAYOUTS[command]))
    tlvs = tuple(draw(st.lists(tlv, max_size=4))) if command in p._WITH_TLVS else ()
    return p.Pdu(
        command,
        draw(st.integers(0, 0x7FFFFFFF)),
        draw(st.integers(0, 0xFFFFFFFF)),
        fields,  # type: ignore[arg-type]
        tlvs,
    )


@settings(max_examples=500)
@given(pdus())
def test_every_pdu_we_write_parses_back(pdu: p.Pdu) -> None:
    frame = p.encode(pdu)
    assert p.frame_length(frame[:4]) == len(frame)
    back = p.decode(frame)
    assert back.command_id == pdu.command_id
    assert back.sequence == pdu.sequence and back.status == pdu.status
    assert dict(back.fields) == dict(pdu.fields)
    assert back.tlvs == pdu.tlvs
    assert p.encode(back) == frame


@given(st.binary(max_size=200))
def test_decoding_garbage_raises_pdu_error_only(body: bytes) -> None:
    for command in p.LAYOUTS:
        frame = struct.pack(">IIII", 16 + len(body), command, 0, 1) + body
        try:
            p.decode(frame)
        except p.PduError:
            pass


def test_bind_transceiver_bytes() -> None:
    pdu = p.Pdu(
        p.BIND_TRANSCEIVER, 1,
        fields={"system_id": b"mb", "password": b"pw", "system_type": b"",
                "interface_version": 0x34},
    )  # fmt: skip
    assert p.encode(pdu) == (
        struct.pack(">IIII", 16 + 3 + 3 + 1 + 3 + 1, 9, 0, 1) + b"mb\0pw\0\0\x34\0\0\0"
    )


def test_error_responses_without_a_body() -> None:
    frame = struct.pack(">IIII", 16, p.SUBMIT_SM_RESP, p.ESME_RTHROTTLED, 7)
    pdu = p.decode(frame)
    assert pdu.status == p.ESME_RTHROTTLED and pdu.text("message_id") == ""
    bind = p.decode(struct.pack(">IIII", 16, p.BIND_TRANSCEIVER_RESP, p.ESME_RINVPASWD, 1))
    assert bind.status in p.BIND_REFUSALS


def test_long_message_ids_are_read() -> None:
    long_id = b"9" * 80
    frame = struct.pack(">IIII", 16 + 81, p.SUBMIT_SM_RESP, 0, 3) + long_id + b"\0"
    assert p.decode(frame).octets("message_id") == long_id


def test_over_long_c_strings_are_not_written() -> None:
    with pytest.raises(p.PduError):
        p.encode(p.Pdu(p.BIND_TRANSCEIVER, 1, fields={"password": b"123456789"}))
    with pytest.raises(p.PduError):
        p.encode(p.Pdu(p.SUBMIT_SM, 1, fields={"short_message": b"x" * 255}))
    with pytest.raises(p.PduError):
        p.c_octets("a" * 16, 16, "system_id")


def test_broken_frames() -> None:
    with pytest.raises(p.PduError):
        p.frame_length(struct.pack(">I", 8))
    with pytest.raises(p.PduError):
        p.frame_length(struct.pack(">I", 10_000_000))
    with pytest.raises(p.PduError):  # C-octet string without its NUL
        p.decode(struct.pack(">IIII", 19, p.SUBMIT_SM, 0, 1) + b"abc")
    with pytest.raises(p.PduError):  # sm_length beyond the body
        # Every field empty or zero up to sm_length, which says 9 octets follow.
        body = b"\0" * 16 + b"\x09"
        p.decode(struct.pack(">IIII", 16 + len(body), p.SUBMIT_SM, 0, 1) + body)


def test_unknown_command_kept_raw_and_nacked() -> None:
    frame = struct.pack(">IIII", 19, 0x00000103, 0, 9) + b"abc"
    pdu = p.decode(frame)
    assert pdu.raw_body == b"abc" and pdu.name == "command 0x00000103"
    nack = p.response(pdu, p.ESME_RINVCMDID)
    assert nack.command_id == p.GENERIC_NACK and nack.sequence == 9


def test_deliver_sm_receipt_tlvs() -> None:
    pdu = p.Pdu(
        p.DELIVER_SM, 5,
        fields={"esm_class": p.ESM_CLASS_RECEIPT, "short_message": b"id:1 stat:DELIVRD"},
        tlvs=((p.TLV_RECEIPTED_MESSAGE_ID, b"1A\0"), (p.TLV_MESSAGE_STATE, b"\x02")),
    )  # fmt: skip
    back = p.decode(p.encode(pdu))
    assert back.tlv(p.TLV_RECEIPTED_MESSAGE_ID) == b"1A\0"
    assert back.tlv(p.TLV_MESSAGE_STATE) == b"\x02"
    assert back.tlv(p.TLV_MESSAGE_PAYLOAD) is None


# -- splitting ---------------------------------------------------------------------------


def reassemble(parts: list[p.Part]) -> str:
    return "".join(p.part_text(x.short_message, x.esm_class, x.data_coding) for x in parts)


@pytest.mark.parametrize(
    ("text", "count"),
    [("a" * 160, 1), ("a" * 161, 2), ("a" * 306, 2), ("a" * 307, 3), ("a" * 459, 3),
     ("é" * 70, 1), ("ç" * 70, 1), ("ç" * 71, 2), ("ç" * 134, 2), ("ç" * 135, 3)],
)  # fmt: skip
def test_part_counts(text: str, count: int) -> None:
    seg = segment(text)
    parts = p.split_parts(text, seg.encoding, reference=42)
    assert len(parts) == seg.parts == count
    assert reassemble(parts) == text


def test_single_part_has_no_udh() -> None:
    [part] = p.split_parts("Bonjour " + EURO, "gsm7")
    assert part.esm_class == 0 and part.data_coding == 0
    assert part.short_message == b"Bonjour \x1be"
    [part] = p.split_parts("ça", "ucs2")
    assert part.data_coding == 8 and part.short_message == "ça".encode("utf-16-be")
    [part] = p.split_parts("abc", "gsm7", data_coding_gsm7=1)
    assert part.data_coding == 1


def test_concatenation_udh() -> None:
    parts = p.split_parts("x" * 400, "gsm7", reference=0x1FF)
    assert [x.short_message[:6] for x in parts] == [bytes((5, 0, 3, 0xFF, 3, i)) for i in (1, 2, 3)]
    assert all(x.esm_class == p.ESM_CLASS_UDHI for x in parts)
    assert [len(x.short_message) - 6 for x in parts] == [153, 153, 94]
    assert p.udh_concat(parts[1].short_message) == (0xFF, 3, 2)


def test_escape_never_ends_a_part() -> None:
    # 152 septets then a euro (2 septets): the euro moves whole to the next part.
    text = "a" * 152 + EURO + "b" * 10
    parts = p.split_parts(text, "gsm7")
    assert parts[0].text == "a" * 152 and parts[1].text.startswith(EURO)
    assert len(parts) == segment(text).parts


def test_surrogate_pair_never_split() -> None:
    text = "ç" * 66 + EMOJI + "x" * 10
    parts = p.split_parts(text, "ucs2")
    assert parts[0].text == "ç" * 66 and parts[1].text.startswith(EMOJI)
    assert reassemble(parts) == text


gsm_alphabet = st.sampled_from(
    list("abcXYZ 019@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ!\"#%&'()*+,-./:;<=>?¡ÄÖÑÜ§¿äöñüà\n\r")
    + list("€[]{}^~\\|")
)
ucs2_alphabet = st.sampled_from(list("abcçêœ€[ЖЩ中文") + [EMOJI, "\U0001f4a9", "\u00e9"])


@settings(max_examples=300)
@given(st.text(gsm_alphabet, max_size=1200), st.integers(0, 255))
def test_random_gsm_split_is_whole_and_exact(text: str, ref: int) -> None:
    parts = p.split_parts(text, "gsm7", reference=ref)
    assert len(parts) == segment(text).parts
    assert reassemble(parts) == text
    for part in parts:
        payload = part.short_message[6:] if len(parts) > 1 else part.short_message
        assert not payload.endswith(b"\x1b") or payload.endswith(b"\x1b\x1b")
        assert payload.decode("gsm03.38") == part.text  # no part begins mid-escape
        assert len(payload) <= (153 if len(parts) > 1 else 160)


@settings(max_examples=300)
@given(st.text(ucs2_alphabet, min_size=1, max_size=500))
def test_random_ucs2_split_is_whole_and_exact(text: str) -> None:
    parts = p.split_parts(text, "ucs2", reference=7)
    if segment(text).encoding == "ucs2":
        assert len(parts) == segment(text).parts
    assert reassemble(parts) == text
    for part in parts:
        payload = part.short_message[6:] if len(parts) > 1 else part.short_message
        # Decoding strictly fails on a lone surrogate: every part holds whole characters.
        assert payload.decode("utf-16-be") == part.text
        assert len(payload) <= (134 if len(parts) > 1 else 140)


def test_esc_itself_is_not_gsm7() -> None:
    with pytest.raises(ValueError):
        p.split_parts("a\x1bb", "gsm7")


# -- receipts ------------------------------------------------------------------------------


def test_receipt_standard() -> None:
    r = p.parse_receipt(
        "id:0123456789 sub:001 dlvrd:001 submit date:2401151230 done date:2401151231"
        " stat:DELIVRD err:000 text:Bonjour"
    )
    assert r is not None
    assert r.message_id == "0123456789" and r.stat == "DELIVRD" and r.err == "000"
    assert r.submit_date == datetime(2024, 1, 15, 12, 30, tzinfo=UTC).timestamp()
    assert r.done_date == datetime(2024, 1, 15, 12, 31, tzinfo=UTC).timestamp()
    assert r.text == "Bonjour"


def test_receipt_twelve_digit_dates_hex_err_and_case() -> None:
    r = p.parse_receipt(
        "ID:a3f9 SUB:001 DLVRD:000 SUBMIT DATE:240115123005 DONE DATE:240115123107"
        " STAT:undeliv ERR:0A3 TEXT:"
    )
    assert r is not None and r.message_id == "a3f9" and r.stat == "UNDELIV" and r.err == "0A3"
    assert r.done_date == datetime(2024, 1, 15, 12, 31, 7, tzinfo=UTC).timestamp()
    assert p.receipt_status(r.stat) == "NON_DELIVRE"


def test_receipt_minimal_and_garbage() -> None:
    r = p.parse_receipt("id:77 stat:EXPIRED")
    assert r is not None and r.err is None and r.done_date is None
    assert p.receipt_status(r.stat) == "EXPIRE"
    assert p.parse_receipt("hello there") is None
    assert p.parse_receipt("id:77 dlvrd:1") is None
    assert p.receipt_date("2413991200") is None  # month 13


@pytest.mark.parametrize(
    ("stat", "status"),
    [("DELIVRD", "DELIVRE"), ("EXPIRED", "EXPIRE"), ("DELETED", "NON_DELIVRE"),
     ("UNDELIV", "NON_DELIVRE"), ("REJECTD", "REJETE"), ("ACCEPTD", "EN_COURS"),
     ("ENROUTE", "EN_COURS"), ("UNKNOWN", "EN_COURS")],
)  # fmt: skip
def test_receipt_statuses(stat: str, status: str) -> None:
    assert p.receipt_status(stat) == status


@given(st.integers(0, 2**63))
def test_id_formats_meet(n: int) -> None:
    assert p.submitted_id(format(n, "X"), "hex_to_dec") == p.receipted_id(str(n), "hex_to_dec")
    assert p.submitted_id(str(n), "dec_to_hex") == p.receipted_id(format(n, "08X"), "dec_to_hex")
    assert p.submitted_id(f" {n} ", "same") == p.receipted_id(str(n), "same")


def test_id_formats_keep_what_does_not_read() -> None:
    assert p.submitted_id("msg-1", "hex_to_dec") == "msg-1"
    assert p.receipted_id("zz", "dec_to_hex") == "zz"
    assert p.split_ids(p.join_ids(["a1", "b2", "c3"])) == ["a1", "b2", "c3"]


# -- SMPP times ------------------------------------------------------------------------------


def test_validity_times() -> None:
    at = datetime(2024, 3, 1, 10, 20, 30, tzinfo=UTC).timestamp()
    assert p.absolute_time(at) == "240301102030000+"
    assert p.parse_smpp_time("240301102030000+", 0) == at
    assert p.parse_smpp_time("240301112030004+", 0) == at  # UTC+1 (4 quarter hours)
    assert p.relative_time(86400 + 3661) == "000001010101000R"
    assert p.parse_smpp_time(p.relative_time(90061), 100.0) == 100.0 + 90061
    assert p.relative_time(400 * 86400) == "010105000000000R"
    assert p.parse_smpp_time("", 0) is None
