"""sMsmode adapter against the fake sMsmode API over real loopback HTTP."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from mailbridge.config import SmsmodeProviderConfig
from mailbridge.providers import (
    Encoding,
    ProviderAuthError,
    SmsMessage,
    TemporaryProviderError,
)
from mailbridge.providers.smsmode import SmsmodeProvider, build
from tests.fake_smsmode import FakeSmsmode
from tests.httpfake import ProviderServer, RecordedRequest

TOKEN = "Ab1CD2efg3Hi"
FORM_LATIN = "application/x-www-form-urlencoded; charset=ISO-8859-15"
FORM_UTF8 = "application/x-www-form-urlencoded; charset=UTF-8"


def sms(
    key: str,
    to: str,
    text: str = "Bonjour",
    *,
    sender: str | None = "SHOP",
    reference: str | None = "trk1",
    encoding: Encoding = "gsm7",
    max_parts: int = 1,
    in_doubt: bool = False,
) -> SmsMessage:
    return SmsMessage(
        key=key,
        to=to,
        sender=sender,
        text=text,
        encoding=encoding,
        parts=1,
        max_parts=max_parts,
        reference=reference,
        request_id=1,
        in_doubt=in_doubt,
    )


def numbers(n: int, start: int = 0) -> list[str]:
    return [f"+336{10000000 + i:08d}" for i in range(start, start + n)]


@pytest.fixture
def fake() -> FakeSmsmode:
    return FakeSmsmode(access_token=TOKEN)


@pytest.fixture
def server(fake: FakeSmsmode) -> Iterator[ProviderServer]:
    with ProviderServer(fake) as srv:
        yield srv
        if fake.hold is not None:
            fake.hold.set()  # never leave a server thread waiting


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def make(url: str, http: httpx.AsyncClient, **kw: Any) -> SmsmodeProvider:
    kw.setdefault("access_token", TOKEN)
    kw.setdefault("timeout_s", 30.0)
    return build("smsmode", SmsmodeProviderConfig(type="smsmode", url=url, **kw), http)


@pytest.fixture
def provider(server: ProviderServer, http: httpx.AsyncClient) -> SmsmodeProvider:
    return make(server.url + "/http/1.6/", http)


def form(req: RecordedRequest) -> list[tuple[str, str]]:
    """The raw (still percent-encoded) fields of a form body, in order."""
    pairs = (p.partition("=") for p in req.body.decode("ascii").split("&"))
    return [(k, v) for k, _, v in pairs]


def upload(req: RecordedRequest) -> tuple[str, bytes]:
    """The multipart boundary of a request and its raw body."""
    boundary = re.search(r"boundary=(\S+)", req.headers["content-type"])
    assert boundary is not None
    return boundary.group(1), req.body


def expected_upload(boundary: str, csv_bytes: bytes) -> bytes:
    return (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="fichier"; filename="mailbridge.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        + csv_bytes
        + f"\r\n--{boundary}--\r\n".encode()
    )


# --- one text to many numbers: sendSMS.do -------------------------------------------------


async def test_same_text_is_one_exact_sendsms_request(
    provider: SmsmodeProvider, server: ProviderServer, fake: FakeSmsmode
) -> None:
    batch = [sms("a", "+33612345678", "Café 10€ à 8h"), sms("b", "+447700900123", "Café 10€ à 8h")]
    out = await provider.send(batch)

    assert len(server.requests) == 1
    req = server.requests[0]
    assert (req.method, req.path, req.query) == ("POST", "/http/1.6/sendSMS.do", {})
    assert req.headers["content-type"] == FORM_LATIN
    assert req.body == (
        b"accessToken=Ab1CD2efg3Hi&message=Caf%E9+10%A4+%E0+8h"
        b"&numero=33612345678%2C447700900123&emetteur=SHOP&refClient=trk1&nbr_msg=1"
    )
    assert [(o.key, o.code, o.retry) for o in out] == [("a", 0, False), ("b", 0, False)]
    # One smsID per request, kept for every recipient (reports match smsID + number).
    assert out[0].provider_message_id == out[1].provider_message_id == fake.sms[0].sms_id
    assert fake.accepted == {"+33612345678": 1, "+447700900123": 1}
    assert fake.sms[0].text == "Café 10€ à 8h"


async def test_optional_fields_omitted_and_nbr_msg_from_max_parts(
    provider: SmsmodeProvider, server: ProviderServer, fake: FakeSmsmode
) -> None:
    text = "x" * 300
    out = await provider.send(
        [sms("a", "+33612345678", text, sender=None, reference=None, max_parts=3)]
    )
    assert out[0].code == 0
    fields = dict(form(server.requests[0]))
    assert list(fields) == ["accessToken", "message", "numero", "nbr_msg"]
    assert fields["nbr_msg"] == "3"
    assert "stop" not in fields and "classe_msg" not in fields
    assert fake.sms[0].sender is None and fake.sms[0].ref_client is None


async def test_ucs2_text_goes_as_utf8_with_classe_msg_9(
    provider: SmsmodeProvider, server: ProviderServer, fake: FakeSmsmode
) -> None:
    batch = [
        sms(k, n, "Привет ☺", encoding="ucs2", max_parts=2)
        for k, n in (("a", "+33612345678"), ("b", "+33612345679"))
    ]
    out = await provider.send(batch)
    req = server.requests[0]
    assert req.headers["content-type"] == FORM_UTF8
    assert req.body == (
        b"accessToken=Ab1CD2efg3Hi&message=%D0%9F%D1%80%D0%B8%D0%B2%D0%B5%D1%82+%E2%98%BA"
        b"&numero=33612345678%2C33612345679&emetteur=SHOP&refClient=trk1&nbr_msg=2&classe_msg=9"
    )
    assert [o.code for o in out] == [0, 0]
    assert fake.sms[0].text == "Привет ☺" and fake.sms[0].unicode


async def test_gsm7_characters_missing_from_iso_8859_15_become_question_marks(
    provider: SmsmodeProvider, server: ProviderServer, fake: FakeSmsmode
) -> None:
    await provider.send([sms("a", "+33612345678", "ΔΩ ¤ {ok}")])
    assert dict(form(server.requests[0]))["message"] == "%3F%3F+%3F+%7Bok%7D"
    assert fake.sms[0].text == "?? ? {ok}"


async def test_500_numbers_one_text_take_one_request(
    provider: SmsmodeProvider, server: ProviderServer, fake: FakeSmsmode
) -> None:
    batch = [sms(f"k{i}", n) for i, n in enumerate(numbers(500))]
    out = await provider.send(batch)
    assert len(server.requests) == 1
    assert len(dict(form(server.requests[0]))["numero"].split("%2C")) == 500
    assert all(o.code == 0 for o in out) and len({o.provider_message_id for o in out}) == 1
    assert sum(fake.accepted.values()) == 500 and provider.max_batch == 500


async def test_501_numbers_one_text_take_two_requests(
    provider: SmsmodeProvider, server: ProviderServer, fake: FakeSmsmode
) -> None:
    batch = [sms(f"k{i}", n) for i, n in enumerate(numbers(501))]
    out = await provider.send(batch)
    sizes = [len(dict(form(r))["numero"].split("%2C")) for r in server.requests]
    assert sizes == [500, 1]
    assert len({o.provider_message_id for o in out}) == 2
    assert all(fake.accepted[n] == 1 for n in numbers(501))


async def test_a_number_is_never_twice_in_one_request(
    provider: SmsmodeProvider, server: ProviderServer, fake: FakeSmsmode
) -> None:
    out = await provider.send(
        [sms("a", "+33612345678"), sms("b", "+33612345678"), sms("c", "+33612345679")]
    )
    assert [dict(form(r))["numero"] for r in server.requests] == [
        "33612345678%2C33612345679",
        "33612345678",
    ]
    assert [o.code for o in out] == [0, 0, 0]
    assert fake.accepted["+33612345678"] == 2


# --- personal texts: one sendSMSBatch.do upload --------------------------------------------


async def test_personal_texts_are_one_exact_csv_upload(
    provider: SmsmodeProvider, server: ProviderServer, fake: FakeSmsmode
) -> None:
    batch = [
        sms("a", "+33612345678", 'Bonjour Zoé, "RDV" à 8h, 5€', max_parts=2),
        sms("b", "+33612345679", "Ligne 1\nLigne 2", sender=None, reference=None),
        sms("c", "+33612345680", "Salut", sender="AUTRE", reference="trk2"),
    ]
    out = await provider.send(batch)

    assert len(server.requests) == 1
    req = server.requests[0]
    assert (req.method, req.path) == ("POST", "/http/1.6/sendSMSBatch.do")
    assert req.query == {"accessToken": [TOKEN], "nbr_msg": ["2"]}
    boundary, body = upload(req)
    assert req.headers["content-type"] == f"multipart/form-data; boundary={boundary}"
    csv_bytes = (
        '"numero","message","emetteur","refClient"\r\n'
        '"33612345678","Bonjour Zoé, ""RDV"" à 8h, 5€","SHOP","trk1"\r\n'
        '"33612345679","Ligne 1\nLigne 2","",""\r\n'
        '"33612345680","Salut","AUTRE","trk2"\r\n'
    ).encode("iso-8859-15")
    assert body == expected_upload(boundary, csv_bytes)

    assert [o.code for o in out] == [0, 0, 0]
    assert len({o.provider_message_id for o in out}) == 1  # the campaign id, for all
    assert [(s.to, s.text, s.sender, s.ref_client) for s in fake.sms] == [
        ("+33612345678", 'Bonjour Zoé, "RDV" à 8h, 5€', "SHOP", "trk1"),
        ("+33612345679", "Ligne 1\nLigne 2", None, None),
        ("+33612345680", "Salut", "AUTRE", "trk2"),
    ]


async def test_500_personal_texts_take_one_request_501_take_two(
    http: httpx.AsyncClient, server: ProviderServer, fake: FakeSmsmode
) -> None:
    provider = make(server.url + "/http/1.6/", http)
    await provider.send([sms(f"k{i}", n, f"Code {i}") for i, n in enumerate(numbers(500))])
    assert len(server.requests) == 1 and sum(fake.accepted.values()) == 500
    server.requests.clear()
    await provider.send([sms(f"j{i}", n, f"Code {i}") for i, n in enumerate(numbers(501, 600))])
    assert [r.path for r in server.requests] == ["/http/1.6/sendSMSBatch.do"] * 2
    assert sum(fake.accepted.values()) == 1001


async def test_mixed_batch_uses_the_fewest_requests(
    provider: SmsmodeProvider, server: ProviderServer, fake: FakeSmsmode
) -> None:
    n = numbers(8)
    batch = [
        sms("g1", n[0], "Promo"),
        sms("g2", n[1], "Promo"),  # one GSM-7 text ...
        sms("g3", n[2], "Rappel"),  # ... and another: both in one upload
        sms("u1", n[3], "☺ bonjour", encoding="ucs2"),  # one UCS-2 text to two numbers
        sms("u2", n[4], "☺ bonjour", encoding="ucs2"),
        sms("p1", n[5], "☺ Zoé", encoding="ucs2"),  # personal UCS-2 texts: one each
        sms("p2", n[6], "☺ Léa", encoding="ucs2"),
    ]
    out = await provider.send(batch)
    assert [r.path.rsplit("/", 1)[1] for r in server.requests] == [
        "sendSMSBatch.do",
        "sendSMS.do",
        "sendSMS.do",
        "sendSMS.do",
    ]
    assert [dict(form(r))["numero"] for r in server.requests[1:]] == [
        f"{n[3][1:]}%2C{n[4][1:]}",
        n[5][1:],
        n[6][1:],
    ]
    assert all(o.code == 0 for o in out)
    ids = {o.key: o.provider_message_id for o in out}
    assert ids["g1"] == ids["g3"] and ids["u1"] == ids["u2"] != ids["p1"] != ids["p2"]
    assert sum(fake.accepted.values()) == 7


async def test_single_gsm7_group_with_ucs2_uses_sendsms_twice(
    provider: SmsmodeProvider, server: ProviderServer
) -> None:
    await provider.send([sms("a", "+33612345678"), sms("b", "+33612345679", "☺", encoding="ucs2")])
    assert [r.path for r in server.requests] == ["/http/1.6/sendSMS.do"] * 2


# --- rejections ---------------------------------------------------------------------------


async def test_request_rejected_for_credit_gives_code_12(
    provider: SmsmodeProvider, fake: FakeSmsmode
) -> None:
    fake.reject["+33612345678"] = 33
    out = await provider.send([sms("a", "+33612345678"), sms("b", "+33612345679")])
    assert [(o.code, o.retry, o.detail) for o in out] == [
        (12, False, "33 | Crédits insuffisants")
    ] * 2
    assert out[0].provider_message_id is None and not fake.accepted


async def test_bad_parameters_give_999(provider: SmsmodeProvider, fake: FakeSmsmode) -> None:
    fake.reject["+33612345678"] = 35
    out = await provider.send([sms("a", "+33612345678")])
    assert (out[0].code, out[0].retry) == (999, False)
    assert out[0].detail == "35 | Paramètre obligatoire manquant"


async def test_partially_rejected_batch(
    provider: SmsmodeProvider, server: ProviderServer, fake: FakeSmsmode
) -> None:
    fake.reject["+33612345679"] = 35
    out = await provider.send(
        [
            sms("a", "+33612345678", "Texte A"),
            sms("c", "+33612345680", "Texte C"),
            sms("b", "+33612345679", "☺", encoding="ucs2"),
        ]
    )
    assert [(o.key, o.code) for o in out] == [("a", 0), ("c", 0), ("b", 999)]
    assert out[0].provider_message_id is not None and out[2].provider_message_id is None
    assert fake.accepted == {"+33612345678": 1, "+33612345680": 1}


async def test_non_e164_number_is_code_7_and_not_sent(
    provider: SmsmodeProvider, server: ProviderServer
) -> None:
    out = await provider.send([sms("a", "+33 6 12"), sms("b", "+33612345679")])
    assert (out[0].code, out[1].code) == (7, 0)
    assert dict(form(server.requests[0]))["numero"] == "33612345679"


# --- transient failures -------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(503, 999), (500, 999), (429, 29)])
async def test_http_failure_gives_retry_outcomes_and_stops_the_batch(
    provider: SmsmodeProvider, server: ProviderServer, fake: FakeSmsmode, status: int, code: int
) -> None:
    fake.fail_next(1, status=status)
    out = await provider.send(
        [sms("a", "+33612345678"), sms("b", "+33612345679", "☺", encoding="ucs2")]
    )
    assert [(o.code, o.retry) for o in out] == [(code, True)] * 2
    assert f"HTTP {status}" in out[0].detail and "not sent" in out[1].detail
    assert len(server.requests) == 1 and not fake.accepted  # the 2nd request never went out


@pytest.mark.parametrize("answer", [31, 50])
async def test_transient_answer_codes_give_retry(
    provider: SmsmodeProvider, fake: FakeSmsmode, answer: int
) -> None:
    fake.fail_next(1, code=answer)
    out = await provider.send([sms("a", "+33612345678")])
    assert (out[0].code, out[0].retry) == (999, True)
    assert out[0].detail.startswith(f"{answer} | ")


async def test_unreadable_answer_gives_retry(
    http: httpx.AsyncClient, server: ProviderServer, fake: FakeSmsmode
) -> None:
    fake.fail_next(1, status=200)  # body "HTTP 200": no answer code
    out = await make(server.url + "/http/1.6/", http).send([sms("a", "+33612345678")])
    assert (out[0].code, out[0].retry) == (999, True) and "unreadable" in out[0].detail


async def test_timeout_gives_retry_outcomes(
    http: httpx.AsyncClient, server: ProviderServer, fake: FakeSmsmode
) -> None:
    fake.hold = threading.Event()
    provider = make(server.url + "/http/1.6/", http, timeout_s=0.3)
    out = await provider.send([sms("a", "+33612345678"), sms("b", "+33612345679")])
    fake.hold.set()
    assert [(o.code, o.retry) for o in out] == [(999, True)] * 2
    assert "timeout" in out[0].detail and not fake.accepted


async def test_lost_answer_after_accept_then_in_doubt_resend_duplicates(
    http: httpx.AsyncClient, server: ProviderServer, fake: FakeSmsmode
) -> None:
    fake.hold, fake.hold_after_accept = threading.Event(), True
    provider = make(server.url + "/http/1.6/", http, timeout_s=0.3)
    out = await provider.send([sms("a", "+33612345678")])
    assert (out[0].code, out[0].retry) == (999, True)
    fake.hold.set()
    assert fake.wait_accepted(1)  # the platform did take it: only the answer was lost
    fake.hold = None
    # No idempotency field in sMsmode: the in-doubt resend is an ordinary request.
    again = await make(server.url + "/http/1.6/", http).send(
        [sms("a", "+33612345678", in_doubt=True)]
    )
    assert again[0].code == 0
    assert server.requests[0].body == server.requests[1].body
    assert fake.accepted["+33612345678"] == 2


async def test_connect_error_gives_retry_outcomes(http: httpx.AsyncClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = make(f"http://127.0.0.1:{port}/http/1.6/", http)
    out = await provider.send([sms("a", "+33612345678")])
    assert (out[0].code, out[0].retry) == (999, True) and "ConnectError" in out[0].detail


# --- authentication -----------------------------------------------------------------------


async def test_refused_token_raises_auth_error(
    http: httpx.AsyncClient, server: ProviderServer, fake: FakeSmsmode
) -> None:
    provider = make(server.url + "/http/1.6/", http, access_token="wrong")
    with pytest.raises(ProviderAuthError, match="32 \\| Erreur d'authentification"):
        await provider.send([sms("a", "+33612345678")])
    assert dict(form(server.requests[0]))["accessToken"] == "wrong"


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_http_auth_or_url_errors_raise(
    provider: SmsmodeProvider, fake: FakeSmsmode, status: int
) -> None:
    fake.fail_next(1, status=status)
    with pytest.raises(ProviderAuthError):
        await provider.send([sms("a", "+33612345678")])


async def test_auth_refused_after_an_accepted_request_returns_outcomes(
    provider: SmsmodeProvider, fake: FakeSmsmode
) -> None:
    fake.reject["+33612345679"] = 32  # the second request (UCS-2) is refused
    out = await provider.send(
        [
            sms("a", "+33612345678"),
            sms("b", "+33612345679", "☺", encoding="ucs2"),
            sms("c", "+33612345680", "☻", encoding="ucs2"),
        ]
    )
    assert [(o.code, o.retry) for o in out] == [(0, False), (999, True), (999, True)]
    assert out[1].detail.startswith("authentication rejected")
    assert fake.accepted == {"+33612345678": 1}


# --- check, factory -----------------------------------------------------------------------


async def test_check_reads_the_balance(provider: SmsmodeProvider, server: ProviderServer) -> None:
    assert await provider.check() == "credentials accepted (balance 212.5)"
    req = server.requests[0]
    assert (req.method, req.path, req.query) == (
        "GET",
        "/http/1.6/credit.do",
        {"accessToken": [TOKEN]},
    )


async def test_check_negative_postpaid_balance(
    provider: SmsmodeProvider, fake: FakeSmsmode
) -> None:
    fake.balance = "-12.0"
    assert await provider.check() == "credentials accepted (balance -12.0)"


async def test_check_refused_token(http: httpx.AsyncClient, server: ProviderServer) -> None:
    with pytest.raises(ProviderAuthError):
        await make(server.url + "/http/1.6/", http, access_token="nope").check()


async def test_check_unavailable(provider: SmsmodeProvider, fake: FakeSmsmode) -> None:
    fake.fail_next(1, status=503)
    with pytest.raises(TemporaryProviderError):
        await provider.check()


async def test_check_unreachable(http: httpx.AsyncClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TemporaryProviderError):
        await make(f"http://127.0.0.1:{port}/http/1.6/", http).check()


async def test_url_without_trailing_slash_and_aclose(
    http: httpx.AsyncClient, server: ProviderServer
) -> None:
    provider = make(server.url + "/http/1.6", http)
    assert provider.name == "smsmode" and isinstance(provider, SmsmodeProvider)
    assert (await provider.send([sms("a", "+33612345678")]))[0].code == 0
    assert server.requests[0].path == "/http/1.6/sendSMS.do"
    await provider.aclose()
    assert not http.is_closed
