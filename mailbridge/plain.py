"""Plain mode (SPEC section 9): `0601020304@sms.example` recipients and a free text.

Input: the number addresses of the envelope, the mail's Subject and text body
(already decoded and unwrapped by mime.py), and the account's `plain` rules.
Output: the same `Envoi` request an `<envoi>` mail gives (`num1`..`numN`, one
`sms`, the Message-ID and a digest of the numbers as `emailId`), so that the checks and every stage
after them do not know which intake form a request came from.

The text keeps its line breaks (there is no `Ö` convention here). The body is
cut at the first signature line (`-- `, RFC 3676) and at each cut marker;
quoted lines (`>`) are dropped; each line loses its trailing white space,
runs of blank lines become one, and the whole text is trimmed. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Sequence

from mailbridge.envoi import Envoi

MAX_PLAIN_RECIPIENTS = 500
# Digits, an optional leading +, and single . or - between digits (SPEC section 9).
_NUMBER_LOCAL_RE = re.compile(r"\+?[0-9]+(?:[.-][0-9]+)*\Z")
# Reply and forward prefixes that clients put before a Subject (English, French,
# German, Scandinavian forms), any number of them: "RE: TR: Alarme" -> "Alarme".
_SUBJECT_PREFIX_RE = re.compile(r"^(?:\s*(?:re|fwd?|tr|aw|wg|sv|vs)\s*(?:\[\d+\])?\s*:)+\s*", re.I)
_BLANK_RUN_RE = re.compile(r"\n{3,}")


def is_number_local_part(local: str) -> bool:
    """Whether the local part of a number address is a number SPEC section 9 takes."""
    return _NUMBER_LOCAL_RE.match(local) is not None


def clean_subject(subject: str | None) -> str:
    """The Subject without reply/forward prefixes and surrounding white space."""
    return _SUBJECT_PREFIX_RE.sub("", subject or "").strip()


def clean_body(body: str | None, cut_markers: Iterable[str] = ()) -> str:
    """The body up to the signature and the first cut marker, quoted lines dropped."""
    lines: list[str] = []
    for line in (body or "").split("\n"):
        # `-- ` is the RFC 3676 signature separator; `--` the same once a client
        # or an MTA stripped the trailing space.
        if line.rstrip() == "--":
            break
        lines.append(line)
    text = "\n".join(lines)
    for marker in cut_markers:
        if marker:
            found = re.search(re.escape(marker), text, re.IGNORECASE)
            if found is not None:
                text = text[: found.start()]
    kept = [line.rstrip() for line in text.split("\n") if not line.lstrip().startswith(">")]
    return _BLANK_RUN_RE.sub("\n\n", "\n".join(kept)).strip()


def plain_text(
    subject: str | None, body: str | None, form: str, cut_markers: Iterable[str] = ()
) -> str:
    """The SMS text per `plain.text`: body (the Subject when the body is empty),
    subject, or subject_body (the Subject, a line break, the body)."""
    head = clean_subject(subject)
    if form == "subject":
        return head
    text = clean_body(body, cut_markers)
    if form == "subject_body":
        return "\n".join(part for part in (head, text) if part)
    return text or head


def plain_email_id(message_id: str | None, numbers: Sequence[str]) -> str:
    """The emailId of a plain mail: its Message-ID and a digest of its numbers.

    The same mail re-sent (or re-delivered after a lost 250) to the same numbers
    is a duplicate and sends nothing again; the parts of one mail that an MTA
    delivers separately (Postfix: 50 recipients per delivery by default) carry
    the same Message-ID with other numbers, and each is sent. Without a
    Message-ID: an id of our own (no dedupe)."""
    message_id = (message_id or "").strip()
    if not message_id:
        return own_email_id()
    digest = hashlib.sha256("\n".join(sorted(set(numbers))).encode()).hexdigest()[:12]
    return f"{message_id}#{digest}"


def own_email_id() -> str:
    """An emailId for a mail without a Message-ID: unique, so never a duplicate."""
    return "mailbridge-" + secrets.token_hex(8)


def plain_request(numbers: Sequence[str], text: str, email_id: str) -> Envoi:
    """The request of a plain mail, as the `<envoi>` reader would have given it."""
    fields = {f"num{i}": number for i, number in enumerate(numbers, start=1)}
    fields["sms"] = text
    fields["emailid"] = email_id
    return Envoi(fields)
