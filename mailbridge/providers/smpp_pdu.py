"""SMPP 3.4 PDUs of our own: struct-based encode/decode, splitting, receipts.

Why not a library (RECIPES.md): aiosmpplib 0.7.4 raises on receipts with
12-digit dates or a hex `err:` (no `deliver_sm_resp`, the bind drops and
rebinds in a loop), passes ESME_RTHROTTLED up without retrying and has no
window; smpp34 acknowledges `deliver_sm` before the application has stored it;
aiosmpplib miscounts `€` and smpplib can cut a part inside an escape. The
PDUs an ESME needs are few and fixed; owning them keeps the ack timing, the
window, the splitting and the id normalisation ours. Pure functions only:
no I/O here (the session is providers/smpp_session.py).

- `encode(pdu)` / `decode(frame)`: one PDU <-> its bytes (header included).
  Only the PDUs of a transceiver ESME: bind_transceiver(+resp), unbind(+resp),
  enquire_link(+resp), submit_sm(+resp), deliver_sm(+resp), generic_nack.
  A PDU of another command decodes with its body kept raw (the session answers
  generic_nack ESME_RINVCMDID). Encoding refuses what the spec does not allow
  (over-long C-octet strings); decoding is lenient where peers are sloppy (a
  response without a body, longer message ids) and strict where a frame is
  broken (`PduError`).
- `split_parts(text, encoding)`: the short_message of each part, with an 8-bit
  concatenation UDH when there are several (esm_class 0x40); the same parts
  as mailbridge.gsm counts.
- `parse_receipt(text)`: the `id:... stat:...` text of a delivery receipt.
- `submitted_id` / `receipted_id`: message_id_format normalisation.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import gsm0338  # noqa: F401  (importing it registers the "gsm03.38" codec)

# -- command ids and statuses ------------------------------------------------------

GENERIC_NACK = 0x80000000
BIND_TRANSCEIVER = 0x00000009
BIND_TRANSCEIVER_RESP = 0x80000009
UNBIND = 0x00000006
UNBIND_RESP = 0x80000006
ENQUIRE_LINK = 0x00000015
ENQUIRE_LINK_RESP = 0x80000015
SUBMIT_SM = 0x00000004
SUBMIT_SM_RESP = 0x80000004
DELIVER_SM = 0x00000005
DELIVER_SM_RESP = 0x80000005
RESPONSE_BIT = 0x80000000

ESME_ROK = 0x00
ESME_RINVMSGLEN = 0x01
ESME_RINVCMDLEN = 0x02
ESME_RINVCMDID = 0x03
ESME_RINVBNDSTS = 0x04
ESME_RALYBND = 0x05
ESME_RSYSERR = 0x08
ESME_RINVSRCADR = 0x0A
ESME_RINVDSTADR = 0x0B
ESME_RINVMSGID = 0x0C
ESME_RBINDFAIL = 0x0D
ESME_RINVPASWD = 0x0E
ESME_RINVSYSID = 0x0F
ESME_RMSGQFUL = 0x14
ESME_RTHROTTLED = 0x58
ESME_RX_T_APPN = 0x64  # "ESME receiver temporary app error": the SMSC redelivers later

BIND_REFUSALS = frozenset({ESME_RBINDFAIL, ESME_RINVPASWD, ESME_RINVSYSID})
# The SMSC is busy, not refusing the message: pause, then the same part again.
SLOW_DOWN = frozenset({ESME_RTHROTTLED, ESME_RMSGQFUL})

STATUS_NAMES = {
    ESME_ROK: "ESME_ROK",
    ESME_RINVMSGLEN: "ESME_RINVMSGLEN",
    ESME_RINVCMDLEN: "ESME_RINVCMDLEN",
    ESME_RINVCMDID: "ESME_RINVCMDID",
    ESME_RINVBNDSTS: "ESME_RINVBNDSTS",
    ESME_RALYBND: "ESME_RALYBND",
    ESME_RSYSERR: "ESME_RSYSERR",
    ESME_RINVSRCADR: "ESME_RINVSRCADR",
    ESME_RINVDSTADR: "ESME_RINVDSTADR",
    ESME_RINVMSGID: "ESME_RINVMSGID",
    ESME_RBINDFAIL: "ESME_RBINDFAIL",
    ESME_RINVPASWD: "ESME_RINVPASWD",
    ESME_RINVSYSID: "ESME_RINVSYSID",
    ESME_RMSGQFUL: "ESME_RMSGQFUL",
    ESME_RTHROTTLED: "ESME_RTHROTTLED",
    ESME_RX_T_APPN: "ESME_RX_T_APPN",
}


def status_name(status: int) -> str:
    """`ESME_RTHROTTLED (0x58)`, or the hex value for a status we have no name for."""
    name = STATUS_NAMES.get(status)
    return f"{name} (0x{status:02X})" if name else f"status 0x{status:08X}"


# -- TLV tags -------------------------------------------------------------------------

TLV_RECEIPTED_MESSAGE_ID = 0x001E
TLV_MESSAGE_STATE = 0x0427
TLV_NETWORK_ERROR_CODE = 0x0423
TLV_SAR_MSG_REF_NUM = 0x020C
TLV_SAR_TOTAL_SEGMENTS = 0x020E
TLV_SAR_SEGMENT_SEQNUM = 0x020F
TLV_MESSAGE_PAYLOAD = 0x0424
TLV_SC_INTERFACE_VERSION = 0x0210

# message_state (SMPP 3.4, 5.2.28)
MESSAGE_STATES = {
    1: "ENROUTE",
    2: "DELIVRD",
    3: "EXPIRED",
    4: "DELETED",
    5: "UNDELIV",
    6: "ACCEPTD",
    7: "UNKNOWN",
    8: "REJECTD",
}

ESM_CLASS_UDHI = 0x40
ESM_CLASS_RECEIPT = 0x04  # message type bits 2-5: SMSC delivery receipt
ESM_CLASS_TYPE_MASK = 0x3C
INTERFACE_VERSION = 0x34
MAX_PDU_BYTES = 65536  # far above any legal PDU (short_message <= 254, payload <= 64K)
HEADER = struct.Struct(">IIII")


class PduError(ValueError):
    """A frame that is not a PDU we can read, or a PDU we must not write."""

    def __init__(self, message: str, status: int = ESME_RINVCMDLEN) -> None:
        super().__init__(message)
        self.status = status  # what a generic_nack answering it says


# -- the body layouts -----------------------------------------------------------------

# A field: (name, kind, size). kind "c": C-octet string of at most `size` octets
# with its NUL; "i": unsigned integer of `size` octets; "sm": short_message, its
# length in the preceding sm_length field.
_Field = tuple[str, Literal["c", "i", "sm"], int]

_SM_FIELDS: tuple[_Field, ...] = (
    ("service_type", "c", 6),
    ("source_addr_ton", "i", 1),
    ("source_addr_npi", "i", 1),
    ("source_addr", "c", 21),
    ("dest_addr_ton", "i", 1),
    ("dest_addr_npi", "i", 1),
    ("destination_addr", "c", 21),
    ("esm_class", "i", 1),
    ("protocol_id", "i", 1),
    ("priority_flag", "i", 1),
    ("schedule_delivery_time", "c", 17),
    ("validity_period", "c", 17),
    ("registered_delivery", "i", 1),
    ("replace_if_present_flag", "i", 1),
    ("data_coding", "i", 1),
    ("sm_default_msg_id", "i", 1),
    ("short_message", "sm", 254),
)

LAYOUTS: dict[int, tuple[_Field, ...]] = {
    BIND_TRANSCEIVER: (
        ("system_id", "c", 16),
        ("password", "c", 9),
        ("system_type", "c", 13),
        ("interface_version", "i", 1),
        ("addr_ton", "i", 1),
        ("addr_npi", "i", 1),
        ("address_range", "c", 41),
    ),
    BIND_TRANSCEIVER_RESP: (("system_id", "c", 16),),
    UNBIND: (),
    UNBIND_RESP: (),
    ENQUIRE_LINK: (),
    ENQUIRE_LINK_RESP: (),
    GENERIC_NACK: (),
    SUBMIT_SM: _SM_FIELDS,
    SUBMIT_SM_RESP: (("message_id", "c", 65),),
    DELIVER_SM: _SM_FIELDS,
    DELIVER_SM_RESP: (("message_id", "c", 65),),
}
# Which commands may carry optional TLVs after their mandatory fields.
_WITH_TLVS = frozenset({BIND_TRANSCEIVER_RESP, SUBMIT_SM, DELIVER_SM})
COMMAND_NAMES = {
    GENERIC_NACK: "generic_nack",
    BIND_TRANSCEIVER: "bind_transceiver",
    BIND_TRANSCEIVER_RESP: "bind_transceiver_resp",
    UNBIND: "unbind",
    UNBIND_RESP: "unbind_resp",
    ENQUIRE_LINK: "enquire_link",
    ENQUIRE_LINK_RESP: "enquire_link_resp",
    SUBMIT_SM: "submit_sm",
    SUBMIT_SM_RESP: "submit_sm_resp",
    DELIVER_SM: "deliver_sm",
    DELIVER_SM_RESP: "deliver_sm_resp",
}

FieldValue = int | bytes


def _default(kind: str) -> FieldValue:
    return 0 if kind == "i" else b""


@dataclass(frozen=True, slots=True)
class Pdu:
    """One SMPP PDU. `fields` holds the mandatory parameters of its command (ints
    for integers, bytes for strings without their NUL and for short_message);
    missing ones read as 0 / empty. `tlvs` are the optional parameters, in order.
    `raw_body` is the undecoded body of a command we do not know."""

    command_id: int
    sequence: int
    status: int = ESME_ROK
    fields: Mapping[str, FieldValue] = field(default_factory=dict)
    tlvs: tuple[tuple[int, bytes], ...] = ()
    raw_body: bytes = b""

    @property
    def name(self) -> str:
        """The command's name, for logs."""
        return COMMAND_NAMES.get(self.command_id, f"command 0x{self.command_id:08X}")

    @property
    def is_response(self) -> bool:
        return bool(self.command_id & RESPONSE_BIT)

    def num(self, name: str) -> int:
        """An integer field (0 when absent)."""
        value = self.fields.get(name, 0)
        return value if isinstance(value, int) else 0

    def octets(self, name: str) -> bytes:
        """A string or octet field (empty when absent)."""
        value = self.fields.get(name, b"")
        return value if isinstance(value, bytes) else b""

    def text(self, name: str) -> str:
        """A C-octet string field as text (Latin-1: every octet maps to a character)."""
        return self.octets(name).decode("latin-1")

    def tlv(self, tag: int) -> bytes | None:
        """The value of the first TLV with this tag, or None."""
        for t, value in self.tlvs:
            if t == tag:
                return value
        return None


def encode(pdu: Pdu) -> bytes:
    """The PDU's bytes, header included; PduError for values the spec does not allow."""
    layout = LAYOUTS.get(pdu.command_id)
    if layout is None:
        body = pdu.raw_body
    else:
        unknown = set(pdu.fields) - {name for name, _, _ in layout} - {"sm_length"}
        if unknown:
            raise PduError(f"{pdu.name}: no field {', '.join(sorted(unknown))}")
        out = bytearray()
        for name, kind, size in layout:
            value = pdu.fields.get(name, _default(kind))
            if kind == "i":
                if not isinstance(value, int) or not 0 <= value < 256**size:
                    raise PduError(f"{pdu.name}.{name}: {value!r} is not a {size}-octet integer")
                out += value.to_bytes(size, "big")
            elif not isinstance(value, bytes):
                raise PduError(f"{pdu.name}.{name}: {value!r} is not bytes")
            elif kind == "c":
                if len(value) >= size or b"\0" in value:
                    raise PduError(
                        f"{pdu.name}.{name}: {value!r} is not a C-octet string of at most"
                        f" {size - 1} octets"
                    )
                out += value + b"\0"
            else:  # short_message: sm_length first
                if len(value) > size:
                    raise PduError(f"{pdu.name}.{name}: {len(value)} octets, at most {size}")
                out.append(len(value))
                out += value
        if pdu.tlvs and pdu.command_id not in _WITH_TLVS:
            raise PduError(f"{pdu.name} carries no optional parameters")
        for tag, value in pdu.tlvs:
            if not 0 <= tag <= 0xFFFF or len(value) > 0xFFFF:
                raise PduError(f"{pdu.name}: TLV 0x{tag:04X} out of range")
            out += struct.pack(">HH", tag, len(value)) + value
        body = bytes(out)
    if not 0 <= pdu.sequence <= 0x7FFFFFFF:
        raise PduError(f"{pdu.name}: sequence {pdu.sequence} out of range")
    length = HEADER.size + len(body)
    return HEADER.pack(length, pdu.command_id, pdu.status, pdu.sequence) + body


def frame_length(header: bytes) -> int:
    """The command_length of a PDU from its first 4 octets; PduError if impossible."""
    (length,) = struct.unpack(">I", header[:4])
    if not HEADER.size <= length <= MAX_PDU_BYTES:
        raise PduError(f"command_length {length} out of range")
    return int(length)


def decode(frame: bytes) -> Pdu:
    """One whole PDU (header included) -> Pdu; PduError when it cannot be read."""
    if len(frame) < HEADER.size:
        raise PduError(f"{len(frame)} octets: shorter than a PDU header")
    length, command_id, status, sequence = HEADER.unpack_from(frame)
    if length != len(frame):
        raise PduError(f"command_length {length} but {len(frame)} octets")
    body = frame[HEADER.size :]
    layout = LAYOUTS.get(command_id)
    if layout is None:
        return Pdu(command_id, sequence, status, raw_body=body)
    fields: dict[str, FieldValue] = {}
    pos = 0
    name = ""
    for name, kind, size in layout:
        if pos == len(body) and command_id & RESPONSE_BIT:
            # Responses (errors above all) often come without a body: the rest
            # reads as empty, as the spec allows for a failed response.
            break
        if kind == "i":
            if pos + size > len(body):
                raise PduError(f"{COMMAND_NAMES[command_id]}.{name}: body ends early")
            fields[name] = int.from_bytes(body[pos : pos + size], "big")
            pos += size
        elif kind == "c":
            end = body.find(b"\0", pos)
            if end < 0:
                raise PduError(f"{COMMAND_NAMES[command_id]}.{name}: C-octet string without NUL")
            # Longer than the spec's maximum is accepted: some SMSCs send long ids.
            fields[name] = body[pos:end]
            pos = end + 1
        else:
            if pos >= len(body):
                raise PduError(f"{COMMAND_NAMES[command_id]}.sm_length: body ends early")
            sm_length = body[pos]
            pos += 1
            if pos + sm_length > len(body):
                raise PduError(f"{COMMAND_NAMES[command_id]}.short_message: body ends early")
            fields[name] = body[pos : pos + sm_length]
            pos += sm_length
    tlvs: list[tuple[int, bytes]] = []
    while pos < len(body):
        if command_id not in _WITH_TLVS and not command_id & RESPONSE_BIT:
            raise PduError(f"{COMMAND_NAMES[command_id]}: {len(body) - pos} octets too many")
        if pos + 4 > len(body):
            raise PduError(f"{COMMAND_NAMES[command_id]}: truncated TLV header")
        tag, size = struct.unpack_from(">HH", body, pos)
        pos += 4
        if pos + size > len(body):
            raise PduError(f"{COMMAND_NAMES[command_id]}: TLV 0x{tag:04X} ends early")
        tlvs.append((tag, body[pos : pos + size]))
        pos += size
    return Pdu(command_id, sequence, status, fields, tuple(tlvs))


def response(request: Pdu, status: int = ESME_ROK, **fields: FieldValue) -> Pdu:
    """The response PDU to `request` (same sequence)."""
    command = request.command_id | RESPONSE_BIT if request.command_id in LAYOUTS else GENERIC_NACK
    if command == GENERIC_NACK:
        fields = {}
    return Pdu(command, request.sequence, status, fields)


def c_octets(value: str, limit: int, what: str) -> bytes:
    """A configured string as a C-octet string's content (ASCII); PduError if too long."""
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise PduError(f"{what}: {value!r} is not ASCII") from None
    if len(raw) >= limit:
        raise PduError(f"{what}: {value!r} is longer than {limit - 1} characters")
    return raw


# -- splitting (SPEC section 3, section 10) ----------------------------------------------

DATA_CODING_UCS2 = 8
_SINGLE = {"gsm7": 160, "ucs2": 70}
_PER_PART = {"gsm7": 153, "ucs2": 67}
_UDH_LEN = 6  # 05 00 03 ref total seq: concatenation, 8-bit reference


@dataclass(frozen=True, slots=True)
class Part:
    """One submit_sm's worth of a message."""

    short_message: bytes  # the UDH (when esm_class has 0x40) then the payload
    esm_class: int
    data_coding: int
    text: str  # the characters this part carries (logs, tests)


def _units(text: str, encoding: str) -> Iterator[tuple[str, bytes]]:
    """(character, its encoded units) for every character: GSM-7 as one septet per
    octet (an extension character is the escape 0x1B and its septet), UCS-2 as
    UTF-16BE (a character outside the BMP is its surrogate pair, 4 octets)."""
    if encoding == "gsm7":
        for ch in text:
            if ch == "\x1b":
                raise ValueError("ESC is not sendable as GSM-7")
            yield ch, ch.encode("gsm03.38")
    else:
        for ch in text:
            yield ch, ch.encode("utf-16-be", "surrogatepass")


def split_parts(
    text: str, encoding: str, *, reference: int = 0, data_coding_gsm7: int = 0
) -> list[Part]:
    """The parts of a message: one short_message when it fits one SMS, else parts of
    153 septets / 67 UTF-16 units after an 8-bit concatenation UDH (`reference`
    0-255 ties them together). Whole characters only: a part never ends on an
    escape or inside a surrogate pair, so the count is mailbridge.gsm's.

    ValueError for text that is not GSM-7 when `encoding` is gsm7.
    """
    unit_size = 1 if encoding == "gsm7" else 2
    coding = data_coding_gsm7 if encoding == "gsm7" else DATA_CODING_UCS2
    chars = list(_units(text, encoding))
    total = sum(len(b) for _, b in chars) // unit_size
    if total <= _SINGLE[encoding]:
        payload = b"".join(b for _, b in chars)
        return [Part(payload, 0, coding, text)]
    cap = _PER_PART[encoding]
    groups: list[list[tuple[str, bytes]]] = [[]]
    fill = 0
    for ch, raw in chars:
        cost = len(raw) // unit_size
        if fill + cost > cap:
            groups.append([])
            fill = 0
        groups[-1].append((ch, raw))
        fill += cost
    if len(groups) > 255:
        raise ValueError(f"{len(groups)} parts: a concatenated SMS has at most 255")
    ref = reference & 0xFF
    return [
        Part(
            bytes((5, 0, 3, ref, len(groups), i)) + b"".join(b for _, b in group),
            ESM_CLASS_UDHI,
            coding,
            "".join(ch for ch, _ in group),
        )
        for i, group in enumerate(groups, 1)
    ]


def part_text(short_message: bytes, esm_class: int, data_coding: int) -> str:
    """A short_message back to text (UDH skipped): MO replies and tests."""
    payload = short_message
    if esm_class & ESM_CLASS_UDHI and payload:
        payload = payload[1 + payload[0] :]
    if data_coding == DATA_CODING_UCS2:
        return payload.decode("utf-16-be", "replace")
    if data_coding in (3, 1):  # Latin-1 / IA5: bytes as characters (ASCII is a subset)
        return payload.decode("latin-1")
    try:
        return payload.decode("gsm03.38")
    except UnicodeDecodeError:
        return payload.decode("latin-1")


def udh_concat(short_message: bytes) -> tuple[int, int, int] | None:
    """(reference, total, sequence) of a concatenation UDH (8- or 16-bit reference)."""
    if not short_message:
        return None
    udh_len = short_message[0]
    udh = short_message[1 : 1 + udh_len]
    pos = 0
    while pos + 2 <= len(udh):
        iei, size = udh[pos], udh[pos + 1]
        value = udh[pos + 2 : pos + 2 + size]
        if iei == 0 and size == 3 and len(value) == 3:
            return value[0], value[1], value[2]
        if iei == 8 and size == 4 and len(value) == 4:
            return (value[0] << 8) | value[1], value[2], value[3]
        pos += 2 + size
    return None


# -- SMPP times (validity_period) -----------------------------------------------------


def absolute_time(at: float) -> str:
    """POSIX time -> SMPP absolute time `YYMMDDhhmmsst00+` in UTC (t: tenths)."""
    moment = datetime.fromtimestamp(at, UTC)
    return moment.strftime("%y%m%d%H%M%S") + f"{moment.microsecond // 100000}00+"


def relative_time(seconds: float) -> str:
    """A duration -> SMPP relative time `YYMMDDhhmmss000R` (years of 365 days, months
    of 30: what SMSCs assume; capped at 99 years)."""
    left = max(0, int(seconds))
    years, left = divmod(left, 365 * 86400)
    months, left = divmod(left, 30 * 86400)
    days, left = divmod(left, 86400)
    hours, left = divmod(left, 3600)
    minutes, secs = divmod(left, 60)
    years = min(years, 99)
    return f"{years:02d}{months:02d}{days:02d}{hours:02d}{minutes:02d}{secs:02d}000R"


def parse_smpp_time(value: str, now: float) -> float | None:
    """An SMPP time (absolute with its quarter-hour offset, or relative `R`) -> POSIX
    time; None when it is empty or unreadable."""
    m = re.fullmatch(r"(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d)(\d{2})([+\-R])", value)
    if not m:
        return None
    yy, mo, dd, hh, mi, ss, tenths, nn, sign = m.groups()
    if sign == "R":
        return now + (
            int(yy) * 365 * 86400 + int(mo) * 30 * 86400 + int(dd) * 86400
            + int(hh) * 3600 + int(mi) * 60 + int(ss)
        )  # fmt: skip
    try:
        moment = datetime(2000 + int(yy), int(mo), int(dd), int(hh), int(mi), int(ss), tzinfo=UTC)
    except ValueError:
        return None
    offset = int(nn) * 15 * 60
    return moment.timestamp() + int(tenths) / 10 - (offset if sign == "+" else -offset)


# -- delivery receipts ------------------------------------------------------------------

# SMPP 3.4 Appendix B; SMSCs vary the case, the spacing, the date length
# (10 or 12 digits), and write err in hex.
_RECEIPT_RE = re.compile(
    r"id:\s*(?P<id>\S+)"
    r"(?:.*?\bsub:\s*(?P<sub>\S*))?"
    r"(?:.*?\bdlvrd:\s*(?P<dlvrd>\S*))?"
    r"(?:.*?\bsubmit\s+date:\s*(?P<submit>\d{10,12}))?"
    r"(?:.*?\bdone\s+date:\s*(?P<done>\d{10,12}))?"
    r".*?\bstat:\s*(?P<stat>[A-Za-z_]+)"
    r"(?:.*?\berr:\s*(?P<err>[0-9A-Fa-f]+))?"
    r"(?:.*?\btext:(?P<text>.*))?",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a receipt's text says."""

    message_id: str
    stat: str  # upper case: DELIVRD, EXPIRED, DELETED, UNDELIV, ACCEPTD, UNKNOWN, REJECTD, ENROUTE
    err: str | None  # as written (hex or decimal: SMSCs differ)
    submit_date: float | None
    done_date: float | None
    text: str


def receipt_date(digits: str | None) -> float | None:
    """`YYMMDDhhmm` or `YYMMDDhhmmss` (UTC: the receipt gives no zone) -> POSIX time."""
    if not digits or len(digits) not in (10, 12):
        return None
    try:
        moment = datetime.strptime(digits, "%y%m%d%H%M%S" if len(digits) == 12 else "%y%m%d%H%M")
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC).timestamp()


def parse_receipt(text: str) -> Receipt | None:
    """The receipt text (`id:... sub:... dlvrd:... submit date:... done date:...
    stat:DELIVRD err:... text:...`) -> Receipt; None when it has no id and stat."""
    m = _RECEIPT_RE.search(text)
    if m is None:
        return None
    return Receipt(
        message_id=m["id"],
        stat=m["stat"].upper(),
        err=m["err"],
        submit_date=receipt_date(m["submit"]),
        done_date=receipt_date(m["done"]),
        text=(m["text"] or "").strip(),
    )


# SMPP receipt states -> the etatDlr statuses (model.FINAL_STATUSES, IN_PROGRESS).
RECEIPT_STATUSES = {
    "DELIVRD": "DELIVRE",
    "DELIVERED": "DELIVRE",
    "EXPIRED": "EXPIRE",
    "DELETED": "NON_DELIVRE",
    "UNDELIV": "NON_DELIVRE",
    "UNDELIVERABLE": "NON_DELIVRE",
    "REJECTD": "REJETE",
    "REJECTED": "REJETE",
}


def receipt_status(stat: str) -> str:
    """A receipt's stat -> DELIVRE, EXPIRE, NON_DELIVRE, REJETE, or EN_COURS
    (ENROUTE, ACCEPTD, UNKNOWN and anything else: not final)."""
    return RECEIPT_STATUSES.get(stat.upper(), "EN_COURS")


# -- message_id_format ------------------------------------------------------------------

IdFormat = Literal["same", "hex_to_dec", "dec_to_hex"]


def submitted_id(raw: str, fmt: IdFormat) -> str:
    """A submit_sm_resp message_id in the form receipts write it (what is stored):
    `hex_to_dec`: the SMSC answers hex and its receipts say decimal (Kannel's
    msg-id-type), so store decimal; `dec_to_hex`: the reverse, lower-case hex.
    An id that does not read in the expected base is kept as it is."""
    raw = raw.strip()
    try:
        if fmt == "hex_to_dec":
            return str(int(raw, 16))
        if fmt == "dec_to_hex":
            return format(int(raw, 10), "x")
    except ValueError:
        pass
    return raw


def receipted_id(raw: str, fmt: IdFormat) -> str:
    """An id as a receipt writes it, in the same canonical form `submitted_id`
    gives (leading zeros and hex case do not matter)."""
    raw = raw.strip()
    try:
        if fmt == "hex_to_dec":
            return str(int(raw, 10))
        if fmt == "dec_to_hex":
            return format(int(raw, 16), "x")
    except ValueError:
        pass
    return raw


def join_ids(ids: Sequence[str]) -> str:
    """The message ids of a message's parts as one stored value (space-separated:
    SMPP message ids are C-octet strings that SMSCs never fill with spaces)."""
    return " ".join(ids)


def split_ids(value: str) -> list[str]:
    """The reverse of join_ids."""
    return value.split()
