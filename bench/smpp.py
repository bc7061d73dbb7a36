"""SMPP: message parts per second the daemon submits to an SMSC, by window, and
the daemon's CPU per part (issue 12; docs/performance.md).

    python bench/smpp.py [--parts 2000] [--delay-ms 0,5] [--windows 1,10,50] [--quick]

The SMSC is the test peer (tests/smsc/smsc.js, node-smpp; `npm ci` in
tests/smsc first). For each response delay (0: loopback, as fast as node
answers; 5 ms: an SMSC a few milliseconds away, where the window matters) and
each window, a fresh daemon (one bind, `throughput: 0`, reports to an SMTP
sink) gets emails of 500 numbers with a one-part text until `--parts` parts;
measured:
- parts/s: submit_sm the SMSC received, first to last (its clock);
- CPU per part: the daemon's CPU (both processes: intake, store, dispatch,
  binds) from the first email until the last submit_sm_resp, divided by the
  parts.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    INTAKE,
    KEYID,
    Proc,
    envoi_mail,
    load,
    machine,
    start_report_sink,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
SMSC = REPO / "tests" / "smsc" / "smsc.js"
SYSTEM_ID, PASSWORD = "bench", "bench123"


class Smsc:
    """smsc.js on ephemeral ports, steered over its control port."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.p = subprocess.Popen(
            ["node", str(SMSC), "--record", str(record), "--system-id", SYSTEM_ID,
             "--password", PASSWORD],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.p.stdout is not None
        ports = json.loads(self.p.stdout.readline())
        self.port, self.control = int(ports["smpp"]), int(ports["control"])

    def call(self, path: str, **query: Any) -> dict[str, Any]:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.control}/{path}?{qs}",
            method="GET" if path == "state" else "POST",
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def received(self) -> list[int]:
        with open(self.record, encoding="utf-8") as f:
            return sorted(e["received"] for e in map(json.loads, f) if e["kind"] == "submit")

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(timeout=30)


def smpp_daemon(tmp: Path, smsc: Smsc, sink_port: int, window: int) -> Proc:
    """The daemon (as bench/run.py starts it), its provider one SMPP bind."""
    home = tmp / f"daemon-{secrets.token_hex(4)}"
    home.mkdir()
    config: dict[str, Any] = {
        "smtp": {"listen": "127.0.0.1:0", "recipients": [INTAKE], "max_message_bytes": 20_000_000},
        "store": {"sqlite": str(home / "mailbridge.db"), "synchronous": "full"},
        "reports": {"from": "mailbridge@bridge.test",
                    "smtp": {"host": "127.0.0.1", "port": sink_port}},
        "providers": {
            "smsc": {"type": "smpp", "host": "127.0.0.1", "port": smsc.port,
                     "system_id": SYSTEM_ID, "password": PASSWORD, "window": window,
                     "throughput": 0, "binds": 1},
        },
        "accounts": [{"keyid": KEYID, "name": "bench", "sender_domains": ["client.test"],
                      "provider": "smsc", "default_sender": "Bench", "commercial": False,
                      "countries": None}],
        "log_level": "WARNING",
    }  # fmt: skip
    path = home / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    name = f"mailbridge-bench-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": "@" + name}
    proc = Proc([sys.executable, "-m", "mailbridge", "serve", "-c", str(path)], env=env)
    try:
        while "READY=1" not in (data := sock.recv(4096).decode()):
            pass
    finally:
        sock.close()
    status = [ln for ln in data.splitlines() if ln.startswith("STATUS=")][0]
    proc.port = int(status.partition("; http ")[0].rsplit(":", 1)[1])
    return proc


def run_one(tmp: Path, window: int, delay_ms: int, parts: int, sink_port: int) -> dict[str, Any]:
    smsc = Smsc(tmp / f"smsc-{window}-{delay_ms}.jsonl")
    try:
        smsc.call("delay", ms=delay_ms)
        proc = smpp_daemon(tmp, smsc, sink_port, window)
        try:
            wait_until(lambda: smsc.call("state")["bound"] == 1, 30, "the bind")
            mails, n = [], 0
            while n < parts:
                count = min(500, parts - n)
                numbers = {f"num{i + 1}": f"06{(n + i) % 100_000_000:08d}" for i in range(count)}
                mails.append(envoi_mail(secrets.token_hex(8), {**numbers, "sms": "Bench SMPP"}))
                n += count
            cpu0 = proc.cpu_s()
            started = time.monotonic()
            load(proc.port, mails, conns=1, reuse=True)
            wait_until(lambda: smsc.call("state")["answered"] >= parts, 600, f"{parts} parts")
            wall = time.monotonic() - started
            cpu = proc.cpu_s() - cpu0
        finally:
            proc.stop()
        times = smsc.received()
        span = max(1, times[-1] - times[0]) / 1000
        return {
            "window": window, "delay_ms": delay_ms, "parts": len(times),
            "parts_per_s": (len(times) - 1) / span, "wall_s": wall,
            "cpu_us_per_part": cpu / parts * 1e6, "max_outstanding":
            smsc.call("state")["max_outstanding"],
        }  # fmt: skip
    finally:
        smsc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", type=int, default=2000)
    parser.add_argument("--windows", default="1,10,50")
    parser.add_argument("--delay-ms", default="0,5")
    parser.add_argument("--quick", action="store_true", help="the CI smoke run (seconds)")
    args = parser.parse_args()
    if args.quick:
        args.parts, args.windows, args.delay_ms = 100, "1,10", "0"
    windows = [int(w) for w in args.windows.split(",")]
    delays = [int(d) for d in args.delay_ms.split(",")]
    with tempfile.TemporaryDirectory(prefix="mailbridge-bench-smpp-") as name:
        tmp = Path(name)
        sink, _ = start_report_sink(tmp)
        try:
            rows = [run_one(tmp, w, d, args.parts, sink.port) for d in delays for w in windows]
        finally:
            sink.stop()
    print(f"SMPP submit, {args.parts} one-part SMS per run, 1 bind, throughput unlimited;")
    print(f"{machine()}; keyid {KEYID[:6]}…, intake {INTAKE}")
    print()
    print("| SMSC answers after | window | parts/s | daemon CPU per part | max outstanding |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['delay_ms']} ms | {r['window']} | {r['parts_per_s']:.0f} |"
            f" {r['cpu_us_per_part']:.0f} µs | {r['max_outstanding']} |"
        )


if __name__ == "__main__":
    main()
