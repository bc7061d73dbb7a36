"""Instructions per mail of the SMTP intake, store aside (callgrind), old against new.

    .venv/bin/python bench/intake_instructions.py --old /work/main
    .venv/bin/python bench/intake_instructions.py --old /work/main --mails 300 --conns 20

The intake of each checkout (IntakeSMTP and IntakeHandler as the daemon
builds them, bench/run.py's account) runs alone in a process under
`valgrind --tool=callgrind`, with a store that answers at once (the store,
its thread and its commit are not the intake's own code); the load comes
from bench/loadgen.py in this process, natively. Each side runs twice, with
N and 3N mails: (I(3N) - I(N)) / 2N is the instruction count per mail without
the start-up, the same on a quiet and on a loaded machine. The bare aiosmtpd
server of bench/servers.py is measured the same way, for the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
from loadgen import run_load  # noqa: E402

HERE = Path(__file__).resolve()


class InstantStore:
    """add_request answered at once; the mail count tells the server when to stop."""

    def __init__(self, mails: int, done: asyncio.Event) -> None:
        self.left = mails
        self.done = done
        self.next_id = 0

    async def add_request(self, request: Any) -> Any:
        from mailbridge.model import Admission

        self.next_id += 1
        self.left -= 1
        if self.left == 0:
            asyncio.get_running_loop().call_later(0.2, self.done.set)  # the 250 goes out first
        return Admission(request_id=self.next_id, ack_code=request.ack_code)


async def serve_intake(mails: int) -> None:
    """The intake of the checkout on sys.path, for `mails` mails, then exit."""
    from mailbridge.app import build_rules
    from mailbridge.cli import GC_THRESHOLDS
    from mailbridge.clock import SystemClock
    from mailbridge.config import parse_config
    from mailbridge.intake import IntakeHandler, smtp_protocol

    gc.set_threshold(*GC_THRESHOLDS)  # as the daemon runs
    tmp = Path(tempfile.mkdtemp(prefix="mb-instr-"))
    data = {  # bench/run.py's daemon: its account, its limits
        "smtp": {"listen": "127.0.0.1:0", "recipients": [bench.INTAKE], "hostname": "bench.test",
                 "max_message_bytes": 20_000_000},
        "store": {"sqlite": str(tmp / "unused.db")},
        "reports": {"from": "mailbridge@bridge.test", "smtp": {"host": "127.0.0.1", "port": 1}},
        "providers": {"cm": {"type": "cm", "url": "http://127.0.0.1:1/v1.0/message",
                             "product_token": "00000000-0000-0000-0000-000000000000"}},
        "accounts": [{"keyid": bench.KEYID, "name": "bench", "sender_domains": ["client.test"],
                      "provider": "cm", "default_sender": "Bench", "commercial": False,
                      "countries": None}],
        "log_level": "WARNING",
    }  # fmt: skip
    config = parse_config(data, base_dir=tmp)
    done = asyncio.Event()
    store = InstantStore(mails, done)
    handler = IntakeHandler(config, build_rules(config), store, SystemClock(), lambda _: None)  # type: ignore[arg-type]
    protocol = smtp_protocol(handler, config.smtp)  # the daemon's listener, TLS off
    loop = asyncio.get_running_loop()

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await done.wait()
    server.close()


def callgrind_total(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def measure(cmd: list[str], env: dict[str, str], mails: int, conns: int, tag: str) -> int:
    """Instructions of the server process `cmd` over `mails` mails (then it exits)."""
    out = Path(tempfile.mkdtemp(prefix="mb-cg-")) / "cg.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        raise RuntimeError(f"{cmd}: no port ({line!r})")
    port = int(line.split()[1])
    msgs, _ = bench.single_mails(mails, tag)
    result = asyncio.run(
        run_load(
            "127.0.0.1", port, msgs, concurrency=conns, reuse=True,
            mail_from=bench.SENDER, rcpt=bench.INTAKE,
        )
    )  # fmt: skip
    if result.errors:
        raise RuntimeError(f"{len(result.errors)} errors, first: {result.errors[0]}")
    if cmd[-1] == "bare":  # bench/servers.py's bare server runs until stopped
        proc.send_signal(signal.SIGINT)  # an orderly exit: callgrind writes its counts
    proc.wait(timeout=600)
    return callgrind_total(out)


def per_mail(cmd: list[str], env: dict[str, str], mails: int, conns: int, tag: str) -> float:
    """(I(3N) - I(N)) / 2N; `{n}` in `cmd` becomes the server's mail count."""

    def run(n: int, suffix: str) -> int:
        return measure([c.replace("{n}", str(n)) for c in cmd], env, n, conns, tag + suffix)

    return (run(3 * mails, "b") - run(mails, "a")) / (2 * mails)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="the old checkout (PYTHONPATH)")
    parser.add_argument("--mails", type=int, default=200)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server side
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(serve_intake(args.serve))
        return 0
    py = sys.executable
    sides: list[tuple[str, list[str], dict[str, str]]] = []
    if args.old is not None:
        env = {**os.environ, "PYTHONPATH": str(args.old.resolve())}
        sides.append(("old", [py, str(HERE), "--serve", "{n}"], env))
    sides.append(("new", [py, str(HERE), "--serve", "{n}"], dict(os.environ)))
    bare_cmd = [py, str(HERE.parent / "servers.py"), "bare"]
    bare = per_mail(bare_cmd, dict(os.environ), args.mails, args.conns, "bare")
    print(f"| server | instructions per mail ({args.conns} conn, reused) | ratio to bare |")
    print("|---|---|---|")
    print(f"| bare aiosmtpd | {bare / 1000:.0f} k | 1.00 |")
    for label, cmd, env in sides:
        value = per_mail(cmd, env, args.mails, args.conns, label)
        print(f"| mailbridge intake, {label} | {value / 1000:.0f} k | {value / bare:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
