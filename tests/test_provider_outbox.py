"""The outbox provider: one line per message, exactly once across crashes."""

from __future__ import annotations

import json
from pathlib import Path

from mailbridge.config import OutboxProviderConfig
from mailbridge.providers import SmsMessage
from mailbridge.providers.outbox import OutboxProvider


def message(key: str, in_doubt: bool = False) -> SmsMessage:
    return SmsMessage(
        key=key, to="+33601020304", sender="MaSociete", text="é€\n", encoding="gsm7",
        parts=1, max_parts=5, reference="trk", request_id=1, in_doubt=in_doubt,
    )  # fmt: skip


def provider(path: Path) -> OutboxProvider:
    return OutboxProvider("outbox", OutboxProviderConfig(type="outbox", path=path))


async def test_lines_carry_the_contract_fields(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    outcomes = await provider(path).send([message("a"), message("b")])
    assert [(o.key, o.code) for o in outcomes] == [("a", 0), ("b", 0)]
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {
        "id": "a", "to": "+33601020304", "sender": "MaSociete", "text": "é€\n",
        "encoding": "gsm7", "parts": 1, "reference": "trk", "request_id": 1,
    }  # fmt: skip


async def test_in_doubt_messages_already_written_are_not_written_again(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    await provider(path).send([message("a")])
    # After a restart, "a" is in doubt (written, outcome not recorded), "b" too but never written.
    again = provider(path)
    outcomes = await again.send([message("a", in_doubt=True), message("b", in_doubt=True)])
    assert [o.code for o in outcomes] == [0, 0]
    keys = [json.loads(x)["id"] for x in path.read_text().splitlines()]
    assert keys == ["a", "b"]


async def test_a_line_cut_by_a_crash_is_removed_and_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    await provider(path).send([message("a")])
    with open(path, "ab") as f:
        f.write(b'{"id": "b", "to": "+3360')  # the process died mid-write
    await provider(path).send([message("b", in_doubt=True)])
    keys = [json.loads(x)["id"] for x in path.read_text().splitlines()]
    assert keys == ["a", "b"]
