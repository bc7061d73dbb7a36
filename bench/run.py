"""mailbridge benchmark: one run, one machine, one load generator.

    .venv/bin/python bench/run.py            # the full run (a few minutes)
    .venv/bin/python bench/run.py --quick    # the CI smoke run (seconds, no thresholds)

Measures, and prints as one Markdown table (also written to --out):
- the limit: a bare aiosmtpd server that only answers 250, and Postfix's
  smtp-sink (C) when installed;
- mailbridge intake: 250s per second for single-recipient <envoi> emails with
  unique emailIds, 1 and 20 connections, new or reused connections; p50/p99
  from the end of DATA to the 250;
- mailbridge end to end: emails per second fully done (provider answered,
  Ack and Not delivered to an SMTP sink), p50/p99 from the 250 to the Not;
- fan-out: 500 numbers with one text, 500 personal texts, a 100 000-line
  mobiles.csv: wall time until the provider has every SMS, HTTP requests,
  daemon CPU, peak RSS of the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import LoadResult, run_load  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KEYID = "bench0000000000000001"
SENDER = "erp@client.test"
INTAKE = "sendsms@bridge.test"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ---------------------------------------------------------------


class Proc:
    """A child process that prints "PORT <n>" (our servers) or is a daemon."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.p = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True, cwd=cwd
        )
        self.port = 0
        self.http_port = 0

    def read_port(self) -> Proc:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{self.p.args!r}: no port ({line!r})")
        self.port = int(line.split()[1])
        return self

    def pids(self) -> list[int]:
        """The process and its children (the daemon's worker process)."""
        pid = self.p.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        return [pid, *map(int, children)]

    def _proc_files(self, name: str) -> list[str]:
        """/proc/<pid>/<name> of the process and each live child."""
        texts = []
        for pid in self.pids():
            try:
                texts.append(Path(f"/proc/{pid}/{name}").read_text())
            except OSError:  # a child that just exited
                continue
        return texts

    def cpu_s(self) -> float:
        """CPU time of the process and its live children."""
        total = 0.0
        for stat in self._proc_files("stat"):
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        return total

    def peak_rss_mb(self) -> float:
        """Sum of the peak RSS of the process and its children (an upper bound of
        their peak together)."""
        return sum(
            int(line.split()[1]) / 1024
            for status in self._proc_files("status")
            for line in status.splitlines()
            if line.startswith("VmHWM:")
        )

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def start_server(kind: str, *extra: str) -> Proc:
    return Proc([sys.executable, str(REPO / "bench" / "servers.py"), kind, *extra]).read_port()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_smtp_sink() -> Proc | None:
    exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not os.path.exists(exe):
        return None
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
    # No -c: its running counter would fill the unread stdout pipe and stall it.
    proc = Proc([exe, *user, f"127.0.0.1:{port}", "256"])
    proc.port = port
    wait_port(port)
    return proc


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_daemon(
    tmp: Path,
    provider_port: int,
    sink_port: int,
    synchronous: str,
    http: dict[str, Any] | None = None,
    store: dict[str, Any] | None = None,
    code: Path | None = None,
    python: str = sys.executable,
) -> Proc:
    """The daemon on the benchmark's peers; with `http`, its receiver too
    (`proc.http_port`); `store`: another store section (PostgreSQL); `code`: a
    checkout whose mailbridge runs instead of this one (the A/B baseline),
    `python`: the interpreter (another checkout's virtualenv)."""
    config: dict[str, Any] = {
        "smtp": {"listen": "127.0.0.1:0", "recipients": [INTAKE], "max_message_bytes": 20_000_000},
        "store": {"sqlite": str(tmp / "mailbridge.db"), "synchronous": synchronous},
        "reports": {
            "from": "mailbridge@bridge.test",
            "smtp": {"host": "127.0.0.1", "port": sink_port},
        },
        "providers": {
            "cm": {
                "type": "cm",
                "url": f"http://127.0.0.1:{provider_port}/v1.0/message",
                "product_token": "00000000-0000-0000-0000-000000000000",
            },
        },
        "accounts": [
            {
                "keyid": KEYID,
                "name": "bench",
                "sender_domains": ["client.test"],
                "provider": "cm",
                "default_sender": "Bench",
                "commercial": False,
                "countries": None,
            }
        ],
        "log_level": "WARNING",
    }
    if http is not None:
        config["http"] = http
    if store is not None:
        config["store"] = store
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    name = f"mailbridge-bench-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": "@" + name}
    # Both processes from the code measured: the worker starts with `python -P`
    # (not from the cwd), so without PYTHONPATH it would run the interpreter's
    # editable install, whichever checkout that is.
    root = code if code is not None else REPO if python == sys.executable else None
    if root is not None:
        env["PYTHONPATH"] = str(root)
    proc = Proc([python, "-m", "mailbridge", "serve", "-c", str(path)], env=env, cwd=code)
    try:
        while "READY=1" not in (data := sock.recv(4096).decode()):
            pass
    finally:
        sock.close()
    # "STATUS=listening on smtp 127.0.0.1:P[; http 127.0.0.1:Q]"
    status = [ln for ln in data.splitlines() if ln.startswith("STATUS=")][0]
    smtp, _, web = status.partition("; http ")
    proc.port = int(smtp.rsplit(":", 1)[1])
    proc.http_port = int(web.rsplit(":", 1)[1]) if web else 0
    return proc


def provider_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as r:
        stats: dict[str, Any] = json.loads(r.read())
        return stats


def provider_reset(port: int) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/reset", data=b"", method="POST")
    urllib.request.urlopen(req, timeout=10).read()


# -- messages ------------------------------------------------------------------


def envoi_mail(
    email_id: str, fields: dict[str, str], attachments: dict[str, bytes] | None = None
) -> bytes:
    body = (
        "<envoi>\n"
        + "".join(
            f"<{k}>{v}</{k}>\n"
            for k, v in {
                "keyid": KEYID,
                **fields,
                "emailId": email_id,
                "emailAck": "ack@client.test",
                "emailNot": "not@client.test",
            }.items()
        )
        + "</envoi>\n"
    )
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, INTAKE, f"sms {email_id}"
    msg.set_content(body)
    for name, data in (attachments or {}).items():
        msg.add_attachment(data, maintype="text", subtype="csv", filename=name)
    return msg.as_bytes()


def single_mails(n: int, tag: str) -> tuple[list[bytes], list[str]]:
    ids = [f"{tag}-{i}-{secrets.token_hex(3)}" for i in range(n)]
    return [
        envoi_mail(e, {"num": f"06{10_000_000 + i % 90_000_000:08d}", "sms": "Votre code: 4821"})
        for i, e in enumerate(ids)
    ], ids


def load(port: int, mails: list[bytes], conns: int, reuse: bool) -> LoadResult:
    result = asyncio.run(
        run_load(
            "127.0.0.1", port, mails, concurrency=conns, reuse=reuse, mail_from=SENDER, rcpt=INTAKE
        )
    )
    if result.errors:
        raise RuntimeError(f"{len(result.errors)} errors, first: {result.errors[0]}")
    return result


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


class SinkLog:
    """The report sink's log, read incrementally: Subject -> first arrival time.

    Incremental so that polling it costs the machine almost nothing while the
    daemon is being measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.arrivals: dict[str, float] = {}

    def refresh(self) -> dict[str, float]:
        if self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self.offset += len(complete)
            for line in complete.decode("latin-1").splitlines():
                t, _, subject = line.partition(" ")
                self.arrivals.setdefault(subject, float(t))
        return self.arrivals

    def has_all(self, subjects: list[str]) -> bool:
        arrivals = self.refresh()
        return all(s in arrivals for s in subjects)


class SinkFile:
    """Postfix smtp-sink's dump file (`-D`: every mail appended to one file),
    read incrementally: Subject -> when this reader first saw it.

    One file rather than smtp-sink's file per mail (`-d`): creating a file per
    mail halved the sink's rate (2 300 vs 4 900 mails/s from 4 connections
    here), so the sink, not the daemon, set the end-to-end rate. The time is
    the read's, so it is late by up to one poll (`wait_until`: 20 ms)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.arrivals: dict[str, float] = {}

    def refresh(self) -> dict[str, float]:
        if not self.path.exists():
            return self.arrivals
        now = time.time()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.split(b"\n"):
            if line.startswith(b"Subject: "):
                self.arrivals.setdefault(line[9:].decode("latin-1").strip(), now)
        return self.arrivals

    def has_all(self, subjects: list[str]) -> bool:
        arrivals = self.refresh()
        return all(s in arrivals for s in subjects)


# Where the reports' arrivals are read: our Python sink's log or smtp-sink's dump.
ReportArrivals = SinkLog | SinkFile


def start_report_sink(tmp: Path) -> tuple[Proc, ReportArrivals]:
    """The SMTP server the daemon's reports go to: Postfix's smtp-sink (C, so
    that the sink's CPU does not weigh on the daemon's), else our Python sink."""
    exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not os.path.exists(exe):
        log = SinkLog(tmp / "sink.log")
        return start_server("sink", "--log", str(log.path)), log
    dump = tmp / "reports"
    dump.mkdir()
    user: list[str] = []
    if os.geteuid() == 0:  # it refuses to run as root: let nobody write the dump
        user = ["-u", "nobody"]
        tmp.chmod(0o755)
        dump.chmod(0o777)
    port = free_port()
    proc = Proc([exe, *user, "-D", f"{dump}/all", f"127.0.0.1:{port}", "256"])
    proc.port = port
    wait_port(port)
    return proc, SinkFile(dump / "all")


# -- the run -------------------------------------------------------------------


@dataclass
class Row:
    what: str
    value: str
    ratio: str = ""
    note: str = ""


def fmt_ms(s: float) -> str:
    return f"{s * 1000:.1f} ms"


def run(
    quick: bool, synchronous: str, baseline: Path | None = None
) -> tuple[list[Row], dict[str, Any]]:
    n = 60 if quick else 2000
    scenarios = [(1, False), (1, True), (20, False), (20, True)]
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="mb-bench-"))
    provider = start_server("provider")
    sink, sink_log = start_report_sink(tmp)
    procs = [provider, sink]
    try:
        limits: dict[tuple[int, bool], float] = {}
        bare = start_server("bare")
        procs.append(bare)
        for conns, reuse in scenarios:
            mails, _ = single_mails(n, "bare")
            r = load(bare.port, mails, conns, reuse)
            limits[(conns, reuse)] = r.rate
            rows.append(
                Row(
                    f"bare aiosmtpd, {conns} conn, {'reused' if reuse else 'new'}",
                    f"{r.rate:.0f} msg/s",
                    "1.00",
                    f"p50 {fmt_ms(r.percentile(50))}, p99 {fmt_ms(r.percentile(99))}",
                )
            )
        bare.stop()
        smtp_sink = start_smtp_sink()
        if smtp_sink is not None:
            procs.append(smtp_sink)
            for conns, reuse in scenarios:
                mails, _ = single_mails(n, "sink")
                r = load(smtp_sink.port, mails, conns, reuse)
                rows.append(
                    Row(
                        f"Postfix smtp-sink, {conns} conn, {'reused' if reuse else 'new'}",
                        f"{r.rate:.0f} msg/s",
                        f"{r.rate / limits[(conns, reuse)]:.2f}",
                        f"p50 {fmt_ms(r.percentile(50))}, p99 {fmt_ms(r.percentile(99))}",
                    )
                )
            smtp_sink.stop()
        else:
            rows.append(Row("Postfix smtp-sink", "not installed", "", "apt-get install postfix"))

        daemon = start_daemon(tmp / "d1", provider.port, sink.port, synchronous)
        procs.append(daemon)
        e2e: LoadResult | None = None
        e2e_ids: list[str] = []
        for conns, reuse in scenarios:
            mails, ids = single_mails(n, f"mb{conns}{int(reuse)}")
            start, cpu0 = time.time(), daemon.cpu_s()
            r = load(daemon.port, mails, conns, reuse)
            ratio = r.rate / limits[(conns, reuse)]
            raw[f"intake_{conns}_{reuse}"] = {
                "rate": r.rate,
                "p50": r.percentile(50),
                "p99": r.percentile(99),
            }
            rows.append(
                Row(
                    f"mailbridge intake, {conns} conn, {'reused' if reuse else 'new'}",
                    f"{r.rate:.0f} msg/s",
                    f"{ratio:.2f}",
                    f"p50 {fmt_ms(r.percentile(50))}, p99 {fmt_ms(r.percentile(99))}",
                )
            )
            if (conns, reuse) == (20, True):
                e2e, e2e_ids, e2e_start = r, ids, start
            # Let the pipeline drain before the next intake scenario.
            wait_until(
                lambda ids=ids: sink_log.has_all([f"etatNot {e}" for e in ids]),
                600,
                "the Nots of an intake scenario",
            )
            if (conns, reuse) == (20, True):
                e2e_cpu = (daemon.cpu_s() - cpu0) / n
        assert e2e is not None
        arrivals = sink_log.refresh()
        nots = [arrivals[f"etatNot {e}"] for e in e2e_ids]
        latencies = sorted(arrivals[f"etatNot {e}"] - e2e.done_at[i] for i, e in enumerate(e2e_ids))
        e2e_rate = len(e2e_ids) / (max(nots) - e2e_start)
        raw["e2e"] = {
            "rate": e2e_rate,
            "p50": latencies[len(latencies) // 2],
            "p99": latencies[int(0.99 * (len(latencies) - 1))],
            "cpu_per_email": e2e_cpu,
        }
        rows.append(
            Row(
                "mailbridge end to end (20 conn, reused)",
                f"{e2e_rate:.0f} emails/s",
                f"{e2e_rate / limits[(20, True)]:.2f}",
                f"250→Not p50 {fmt_ms(raw['e2e']['p50'])}, p99 {fmt_ms(raw['e2e']['p99'])},"
                f" daemon CPU {e2e_cpu * 1e6:.0f} µs per email",
            )
        )

        rows += fan_out_rows(
            tmp, daemon, provider, sink_log, sink.port, synchronous, quick, baseline, raw
        )
        daemon.stop()
        rows += callback_rows(tmp, provider.port, sink.port, quick, raw)
        rows += smpp_rows(tmp, sink.port, quick, raw)
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, raw


@dataclass
class FanOut:
    """One side's measurements of one fan-out mail, over its runs."""

    walls: list[float]
    cpus: list[float]
    requests: list[int]
    rss: float = 0.0

    def wall(self) -> float:
        return sorted(self.walls)[len(self.walls) // 2]

    def cpu(self) -> float:
        return sum(self.cpus) / len(self.cpus)


def fan_out_once(
    daemon: Proc,
    provider: Proc,
    sink: ReportArrivals,
    fields: dict[str, str],
    attachments: dict[str, bytes] | None,
    expected: int,
    into: FanOut,
) -> None:
    """One mail alone: wall time until the provider has every SMS, its requests,
    and the daemon's CPU until the mail's Not reaches the sink (all of its work)."""
    email_id = secrets.token_hex(6)
    mail = envoi_mail(email_id, fields, attachments)
    provider_reset(provider.port)
    cpu0 = daemon.cpu_s()
    start = time.time()
    load(daemon.port, [mail], 1, False)
    wait_until(lambda: provider_stats(provider.port)["messages"] >= expected, 600, "fan-out")
    stats = provider_stats(provider.port)
    into.walls.append(stats["last"] - start)
    into.requests.append(stats["requests"])
    wait_until(lambda: sink.has_all([f"etatNot {email_id}"]), 600, "the fan-out's Not")
    into.cpus.append(daemon.cpu_s() - cpu0)
    into.rss = max(into.rss, daemon.peak_rss_mb())


def fan_out_rows(
    tmp: Path,
    daemon: Proc,
    provider: Proc,
    sink: ReportArrivals,
    sink_port: int,
    synchronous: str,
    quick: bool,
    baseline: Path | None,
    raw: dict[str, Any],
) -> list[Row]:
    """The fan-out mails, each alone; with `baseline`, the same mails on a daemon
    of that checkout, alternating with this one's (A/B in one run)."""
    rows: list[Row] = []
    numbers = [f"06{10_000_000 + i:08d}" for i in range(500)]
    same = {f"num{i + 1}": num for i, num in enumerate(numbers)} | {"sms": "Promo -10% ce week-end"}
    personal = {f"num{i + 1}": num for i, num in enumerate(numbers)} | {
        f"sms{i + 1}": f"Bonjour client {i}, votre code est {1000 + i}" for i in range(500)
    }
    sides = {"this": daemon}
    if baseline is not None:
        sides["baseline"] = start_daemon(
            tmp / "b1", provider.port, sink_port, synchronous, code=baseline
        )
    try:
        for label, fields in (
            ("500 numbers, one text", same),
            ("500 numbers, personal texts", personal),
        ):
            found = {side: FanOut([], [], []) for side in sides}
            for _ in range(3 if quick else 10):
                for side, proc in sides.items():
                    fan_out_once(proc, provider, sink, fields, None, 500, found[side])
            rows += fan_out_report(label, found, 500, raw)
    finally:
        if "baseline" in sides:
            sides["baseline"].stop()

    # A fresh daemon per run so that its peak RSS is the CSV's.
    csv_lines = 2_000 if quick else 100_000
    mobiles = "".join(f"06{10_000_000 + i:08d};;client {i}\n" for i in range(csv_lines)).encode()
    attachments = {"mobiles.csv": mobiles, "message.csv": b"Bonjour [1], votre colis arrive demain"}
    found = {side: FanOut([], [], []) for side in sides}
    for round_ in range(1 if quick or baseline is None else 2):
        for side in sides:
            fresh = start_daemon(
                tmp / f"csv-{side}-{round_}", provider.port, sink_port, synchronous,
                code=baseline if side == "baseline" else None,
            )  # fmt: skip
            try:
                fan_out_once(fresh, provider, sink, {}, attachments, csv_lines, found[side])
            finally:
                fresh.stop()
    rows += fan_out_report(f"mobiles.csv of {csv_lines} lines", found, csv_lines, raw)
    return rows


def fan_out_report(
    label: str, found: dict[str, FanOut], recipients: int, raw: dict[str, Any]
) -> list[Row]:
    rows = []
    this = found["this"]
    for side, f in found.items():
        per = f.cpu() / recipients * 1e6
        key = label if side == "this" else f"{label} (baseline)"
        raw[key] = {
            "wall": f.wall(), "requests": max(f.requests), "cpu": f.cpu(),
            "cpu_us_per_recipient": per, "rss": f.rss, "runs": len(f.walls),
        }  # fmt: skip
        runs = f", median of {len(f.walls)} runs" if len(f.walls) > 1 else ""
        rows.append(
            Row(
                f"fan-out: {label}" + (" — baseline" if side == "baseline" else ""),
                f"{f.wall() * 1000:.0f} ms",
                f"{this.cpu() / f.cpu():.2f} of baseline CPU" if side == "baseline" else "",
                f"{max(f.requests)} HTTP request(s), daemon CPU {f.cpu() * 1000:.0f} ms"
                f" ({per:.0f} µs per recipient){runs}, peak RSS {f.rss:.0f} MB",
            )
        )
    return rows


def callback_rows(
    tmp: Path, provider_port: int, sink_port: int, quick: bool, raw: dict[str, Any]
) -> list[Row]:
    """Delivery callbacks stored per second (bench/callbacks.py's wrk part): a bare
    aiohttp handler, then the daemon's receiver storing each durably."""
    if shutil.which("wrk") is None:
        return [Row("delivery callbacks", "wrk not installed", "", "apt-get install wrk")]
    import callbacks  # the same measure bench/callbacks.py prints

    seconds = 2 if quick else 10
    bare = start_server("hooks")
    try:
        bare_rps, bare_p99 = callbacks.wrk(bare.port, "/hooks/x/cm", seconds, 20, tmp)
    finally:
        bare.stop()
    daemon = start_daemon(
        tmp / "cb", provider_port, sink_port, "full",
        http={"listen": "127.0.0.1:0", "token": callbacks.TOKEN},
    )  # fmt: skip
    try:
        before = callbacks.stored_events(tmp / "cb" / "mailbridge.db")
        cpu0 = daemon.cpu_s()
        rps, p99 = callbacks.wrk(daemon.http_port, f"/hooks/{callbacks.TOKEN}/cm", seconds, 20, tmp)
        cpu = daemon.cpu_s() - cpu0
        stored = callbacks.stored_events(tmp / "cb" / "mailbridge.db") - before
    finally:
        daemon.stop()
    raw["callbacks"] = {"bare": bare_rps, "rate": rps, "stored": stored, "cpu": cpu}
    return [
        Row(
            "bare aiohttp handler, 20 conn (wrk)",
            f"{bare_rps:.0f} req/s",
            "1.00",
            f"p99 {bare_p99}",
        ),
        Row(
            "mailbridge delivery callbacks stored, 20 conn (wrk)",
            f"{rps:.0f} req/s",
            f"{rps / bare_rps:.2f} of bare aiohttp",
            f"p99 {p99}, {stored} stored, {cpu / max(stored, 1) * 1e6:.0f} µs daemon CPU each",
        ),
    ]


def smpp_rows(tmp: Path, sink_port: int, quick: bool, raw: dict[str, Any]) -> list[Row]:
    """SMPP parts per second at window 10 (bench/smpp.py's measure) against the
    SMSC peer's own limit (a bare client at the same window, bench/smsc_limit.py),
    with the SMSC on loopback and answering after 5 ms."""
    import smpp  # bench/smpp.py

    if shutil.which("node") is None or not (REPO / "tests/smsc/node_modules/smpp").exists():
        return [Row("SMPP", "node-smpp not installed", "", "cd tests/smsc && npm ci")]
    parts = 100 if quick else 2000
    rows = []
    for delay in (0, 5):
        limit = smpp.Smsc(tmp / f"limit-{delay}.jsonl")
        try:
            limit.call("delay", ms=delay)
            out = subprocess.run(
                [sys.executable, str(REPO / "bench" / "smsc_limit.py"), str(limit.port),
                 smpp.SYSTEM_ID, smpp.PASSWORD, str(parts), "10"],
                capture_output=True, text=True, timeout=600, check=True,
            ).stdout  # fmt: skip
            peer = float(json.loads(out)["parts_per_s"])
        finally:
            limit.stop()
        r = smpp.run_one(tmp, 10, delay, parts, sink_port)
        raw[f"smpp_{delay}ms"] = {"peer": peer, **r}
        rows.append(
            Row(
                f"SMSC peer (node-smpp), bare client, window 10, answers after {delay} ms",
                f"{peer:.0f} parts/s",
                "1.00",
                f"{parts} one-part submit_sm",
            )
        )
        rows.append(
            Row(
                f"mailbridge SMPP, window 10, answers after {delay} ms",
                f"{r['parts_per_s']:.0f} parts/s",
                f"{r['parts_per_s'] / peer:.2f} of the peer's limit",
                f"daemon CPU {r['cpu_us_per_part']:.0f} µs per part,"
                f" max outstanding {r['max_outstanding']}",
            )
        )
    return rows


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def checkout(commit: str, where: Path) -> Path:
    """The tree of `commit` (git archive) under `where`: the baseline's code."""
    tree = where / "tree"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", commit], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    return (
        f"{os.cpu_count()} cores ({cpu}), {int(mem) // 1024 // 1024} GiB, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run: small counts")
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument(
        "--baseline",
        metavar="COMMIT",
        help="also run the fan-out mails on a daemon of this commit, alternating (A/B)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mb-baseline-") as where:
        baseline = checkout(args.baseline, Path(where)) if args.baseline else None
        rows, raw = run(args.quick, args.synchronous, baseline)
    commit = git("rev-parse", "--short", "HEAD")
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "-uno") else ""
    lines = [
        f"Machine: {machine()}",
        f"Commit: {commit}{dirty}"
        + (f"; baseline {git('rev-parse', '--short', args.baseline)}" if args.baseline else ""),
        f"Store: SQLite WAL, synchronous={args.synchronous}",
        "",
        "| measure | result | ratio to bare aiosmtpd | details |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.what} | {r.value} | {r.ratio} | {r.note} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
