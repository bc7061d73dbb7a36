"""The shared HTTP rule of the adapters (mailbridge/providers/http.py).

Real httpx exceptions and responses through an injected transport: which
statuses and errors are temporary, throttled, refused, or the API's own answer.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from mailbridge.providers import ProviderAuthError, SmsMessage, TemporaryProviderError
from mailbridge.providers.http import CallFailure, Failure, HttpRules

URL = "https://user:pw@api.example/http/1.6/sendSMS.do?accessToken=SECRET"
RULES = HttpRules("sms", 10.0, credentials="access token")


async def call(
    handler: Callable[[httpx.Request], httpx.Response], rules: HttpRules = RULES
) -> httpx.Response | CallFailure:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        return await rules.call(http.post(URL, content=b"x"))


def answer(status: int, body: str = "") -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, text=body)


def raising(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def sms(key: str) -> SmsMessage:
    return SmsMessage(
        key=key,
        to="+33601020304",
        sender=None,
        text="t",
        encoding="gsm7",
        parts=1,
        max_parts=1,
        reference=None,
        request_id=1,
    )


@pytest.mark.parametrize("status", [200, 201, 202, 400, 402, 409, 422])
async def test_the_apis_own_answers_go_to_the_adapter(status: int) -> None:
    resp = await call(answer(status, "0 | Accepted"))
    assert isinstance(resp, httpx.Response) and resp.status_code == status


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (500, Failure.TEMPORARY, 999),
        (502, Failure.TEMPORARY, 999),
        (503, Failure.TEMPORARY, 999),
        (429, Failure.THROTTLED, 29),
    ],
)
async def test_5xx_is_temporary_and_429_throttled(status: int, kind: Failure, code: int) -> None:
    failure = await call(answer(status, "come back later"))
    assert isinstance(failure, CallFailure)
    assert (failure.kind, failure.code, failure.temporary) == (kind, code, True)
    assert f"HTTP {status}" in failure.detail and "come back later" in failure.detail


@pytest.mark.parametrize("status", [401, 403])
async def test_401_and_403_are_refused_credentials(status: int) -> None:
    failure = await call(answer(status))
    assert isinstance(failure, CallFailure) and failure.kind is Failure.REFUSED
    assert failure.detail.startswith(f"access token refused (HTTP {status}")
    assert not failure.temporary


@pytest.mark.parametrize("status", [404, 405])
async def test_a_wrong_url_is_refused_without_leaking_the_query(status: int) -> None:
    failure = await call(answer(status))
    assert isinstance(failure, CallFailure) and failure.kind is Failure.REFUSED
    assert "https://api.example/http/1.6/sendSMS.do" in failure.detail
    assert "check providers.sms.url" in failure.detail
    assert "SECRET" not in failure.detail and "pw" not in failure.detail


async def test_an_adapter_names_its_own_wrong_url_statuses() -> None:
    rules = HttpRules("sms", 10.0, wrong_url=frozenset({404, 301}))
    assert isinstance(await call(answer(405), rules), httpx.Response)
    redirect = await call(answer(301), rules)
    assert isinstance(redirect, CallFailure) and redirect.kind is Failure.REFUSED


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (httpx.ConnectError("Connection refused"), "unreachable: ConnectError: Connection refused"),
        (httpx.ConnectTimeout(""), "unreachable: ConnectTimeout"),
        (httpx.ReadTimeout("slow"), "timed out: no answer in time (ReadTimeout, timeout 10 s)"),
        (httpx.WriteTimeout("slow"), "may have been accepted"),
        (httpx.RemoteProtocolError("peer closed"), "request failed: RemoteProtocolError"),
        (httpx.ReadError("reset"), "request failed: ReadError: reset"),
    ],
)
async def test_transport_errors_are_temporary(exc: Exception, words: str) -> None:
    failure = await call(raising(exc))
    assert isinstance(failure, CallFailure)
    assert (failure.kind, failure.code) == (Failure.TEMPORARY, 999)
    assert words in failure.detail
    # Only a connection that never opened proves the request did not reach them.
    unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    assert failure.unsent is unsent
    assert all(o.unsent is unsent for o in failure.outcomes([sms("a")]))


async def test_an_error_outside_httpx_is_not_swallowed() -> None:
    with pytest.raises(ZeroDivisionError):
        await call(raising(ZeroDivisionError()))


def test_outcomes_retry_everything_but_a_permanent_failure() -> None:
    batch = [sms("a"), sms("b")]
    for kind, code, retry in [
        (Failure.TEMPORARY, 999, True),
        (Failure.THROTTLED, 29, True),
        (Failure.REFUSED, 999, True),  # held by the dispatcher, never failed for it
        (Failure.PERMANENT, 999, False),
    ]:
        outcomes = CallFailure(kind, "why").outcomes(batch)
        assert [(o.key, o.code, o.retry, o.detail) for o in outcomes] == [
            ("a", code, retry, "why"),
            ("b", code, retry, "why"),
        ]
    [other] = CallFailure(Failure.TEMPORARY, "why").outcomes(batch[:1], "not sent (why)")
    assert other.detail == "not sent (why)"


def test_errors_are_typed() -> None:
    refused = CallFailure(Failure.REFUSED, "token refused").error("cm")
    assert isinstance(refused, ProviderAuthError) and str(refused) == "cm: token refused"
    throttled = CallFailure(Failure.THROTTLED, "slow down").error("cm")
    assert isinstance(throttled, TemporaryProviderError) and throttled.throttled
    down = CallFailure(Failure.TEMPORARY, "down").error("cm")
    assert isinstance(down, TemporaryProviderError) and not down.throttled
    odd = CallFailure(Failure.PERMANENT, "odd answer").error("cm")
    assert isinstance(odd, TemporaryProviderError) and not isinstance(odd, ProviderAuthError)
