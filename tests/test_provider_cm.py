"""CmProvider against a fake CM JSON gateway over real loopback HTTP."""

from __future__ import annotations

import gc
import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.codes import ProviderFailure, cm_failure
from mailbridge.config import CmProviderConfig
from mailbridge.providers import (
    Encoding,
    Outcome,
    ProviderAuthError,
    SmsMessage,
    TemporaryProviderError,
)
from mailbridge.providers.cm import CmProvider, _Msg, _msg_json, build, cm_number, cm_reference
from tests.fake_cm import FakeCm
from tests.httpfake import ProviderServer, RecordedRequest, Reply

TOKEN = FakeCm.TOKEN


def num(i: int) -> str:
    return f"+336{i:08d}"


def sms(
    i: int = 1,
    *,
    to: str | None = None,
    text: str = "Bonjour",
    sender: str | None = "MaSociete",
    encoding: Encoding = "gsm7",
    parts: int = 1,
    max_parts: int = 5,
    reference: str | None = "TRK1",
    key: str | None = None,
    in_doubt: bool = False,
) -> SmsMessage:
    return SmsMessage(
        key=key or f"k{i}",
        to=to or num(i),
        sender=sender,
        text=text,
        encoding=encoding,
        parts=parts,
        max_parts=max_parts,
        reference=reference,
        request_id=1,
        in_doubt=in_doubt,
    )


def body(req: RecordedRequest) -> Any:
    return json.loads(req.body.decode("utf-8"))


def by_key(outcomes: list[Outcome]) -> dict[str, Outcome]:
    assert len({o.key for o in outcomes}) == len(outcomes)
    return {o.key: o for o in outcomes}


@pytest.fixture
def fake() -> FakeCm:
    return FakeCm()


@pytest.fixture
def server(fake: FakeCm) -> Iterator[ProviderServer]:
    with ProviderServer(fake) as srv:
        yield srv
        fake.release()  # let a held handler finish before the server stops


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def make(url: str, http: httpx.AsyncClient, token: str = TOKEN, timeout: float = 30) -> CmProvider:
    config = CmProviderConfig(type="cm", url=url, product_token=token, timeout_s=timeout)
    return CmProvider("cm-main", config, http)


@pytest.fixture
def cm(server: ProviderServer, http: httpx.AsyncClient) -> CmProvider:
    return make(server.url + FakeCm.PATH, http)


def serve(handler: Any) -> ProviderServer:
    return ProviderServer(handler)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1.0/message"


# --- the request on the wire ------------------------------------------------------------


async def test_single_message_exact_request(cm: CmProvider, server: ProviderServer) -> None:
    outcomes = await cm.send([sms(1, text="Rendez-vous à 10h, salle B")])

    # provider_message_id: the reference, which status reports name
    assert outcomes == [Outcome("k1", 0, "TRK1", "accepted, 1 part(s)")]
    [req] = server.requests
    assert req.method == "POST"
    assert req.path == "/v1.0/message"
    assert req.query == {}
    assert req.headers["content-type"] == "application/json; charset=utf-8"
    assert req.headers["accept"] == "application/json"
    expected = {
        "messages": {
            "authentication": {"producttoken": TOKEN},
            "msg": [
                {
                    "from": "MaSociete",
                    "to": [{"number": "0033600000001"}],
                    "body": {"content": "Rendez-vous à 10h, salle B"},
                    "dcs": 0,
                    "reference": "TRK1",
                    "minimumNumberOfMessageParts": 1,
                    "maximumNumberOfMessageParts": 5,
                    "allowedChannels": ["SMS"],
                }
            ],
        }
    }
    # Compact UTF-8 JSON, non-ASCII written as is (not \\u escapes).
    assert req.body == json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()
    assert "à".encode() in req.body


async def test_ucs2_text_goes_with_dcs_8(
    cm: CmProvider, server: ProviderServer, fake: FakeCm
) -> None:
    text = "Ça coûte 5 € œuvre"
    [o] = await cm.send([sms(1, text=text, encoding="ucs2", parts=1, max_parts=3)])

    assert o.code == 0
    msg = body(server.requests[0])["messages"]["msg"][0]
    assert msg["dcs"] == 8
    assert msg["body"] == {"content": text}  # no "type": "auto": our encoding is final
    assert msg["maximumNumberOfMessageParts"] == 3
    assert fake.sent[0].dcs == 8 and fake.sent[0].text == text


async def test_part_limit_never_below_the_texts_own_count(
    cm: CmProvider, server: ProviderServer
) -> None:
    await cm.send([sms(1, text="x" * 400, parts=3, max_parts=2)])
    msg = body(server.requests[0])["messages"]["msg"][0]
    assert (msg["minimumNumberOfMessageParts"], msg["maximumNumberOfMessageParts"]) == (1, 3)


async def test_no_sender_omits_from_and_cm_refuses_it(
    cm: CmProvider, server: ProviderServer
) -> None:
    [o] = await cm.send([sms(1, sender=None)])

    assert "from" not in body(server.requests[0])["messages"]["msg"][0]
    assert o.code == 33 and not o.retry
    assert "No FROM field found" in o.detail and "301" in o.detail


async def test_reference_absent_and_sanitised(cm: CmProvider, server: ProviderServer) -> None:
    long = "commande-2024/05 été " + "X" * 40
    outcomes = await cm.send(
        [sms(1, reference=None), sms(2, reference=long), sms(3, reference="  ")]
    )

    assert [o.code for o in outcomes] == [0, 0, 0]
    msgs = body(server.requests[0])["messages"]["msg"]
    assert len(msgs) == 2  # a blank tracker is no reference: it joins the first msg
    assert "reference" not in msgs[0] and len(msgs[0]["to"]) == 2
    assert msgs[1]["reference"] == "commande_2024_05__t__XXXXXXXXXXX"[:32]
    assert len(msgs[1]["reference"]) == 32


def test_number_and_reference_forms() -> None:
    assert cm_number("+33601020304") == "0033601020304"
    assert cm_number("+77011234567") == "0077011234567"
    assert cm_reference("Abc_123") == "Abc_123"
    assert cm_reference("a b-c") == "a_b_c"
    assert cm_reference("") is None and cm_reference(None) is None


# --- batching ---------------------------------------------------------------------------


async def test_500_numbers_one_text_is_one_request_one_msg(
    cm: CmProvider, server: ProviderServer, fake: FakeCm
) -> None:
    batch = [sms(i) for i in range(500)]
    outcomes = await cm.send(batch)

    assert len(server.requests) == 1
    [msg] = body(server.requests[0])["messages"]["msg"]
    assert msg["to"] == [{"number": cm_number(num(i))} for i in range(500)]
    assert sorted(o.key for o in outcomes if o.code == 0) == sorted(m.key for m in batch)
    assert all(fake.accepted_count(num(i)) == 1 for i in range(500))


async def test_500_personal_texts_is_one_request_of_500_msg(
    cm: CmProvider, server: ProviderServer
) -> None:
    outcomes = await cm.send([sms(i, text=f"Bonjour client {i}") for i in range(500)])

    assert len(server.requests) == 1
    msgs = body(server.requests[0])["messages"]["msg"]
    assert len(msgs) == 500 and all(len(m["to"]) == 1 for m in msgs)
    assert [o.code for o in outcomes] == [0] * 500


@pytest.mark.parametrize(("n", "sizes"), [(1000, [1000]), (1001, [1000, 1])])
async def test_msg_limit_per_request(
    cm: CmProvider, server: ProviderServer, n: int, sizes: list[int]
) -> None:
    outcomes = await cm.send([sms(i, text=f"texte {i}") for i in range(n)])

    assert [len(body(r)["messages"]["msg"]) for r in server.requests] == sizes
    assert len(by_key(outcomes)) == n and all(o.code == 0 for o in outcomes)


@pytest.mark.parametrize(("n", "sizes"), [(1000, [1000]), (1001, [1000, 1])])
async def test_to_limit_per_msg(
    cm: CmProvider, server: ProviderServer, n: int, sizes: list[int]
) -> None:
    outcomes = await cm.send([sms(i) for i in range(n)])

    assert len(server.requests) == 1
    assert [len(m["to"]) for m in body(server.requests[0])["messages"]["msg"]] == sizes
    assert len(by_key(outcomes)) == n and all(o.code == 0 for o in outcomes)


async def test_msg_groups_split_on_sender_reference_and_part_limit(
    cm: CmProvider, server: ProviderServer
) -> None:
    batch = [
        sms(1),
        sms(2),
        sms(3, sender="Autre"),
        sms(4, reference="TRK2"),
        sms(5, max_parts=2),
        sms(6, sender=None),
        sms(7),
    ]
    await cm.send(batch)

    msgs = body(server.requests[0])["messages"]["msg"]
    assert [[t["number"][-1] for t in m["to"]] for m in msgs] == [
        ["1", "2", "7"],
        ["3"],
        ["4"],
        ["5"],
        ["6"],
    ]


async def test_same_number_twice_goes_in_two_requests(
    cm: CmProvider, server: ProviderServer, fake: FakeCm
) -> None:
    batch = [sms(1, key="a"), sms(2, key="b"), sms(1, key="c", text="Autre texte")]
    outcomes = by_key(await cm.send(batch))

    assert len(server.requests) == 2
    second = body(server.requests[1])["messages"]["msg"]
    assert second[0]["to"] == [{"number": "0033600000001"}]
    assert second[0]["body"]["content"] == "Autre texte"
    assert {k: o.code for k, o in outcomes.items()} == {"a": 0, "b": 0, "c": 0}
    assert fake.accepted_count(num(1)) == 2


async def test_answer_matched_by_number_not_order(fake: FakeCm, http: httpx.AsyncClient) -> None:
    fake.reject(num(2), 303, "Gsm '0033600000002' is not a number.")

    def reversed_answer(req: RecordedRequest) -> Reply:
        reply = fake(req)
        data = json.loads(reply.body)
        data["messages"].reverse()
        return Reply(reply.status, json.dumps(data))

    with serve(reversed_answer) as srv:
        outcomes = by_key(await make(srv.url + FakeCm.PATH, http).send([sms(1), sms(2), sms(3)]))
    assert {k: o.code for k, o in outcomes.items()} == {"k1": 0, "k2": 7, "k3": 0}


# --- per-recipient results ---------------------------------------------------------------


async def test_partial_rejection_maps_cm_codes(
    cm: CmProvider, server: ProviderServer, fake: FakeCm
) -> None:
    fake.reject(num(1), 303, "Rejected: Gsm '0033600000001' is not a number.")
    fake.reject(num(2), 402, "The message was blacklisted")
    fake.reject(num(3), 401, "The message was filtered as spam")
    fake.reject(num(4), 302, "Invalid TO field")
    outcomes = by_key(await cm.send([sms(i) for i in range(1, 7)]))

    assert {k: o.code for k, o in outcomes.items()} == {
        "k1": 7,
        "k2": 11,
        "k3": 999,
        "k4": 7,
        "k5": 0,
        "k6": 0,
    }
    assert outcomes["k2"].detail == "The message was blacklisted (messageErrorCode 402)"
    assert not any(o.retry for o in outcomes.values())
    assert fake.accepted_count(num(1)) == 0 and fake.accepted_count(num(5)) == 1


async def test_all_rejected_400_still_per_recipient(cm: CmProvider, fake: FakeCm) -> None:
    fake.reject(num(1), 303, "Gsm is not a number.")
    fake.reject(num(2), 402, "blacklisted")
    outcomes = by_key(await cm.send([sms(1), sms(2)]))
    assert {k: o.code for k, o in outcomes.items()} == {"k1": 7, "k2": 11}


async def test_insufficient_balance_gives_12_to_all(cm: CmProvider, fake: FakeCm) -> None:
    fake.balance_exhausted = True
    outcomes = await cm.send([sms(1), sms(2, text="autre")])

    assert [(o.code, o.retry) for o in outcomes] == [(12, False), (12, False)]
    assert "Insufficient balance." in outcomes[0].detail and "102" in outcomes[0].detail


async def test_ok_without_per_number_lines_means_accepted(http: httpx.AsyncClient) -> None:
    def terse(req: RecordedRequest) -> Reply:
        return Reply(200, '{"details":"Created 2 message(s)","errorCode":0,"messages":[]}')

    with serve(terse) as srv:
        outcomes = await make(srv.url, http).send([sms(1), sms(2)])
    assert [o.code for o in outcomes] == [0, 0]


async def test_unreadable_200_is_999_not_retried(http: httpx.AsyncClient) -> None:
    with serve(lambda req: Reply(200, "<html>proxy</html>")) as srv:
        outcomes = await make(srv.url, http).send([sms(1)])
    assert [(o.code, o.retry) for o in outcomes] == [(999, False)]
    assert "<html>proxy</html>" in outcomes[0].detail


async def test_missing_line_after_partial_error_is_999_not_retried(
    http: httpx.AsyncClient,
) -> None:
    line = {"to": "0033600000001", "status": "Accepted", "parts": 1, "messageErrorCode": 0}
    answer = {"details": "Created 1 message(s)", "errorCode": 201, "messages": [line]}
    with serve(lambda req: Reply(200, json.dumps(answer))) as srv:
        outcomes = by_key(await make(srv.url, http).send([sms(1), sms(2)]))
    assert (outcomes["k1"].code, outcomes["k2"].code, outcomes["k2"].retry) == (0, 999, False)


# --- whole-request failures ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "code"), [("99999999-9999-9999-9999-999999999999", 101), ("not-a-token", 103)]
)
async def test_token_refused_raises_auth_error(
    server: ProviderServer, http: httpx.AsyncClient, fake: FakeCm, token: str, code: int
) -> None:
    cm = make(server.url + FakeCm.PATH, http, token=token)
    with pytest.raises(ProviderAuthError, match=f"errorCode {code}"):
        await cm.send([sms(1)])
    assert fake.sent == []


async def test_wrong_url_is_a_configuration_error(
    server: ProviderServer, http: httpx.AsyncClient
) -> None:
    with pytest.raises(ProviderAuthError, match="HTTP 404"):
        await make(server.url + "/v1.0/wrong", http).send([sms(1)])


async def test_auth_refused_after_an_accepted_request_returns_outcomes(
    fake: FakeCm, http: httpx.AsyncClient
) -> None:
    seen: list[int] = []

    def second_refused(req: RecordedRequest) -> Reply:
        seen.append(1)
        if len(seen) == 1:
            return fake(req)
        return Reply(400, '{"details":"No account found","errorCode":101,"messages":[]}')

    with serve(second_refused) as srv:
        outcomes = await make(srv.url + FakeCm.PATH, http).send(
            [sms(i, text=f"t{i}") for i in range(1001)]
        )
    done = [o for o in outcomes if o.code == 0]
    rest = [o for o in outcomes if o.code != 0]
    assert len(done) == 1000 and not any(o.retry for o in done)
    assert [(o.key, o.code, o.retry) for o in rest] == [("k1000", 999, True)]
    assert rest[0].detail.startswith("authentication rejected")


@pytest.mark.parametrize(("status", "code"), [(503, 999), (500, 999), (429, 29)])
async def test_transient_http_status_gives_retry_outcomes(
    cm: CmProvider, fake: FakeCm, status: int, code: int
) -> None:
    fake.fail_next(1, status=status)
    outcomes = await cm.send([sms(1), sms(2)])

    assert [(o.code, o.retry) for o in outcomes] == [(code, True), (code, True)]
    assert str(status) in outcomes[0].detail
    assert fake.accepted_count(num(1)) == 0


async def test_failure_of_first_request_leaves_the_rest_unsent(
    cm: CmProvider, server: ProviderServer, fake: FakeCm
) -> None:
    fake.fail_next(1, status=503)
    outcomes = by_key(await cm.send([sms(i, text=f"t{i}") for i in range(1001)]))

    assert len(server.requests) == 1
    assert all(o.retry and o.code == 999 for o in outcomes.values())
    assert outcomes["k1000"].detail.startswith("not sent")


async def test_failure_of_second_request_keeps_first_results(
    fake: FakeCm, http: httpx.AsyncClient
) -> None:
    count: list[int] = []

    def second_fails(req: RecordedRequest) -> Reply:
        count.append(1)
        return fake(req) if len(count) == 1 else Reply(503, "Service Unavailable")

    with serve(second_fails) as srv:
        outcomes = by_key(
            await make(srv.url + FakeCm.PATH, http).send(
                [sms(1, key="a"), sms(2, key="b"), sms(1, key="c", text="autre")]
            )
        )
    assert [(outcomes[k].code, outcomes[k].retry) for k in "abc"] == [
        (0, False),
        (0, False),
        (999, True),
    ]


async def test_timeout_gives_retry_outcomes(
    server: ProviderServer, http: httpx.AsyncClient, fake: FakeCm
) -> None:
    fake.hold()
    try:
        cm = make(server.url + FakeCm.PATH, http, timeout=0.3)
        outcomes = await cm.send([sms(1), sms(2)])
    finally:
        fake.release()
    assert [(o.code, o.retry) for o in outcomes] == [(999, True), (999, True)]
    assert "timed out" in outcomes[0].detail


async def test_connect_error_gives_retry_outcomes(http: httpx.AsyncClient) -> None:
    outcomes = await make(closed_port_url(), http).send([sms(1)])
    assert [(o.code, o.retry) for o in outcomes] == [(999, True)]
    assert "unreachable" in outcomes[0].detail


async def test_in_doubt_is_sent_the_same_way(
    cm: CmProvider, server: ProviderServer, fake: FakeCm
) -> None:
    # CM has no idempotency field: a message in doubt is sent again, unchanged.
    await cm.send([sms(1)])
    [o] = await cm.send([sms(1, in_doubt=True)])

    assert o.code == 0
    assert server.requests[0].body == server.requests[1].body
    assert fake.accepted_count(num(1)) == 2


# --- check, factory, codes ----------------------------------------------------------------


async def test_check_probes_with_an_empty_msg_list(
    cm: CmProvider, server: ProviderServer, fake: FakeCm
) -> None:
    verdict = await cm.check()

    assert "reachable" in verdict and "no call proving the token" in verdict
    assert "\n" not in verdict
    assert body(server.requests[0]) == {
        "messages": {"authentication": {"producttoken": TOKEN}, "msg": []}
    }
    assert fake.sent == []


async def test_check_refused_token(server: ProviderServer, http: httpx.AsyncClient) -> None:
    cm = make(server.url + FakeCm.PATH, http, token="99999999-9999-9999-9999-999999999999")
    with pytest.raises(ProviderAuthError):
        await cm.check()


async def test_check_unreachable_or_failing(
    cm: CmProvider, fake: FakeCm, http: httpx.AsyncClient
) -> None:
    with pytest.raises(TemporaryProviderError) as info:
        await make(closed_port_url(), http).check()
    assert not info.value.throttled
    fake.fail_next(1, status=503)
    with pytest.raises(TemporaryProviderError):
        await cm.check()
    fake.fail_next(1, status=429)
    with pytest.raises(TemporaryProviderError) as info:
        await cm.check()
    assert info.value.throttled


async def test_build_and_aclose_leave_the_shared_client_open(http: httpx.AsyncClient) -> None:
    config = CmProviderConfig(type="cm", product_token=TOKEN)
    provider = build("cm-main", config, http)
    assert isinstance(provider, CmProvider)
    assert provider.name == "cm-main" and provider.max_batch == 2000
    await provider.aclose()
    assert not http.is_closed


def test_code_table() -> None:
    assert cm_failure(303) is ProviderFailure.INVALID_NUMBER
    assert cm_failure(302) is ProviderFailure.INVALID_NUMBER
    assert cm_failure("303") is ProviderFailure.INVALID_NUMBER
    assert cm_failure(301) is ProviderFailure.SENDER_REFUSED
    assert cm_failure(402) is ProviderFailure.BLACKLISTED
    assert cm_failure(102) is ProviderFailure.NO_BALANCE
    assert cm_failure(401) is ProviderFailure.OTHER
    assert cm_failure(12345) is ProviderFailure.OTHER
    assert cm_failure(None) is ProviderFailure.OTHER


# -- the `msg` objects are assembled as bytes: the same bytes orjson writes -------------

_ANY_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)


@given(
    sender=st.none() | _ANY_TEXT,
    text=_ANY_TEXT,
    numbers=st.lists(st.from_regex(r"00[0-9]{6,13}", fullmatch=True) | _ANY_TEXT, min_size=1),
    tail=st.fixed_dictionaries(
        {"dcs": st.sampled_from([0, 8])},
        optional={"reference": _ANY_TEXT, "maximumNumberOfMessageParts": st.integers(1, 255)},
    ),
)
@settings(max_examples=300, deadline=None)
def test_msg_json_is_what_orjson_writes_for_the_dict(
    sender: str | None, text: str, numbers: list[str], tail: dict[str, Any]
) -> None:
    head = b"{" if sender is None else b'{"from":%s,' % orjson.dumps(sender)
    msg = _Msg(head, text, orjson.dumps(tail)[1:-1], None, [], numbers)
    expected: dict[str, Any] = {} if sender is None else {"from": sender}
    expected |= {"to": [{"number": n} for n in numbers], "body": {"content": text}} | tail
    assert _msg_json(msg) == orjson.dumps(expected)


async def test_a_provider_call_leaves_no_reference_cycle(cm: CmProvider) -> None:
    """httpx's response and its stream point at each other: left as they come,
    every call kept both bodies until the cyclic GC ran (providers/http.py)."""
    await cm.send([sms(1)])  # the connection and the client's first-call state
    gc.collect()
    gc.disable()
    try:
        outcomes = await cm.send([sms(i) for i in range(2, 40)])
        assert {o.code for o in outcomes} == {0}
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage
        gc.collect()
        left = [o for o in gc.garbage if type(o).__module__.startswith(("httpx", "httpcore"))]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
