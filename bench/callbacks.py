"""Delivery callbacks: how many mailbridge stores per second, and how long from
a callback to its etatDlr mail (issue 10; docs/performance.md).

    python bench/callbacks.py [--seconds 10] [--connections 20] [--quick]

In one run, on this machine:
1. a bare aiohttp server answering 200 to every GET (bench/servers.py hooks):
   the limit of the HTTP stack itself;
2. the daemon's receiver, `/hooks/<token>/cm`, every callback a new CM status
   report (its own ID, so none is a duplicate): parsed, stored durably
   (store.synchronous: full) and answered 200; the ratio to (1) is the cost of
   doing it for real.
Both are loaded by wrk (Debian's package, C: it leaves the cores to the
servers), with a Lua script that makes every request unique.
3. callback -> etatDlr: single-number emails with <emailDlr>, sent and
   accepted by the CM-compatible gateway; then one CM "delivered" callback
   each, and the time until its etatDlr mail reaches the SMTP sink.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    envoi_mail,
    load,
    machine,
    start_daemon,
    start_report_sink,
    start_server,
    wait_until,
)

TOKEN = "bench-token-" + "0" * 16
WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local path = "{path}?STATUS=2&GSM=0033601020304&REFERENCE=bench&CREATED_S=2026-12-02T09:00:00"
    .. "&ID=" .. counter .. "-" .. math.random(1, 1000000000)
  return wrk.format("GET", path)
end
"""


def wrk(port: int, path: str, seconds: int, connections: int, tmp: Path) -> tuple[float, str]:
    """Requests per second (and the latency line) wrk measured."""
    script = tmp / f"wrk-{secrets.token_hex(3)}.lua"
    script.write_text(WRK_SCRIPT.format(path=path))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), "--latency",
         f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout  # fmt: skip
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out}")
    rps = float(found.group(1))
    p99 = re.search(r"99%\s+(\S+)", out)
    return rps, p99.group(1) if p99 else "?"


def stored_events(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def reference_of(db: Path, email_id: str) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT r.provider_message_id FROM recipients r JOIN requests q ON q.id = r.request_id"
            " WHERE q.email_id = ? AND r.code = 0",
            (email_id,),
        ).fetchone()
    return str(row[0]) if row else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--mails", type=int, default=50, help="emails for the latency part")
    parser.add_argument("--quick", action="store_true", help="2 s, 10 mails (CI smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.mails = 2, 10
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="mb-callbacks-"))
    bare = start_server("hooks")
    provider = start_server("provider")
    sink, arrivals = start_report_sink(tmp)
    daemon = start_daemon(
        tmp / "daemon", provider.port, sink.port, "full",
        http={"listen": "127.0.0.1:0", "token": TOKEN},
    )  # fmt: skip
    db = tmp / "daemon" / "mailbridge.db"
    try:
        bare_rps, bare_p99 = wrk(bare.port, "/hooks/x/cm", args.seconds, args.connections, tmp)
        before = stored_events(db)
        cpu0 = daemon.cpu_s()
        mb_rps, mb_p99 = wrk(
            daemon.http_port, f"/hooks/{TOKEN}/cm", args.seconds, args.connections, tmp
        )
        cpu = daemon.cpu_s() - cpu0
        stored = stored_events(db) - before
        # Latency: one email per number, then its "delivered" callback.
        ids = [f"dlr-{i}-{secrets.token_hex(3)}" for i in range(args.mails)]
        mails = [
            envoi_mail(e, {"num": f"06{20_000_000 + i:08d}", "sms": "Rendez-vous demain 10h",
                           "emailDlr": "dlr@client.test"})
            for i, e in enumerate(ids)
        ]  # fmt: skip
        load(daemon.port, mails, 4, True)
        wait_until(lambda: all(reference_of(db, e) for e in ids), 60, "every SMS accepted")
        latencies = []
        for i, email_id in enumerate(ids):
            query = urlencode({
                "STATUS": "2", "GSM": f"00336{20_000_000 + i:08d}",
                "REFERENCE": reference_of(db, email_id), "ID": f"lat-{i}",
                "CREATED_S": "2026-12-02T09:00:00",
            })  # fmt: skip
            sent = time.time()
            url = f"http://127.0.0.1:{daemon.http_port}/hooks/{TOKEN}/cm?{query}"
            urllib.request.urlopen(url, timeout=10).read()
            subject = f"etatDlr {email_id}"
            wait_until(lambda s=subject: s in arrivals.refresh(), 30, subject)
            latencies.append(arrivals.refresh()[subject] - sent)
    finally:
        for proc in (daemon, bare, provider, sink):
            proc.stop()
    print(f"# callbacks benchmark — {machine()}")
    print(f"wrk: {args.connections} connections, {args.seconds} s each, unique callbacks")
    print(f"bare aiohttp handler        {bare_rps:8.0f} req/s  p99 {bare_p99}")
    print(
        f"mailbridge /hooks/…/cm      {mb_rps:8.0f} req/s  p99 {mb_p99}"
        f"  ratio {mb_rps / bare_rps:.2f}x  ({stored} stored,"
        f" {cpu / max(stored, 1) * 1e6:.0f} µs daemon CPU each)"
    )
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"callback -> etatDlr mail    p50 {statistics.median(latencies) * 1000:.0f} ms"
        f"  p99 {p99 * 1000:.0f} ms  ({len(latencies)} mails)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
