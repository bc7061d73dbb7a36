"""The operator's commands (SPEC 11): `status`, `queue …`, `reports …`, `purge`.

Each opens the configured store beside the running daemon (or without it),
does one short thing and closes it: safe while the daemon runs, on SQLite and
PostgreSQL alike, and never creating a store that does not exist (a mistyped
`store.sqlite` is an error, not a new empty database). `--json` prints what a
script would want; the text is for people. The store's rules are in
store/admin.py; this module only words them.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from mailbridge.config import Config
from mailbridge.store import Store, StoreUnavailable, open_store

T = TypeVar("T")
DROP_REASON = "dropped by the operator (mailbridge queue drop)"


class CommandError(Exception):
    """A command that cannot do what was asked: its message is for the operator."""


def with_store(config: Config, work: Callable[[Store], Awaitable[T]]) -> T:
    """Open the existing store, run `work`, close it."""
    if config.store.sqlite is not None and not config.store.sqlite.exists():
        raise CommandError(
            f"no store at {config.store.sqlite} (is store.sqlite right? `mailbridge serve`"
            " creates it)"
        )

    async def run() -> T:
        store = open_store(config.store)
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StoreUnavailable as err:
        raise CommandError(f"store unavailable: {err}") from None


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str, ensure_ascii=False))


def _account_labels(config: Config) -> dict[str, str]:
    """keyid -> the name logs use (a keyid is a secret: never printed)."""
    return {a.keyid: a.label for a in config.accounts}


def _account_keyid(config: Config, name: str | None) -> str | None:
    if name is None:
        return None
    for account in config.accounts:
        if name in (account.name, account.label):
            return account.keyid
    raise CommandError(f"no account named {name!r}")


# -- status ---------------------------------------------------------------------------


def daemon_running(config: Config) -> str | None:
    """Whether a daemon works on this SQLite store (its lock is held), in words;
    None for PostgreSQL (see the heartbeats)."""
    if config.store.sqlite is None:
        return None
    from mailbridge.store.sqlite import lock_path

    path = lock_path(config.store.sqlite)
    if not path.exists():
        return "no daemon"
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return "a daemon is running on this store"
    finally:
        os.close(fd)
    return "no daemon"


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    now = time.time()

    async def read(store: Store) -> dict[str, Any]:
        status = await store.status(now)
        return {
            "status": asdict(status),
            "heartbeats": await store.heartbeats(),
            "oldest_pending": await store.oldest_pending(),
            "providers": await store.provider_errors(),
        }

    found = with_store(config, read)
    running = daemon_running(config)
    stale = config.dispatch.heartbeat_stale_s
    senders = {p: now - at for p, at in found["heartbeats"].items() if now - at < stale}
    if args.json:
        _print_json({**found, "daemon": running, "senders_alive": sorted(senders)})
        return 0
    status = found["status"]
    print("daemon:", running or f"{len(senders)} instance(s) sending (heartbeats)")
    for name, age in sorted(senders.items()):
        print(f"  {name}: heartbeat {age:.0f}s ago")
    requests = status["requests"]
    print("requests:", ", ".join(f"{k} {v}" for k, v in sorted(requests.items())) or "none")
    print("recipients waiting for a code:", status["recipients_pending"])
    if found["oldest_pending"] is not None:
        print("oldest unfinished request:", _age(now - found["oldest_pending"]), "old")
    print("reports:", ", ".join(f"{k} {v}" for k, v in sorted(status["reports"].items())) or "none")
    for name, up, since, error in found["providers"]:
        state = "up" if up else "DOWN"
        print(f"provider {name}: {state} since {_age(now - since)} ago" + (
            f"; last error: {error}" if error else ""))  # fmt: skip
    if status["last_errors"]:
        print("last errors:")
        for line in status["last_errors"]:
            print("  " + line)
    size = status["database_bytes"] / 2**20
    cap = status["database_max_bytes"]
    print(f"store size: {size:.1f} MiB" + (f" of {cap / 2**20:.0f} MiB" if cap else ""))
    return 0


# -- queue ----------------------------------------------------------------------------


def cmd_queue_list(args: argparse.Namespace, config: Config) -> int:
    now = time.time()
    keyid = _account_keyid(config, args.account)
    entries = with_store(config, lambda s: s.queue_list(now, args.state, keyid))
    labels = _account_labels(config)
    if args.json:
        _print_json([{**asdict(e), "account": labels.get(e.account, "?")} for e in entries])
        return 0
    if not entries:
        print("queue empty")
        return 0
    print(
        f"{'id':>8}  {'account':<14} {'emailId':<24} {'age':>5}  {'pending':>9}  why / last error"
    )
    for e in entries:
        why = e.waiting + (f"; last error: {e.last_error}" if e.last_error else "")
        print(
            f"{e.id:>8}  {labels.get(e.account, '?'):<14.14} {e.email_id or '-':<24.24}"
            f" {_age(now - e.received_at):>5}  {e.pending:>4}/{e.total:<4}  {why}"
        )
    print(f"-- {len(entries)} unfinished request(s)")
    return 0


def cmd_queue_show(args: argparse.Namespace, config: Config) -> int:
    detail = with_store(config, lambda s: s.queue_show(args.id))
    if detail is None:
        raise CommandError(f"no request {args.id}")
    labels = _account_labels(config)
    request = {k: v for k, v in detail.request.items() if k not in ("token",)}
    request["account"] = labels.get(str(request["account"]), "?")
    if args.json:
        _print_json({"request": request, "recipients": detail.recipients,
                     "reports": detail.reports})  # fmt: skip
        return 0
    r = request
    print(f"request {r['id']}: account {r['account']}, emailId {r['email_id'] or '-'},"
          f" {r['state']}, from <{r['mail_from']}> at {r['client_ip']}")  # fmt: skip
    if r.get("last_error"):
        print(f"  last error: {r['last_error']}")
    for c in detail.recipients:
        code = "pending" if c["code"] is None else f"code {c['code']}"
        extra = "".join(
            f", {label} {c[key]}"
            for key, label in (("provider", "via"), ("provider_message_id", "id"),
                               ("delivery", "delivery"))
            if c[key]
        )  # fmt: skip
        doubt = ", in doubt" if c["in_doubt"] else ""
        print(f"  {c['idx']:>4} {c['tel']:<18} {code}{extra}, {c['attempts']} attempt(s){doubt}"
              + (f": {c['detail']}" if c["detail"] else ""))  # fmt: skip
    for p in detail.reports:
        print(f"  report {p['id']} {p['kind']} to {p['to']}: {p['state']}"
              + (f" ({p['last_error']})" if p["last_error"] else ""))  # fmt: skip
    return 0


def cmd_queue_retry(args: argparse.Namespace, config: Config) -> int:
    if args.id is None and not args.all:
        raise CommandError("give a request id, or --all")
    ids = None if args.all else [args.id]
    n = with_store(config, lambda s: s.queue_retry(ids, time.time()))
    print(f"{n} request(s) due now (the daemon takes them within a minute)")
    return 0 if n or args.all else 1


def cmd_queue_drop(args: argparse.Namespace, config: Config) -> int:
    result = with_store(config, lambda s: s.queue_drop(args.id, time.time(), DROP_REASON))
    if result is None:
        raise CommandError(f"no unfinished request {args.id}")
    dropped, in_flight = result
    print(f"request {args.id}: {dropped} recipient(s) dropped (code 999)")
    if in_flight:
        print(f"  {in_flight} being submitted right now: their outcome comes first; drop again")
        return 1
    print("  the Not goes out with them")
    return 0


# -- reports --------------------------------------------------------------------------


def cmd_reports_list(args: argparse.Namespace, config: Config) -> int:
    rows = with_store(config, lambda s: s.reports_list(args.state, args.limit))
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no reports" + (f" {args.state}" if args.state else ""))
        return 0
    now = time.time()
    for r in rows:
        print(f"{r['id']:>8}  request {r['request']:<8} {r['kind']:<5} {r['state']:<8}"
              f" {_age(now - r['created_at']):>5}  to {r['to']}"
              + (f": {r['error']}" if r["error"] else ""))  # fmt: skip
    return 0


def cmd_reports_retry(args: argparse.Namespace, config: Config) -> int:
    if not with_store(config, lambda s: s.reports_retry(args.id, time.time())):
        raise CommandError(f"no report {args.id} to retry (sent reports are not sent again)")
    print(f"report {args.id}: pending, due now")
    return 0


def cmd_reports_drop(args: argparse.Namespace, config: Config) -> int:
    why = "dropped by the operator (mailbridge reports drop)"
    if not with_store(config, lambda s: s.reports_drop(args.id, why)):
        raise CommandError(f"no pending or failed report {args.id}")
    print(f"report {args.id}: dropped")
    return 0


# -- purge ----------------------------------------------------------------------------


def purge_all(store: Store, days: float, now: float) -> Awaitable[int]:
    """Purge in batches (short transactions beside a running daemon)."""

    async def run() -> int:
        total = 0
        while n := await store.purge(now - days * 86400):
            total += n
        return total

    return run()


def cmd_purge(args: argparse.Namespace, config: Config) -> int:
    days = args.days if args.days is not None else config.store.retention_days
    n = with_store(config, lambda s: purge_all(s, days, time.time()))
    print(f"{n} finished request(s) older than {days:g} day(s) purged (their emailIds kept)")
    return 0


# -- the parser ---------------------------------------------------------------------------


def add_commands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Register the operator's commands with the CLI's `add(name, help)`."""
    queue = add("queue", "unfinished requests: list, show, retry, drop")
    qsub = queue.add_subparsers(dest="action", required=True)
    ql = qsub.add_parser("list", help="one line per unfinished request (like mailq)")
    ql.add_argument("--state", choices=["queued", "quarantined"])
    ql.add_argument("--account", help="an account's name")
    ql.add_argument("--json", action="store_true")
    ql.set_defaults(command_func=cmd_queue_list)
    qs = qsub.add_parser("show", help="a request, each recipient and its reports")
    qs.add_argument("id", type=int)
    qs.add_argument("--json", action="store_true")
    qs.set_defaults(command_func=cmd_queue_show)
    qr = qsub.add_parser("retry", help="held, deferred or quarantined work due now")
    qr.add_argument("id", type=int, nargs="?")
    qr.add_argument("--all", action="store_true")
    qr.set_defaults(command_func=cmd_queue_retry)
    qd = qsub.add_parser("drop", help="pending recipients get 999 and the Not goes out")
    qd.add_argument("id", type=int)
    qd.set_defaults(command_func=cmd_queue_drop)
    reports = add("reports", "report mails: list, retry, drop")
    rsub = reports.add_subparsers(dest="action", required=True)
    rl = rsub.add_parser("list", help="the latest reports, newest first")
    rl.add_argument("--state", choices=["pending", "sent", "failed", "dropped"])
    rl.add_argument("--limit", type=int, default=100)
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(command_func=cmd_reports_list)
    rr = rsub.add_parser("retry", help="a failed (or dropped) report: pending again, due now")
    rr.add_argument("id", type=int)
    rr.set_defaults(command_func=cmd_reports_retry)
    rd = rsub.add_parser("drop", help="a pending or failed report: never sent")
    rd.add_argument("id", type=int)
    rd.set_defaults(command_func=cmd_reports_drop)
    # `queue list -c FILE` as well as `queue -c FILE list`: SUPPRESS keeps the
    # value parsed before the action when the option is not given after it.
    for action in (ql, qs, qr, qd, rl, rr, rd):
        action.add_argument(
            "-c", "--config", type=Path, default=argparse.SUPPRESS, help="config file"
        )
    purge = add("purge", "finished requests older than store.retention_days lose their rows")
    purge.add_argument("--days", type=float, help="instead of store.retention_days")
    purge.set_defaults(command_func=cmd_purge)
    status = add("status", "the daemon, queue counts, the oldest item, provider errors")
    status.add_argument("--json", action="store_true")
    status.set_defaults(command_func=cmd_status)


def run_command(args: argparse.Namespace, config: Config) -> int:
    """Run the command the parser chose; its errors become one line on stderr."""
    try:
        result: int = args.command_func(args, config)
        return result
    except CommandError as err:
        print(f"mailbridge {args.command}: {err}", file=sys.stderr)
        return 1
