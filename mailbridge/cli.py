"""Command line: `mailbridge serve | check-config | send | status`.

Sets up logging and hands over to the composition root; no business logic.
Both processes of the daemon enter here: `serve`, and the hidden `_worker`
that `serve` starts for its send and report stages (worker.py).
Exit codes: 0 ok, 1 a check failed or the daemon failed, 2 bad configuration
or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import secrets
import smtplib
import sys
import time
from email.message import EmailMessage
from pathlib import Path

from mailbridge import stopsignal
from mailbridge.config import Config, ConfigError, load_config, parse_hostport
from mailbridge.logs import setup_logging
from mailbridge.worker import WORKER_COMMAND

DEFAULT_CONFIG = Path("config.yaml")
CONFIG_ENV = "MAILBRIDGE_CONFIG"  # the config file when -c is not given (export it once)
# The cyclic GC's first generation is collected every 700 new container objects
# by default: with a big request in memory that is every few recipients, and
# the older generations are rescanned ten and a hundred times as often as the
# work needs (a third of the dispatch time of a 100 000-line CSV). Reference
# counting frees nearly all our objects; cycles are collected less often. At
# 100 000 (20 000 before) the GC took ~0.3 s less of the CSV's ~4.5 s; that
# became safe once the provider calls stopped leaving their bodies in cycles
# (providers/http.py): before, the worker's peak RSS on the CSV rose 127 -> 186 MB.
GC_THRESHOLDS = (100_000, 10, 10)


def tune_gc() -> None:
    """Process-wide GC thresholds for the daemon's processes (serve and its worker)."""
    gc.set_threshold(*GC_THRESHOLDS)


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as err:
        print(f"{err.source}: invalid configuration:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from mailbridge.app import Daemon
    from mailbridge.store import StoreUnavailable

    config = _load(args.config)
    setup_logging(config.logging)
    if stopsignal.requested():  # SIGTERM while importing and reading the config
        logging.getLogger("mailbridge").info("stopped before starting (SIGTERM)")
        return 0
    tune_gc()
    try:
        asyncio.run(Daemon(config).serve())
    except (OSError, StoreUnavailable) as err:  # the port is taken, the store is locked...
        logging.getLogger("mailbridge").error("cannot start: %s", err)
        return 1
    finally:
        stopsignal.restore()  # the loop's close gave SIGTERM its default back
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """The worker process (started by `serve`, never by hand): the send and report stages."""
    from mailbridge import worker
    from mailbridge.app import run_worker
    from mailbridge.store import StoreUnavailable

    worker.die_with_parent(args.parent)
    config, owner = worker.read_config()
    if stopsignal.requested():  # the daemon stopped while it was starting us
        return 0
    setup_logging(config.logging)
    tune_gc()
    worker.lower_priority(config.dispatch.process_nice)
    try:
        asyncio.run(run_worker(config, args.wake_fd, owner, args.parent))
    except StoreUnavailable as err:
        logging.getLogger("mailbridge").error("worker: store unavailable: %s", err)
        return 1
    finally:
        stopsignal.restore()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(
        f"{args.config}: OK: {len(config.accounts)} account(s), "
        f"providers {', '.join(config.providers)}, SMTP on {config.smtp.listen}"
    )
    if not args.online:
        return 0
    return asyncio.run(_check_online(config))


async def _check_online(config: Config) -> int:
    import httpx

    from mailbridge.providers import build_provider

    failed = 0
    async with httpx.AsyncClient() as http:
        for name, pc in config.providers.items():
            provider = build_provider(name, pc, http)
            try:
                verdict = await provider.check()
                print(f"provider {name} ({pc.type}): {verdict}")
            except Exception as err:  # every failure is reported, none stops the others
                failed += 1
                print(f"provider {name} ({pc.type}): FAILED: {type(err).__name__}: {err}")
            finally:
                await provider.aclose()
    return 1 if failed else 0


def compose_request(args: argparse.Namespace, config: Config) -> EmailMessage:
    """The <envoi> email `mailbridge send` submits."""
    account = config.accounts[0]
    keyid = args.keyid or account.keyid
    sender = args.sender or (
        account.sender_addresses[0]
        if account.sender_addresses
        else f"mailbridge-send@{account.sender_domains[0]}"
    )
    fields: list[tuple[str, str]] = [("keyid", keyid)]
    numbers = args.num or []
    if len(numbers) == 1 and not args.numbered:
        fields.append(("num", numbers[0]))
    else:
        fields += [(f"num{i}", n) for i, n in enumerate(numbers, start=1)]
    if args.sms is not None:
        fields.append(("sms", args.sms))
    for tag in ("emetteur", "tracker", "smslong"):
        if getattr(args, tag) is not None:
            fields.append((tag, getattr(args, tag)))
    if args.nostop:
        fields.append(("nostop", "1"))
    email_id = args.email_id or f"{int(time.time() * 1000)}{secrets.randbelow(1000):03d}"
    fields.append(("emailId", email_id))
    fields.append(("emailAck", args.ack or sender))
    fields.append(("emailNot", args.not_ or sender))
    body = "<envoi>\n" + "".join(f"<{t}>{_escape(v)}</{t}>\n" for t, v in fields) + "</envoi>\n"
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = args.to or config.smtp.recipients[0]
    msg["Subject"] = f"SMS request {email_id}"
    msg.set_content(body, charset="utf-8")
    for path in (args.mobiles, args.message):
        if path is not None:
            data = Path(path).read_bytes()
            name = "mobiles.csv" if path is args.mobiles else "message.csv"
            msg.add_attachment(data, maintype="text", subtype="csv", filename=name)
    return msg


def _escape(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def cmd_send(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if not args.num and not args.mobiles:
        print("send: give --num (repeatable) or --mobiles FILE", file=sys.stderr)
        return 2
    msg = compose_request(args, config)
    host, port = parse_hostport(args.server or config.smtp.listen)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    try:
        with smtplib.SMTP(host, port, timeout=60) as smtp:
            refused = smtp.send_message(msg)
    except smtplib.SMTPResponseException as err:
        reply = err.smtp_error
        reply_text = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
        print(f"refused: {err.smtp_code} {reply_text}")
        return 1
    except smtplib.SMTPRecipientsRefused as err:
        for rcpt, (code, text) in err.recipients.items():
            print(f"refused: {rcpt}: {code} {text.decode(errors='replace')}")
        return 1
    except OSError as err:
        print(f"cannot reach {host}:{port}: {err}", file=sys.stderr)
        return 1
    if refused:
        print(f"refused recipients: {refused}")
        return 1
    print(f"sent emailId {msg['Subject'].split()[-1]} to {msg['To']} via {host}:{port}")
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    """status, queue, reports, purge: mailbridge/commands.py."""
    from mailbridge.commands import run_command

    return run_command(args, _load(args.config))


def cmd_store_copy(args: argparse.Namespace) -> int:
    """Move to several instances: the SQLite store, copied whole (the daemon stopped)."""
    from mailbridge.store import StoreUnavailable
    from mailbridge.store.copy import copy_store

    config = _load(args.config)
    if config.store.sqlite is None:
        print("store-copy: the configuration's store is not SQLite", file=sys.stderr)
        return 2
    try:
        counts = asyncio.run(copy_store(config.store.sqlite, args.to))
    except StoreUnavailable as err:
        print(f"store-copy: {err}", file=sys.stderr)
        return 1
    for table, n in counts.items():
        print(f"{table}: {n} row(s)")
    print("done: set store.postgresql to this URL (remove store.sqlite) and start the instances")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailbridge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    # The metavar lists the public commands only: `_worker` is not for operators.
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{serve,check-config,send,status,queue,reports,purge,store-copy}",
    )

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "-c", "--config", type=Path, default=Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG),
            help=f"config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
        )  # fmt: skip
        return p

    add("serve", "run the daemon (SIGTERM stops it cleanly)").set_defaults(func=cmd_serve)
    check = add("check-config", "validate the configuration and name every bad key")
    check.add_argument("--online", action="store_true", help="also try each provider's login")
    check.set_defaults(func=cmd_check_config)
    send = add("send", "compose an <envoi> request and submit it over SMTP")
    send.add_argument("--num", action="append", help="a recipient number (repeat for several)")
    send.add_argument("--numbered", action="store_true", help="use <num1> even for one number")
    send.add_argument("--sms", help="the message (Ö is a line break)")
    send.add_argument("--mobiles", help="a mobiles.csv file to attach")
    send.add_argument("--message", help="a message.csv file to attach")
    send.add_argument("--emetteur", help="sender id")
    send.add_argument("--tracker", help="your reference for this send")
    send.add_argument("--smslong", help="maximum SMS parts")
    send.add_argument("--nostop", action="store_true", help="ask for no STOP mention")
    send.add_argument("--email-id", help="emailId (default: a new one)")
    send.add_argument("--ack", help="emailAck address (default: the sender)")
    send.add_argument("--not", dest="not_", help="emailNot address (default: the sender)")
    send.add_argument("--keyid", help="account key (default: the first account's)")
    send.add_argument("--from", dest="sender", help="sender address (default: from the account)")
    send.add_argument("--to", help="intake address (default: the first smtp.recipients)")
    send.add_argument("--server", help="host:port (default: smtp.listen)")
    send.set_defaults(func=cmd_send)
    from mailbridge.commands import add_commands

    def add_operator(name: str, help: str) -> argparse.ArgumentParser:
        p = add(name, help)
        p.set_defaults(func=cmd_operator)
        return p

    add_commands(add_operator)
    copy = add("store-copy", "copy this config's SQLite store into an empty PostgreSQL database")
    copy.add_argument("--to", required=True, help="postgresql://user:password@host/database")
    copy.set_defaults(func=cmd_store_copy)
    # No help= : argparse then leaves it out of --help.
    hidden = sub.add_parser(WORKER_COMMAND)
    hidden.add_argument("parent", type=int, help="the daemon's pid")
    hidden.add_argument("wake_fd", type=int, help="the read end of its wake pipe")
    hidden.set_defaults(func=cmd_worker)
    return parser


class _Version(argparse.Action):
    """--version, its metadata looked up only when asked (not at each start)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"{parser.prog} {package_version()}")
        parser.exit()


def package_version() -> str:
    """The installed distribution's version (its metadata, as pip installed it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mailbridge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from mailbridge import __version__

        return f"{__version__} (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func not in (cmd_serve, cmd_worker):
        stopsignal.release()  # only the daemon's processes hold SIGTERM (__main__)
    result: int = args.func(args)
    return result
