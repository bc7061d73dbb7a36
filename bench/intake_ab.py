"""Intake A/B in one run: the intake process's CPU per mail, old code against new.

    .venv/bin/python bench/intake_ab.py --old /work/main
    .venv/bin/python bench/intake_ab.py --old /work/main --rounds 5 --mails 2000

Both daemons run at once (bench/run.py's daemon: store at synchronous: full,
the CM-compatible fake, reports to the report sink), the old one from the
checkout given (PYTHONPATH, same interpreter), the new one from this checkout.
Each round loads them in turn, alternating which goes first, with the same
single-recipient mails (unique emailIds) over 20 reused connections, then over
1 reused connection; the figure is the intake process's own CPU (the daemon,
not its worker child) from /proc over the load, divided by the mails. The bare
aiosmtpd server is loaded in the same rounds, for the ratio of the rate. The
worker's CPU per mail is counted from the load's start until the last of its
Nots reaches the sink (the next load starts only then).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402


def cpu_s(pid: int) -> float:
    """CPU seconds of one process (user and system, /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / bench.CLK_TCK


def intake_cpu_s(daemon: bench.Proc) -> float:
    """CPU seconds of the daemon's own process (the intake), not its worker."""
    return cpu_s(daemon.p.pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the old checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mails", type=int, default=2000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mb-intake-ab-"))
    provider = bench.start_server("provider")
    sink, arrivals = bench.start_report_sink(tmp)
    bare = bench.start_server("bare")
    daemons = {
        "old": bench.start_daemon(tmp / "old", provider.port, sink.port, "full", code=args.old),
        "new": bench.start_daemon(tmp / "new", provider.port, sink.port, "full"),
    }
    cpu: dict[tuple[str, int], list[float]] = {}
    worker_cpu: dict[tuple[str, int], list[float]] = {}
    rate: dict[tuple[str, int], list[float]] = {}
    p99: dict[tuple[str, int], list[float]] = {}
    try:
        for side, d in daemons.items():  # warm-up: imports, first connections, caches
            warm, ids = bench.single_mails(200, f"warm{side}")
            bench.load(d.port, warm, 20, True)
            nots = [f"etatNot {e}" for e in ids]
            bench.wait_until(functools.partial(arrivals.has_all, nots), 300, "the warm-up's Nots")
        for rnd in range(args.rounds):
            order = ["old", "new"] if rnd % 2 == 0 else ["new", "old"]
            for conns in (20, 1):
                r = bench.load(bare.port, bench.single_mails(args.mails, "bare")[0], conns, True)
                rate.setdefault(("bare", conns), []).append(r.rate)
                p99.setdefault(("bare", conns), []).append(r.percentile(99))
                for side in order:
                    d = daemons[side]
                    mails, ids = bench.single_mails(args.mails, f"r{rnd}{side}{conns}")
                    worker = d.pids()[1]
                    before, worker_before = intake_cpu_s(d), cpu_s(worker)
                    r = bench.load(d.port, mails, conns, True)
                    cpu.setdefault((side, conns), []).append((intake_cpu_s(d) - before) / r.sent)
                    nots = [f"etatNot {e}" for e in ids]
                    bench.wait_until(
                        functools.partial(arrivals.has_all, nots), 300, "the load's Nots"
                    )
                    worker_cpu.setdefault((side, conns), []).append(
                        (cpu_s(worker) - worker_before) / r.sent
                    )
                    rate.setdefault((side, conns), []).append(r.rate)
                    p99.setdefault((side, conns), []).append(r.percentile(99))
            print(f"round {rnd + 1} done", file=sys.stderr)
    finally:
        for p in (*daemons.values(), bare, provider, sink):
            p.stop()
    print("| side | conns | intake CPU per mail (µs), each round | median | msg/s median"
          " | ratio to bare | p99 median | worker CPU per mail (µs), median |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for conns in (20, 1):
        bare_rate = statistics.median(rate[("bare", conns)])
        print(f"| bare | {conns} | | | {bare_rate:.0f} | 1.00 |"
              f" {statistics.median(p99[('bare', conns)]) * 1e3:.1f} ms | |")  # fmt: skip
        for side in ("old", "new"):
            each = ", ".join(f"{c * 1e6:.0f}" for c in cpu[(side, conns)])
            med = statistics.median(cpu[(side, conns)]) * 1e6
            msgs = statistics.median(rate[(side, conns)])
            ratio = statistics.median(
                a / b for a, b in zip(rate[(side, conns)], rate[("bare", conns)], strict=True)
            )
            q = statistics.median(p99[(side, conns)]) * 1e3
            w = statistics.median(worker_cpu[(side, conns)]) * 1e6
            print(
                f"| {side} | {conns} | {each} | {med:.0f} | {msgs:.0f} | {ratio:.2f} | {q:.1f} ms"
                f" | {w:.0f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
