"""Several instances on one PostgreSQL, end to end (issue 11; docs/performance.md).

    python bench/instances.py [--mails 2000] [--quick]

In one run: the end-to-end rate (emails/s from the first MAIL to the last
Not at the report sink) of one SQLite instance, and of 1, 2 and 3 instances
on one PostgreSQL (a throwaway cluster on this machine, fsync on), each
instance with its worker process, the mail spread evenly across them (20 SMTP
connections in all, reused), SMS to the CM-compatible gateway, reports to
the SMTP sink.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadgen import run_load  # noqa: E402
from run import (  # noqa: E402
    INTAKE,
    SENDER,
    Proc,
    ReportArrivals,
    machine,
    single_mails,
    start_daemon,
    start_report_sink,
    start_server,
    wait_until,
)

from tests.pg import PgCluster  # noqa: E402


async def spread(ports: list[int], mails: list[bytes], connections: int) -> None:
    """Send the mails, evenly across the instances, `connections` in all."""
    share = max(1, connections // len(ports))
    chunks = [mails[i :: len(ports)] for i in range(len(ports))]
    results = await asyncio.gather(
        *(
            run_load("127.0.0.1", port, chunk, concurrency=share, reuse=True,
                     mail_from=SENDER, rcpt=INTAKE)
            for port, chunk in zip(ports, chunks, strict=True)
        )
    )  # fmt: skip
    errors = [e for r in results for e in r.errors]
    if errors:
        raise RuntimeError(f"{len(errors)} errors, first: {errors[0]}")


def measure(
    label: str, instances: list[Proc], mails: list[bytes], ids: list[str], sink: ReportArrivals
) -> float:
    start = time.time()
    asyncio.run(spread([p.port for p in instances], mails, 20))
    subjects = [f"etatNot {e}" for e in ids]
    wait_until(lambda: sink.has_all(subjects), 900, f"the Nots of {label}")
    arrivals = sink.refresh()
    rate = len(ids) / (max(arrivals[s] for s in subjects) - start)
    print(f"{label:<34} {rate:8.0f} emails/s", flush=True)
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="100 mails (a smoke run)")
    args = parser.parse_args()
    n = 100 if args.quick else args.mails
    tmp = Path(tempfile.mkdtemp(prefix="mb-instances-"))
    provider = start_server("provider")
    sink, arrivals = start_report_sink(tmp)
    cluster = PgCluster(fsync=True)
    cluster.start()
    rates: dict[str, float] = {}
    print(f"# instances benchmark — {machine()}; {n} single-number emails per row")
    try:
        daemon = start_daemon(tmp / "sqlite", provider.port, sink.port, "full")
        mails, ids = single_mails(n, "sq")
        rates["sqlite"] = measure("1 instance, SQLite", [daemon], mails, ids, arrivals)
        daemon.stop()
        for count in (1, 2, 3):
            dsn = cluster.new_database()
            tag = secrets.token_hex(2)
            procs = [
                start_daemon(tmp / f"pg{count}-{i}-{tag}", provider.port, sink.port, "full",
                             store={"postgresql": dsn})
                for i in range(count)
            ]  # fmt: skip
            try:
                mails, ids = single_mails(n, f"pg{count}")
                label = f"{count} instance{'s' if count > 1 else ''}, PostgreSQL"
                rates[f"pg{count}"] = measure(label, procs, mails, ids, arrivals)
            finally:
                for proc in procs:
                    proc.stop()
    finally:
        provider.stop()
        sink.stop()
        cluster.destroy()
    print(
        "ratios to one SQLite instance: "
        + ", ".join(f"{k} {v / rates['sqlite']:.2f}" for k, v in rates.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
