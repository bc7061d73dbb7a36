"""Numbers as clients write them -> E.164 or the code that says why not."""

from __future__ import annotations

from collections.abc import Collection
from typing import TypedDict

import phonenumbers
import pytest

from mailbridge.numbers import check_number, normalise_blacklist, parse_number


class Policy(TypedDict):
    """An account's number policy: check_number's keyword arguments."""

    default_region: str
    countries: Collection[str] | None
    blacklist: Collection[str]


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("0601020304", "+33601020304"),
        ("06 01 02 03 04", "+33601020304"),
        ("06.01.02.03.04", "+33601020304"),
        ("06-01-02-03-04", "+33601020304"),
        ("+33601020304", "+33601020304"),
        ("0033601020304", "+33601020304"),
        ("33601020304", "+33601020304"),
        ("0751234567", "+33751234567"),
        ("0690123456", "+590690123456"),  # Guadeloupe
        ("0696123456", "+596696123456"),  # Martinique
        ("0692123456", "+262692123456"),  # Réunion
        ("0694123456", "+594694123456"),  # Guyane
        ("0639401234", "+262639401234"),  # Mayotte
        ("0123456789", "+33123456789"),  # a landline is a valid number too
    ],
)
def test_valid_numbers(raw: str, e164: str) -> None:
    assert parse_number(raw).e164 == e164


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("", 6),
        ("   ", 6),
        ("abc", 7),
        ("06ABCDEFGH", 7),  # letters are not keypad digits here
        ("06010203", 7),  # too short
        ("060102030405", 7),  # too long
        ("0700000000", 21),  # right length, not allocated
        ("+33700000000", 21),
    ],
)
def test_refused_numbers(raw: str, code: int) -> None:
    result = parse_number(raw)
    assert (result.e164, result.code) == (None, code)


def test_fast_path_agrees_with_phonenumbers() -> None:
    # The regex fast path must never accept what phonenumbers refuses, and
    # give the same E.164.
    for prefix in range(600, 800):
        for suffix in ("000000", "123456", "999999", "555555"):
            raw = f"0{prefix}{suffix}"
            parsed = phonenumbers.parse(raw, "FR")
            ours = parse_number(raw)
            if ours.e164 is not None and ours.e164.startswith("+33"):
                assert phonenumbers.is_valid_number(parsed), raw
                assert ours.e164 == phonenumbers.format_number(
                    parsed, phonenumbers.PhoneNumberFormat.E164
                )


def test_countries_and_overseas() -> None:
    fr_only: Policy = {"default_region": "FR", "countries": ["FR"], "blacklist": frozenset()}
    assert check_number("0690123456", **fr_only).e164 == "+590690123456"
    assert check_number("+77011234567", **fr_only).code == 27
    assert check_number("+4915112345678", **fr_only).code == 27
    kz: Policy = {"default_region": "FR", "countries": ["KZ"], "blacklist": frozenset()}
    assert check_number("+77011234567", **kz).e164 == "+77011234567"
    assert check_number("0601020304", **kz).code == 27
    anywhere: Policy = {"default_region": "FR", "countries": None, "blacklist": frozenset()}
    assert check_number("+4915112345678", **anywhere).e164 == "+4915112345678"


def test_blacklist_matches_any_written_form() -> None:
    blacklist = normalise_blacklist(["06 00 00 00 01", "+33600000002"], "FR")
    rules: Policy = {"default_region": "FR", "countries": None, "blacklist": blacklist}
    assert check_number("0600000001", **rules).code == 11
    assert check_number("0033600000002", **rules).code == 11
    assert check_number("0600000003", **rules).code is None


def test_other_default_region() -> None:
    assert parse_number("87011234567", "KZ").e164 == "+77011234567"
