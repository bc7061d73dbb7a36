"""What `store.synchronous: full` costs against `normal`, on this disk.

    .venv/bin/python bench/store_durability.py            # the full run (well under a minute)
    .venv/bin/python bench/store_durability.py --quick    # a smoke run (seconds)
    .venv/bin/python bench/store_durability.py --dir /var/lib/mailbridge   # the disk you will use

The real `SqliteStore` (WAL) in a fresh file under --dir (default: the system
temp dir) takes `add_request` calls, the intake's one transaction before each
250: one caller at a time, then 8 at once (as 8 SMTP connections would; the
store serialises writes on its thread, so this shows queueing, not parallel
commits). Requests carry 1 or 50 recipients. Each cell is run --repeat
times (default 3) and the median run is shown, so that a neighbour's burst of
disk or CPU use does not decide the figure. Prints one Markdown table:
requests per second, and p50/p99 latency of the call. The first line is the
raw cost of one fsync of a small write in that directory, for comparison.

`full` fsyncs the WAL at every commit: a 250 survives power loss. `normal`
fsyncs only at checkpoints: a 250 survives a crash of the daemon (the WAL is in
the OS page cache) but the last commits can be lost if the machine loses power.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mailbridge.model import NewRequest, RecipientDraft  # noqa: E402
from mailbridge.store.sqlite import SqliteStore  # noqa: E402


def request(n: int, recipients: int) -> NewRequest:
    now = time.time()
    return NewRequest(
        account="bench0000000000000001", email_id=f"e{n}", ack_code=0,
        ack_to="ack@client.test", not_to="not@client.test", numbered=recipients > 1,
        sender="Bench", reference=f"t{n}", received_at=now, due_at=now,
        mail_from="erp@client.test", client_ip="127.0.0.1", message_id=f"<{n}@client.test>",
        recipients=[
            RecipientDraft(tel=f"06{i:08d}", number=f"+336{i:08d}",
                           text="Votre commande est prête", encoding="ucs2", parts=1, max_parts=5)
            for i in range(recipients)
        ],
    )  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    directory: Path, synchronous: str, count: int, recipients: int, callers: int
) -> tuple[float, float, float]:
    """(requests per second, p50 ms, p99 ms) of `count` add_request calls."""
    with tempfile.TemporaryDirectory(dir=directory, prefix="mb-durability-") as tmp:
        store = SqliteStore(Path(tmp) / "bench.db", synchronous=synchronous)
        await store.open()
        try:
            for n in range(20):  # warm up: schema pages, WAL file created
                await store.add_request(request(-n - 1, recipients))
            latencies: list[float] = []
            queue = iter(range(count))

            async def caller() -> None:
                for n in queue:
                    req = request(n, recipients)
                    t0 = time.perf_counter()
                    await store.add_request(req)
                    latencies.append(time.perf_counter() - t0)

            started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(callers)))
            wall = time.perf_counter() - started
        finally:
            await store.close()
    return count / wall, percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3


def fsync_cost(directory: Path, count: int) -> float:
    """p50 ms of write(4 KiB) + fsync in `directory`."""
    fd, name = tempfile.mkstemp(dir=directory, prefix="mb-fsync-")
    times = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(name)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--quick", action="store_true", help="few requests (a smoke run)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (median shown)")
    args = parser.parse_args()
    small, large = (200, 50) if args.quick else (2000, 500)
    repeat = 1 if args.quick else max(1, args.repeat)
    print(f"# store durability: {platform.node()}, {os.cpu_count()} CPU, dir {args.dir}")
    print(f"\nraw write(4 KiB)+fsync in that directory: p50 {fsync_cost(args.dir, 200):.2f} ms\n")
    print("| synchronous | recipients | callers | requests/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for recipients, count in ((1, small), (50, large)):
        for callers in (1, 8):
            for synchronous in ("full", "normal"):
                runs = sorted(
                    asyncio.run(measure(args.dir, synchronous, count, recipients, callers))
                    for _ in range(repeat)
                )
                rate, p50, p99 = runs[len(runs) // 2]  # the median run, by throughput
                print(
                    f"| {synchronous} | {recipients} | {callers} | {rate:,.0f} |"
                    f" {p50:.2f} | {p99:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
