"""Soak: does the whole pipeline stay flat as the work done grows? (issue 13, item 4)

    .venv/bin/python bench/soak.py                          # 10 000 emails of 100, both backends
    .venv/bin/python bench/soak.py --backend sqlite --emails 2000
    .venv/bin/python bench/soak.py --quick                  # a smoke run (seconds)

The real daemon (SMTP intake and its worker process) takes `<envoi>` emails
of `--per` numbers (num1..numN, one text, unique emailIds), sends every SMS
to the CM-compatible gateway (bench/servers.py provider) and every Ack and
Not to Postfix's smtp-sink; on SQLite (`synchronous: full`) and on a
throwaway PostgreSQL cluster (fsync on). The load is a closed loop: at most
`--window` emails are between their `250` and their Not, so the rate is the
pipeline's, not the intake's alone, and the store holds what was done, not a
growing backlog.

Printed per tenth of the run (by Nots delivered): emails and recipients done
per second (Nots at the sink, SMS at the provider), the intake's 250s per
second of sending and its p99, the daemon's CPU per email (the figure that
noise moves least), the RSS of each daemon process (max of its samples in the
tenth) and the store's size on disk; then VmHWM of both processes, and the
store's size per million recipients before and after `mailbridge purge
--days 0`. Flat: the last tenth's rate within 10 % of the first's, RSS not
growing with the work done.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from run import (  # noqa: E402
    CLK_TCK,
    Proc,
    ReportArrivals,
    envoi_mail,
    load,
    machine,
    provider_stats,
    start_daemon,
    start_report_sink,
    start_server,
)

TEXT = "Votre colis 4821 arrive demain entre 9h et 12h. STOP 36111"
SAMPLE_EVERY_S = 1.0
CHUNK = 50  # emails per load call (4 reused connections)
CONNECTIONS = 4


@dataclass(kw_only=True)
class Sample:
    """One look at the run: time, work done, the daemon's CPU, RSS and store size."""

    at: float
    accepted: int
    nots: int
    sms: int
    cpu_s: float
    rss_intake_mb: float
    rss_worker_mb: float
    store_bytes: int
    # PostgreSQL's own (0 on SQLite): its processes' CPU, WAL written, checkpoints
    server_cpu_s: float = 0.0
    wal_bytes: float = 0.0
    checkpoints: float = 0.0


@dataclass(kw_only=True)
class SoakResult:
    backend: str
    emails: int
    per: int
    started: float
    finished: float
    samples: list[Sample]
    not_times: list[float]  # arrival of each Not, sorted
    accept_times: list[float]  # each 250, sorted
    intake_p99_s: list[float]  # per tenth
    intake_rate: list[float]  # 250s per second of sending, per tenth
    hwm_intake_mb: float
    hwm_worker_mb: float
    empty_bytes: int
    full_bytes: int
    purged_bytes: int
    purged: int
    extra: dict[str, Any] = field(default_factory=dict)


def soak_mails(emails: int, per: int, tag: str) -> list[bytes]:
    """`emails` <envoi> mails of `per` distinct numbers each, one text."""
    mails = []
    for e in range(emails):
        fields = {
            f"num{i + 1}": f"06{10_000_000 + (e * per + i) % 90_000_000:08d}" for i in range(per)
        }
        fields["sms"] = TEXT
        mails.append(envoi_mail(f"{tag}-{e}-{secrets.token_hex(3)}", fields))
    return mails


def vm_kb(pid: int, key: str) -> float:
    """VmRSS or VmHWM of a process, in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def worker_pid(daemon: Proc) -> int:
    pids = daemon.pids()
    if len(pids) < 2:
        raise RuntimeError("the daemon has no worker process (dispatch.separate_process?)")
    return pids[1]


class StoreSize:
    """The store's size: on disk while running (SQLite file + WAL, PostgreSQL's
    database), and the bytes its rows take (pages in use, size after VACUUM FULL)."""

    def __init__(self, *, sqlite_path: Path | None = None, dsn: str | None = None) -> None:
        self.sqlite_path = sqlite_path
        self.dsn = dsn

    def on_disk(self) -> int:
        if self.sqlite_path is not None:
            total = 0
            for suffix in ("", "-wal"):
                try:
                    total += os.path.getsize(str(self.sqlite_path) + suffix)
                except OSError:
                    pass
            return total
        return self._pg("SELECT pg_database_size(current_database())")

    def used(self) -> int:
        if self.sqlite_path is not None:
            with sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True) as conn:
                one = conn.execute
                pages = int(one("PRAGMA page_count").fetchone()[0])
                free = int(one("PRAGMA freelist_count").fetchone()[0])
                return (pages - free) * int(one("PRAGMA page_size").fetchone()[0])
        # VACUUM FULL: the rows compacted, as SQLite's pages in use (a plain VACUUM
        # frees dead rows' space for reuse but keeps the files' size).
        return self._pg("VACUUM FULL", "SELECT pg_database_size(current_database())")

    def _pg(self, *statements: str) -> int:
        import psycopg

        assert self.dsn is not None
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for sql in statements[:-1]:
                conn.execute(sql)
            row: Any = conn.execute(statements[-1]).fetchone()
        return int(row[0])


class ServerProbe:
    """PostgreSQL's side of a sample (where the time goes when the daemon's does
    not grow), read over one open connection (a new one per sample would
    fork a backend each second)."""

    def __init__(self, dsn: str, postmaster_pid: int) -> None:
        import psycopg

        self.pid = postmaster_pid
        self.conn = psycopg.connect(dsn, autocommit=True)

    def read(self) -> dict[str, float]:
        """Sample fields: server_cpu_s (exited backends included), wal_bytes, checkpoints."""
        stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = sum(int(v) for v in stat[11:15])  # utime stime cutime cstime: waited children
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            children = []
        for child in children:
            try:
                fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited between the two reads: counted in cutime next time
            ticks += int(fields[11]) + int(fields[12])
        row: Any = self.conn.execute(
            "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn,"
            " (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter)"
        ).fetchone()
        return {"server_cpu_s": ticks / CLK_TCK, "wal_bytes": row[0], "checkpoints": row[1]}

    def close(self) -> None:
        self.conn.close()


def purge_all(config: Path) -> int:
    """`mailbridge purge --days 0`, as an operator runs it; how many were purged."""
    out = subprocess.run(
        [sys.executable, "-m", "mailbridge", "purge", "--days", "0", "-c", str(config)],
        capture_output=True, text=True, timeout=1800, check=True,
    ).stdout  # fmt: skip
    return int(out.split()[0])


def count_nots(sink: ReportArrivals) -> dict[str, float]:
    return {s: t for s, t in sink.refresh().items() if s.startswith("etatNot ")}


def soak(
    backend: str, *, emails: int, per: int, window: int, tmp: Path, provider: Proc,
    sink: Proc, arrivals: ReportArrivals, dsn: str | None, server: ServerProbe | None = None,
) -> SoakResult:  # fmt: skip
    """One backend's run (see the module docstring)."""
    directory = tmp / f"{backend}-{secrets.token_hex(2)}"
    store = {"postgresql": dsn} if dsn else None
    daemon = start_daemon(directory, provider.port, sink.port, "full", store=store)
    size = StoreSize(sqlite_path=None if dsn else directory / "mailbridge.db", dsn=dsn)
    mails = soak_mails(emails, per, f"soak-{backend}")
    sms0 = int(provider_stats(provider.port)["messages"])
    nots0 = len(count_nots(arrivals))
    try:
        worker = worker_pid(daemon)
        empty = size.used()
        samples: list[Sample] = []
        accept_times: list[float] = []
        latencies: list[tuple[float, float]] = []  # (time of the 250, end of DATA -> 250)
        sending_s: list[tuple[float, float, int]] = []  # (end, seconds, emails) per load call
        sent = 0
        started = time.time()
        last_sample = 0.0
        done = 0
        while done < emails:
            now = time.time()
            if now - last_sample >= SAMPLE_EVERY_S:
                samples.append(
                    Sample(
                        at=now, accepted=sent, nots=done,
                        sms=int(provider_stats(provider.port)["messages"]) - sms0,
                        cpu_s=daemon.cpu_s(), rss_intake_mb=vm_kb(daemon.p.pid, "VmRSS"),
                        rss_worker_mb=vm_kb(worker, "VmRSS"), store_bytes=size.on_disk(),
                        **(server.read() if server else {}),
                    )
                )  # fmt: skip
                last_sample = now
            if sent < emails and sent - done <= window - CHUNK:
                chunk = mails[sent : sent + CHUNK]
                t0 = time.perf_counter()
                result = load(daemon.port, chunk, CONNECTIONS, True)
                sending_s.append((time.time(), time.perf_counter() - t0, len(chunk)))
                accept_times += result.done_at.values()
                latencies += zip(result.done_at.values(), result.latencies_s, strict=False)
                sent += len(chunk)
            else:
                time.sleep(0.05)
            done = len(count_nots(arrivals)) - nots0
            if daemon.p.poll() is not None:
                raise RuntimeError(f"the daemon exited ({daemon.p.returncode})")
        finished = time.time()
        while provider_stats(provider.port)["messages"] - sms0 < emails * per:
            time.sleep(0.05)
        samples.append(
            Sample(
                at=finished, accepted=sent, nots=done, sms=emails * per, cpu_s=daemon.cpu_s(),
                rss_intake_mb=vm_kb(daemon.p.pid, "VmRSS"), rss_worker_mb=vm_kb(worker, "VmRSS"),
                store_bytes=size.on_disk(), **(server.read() if server else {}),
            )
        )  # fmt: skip
        hwm_intake, hwm_worker = vm_kb(daemon.p.pid, "VmHWM"), vm_kb(worker, "VmHWM")
        full = size.used()
        purged = purge_all(directory / "config.yaml")
        after = size.used()
    finally:
        daemon.stop()
    nots = sorted(t for s, t in count_nots(arrivals).items() if s.startswith("etatNot soak-"))
    nots = [t for t in nots if t >= started][:emails]
    tenths = tenth_edges(started, accept_times)
    return SoakResult(
        backend=backend, emails=emails, per=per, started=started, finished=finished,
        samples=samples, not_times=nots, accept_times=sorted(accept_times),
        intake_p99_s=[p99([lat for at, lat in latencies if a <= at < b]) for a, b in tenths],
        intake_rate=[sending_rate(sending_s, a, b) for a, b in tenths],
        hwm_intake_mb=hwm_intake, hwm_worker_mb=hwm_worker,
        empty_bytes=empty, full_bytes=full, purged_bytes=after, purged=purged,
    )  # fmt: skip


def tenth_edges(started: float, times: list[float]) -> list[tuple[float, float]]:
    """[start, end) of each tenth of `times` (sorted event times)."""
    ordered = sorted(times)
    n = len(ordered)
    edges = [started] + [ordered[min(n - 1, (k * n) // 10 - 1)] for k in range(1, 11)]
    edges[-1] += 1e-6
    return list(zip(edges, edges[1:], strict=False))


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def sending_rate(calls: list[tuple[float, float, int]], a: float, b: float) -> float:
    """250s per second spent sending, over the load calls that ended in [a, b)."""
    inside = [(s, n) for end, s, n in calls if a <= end < b]
    seconds = sum(s for s, _ in inside)
    return sum(n for _, n in inside) / seconds if seconds else float("nan")


def interpolate(samples: list[Sample], nots: float, attr: str) -> float:
    """The value of `attr` when `nots` Nots had arrived (linear between samples)."""
    prev = samples[0]
    for s in samples:
        if s.nots >= nots:
            if s.nots == prev.nots:
                return float(getattr(s, attr))
            f = (nots - prev.nots) / (s.nots - prev.nots)
            return float(getattr(prev, attr)) + f * (
                float(getattr(s, attr)) - float(getattr(prev, attr))
            )
        prev = s
    return float(getattr(samples[-1], attr))


def time_at(samples: list[Sample], value: float, attr: str) -> float:
    """When `attr` (a count that only grows) reached `value` (linear between samples)."""
    prev = samples[0]
    for s in samples:
        if getattr(s, attr) >= value:
            if getattr(s, attr) == getattr(prev, attr):
                return s.at
            f = (value - getattr(prev, attr)) / (getattr(s, attr) - getattr(prev, attr))
            return float(prev.at + f * (s.at - prev.at))
        prev = s
    return samples[-1].at


@dataclass(kw_only=True)
class Tenth:
    emails_s: float
    sms_s: float
    intake_s: float
    intake_p99_ms: float
    cpu_ms_per_email: float
    rss_intake_mb: float
    rss_worker_mb: float
    store_mb: float
    # PostgreSQL's own, per email of the tenth (0 on SQLite)
    server_cpu_ms_per_email: float = 0.0
    wal_kb_per_email: float = 0.0
    checkpoints: int = 0


def tenths(r: SoakResult) -> list[Tenth]:
    """Per tenth of the Nots; from the first Not (the pipeline's fill before it,
    the window's first emails in flight, is not a rate of the store's size)."""
    out = []
    step = r.emails / 10
    times = [r.not_times[0]] + [
        r.not_times[min(len(r.not_times) - 1, int((k + 1) * step) - 1)] for k in range(10)
    ]
    for k in range(10):
        lo, hi = max(1.0, k * step), (k + 1) * step
        inside = [s for s in r.samples if lo <= s.nots <= hi] or [r.samples[-1]]
        sms_lo = time_at(r.samples, lo * r.per, "sms")
        sms_hi = time_at(r.samples, hi * r.per, "sms")
        cpu = interpolate(r.samples, hi, "cpu_s") - interpolate(r.samples, lo, "cpu_s")

        server = {
            attr: interpolate(r.samples, hi, attr) - interpolate(r.samples, lo, attr)
            for attr in ("server_cpu_s", "wal_bytes", "checkpoints")
        }
        out.append(
            Tenth(
                emails_s=(hi - lo) / max(times[k + 1] - times[k], 1e-9),
                sms_s=(hi - lo) * r.per / max(sms_hi - sms_lo, 1e-9),
                intake_s=r.intake_rate[k],
                intake_p99_ms=r.intake_p99_s[k] * 1000,
                cpu_ms_per_email=cpu / (hi - lo) * 1000,
                rss_intake_mb=max(s.rss_intake_mb for s in inside),
                rss_worker_mb=max(s.rss_worker_mb for s in inside),
                store_mb=max(s.store_bytes for s in inside) / 2**20,
                server_cpu_ms_per_email=server["server_cpu_s"] / (hi - lo) * 1000,
                wal_kb_per_email=server["wal_bytes"] / (hi - lo) / 1024,
                checkpoints=round(server["checkpoints"]),
            )  # fmt: skip
        )
    return out


def server_line(first: Tenth, last: Tenth, rows: list[Tenth]) -> str:
    """The whole machine's work per email (daemon and PostgreSQL), first and last tenth."""
    a = first.cpu_ms_per_email + first.server_cpu_ms_per_email
    b = last.cpu_ms_per_email + last.server_cpu_ms_per_email
    return (
        f"- daemon + PostgreSQL CPU per email, first/last tenth: {a:.1f} / {b:.1f} ms"
        f" ({b / a - 1:+.0%}); WAL {first.wal_kb_per_email:.0f} /"
        f" {last.wal_kb_per_email:.0f} KiB per email;"
        f" {sum(t.checkpoints for t in rows)} checkpoints in the run"
    )


def report(r: SoakResult) -> str:
    rows = tenths(r)
    per_m = 1_000_000 / (r.emails * r.per)
    mib = 2**20
    server = any(s.wal_bytes for s in r.samples)
    lines = [
        f"## {r.backend}: {r.emails} emails of {r.per} ({r.emails * r.per} recipients)"
        f" in {r.finished - r.started:.0f} s",
        "",
        "| tenth | emails/s (Nots) | recipients/s (SMS at provider) | intake 250/s of sending"
        " | intake p99 | daemon CPU per email | RSS intake | RSS worker | store on disk |"
        + (" PostgreSQL CPU per email | WAL per email | checkpoints |" if server else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if server else ""),
    ]
    for k, t in enumerate(rows, 1):
        lines.append(
            f"| {k} | {t.emails_s:.0f} | {t.sms_s:.0f} | {t.intake_s:.0f}"
            f" | {t.intake_p99_ms:.1f} ms | {t.cpu_ms_per_email:.1f} ms"
            f" | {t.rss_intake_mb:.0f} MB | {t.rss_worker_mb:.0f} MB"
            f" | {t.store_mb:.0f} MB |"
            + (
                f" {t.server_cpu_ms_per_email:.1f} ms | {t.wal_kb_per_email:.0f} KiB"
                f" | {t.checkpoints} |"
                if server
                else ""
            )
        )
    first, last = rows[0], rows[-1]
    drift = last.emails_s / first.emails_s - 1
    lines += [
        "",
        f"- last tenth vs first: emails/s {drift:+.0%}, recipients/s"
        f" {last.sms_s / first.sms_s - 1:+.0%}, CPU per email"
        f" {last.cpu_ms_per_email / first.cpu_ms_per_email - 1:+.0%}"
        f" ({'flat' if abs(drift) <= 0.10 else 'NOT flat'}: within 10 %?)",
        *([server_line(first, last, rows)] if server else []),
        f"- peak RSS (VmHWM): intake {r.hwm_intake_mb:.0f} MB, worker {r.hwm_worker_mb:.0f} MB;"
        f" RSS first/last tenth: intake {first.rss_intake_mb:.0f}/{last.rss_intake_mb:.0f} MB,"
        f" worker {first.rss_worker_mb:.0f}/{last.rss_worker_mb:.0f} MB",
        f"- store per million recipients: {(r.full_bytes - r.empty_bytes) * per_m / mib:,.0f} MiB;"
        f" after `mailbridge purge --days 0` ({r.purged} requests):"
        f" {(r.purged_bytes - r.empty_bytes) * per_m / mib:,.1f} MiB",
    ]
    return "\n".join(lines)


def as_json(r: SoakResult) -> dict[str, Any]:
    return {
        "backend": r.backend,
        "emails": r.emails,
        "per": r.per,
        "seconds": r.finished - r.started,
        "tenths": [t.__dict__ for t in tenths(r)],
        "hwm_intake_mb": r.hwm_intake_mb,
        "hwm_worker_mb": r.hwm_worker_mb,
        "bytes": {"empty": r.empty_bytes, "full": r.full_bytes, "purged": r.purged_bytes},
        "purged": r.purged,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emails", type=int, default=10_000)
    parser.add_argument("--per", type=int, default=100, help="numbers per email")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument(
        "--window", type=int, default=100,
        help="emails between their 250 and their Not (small against a tenth: each tenth's"
        " CPU is then the work of its own emails)",
    )  # fmt: skip
    parser.add_argument(
        "--pg-setting", action="append", default=[], metavar="NAME=VALUE",
        help="a PostgreSQL server setting for the throwaway cluster (repeatable), e.g."
        " max_wal_size=8GB",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="200 emails of 10 (smoke run)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.emails, args.per, args.window = 200, 10, 50
    if args.emails < 10:
        parser.error("--emails: at least 10 (one per tenth)")
    tmp = Path(tempfile.mkdtemp(prefix="mb-soak-"))
    provider = start_server("provider")
    sink, arrivals = start_report_sink(tmp)
    results: list[SoakResult] = []
    print(f"# soak — {machine()}", flush=True)
    try:
        for backend in ("sqlite", "postgresql"):
            if args.backend not in (backend, "both"):
                continue
            cluster = None
            dsn = None
            probe = None
            if backend == "postgresql":
                from tests.pg import PgCluster

                settings = dict(s.split("=", 1) for s in args.pg_setting)
                cluster = PgCluster(fsync=True, settings=settings).start()
                dsn = cluster.new_database()
                probe = ServerProbe(dsn, cluster.postmaster_pid())
            try:
                r = soak(
                    backend, emails=args.emails, per=args.per, window=args.window, tmp=tmp,
                    provider=provider, sink=sink, arrivals=arrivals, dsn=dsn, server=probe,
                )  # fmt: skip
            finally:
                if probe is not None:
                    probe.close()
                if cluster is not None:
                    cluster.destroy()
            results.append(r)
            print(report(r), flush=True)
            print(flush=True)
    finally:
        provider.stop()
        sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps([as_json(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
