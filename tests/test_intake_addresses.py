"""Address fast paths give exactly what the full parsers give: MAIL FROM / RCPT
TO arguments (IntakeSMTP, against aiosmtpd's RFC 5322 parser), and bare
addresses in From: and <emailAck>/<emailNot> (mime, against email.utils)."""

from __future__ import annotations

import asyncio
import email.utils

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.intake import IntakeSMTP
from mailbridge.limits import ConnectionGate
from mailbridge.mime import parse_address, read_mail

ATEXT = "abcXYZ0189!#$%&'*+/=?^_`{|}~-"
atom = st.text(ATEXT, min_size=1, max_size=6)
dot_atom = st.lists(atom, min_size=1, max_size=3).map(".".join)
label = st.text("abz09-", min_size=1, max_size=6)
domain = st.lists(label, min_size=1, max_size=3).map(".".join)
# Mostly well-formed addresses, with hostile bits mixed in.
noise = st.text(' \t<>@.()"[]\\,;:é', max_size=3)
rest = st.sampled_from(["", " ", " SIZE=123", " BODY=8BITMIME SMTPUTF8", " (c) X=1", "x", "\t"])


def server() -> SMTP:
    loop = asyncio.new_event_loop()
    try:
        return IntakeSMTP(None, ConnectionGate(1, 1), loop=loop)  # type: ignore[arg-type]
    finally:
        loop.close()


FAST = server()
REFERENCE = SMTP(None, loop=FAST.loop)


def reference(arg: str) -> tuple[str | None, str | None]:
    """aiosmtpd's parse, where its crash on hostile input (the stdlib's header
    parser raises AttributeError on `<.@[0@0>`) counts as no address (501)."""
    try:
        return REFERENCE._getaddr(arg)
    except Exception:
        return None, None


@settings(max_examples=1000, deadline=None)
@given(
    local=dot_atom,
    dom=domain,
    before=noise,
    middle=noise,
    after=rest,
    lead=st.sampled_from(["", " "]),
)
def test_fast_address_parsing_matches_aiosmtpd(
    local: str, dom: str, before: str, middle: str, after: str, lead: str
) -> None:
    for arg in (
        f"{lead}<{local}@{dom}>{after}",
        f"{lead}<{before}{local}@{dom}{middle}>{after}",
        f"{local}@{dom}{after}",
    ):
        assert FAST._getaddr(arg) == reference(arg), arg


def test_hostile_address_is_a_syntax_error_not_a_crash() -> None:
    assert FAST._getaddr("<.@[0@0>") == (None, None)


def test_local_part_limit_still_applies() -> None:
    FAST.local_part_limit = 4
    try:
        assert FAST._getaddr("<abcde@x.test>") == (None, None)
        assert FAST._getaddr("<abcd@x.test> SIZE=1") == ("abcd@x.test", "SIZE=1")
    finally:
        FAST.local_part_limit = 0


# -- header and <emailAck> addresses: mime.parse_address and From: ------------------


@settings(max_examples=1000, deadline=None)
@given(
    local=dot_atom, dom=domain, before=noise, after=noise, space=st.sampled_from(["", " ", "\t"])
)
def test_bare_address_fast_path_matches_the_stdlib(
    local: str, dom: str, before: str, after: str, space: str
) -> None:
    for value in (
        f"{local}@{dom}",
        f"{space}{local}@{dom}{space}",
        f"{before}{local}@{dom}{after}",
        f"Name <{local}@{dom}>",
    ):
        assert parse_address(value) == email.utils.parseaddr(value.strip())[1], value
        header = f"From: {value}\r\n\r\n".encode()
        expected = tuple(
            a.strip().lower() for _, a in email.utils.getaddresses([value]) if "@" in a
        )
        assert read_mail(header).from_addresses == tuple(dict.fromkeys(expected)), value
