"""Phone numbers as clients write them -> E.164, or the code that says why not.

Input: the raw text of a `<num>` tag or a `mobiles.csv` line, and the account's
region, country allow-list and blacklist. Output: a `NumberCheck` with the
E.164 form or one of the codes 6, 7, 21, 27, 11. Never raises.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import NamedTuple

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumber

from mailbridge.codes import Code

# Separators clients put inside numbers ("06 01 02 03 04", "06.01.02.03.04").
_SEPARATORS = re.compile(r"[\s.\-()/]")
# After separators are removed: digits with an optional leading '+'. Letters are
# refused here because phonenumbers would read them as a keypad vanity number.
_DIGITS = re.compile(r"^\+?[0-9]+$")
# Fast path: metropolitan French mobiles that are valid whatever their last
# digits (060-062, 064-068, 073-079; 063 and 069 hold overseas blocks) need no
# phonenumbers parse. tests/test_numbers.py checks this against phonenumbers.
_FR_MOBILE = re.compile(r"^(?:0|\+33|0033|33)((?:6[0-24-8]|7[3-9])[0-9]{7})$")

# French overseas departments and collectivities share French national
# numbering ("0690…") but have their own region in phonenumbers.
FRENCH_OVERSEAS = ("GP", "MQ", "GF", "RE", "YT", "PM", "BL", "MF")
FRENCH_REGIONS = frozenset(("FR", *FRENCH_OVERSEAS))


class NumberCheck(NamedTuple):
    """The verdict on one number: `e164` when usable, else `code`."""

    e164: str | None
    code: int | None  # None: the number is fine
    region: str | None = None


def _parse(digits: str, region: str) -> PhoneNumber | None:
    try:
        return phonenumbers.parse(digits, region)
    except NumberParseException:
        return None


def parse_number(raw: str, default_region: str = "FR") -> NumberCheck:
    """Read a number without account policy: E.164, or code 6, 7 or 21."""
    text = raw.strip()
    if default_region == "FR":
        # Written without separators (most numbers): the fast path needs no cleaning
        # (and NumberCheck by tuple.__new__: its fields in order, no Python frame).
        fast = _FR_MOBILE.match(text)
        if fast:
            return tuple.__new__(NumberCheck, ("+33" + fast.group(1), None, "FR"))
    if not text:
        return NumberCheck(None, Code.EMPTY_NUMBER)
    digits = _SEPARATORS.sub("", text)
    if not _DIGITS.match(digits):
        return NumberCheck(None, Code.MALFORMED_NUMBER)
    if default_region == "FR":
        fast = _FR_MOBILE.match(digits)
        if fast:
            return NumberCheck("+33" + fast.group(1), None, "FR")
    number = _parse(digits, default_region)
    if number is None or not phonenumbers.is_possible_number(number):
        return NumberCheck(None, Code.MALFORMED_NUMBER)
    if not phonenumbers.is_valid_number(number):
        if default_region == "FR" and number.country_code == 33 and not digits.startswith("+"):
            for overseas in FRENCH_OVERSEAS:
                candidate = _parse(digits, overseas)
                if candidate is not None and phonenumbers.is_valid_number(candidate):
                    number = candidate
                    break
            else:
                return NumberCheck(None, Code.UNASSIGNED_NUMBER)
        else:
            return NumberCheck(None, Code.UNASSIGNED_NUMBER)
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return NumberCheck(e164, None, phonenumbers.region_code_for_number(number))


def country_allowed(region: str | None, countries: Collection[str] | None) -> bool:
    """Whether a number's region is in the account's list (FR covers the overseas)."""
    if countries is None:
        return True
    if region in countries:
        return True
    return "FR" in countries and region in FRENCH_REGIONS


def check_number(
    raw: str,
    *,
    default_region: str,
    countries: Collection[str] | None,
    blacklist: Collection[str],
) -> NumberCheck:
    """Read a number with the account's policy: adds codes 27 and 11."""
    result = parse_number(raw, default_region)
    if result.e164 is None:
        return result
    if not country_allowed(result.region, countries):
        return NumberCheck(None, Code.COUNTRY_NOT_ALLOWED, result.region)
    if result.e164 in blacklist:
        return NumberCheck(None, Code.BLACKLISTED, result.region)
    return result


def normalise_blacklist(entries: Collection[str], default_region: str) -> frozenset[str]:
    """Blacklist entries as written in config -> E.164 set (unreadable entries kept raw)."""
    out: set[str] = set()
    for entry in entries:
        parsed = parse_number(entry, default_region)
        out.add(parsed.e164 if parsed.e164 else entry.strip())
    return frozenset(out)
