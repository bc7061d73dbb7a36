"""A/B of the report path in one run: two checkouts' daemons, alternating.

    .venv/bin/python bench/reports_ab.py --old /work/main/.venv/bin/python \\
        --new .venv/bin/python --mails 2000 --rounds 2

Each round runs, for each side in turn, a fresh daemon (store at
`synchronous: full`, reports to Postfix's smtp-sink) under the end-to-end
scenario of bench/run.py (single-recipient mails on 20 reused connections,
until the last Not is at the sink), after the bare aiosmtpd limit of the same
scenario. Prints per side: the worker process's CPU per email, the intake
process's, the end-to-end rate and its ratio to the bare limit of the round.
CPU is what to compare (the machine is shared); rates only within a round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402


@dataclass(frozen=True)
class SideResult:
    worker_cpu_ms: float  # per email
    intake_cpu_ms: float  # per email
    rate: float  # emails/s end to end
    ratio: float  # to the bare limit of the round


def pid_cpu_s(pid: int) -> float:
    """CPU time (user + system) of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / bench.CLK_TCK


def run_side(python: str, tmp: Path, mails: int, limit: float, tag: str) -> SideResult:
    provider = bench.start_server("provider")
    sink, sink_log = bench.start_report_sink(tmp)
    with mock.patch.object(sys, "executable", python):
        daemon = bench.start_daemon(tmp / "d", provider.port, sink.port, "full")
    try:
        intake_pid, worker_pid = daemon.pids()[:2]
        letters, ids = bench.single_mails(mails, tag)
        intake0, worker0 = pid_cpu_s(intake_pid), pid_cpu_s(worker_pid)
        start = time.time()
        bench.load(daemon.port, letters, 20, True)
        subjects = [f"etatNot {e}" for e in ids]
        bench.wait_until(lambda: sink_log.has_all(subjects), 600, "the Nots")
        intake_s = pid_cpu_s(intake_pid) - intake0
        worker_s = pid_cpu_s(worker_pid) - worker0
        last = max(sink_log.refresh()[s] for s in subjects)
    finally:
        for p in (daemon, provider, sink):
            p.stop()
    rate = mails / (last - start)
    return SideResult(
        worker_cpu_ms=worker_s * 1000 / mails,
        intake_cpu_ms=intake_s * 1000 / mails,
        rate=rate,
        ratio=rate / limit,
    )


def bare_limit(mails: int) -> float:
    bare = bench.start_server("bare")
    try:
        letters, _ = bench.single_mails(mails, "bare")
        return bench.load(bare.port, letters, 20, True).rate
    finally:
        bare.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the python of the old checkout")
    parser.add_argument("--new", default=sys.executable, help="the python of the new one")
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    # `python -m mailbridge` puts the working directory first on sys.path: run
    # where no checkout is, so that each python imports its own.
    os.chdir(tempfile.gettempdir())
    results: dict[str, list[SideResult]] = {"old": [], "new": []}
    for round_no in range(args.rounds):
        limit = bare_limit(args.mails)
        for side, python in (("old", args.old), ("new", args.new)):
            tmp = Path(tempfile.mkdtemp(prefix="mb-ab-"))
            try:
                r = run_side(python, tmp, args.mails, limit, f"{side}{round_no}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            results[side].append(r)
            print(
                f"round {round_no + 1} {side}: worker {r.worker_cpu_ms:.2f} ms/email,"
                f" intake {r.intake_cpu_ms:.2f} ms/email, end to end {r.rate:.0f} emails/s"
                f" = {r.ratio:.2f}x bare ({limit:.0f} msg/s)",
                flush=True,
            )
    for side, rs in results.items():
        print(
            f"{side}: worker {statistics.mean(r.worker_cpu_ms for r in rs):.2f} ms/email,"
            f" intake {statistics.mean(r.intake_cpu_ms for r in rs):.2f} ms/email,"
            f" end to end {statistics.mean(r.ratio for r in rs):.2f}x bare"
            f" ({', '.join(f'{r.ratio:.2f}' for r in rs)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
