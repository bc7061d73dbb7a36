"""KcellProvider against FakeKcell over real loopback HTTP."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from mailbridge.codes import ProviderFailure, kcell_failure
from mailbridge.config import KcellProviderConfig
from mailbridge.providers import (
    Outcome,
    Provider,
    ProviderAuthError,
    SmsMessage,
    TemporaryProviderError,
)
from mailbridge.providers.kcell import BATCH_LIMIT, KcellProvider, build
from tests.fake_kcell import BASE, DUPLICATE_TEXT, FakeKcell
from tests.httpfake import ProviderServer, RecordedRequest, Reply

AUTH = "Basic " + base64.b64encode(b"mailbridge:secret").decode()


@pytest.fixture
def fake() -> Iterator[FakeKcell]:
    fake = FakeKcell()
    yield fake
    fake.release()


@pytest.fixture
def server(fake: FakeKcell) -> Iterator[ProviderServer]:
    with ProviderServer(fake) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def make(http: httpx.AsyncClient, url: str, timeout_s: float = 10.0) -> KcellProvider:
    config = KcellProviderConfig.model_validate(
        {
            "type": "kcell",
            "url": url,
            "username": "mailbridge",
            "password": "secret",
            "timeout_s": timeout_s,
        }
    )
    return build("kcell", config, http)


@pytest.fixture
def kcell(http: httpx.AsyncClient, server: ProviderServer) -> KcellProvider:
    return make(http, server.url + BASE)


def sms(
    i: int,
    *,
    to: str | None = None,
    sender: str | None = "MAILBRIDGE",
    text: str = "Hello",
    in_doubt: bool = False,
    key: str | None = None,
) -> SmsMessage:
    return SmsMessage(
        key=key or f"req7-{i}",
        to=to or f"+7701{i:07d}",
        sender=sender,
        text=text,
        encoding="gsm7",
        parts=1,
        max_parts=5,
        reference=None,
        request_id=7,
        in_doubt=in_doubt,
    )


def by_key(outcomes: list[Outcome]) -> dict[str, Outcome]:
    return {o.key: o for o in outcomes}


def posts(server: ProviderServer) -> list[RecordedRequest]:
    return [r for r in server.requests if r.method == "POST"]


# -- wire format ---------------------------------------------------------------


async def test_single_message_exact_request(
    kcell: KcellProvider, server: ProviderServer, fake: FakeKcell
) -> None:
    outcomes = await kcell.send([sms(1, text="Привет € {x}")])

    [req] = server.requests
    assert (req.method, req.path, req.query) == ("POST", f"{BASE}/messages", {})
    assert req.headers["authorization"] == AUTH
    assert req.headers["content-type"] == "application/json;charset=utf-8"
    assert req.headers["accept"] == "application/json, text/plain, */*"
    assert (
        req.body
        == (
            '{"client_message_id":"req7-1","sender":"MAILBRIDGE","recipient":"77010000001",'
            '"message_text":"Привет € {x}","time_bounds":"full"}'
        ).encode()
    )
    [out] = outcomes
    assert (out.key, out.code, out.retry) == ("req7-1", 0, False)
    assert out.provider_message_id == "req7-1"  # reports name our client_message_id
    assert fake.count("+77010000001") == 1


async def test_sender_none_is_omitted(kcell: KcellProvider, server: ProviderServer) -> None:
    [out] = await kcell.send([sms(1, sender=None)])
    assert out.code == 0
    body = json.loads(server.requests[0].body)
    assert body == {
        "client_message_id": "req7-1",
        "recipient": "77010000001",
        "message_text": "Hello",
        "time_bounds": "full",
    }


async def test_batch_exact_request(
    kcell: KcellProvider, server: ProviderServer, fake: FakeKcell
) -> None:
    batch = [sms(1, text="Hi Ann"), sms(2, text="Hi Bob", sender=None)]
    outcomes = await kcell.send(batch)

    [req] = server.requests
    assert (req.method, req.path) == ("POST", f"{BASE}/batches")
    assert req.headers["authorization"] == AUTH
    assert req.headers["content-type"] == "application/json;charset=utf-8"
    assert req.body == (
        b'{"messages":[{"client_message_id":"req7-1","sender":"MAILBRIDGE",'
        b'"recipient":"77010000001","message_text":"Hi Ann","time_bounds":"full"},'
        b'{"client_message_id":"req7-2","recipient":"77010000002","message_text":"Hi Bob",'
        b'"time_bounds":"full"}],'
        b'"fail-fast":false}'
    )
    [batch_id] = fake.batches
    assert [(o.key, o.code, o.retry, o.provider_message_id) for o in outcomes] == [
        ("req7-1", 0, False, "req7-1"),
        ("req7-2", 0, False, "req7-2"),
    ]
    assert all(o.detail == f"batch {batch_id}" for o in outcomes)
    assert fake.count("77010000001") == fake.count("77010000002") == 1


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1, [("/messages", 1)]),
        (2, [("/batches", 2)]),
        (200, [("/batches", 200)]),
        (201, [("/batches", 200), ("/messages", 1)]),
        (202, [("/batches", 200), ("/batches", 2)]),
        (500, [("/batches", 200), ("/batches", 200), ("/batches", 100)]),
    ],
)
async def test_batching_boundaries(
    kcell: KcellProvider,
    server: ProviderServer,
    fake: FakeKcell,
    size: int,
    expected: list[tuple[str, int]],
) -> None:
    assert kcell.max_batch >= 500 and BATCH_LIMIT == 200
    batch = [sms(i) for i in range(size)]
    outcomes = await kcell.send(batch)

    seen = []
    for req in server.requests:
        body = json.loads(req.body)
        seen.append(
            (req.path.removeprefix(BASE), len(body["messages"]) if "messages" in body else 1)
        )
    assert seen == expected
    assert sorted(o.key for o in outcomes) == sorted(m.key for m in batch)
    assert all(o.code == 0 and not o.retry for o in outcomes)
    assert fake.total == size and set(fake.accepted.values()) == {1}


async def test_personal_texts_share_batches(kcell: KcellProvider, server: ProviderServer) -> None:
    batch = [sms(i, text=f"Dear customer {i}") for i in range(500)]
    await kcell.send(batch)
    assert len(server.requests) == 3
    texts = [m["message_text"] for r in server.requests for m in json.loads(r.body)["messages"]]
    assert texts == [m.text for m in batch]


# -- per-recipient answers -------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "message", "code", "retry", "words"),
    [
        (None, sms(1, to="+79161234567"), 7, False, "destination address"),
        (None, sms(1, sender="NOPE"), 33, False, "alias NOPE"),
        ((34, None), sms(1), 11, False, "black list"),
        ((30, None), sms(1), 11, False, "banned"),
        ((88, None), sms(1), 29, True, "Throttling"),
        ((27, "Mobile equipment is off"), sms(1), 999, False, "equipment is off"),
    ],
)
async def test_single_rejections(
    kcell: KcellProvider,
    fake: FakeKcell,
    setup: tuple[int, str | None] | None,
    message: SmsMessage,
    code: int,
    retry: bool,
    words: str,
) -> None:
    if setup is not None:
        fake.reject_number(message.to, *setup)
    [out] = await kcell.send([message])
    assert (out.code, out.retry, out.provider_message_id) == (code, retry, None)
    assert out.detail.startswith("HTTP 400: ") and words in out.detail
    assert fake.total == 0


async def test_batch_rejections_are_reported_later(kcell: KcellProvider, fake: FakeKcell) -> None:
    # fail-fast false: SMSGW takes the batch and reports bad messages in DLRs.
    fake.reject_number("+77010000002", 34)
    outcomes = by_key(await kcell.send([sms(1), sms(2), sms(3, to="+7123")]))
    assert {k: o.code for k, o in outcomes.items()} == {"req7-1": 0, "req7-2": 0, "req7-3": 0}
    assert fake.count("+77010000001") == 1 and fake.total == 1
    assert fake.messages["req7-2"]["error_code"] == "34"
    assert fake.messages["req7-3"]["error_code"] == "11"
    assert kcell_failure(fake.messages["req7-2"]["error_code"], "") is ProviderFailure.BLACKLISTED


async def test_refused_batch_is_resubmitted_one_by_one(
    kcell: KcellProvider, server: ProviderServer, fake: FakeKcell
) -> None:
    fake.batch_error = "Invalid number of messages"
    batch = [sms(1), sms(2, to="+7123"), sms(3, sender="NOPE")]
    outcomes = by_key(await kcell.send(batch))
    assert [r.path.removeprefix(BASE) for r in server.requests] == ["/batches"] + 3 * ["/messages"]
    assert {k: o.code for k, o in outcomes.items()} == {"req7-1": 0, "req7-2": 7, "req7-3": 33}
    assert outcomes["req7-1"].provider_message_id == "req7-1"
    assert fake.total == 1


# -- idempotency -----------------------------------------------------------------


async def test_lost_answer_then_in_doubt_retry_is_accepted_once(
    http: httpx.AsyncClient, server: ProviderServer, fake: FakeKcell
) -> None:
    slow = make(http, server.url + BASE, timeout_s=0.3)
    fake.delay_s = 30  # the fake accepts, then holds its answer past our timeout
    [out] = await slow.send([sms(1)])
    assert (out.code, out.retry) == (999, True)
    assert "no answer in time" in out.detail
    assert fake.count("+77010000001") == 1

    fake.delay_s = 0
    fake.release()
    [again] = await make(http, server.url + BASE).send([sms(1, in_doubt=True)])
    assert (again.code, again.retry) == (0, False)
    assert DUPLICATE_TEXT in again.detail
    assert server.requests[0].body == server.requests[1].body  # the same key, re-sent
    assert fake.count("+77010000001") == 1


async def test_in_doubt_batch_is_resent_with_the_same_keys(
    kcell: KcellProvider, server: ProviderServer, fake: FakeKcell
) -> None:
    await kcell.send([sms(1), sms(2)])
    retry = [sms(1, in_doubt=True), sms(2, in_doubt=True), sms(3, in_doubt=True)]
    outcomes = await kcell.send(retry)
    assert len(server.requests) == 2
    assert all(o.code == 0 and not o.retry for o in outcomes)
    assert [fake.count(f"+7701000000{i}") for i in (1, 2, 3)] == [1, 1, 1]


async def test_batch_refused_for_duplicates_falls_back_to_singles(
    kcell: KcellProvider, server: ProviderServer, fake: FakeKcell
) -> None:
    await kcell.send([sms(1)])
    fake.batch_error = DUPLICATE_TEXT  # a gateway that refuses the whole batch
    outcomes = await kcell.send([sms(1, in_doubt=True), sms(2, in_doubt=True)])
    assert len(server.requests) == 4
    assert all(o.code == 0 for o in outcomes)
    assert fake.count("+77010000001") == fake.count("+77010000002") == 1


async def test_key_longer_than_64_is_never_sent(kcell: KcellProvider, fake: FakeKcell) -> None:
    outcomes = by_key(await kcell.send([sms(1, key="k" * 65), sms(2, key="k" * 64)]))
    assert (outcomes["k" * 65].code, outcomes["k" * 65].retry) == (999, False)
    assert outcomes["k" * 64].code == 0
    assert fake.total == 1


# -- whole-request failures --------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(503, 999), (500, 999), (429, 29)])
async def test_transient_failure_stops_the_batch(
    kcell: KcellProvider, server: ProviderServer, fake: FakeKcell, status: int, code: int
) -> None:
    fake.fail_next(1, status)
    outcomes = await kcell.send([sms(i) for i in range(500)])
    assert len(server.requests) == 1  # the two other chunks are not tried
    assert len(outcomes) == 500
    assert all(o.code == code and o.retry for o in outcomes)
    assert all(f"HTTP {status}" in o.detail for o in outcomes)
    assert sum("not sent" in o.detail for o in outcomes) == 300
    assert fake.total == 0


@pytest.mark.parametrize(("status", "code"), [(503, 999), (429, 29)])
async def test_single_transient_failure(
    kcell: KcellProvider, fake: FakeKcell, status: int, code: int
) -> None:
    fake.fail_next(1, status)
    [out] = await kcell.send([sms(1)])
    assert (out.code, out.retry) == (code, True)


class FlakyAfter:
    """Answers the first `ok` requests with the fake, then `status` (or 401) for the rest."""

    def __init__(self, fake: FakeKcell, ok: int, status: int) -> None:
        self.fake, self.ok, self.status = fake, ok, status

    def __call__(self, req: RecordedRequest) -> Reply:
        if self.ok > 0:
            self.ok -= 1
            return self.fake(req)
        return Reply(self.status, "")


@pytest.mark.parametrize(
    ("status", "code", "words"), [(503, 999, "HTTP 503"), (429, 29, "HTTP 429")]
)
async def test_failure_after_an_accepted_chunk(
    http: httpx.AsyncClient, fake: FakeKcell, status: int, code: int, words: str
) -> None:
    with ProviderServer(FlakyAfter(fake, 1, status)) as server:
        outcomes = await make(http, server.url + BASE).send([sms(i) for i in range(500)])
        assert len(server.requests) == 2
    assert [o.code for o in outcomes[:200]] == [0] * 200
    assert all(o.code == code and o.retry and words in o.detail for o in outcomes[200:])
    assert fake.total == 200


async def test_failure_inside_the_one_by_one_fallback_stops_it(
    http: httpx.AsyncClient, fake: FakeKcell
) -> None:
    fake.batch_error = "Invalid number of messages"
    with ProviderServer(FlakyAfter(fake, 1, 503)) as server:
        outcomes = await make(http, server.url + BASE).send([sms(i) for i in range(40)])
        # the refused batch, then at most the singles already in flight (8 at a time)
        assert 2 <= len(server.requests) <= 1 + 8
    assert len(outcomes) == 40
    assert all(o.code == 999 and o.retry for o in outcomes)
    assert sum("not sent" in o.detail for o in outcomes) >= 40 - 8
    assert fake.total == 0


async def test_timeout_gives_retry_outcomes(
    http: httpx.AsyncClient, server: ProviderServer, fake: FakeKcell
) -> None:
    fake.delay_s = 30
    outcomes = await make(http, server.url + BASE, timeout_s=0.3).send([sms(1), sms(2)])
    assert all(o.code == 999 and o.retry and "no answer in time" in o.detail for o in outcomes)


async def test_connect_error_gives_retry_outcomes(http: httpx.AsyncClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcomes = await make(http, f"http://127.0.0.1:{port}{BASE}").send([sms(1), sms(2), sms(3)])
    assert all(o.code == 999 and o.retry and "ConnectError" in o.detail for o in outcomes)


@pytest.mark.parametrize("size", [1, 3, 250])
async def test_credentials_refused(
    kcell: KcellProvider, server: ProviderServer, fake: FakeKcell, size: int
) -> None:
    fake.deny_auth = True
    with pytest.raises(ProviderAuthError, match="username/password refused"):
        await kcell.send([sms(i) for i in range(size)])
    assert len(server.requests) == 1


async def test_credentials_refused_after_an_accepted_chunk(
    http: httpx.AsyncClient, fake: FakeKcell
) -> None:
    with ProviderServer(FlakyAfter(fake, 1, 401)) as server:
        outcomes = await make(http, server.url + BASE).send([sms(i) for i in range(500)])
        assert len(server.requests) == 2
    assert [o.code for o in outcomes[:200]] == [0] * 200
    assert all(o.code == 999 and o.retry for o in outcomes[200:])
    # The same words as CM and sMsmode: "authentication rejected: <what was refused>".
    assert all(o.detail.startswith("authentication rejected: username/password refused")
               for o in outcomes[200:400])  # fmt: skip
    assert all("not sent" in o.detail for o in outcomes[400:])


async def test_wrong_url_is_a_configuration_error(
    http: httpx.AsyncClient, server: ProviderServer
) -> None:
    with pytest.raises(ProviderAuthError, match="404.*check providers.kcell.url"):
        await make(http, server.url + "/app/smsgw/rest/v1").send([sms(1)])


async def test_odd_batch_id_key_of_the_seed(http: httpx.AsyncClient) -> None:
    def handler(req: RecordedRequest) -> Reply:
        return Reply(201, '{" batch_id": "182532" }', {"Content-Type": "application/json"})

    with ProviderServer(handler) as server:
        outcomes = await make(http, server.url + BASE).send([sms(1), sms(2)])
    assert [o.detail for o in outcomes] == ["batch 182532"] * 2


# -- check() and lifecycle ---------------------------------------------------------


async def test_check_lists_senders(kcell: KcellProvider, server: ProviderServer) -> None:
    assert await kcell.check() == "credentials accepted; senders: MAILBRIDGE, INFO"
    [req] = server.requests
    assert (req.method, req.path) == ("GET", f"{BASE}/senders")
    assert req.headers["authorization"] == AUTH and req.body == b""


async def test_check_reads_sender_objects(http: httpx.AsyncClient) -> None:
    def handler(req: RecordedRequest) -> Reply:
        return Reply(200, '[{"sender": "SMSGW"}, {"name": "INFO"}]')

    with ProviderServer(handler) as server:
        verdict = await make(http, server.url + BASE).check()
    assert verdict == "credentials accepted; senders: SMSGW, INFO"


async def test_check_failures(kcell: KcellProvider, fake: FakeKcell) -> None:
    fake.deny_auth = True
    with pytest.raises(ProviderAuthError):
        await kcell.check()
    fake.deny_auth = False
    fake.fail_next(1, 503)
    with pytest.raises(TemporaryProviderError):
        await kcell.check()
    fake.fail_next(1, 429)
    with pytest.raises(TemporaryProviderError) as info:
        await kcell.check()
    assert info.value.throttled


async def test_check_unreachable(http: httpx.AsyncClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TemporaryProviderError):
        await make(http, f"http://127.0.0.1:{port}{BASE}").check()


async def test_empty_batch_and_aclose_leave_the_client_open(
    kcell: KcellProvider, http: httpx.AsyncClient, server: ProviderServer
) -> None:
    assert await kcell.send([]) == []
    await kcell.aclose()
    assert not http.is_closed and server.requests == []
    protocol: Provider = kcell  # mypy: the adapter satisfies the Provider protocol
    assert protocol.name == "kcell"


def test_kcell_failure_table() -> None:
    assert kcell_failure("11", "") is ProviderFailure.INVALID_NUMBER
    assert kcell_failure(23, "") is ProviderFailure.ACCEPTED
    assert kcell_failure("", DUPLICATE_TEXT) is ProviderFailure.ACCEPTED
    assert kcell_failure(None, "User can't use alias SMSGW to send messages") is (
        ProviderFailure.SENDER_REFUSED
    )
    assert kcell_failure("33", "insufficient balance") is ProviderFailure.OTHER
    assert kcell_failure("999", "something new") is ProviderFailure.OTHER
