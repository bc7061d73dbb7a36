"""Log lines for people, for journald and for log shippers (SPEC 11).

- `text`: `2026-12-02 13:51:09,362 INFO mailbridge.dispatch: request 12 emailId 1548: …`;
- under systemd (stderr is the journal: `JOURNAL_STREAM` names it) no timestamp
  of our own (journald has one) and a syslog priority prefix (`<3>` for
  ERROR…), which journald turns into the entry's priority, so
  `journalctl -p err` finds our errors;
- `json`: one object per line (`ts`, `level`, `logger`, `message`, and
  `request_id` / `email_id` where the line is about a request), for a shipper.

Lines about a request say so in their words (`request_tag`) and carry the ids
as fields (`request_fields`), so a JSON line can be filtered without parsing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from mailbridge.config import LoggingConfig

# syslog(3) priorities, as sd-daemon(3) prefixes want them.
PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"


def request_tag(request_id: int, email_id: str | None) -> str:
    """`request 12 emailId 1548`: how a line names its request."""
    return f"request {request_id} emailId {email_id if email_id else '-'}"


def requests_tag(pairs: Iterable[tuple[int, str | None]]) -> str:
    """Several requests (one provider call may carry many): `requests 12 (1548), 13 (-)`."""
    items = list(dict.fromkeys(pairs))
    if len(items) == 1:
        return request_tag(*items[0])
    shown = ", ".join(f"{rid} ({eid if eid else '-'})" for rid, eid in items[:10])
    more = f" and {len(items) - 10} more" if len(items) > 10 else ""
    return f"requests {shown}{more}"


def request_fields(
    request_id: int | list[int], email_id: str | None | list[str | None]
) -> dict[str, Any]:
    """`extra=` for a log call about a request (JSON lines show them as fields)."""
    return {"request_id": request_id, "email_id": email_id}


def under_journald(environ: Mapping[str, str], stream: TextIO) -> bool:
    """True when `stream` is connected to the journal itself.

    systemd sets `JOURNAL_STREAM=<dev>:<inode>` of the stream it gave us; a
    child whose stderr was redirected elsewhere inherits the variable, so the
    device and inode are compared (systemd.exec(5) says to)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, inode = value.partition(":")
    if not (dev.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(inode))


class JournalFormatter(logging.Formatter):
    """No timestamp; `<N>` syslog priority first (journald reads it)."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
        # Each line of a traceback is an entry of its own: each gets the prefix.
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key in ("request_id", "email_id"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False, default=str)
        return f"<{PRIORITY.get(record.levelno, 6)}>{line}" if self.journal else line


def setup_logging(
    config: LoggingConfig,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure the process's root logger from `logging:` (both daemon processes)."""
    stream = sys.stderr if stream is None else stream
    journal = under_journald(os.environ if environ is None else environ, stream)
    formatter: logging.Formatter
    if config.format == "json":
        formatter = JsonFormatter(journal)
    elif journal:
        formatter = JournalFormatter()
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, config.level))
    # aiosmtpd logs every command at INFO; our intake logs one line per email.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # httpx logs every request at INFO; providers/http.py logs a summary at DEBUG.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
