"""The `outbox` provider: one JSON line per recipient SMS in a file.

The embedded default, so the bridge runs with no SMS account. Each line holds
`to` (E.164), `sender`, `text` (final), `encoding`, `parts`, `reference`,
`request_id` and `id` (the message's idempotency key). Lines are appended and
fsynced before the messages count as accepted.

Exactly once: a message sent again after a crash (`in_doubt`) is looked up by
`id` in the file first and not written twice. A line cut short by a crash in
the middle of a write is removed at open, so the file is always whole lines.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence

import httpx

from mailbridge.config import OutboxProviderConfig
from mailbridge.providers import Outcome, SmsMessage

_ID_MARK = b'"id": "'


class OutboxProvider:
    def __init__(self, name: str, config: OutboxProviderConfig) -> None:
        self.name = name
        self.path = config.path
        self.max_batch = 1000
        self._lock = asyncio.Lock()
        self._opened = False

    def _repair(self) -> None:
        """Drop a partial last line left by a crash mid-write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            # Find the end of the last whole line; scan backwards in blocks.
            pos = size
            while pos > 0:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                block = f.read(step)
                cut = block.rfind(b"\n")
                if cut >= 0:
                    f.truncate(pos + cut + 1)
                    break
            else:
                f.truncate(0)
            f.flush()
            os.fsync(f.fileno())

    def _written_ids(self, wanted: set[str]) -> set[str]:
        """Which of these message ids already have a line (only after a crash)."""
        found: set[str] = set()
        needles = {key.encode(): key for key in wanted}
        with open(self.path, "rb") as f:
            for line in f:
                start = line.find(_ID_MARK)
                if start < 0:
                    continue
                start += len(_ID_MARK)
                end = line.find(b'"', start)
                key = needles.get(line[start:end])
                if key is not None:
                    found.add(key)
        return found

    def _append(self, batch: Sequence[SmsMessage]) -> None:
        if not self._opened:
            self._repair()
            self._opened = True
        doubtful = {m.key for m in batch if m.in_doubt}
        already = self._written_ids(doubtful) if doubtful else set()
        lines = [
            json.dumps(
                {
                    "id": m.key,
                    "to": m.to,
                    "sender": m.sender,
                    "text": m.text,
                    "encoding": m.encoding,
                    "parts": m.parts,
                    "reference": m.reference,
                    "request_id": m.request_id,
                },
                ensure_ascii=False,
            )
            + "\n"
            for m in batch
            if m.key not in already
        ]
        if not lines:
            return
        data = "".join(lines).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    async def send(self, batch: Sequence[SmsMessage]) -> list[Outcome]:
        async with self._lock:  # one writer: lines never interleave
            await asyncio.to_thread(self._append, batch)
        return [Outcome(m.key, 0, provider_message_id=m.key) for m in batch]

    async def check(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(self.path.parent, os.W_OK):
            raise PermissionError(f"{self.path.parent} is not writable")
        return f"writes to {self.path}"

    async def aclose(self) -> None:
        return None


def build(name: str, config: OutboxProviderConfig, http: httpx.AsyncClient) -> OutboxProvider:
    return OutboxProvider(name, config)
