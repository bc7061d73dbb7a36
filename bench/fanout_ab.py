"""Fan-out A/B in one run: daemon CPU per recipient, old code against new, alternating.

    .venv/bin/python bench/fanout_ab.py --old /work/main/.venv/bin/python
    .venv/bin/python bench/fanout_ab.py --old /work/main/.venv/bin/python --rounds 3 --lines 20000
    .venv/bin/python bench/fanout_ab.py --old ../wt-old   # a checkout (git worktree), this venv

Each side is a Python executable whose environment has the mailbridge to
measure installed (an editable install: the daemon runs from the checkout
next to its venv), or a checkout directory, run by this interpreter (its
dependencies must be this venv's). Per round and side: a fresh daemon (so that its peak RSS
is the CSV's), one warm-up mail, the 500-number one-text and personal-texts
mails (`--repeat` of each: mean CPU to their Not, as bench/run.py counts them;
the kernel counts in 10 ms ticks), then the `mobiles.csv` mail. The figures
are the daemon's CPU (both processes, /proc) from the start of the SMTP
transaction until the provider has every SMS ("to provider"), and until the
Not has reached the report sink ("to Not"). `--lines 0`: the 500-number mails only.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class Side:
    """One code base under test."""

    label: str
    python: str  # its venv's interpreter
    checkout: Path  # where `-m mailbridge` must find its package (the daemon's cwd)


@dataclass(kw_only=True)
class Figures:
    """One side's measurements over the rounds (lists: one value per round)."""

    one_text_ms: list[float] = field(default_factory=list)  # to the Not, as bench/run.py
    personal_ms: list[float] = field(default_factory=list)
    one_text_intake_ms: list[float] = field(default_factory=list)  # of which the intake
    requests_500: list[int] = field(default_factory=list)
    csv_provider_us: list[float] = field(default_factory=list)  # per recipient
    csv_not_us: list[float] = field(default_factory=list)
    csv_rss_mb: list[float] = field(default_factory=list)
    csv_intake_us: list[float] = field(default_factory=list)  # to the Not, intake process
    csv_worker_us: list[float] = field(default_factory=list)  # to the Not, worker process


def side_of(label: str, where: str) -> Side:
    """--old / --new: a venv's interpreter, or a checkout run by this one."""
    if Path(where).is_dir():
        return Side(label=label, python=sys.executable, checkout=Path(where).resolve())
    return Side(label=label, python=where, checkout=checkout_of(where))


def checkout_of(python: str) -> Path:
    """The checkout an editable venv's interpreter runs (`<checkout>/.venv/bin/python`)."""
    return Path(python).absolute().parent.parent.parent


def start_daemon(side: Side, tmp: Path, provider_port: int, sink_port: int) -> bench.Proc:
    """The daemon of `side`: bench/run.py's daemon (store at synchronous: full),
    run by that side's interpreter on its own checkout."""
    return bench.start_daemon(
        tmp, provider_port, sink_port, "full", code=side.checkout, python=side.python
    )


def cpu_by_process(daemon: bench.Proc) -> tuple[float, float]:
    """CPU seconds of the intake process (the daemon itself) and of its children (the worker)."""
    total, intake = daemon.cpu_s(), 0.0
    try:
        fields = Path(f"/proc/{daemon.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        intake = (int(fields[11]) + int(fields[12])) / bench.CLK_TCK
    except OSError:
        pass
    return intake, total - intake


def send_one(
    daemon: bench.Proc,
    provider: bench.Proc,
    sink: bench.ReportArrivals,
    mail: bytes,
    email_id: str,
    expected: int,
) -> tuple[float, float, int]:
    """One mail alone: (CPU to provider, CPU to its Not, provider requests)."""
    bench.provider_reset(provider.port)
    cpu0 = daemon.cpu_s()
    bench.load(daemon.port, [mail], 1, False)
    bench.wait_until(
        lambda: bench.provider_stats(provider.port)["messages"] >= expected, 600, "the SMS"
    )
    to_provider = daemon.cpu_s() - cpu0
    requests = int(bench.provider_stats(provider.port)["requests"])
    bench.wait_until(lambda: sink.has_all([f"etatNot {email_id}"]), 600, "the Not")
    return to_provider, daemon.cpu_s() - cpu0, requests


def five_hundred(personal: bool) -> tuple[bytes, str]:
    """bench/run.py's 500-number mail: one text, or a text per number."""
    numbers = [f"06{10_000_000 + i:08d}" for i in range(500)]
    fields = {f"num{i + 1}": num for i, num in enumerate(numbers)}
    if personal:
        fields |= {
            f"sms{i + 1}": f"Bonjour client {i}, votre code est {1000 + i}" for i in range(500)
        }
    else:
        fields["sms"] = "Promo -10% ce week-end"
    email_id = secrets.token_hex(6)
    return bench.envoi_mail(email_id, fields), email_id


def csv_mail(lines: int) -> tuple[bytes, str]:
    """bench/run.py's mobiles.csv mail."""
    mobiles = "".join(f"06{10_000_000 + i:08d};;client {i}\n" for i in range(lines)).encode()
    email_id = secrets.token_hex(6)
    attachments = {"mobiles.csv": mobiles, "message.csv": b"Bonjour [1], votre colis arrive demain"}
    return bench.envoi_mail(email_id, {}, attachments), email_id


def measure(
    side: Side,
    tmp: Path,
    provider: bench.Proc,
    sink: tuple[bench.Proc, bench.ReportArrivals],
    args: argparse.Namespace,
    figures: Figures,
) -> None:
    """One round of one side, into `figures`."""
    daemon = start_daemon(side, tmp / f"{side.label}-{secrets.token_hex(3)}", provider.port,
                          sink[0].port)  # fmt: skip
    try:
        # A warm-up mail: the worker's first SMS imports the HTTP stack.
        warm_id = secrets.token_hex(6)
        warm = bench.envoi_mail(warm_id, {"num": "0601020304", "sms": "hi"})
        send_one(daemon, provider, sink[1], warm, warm_id, 1)
        for personal, out in ((False, figures.one_text_ms), (True, figures.personal_ms)):
            cpus, intakes = [], []
            for _ in range(args.repeat):
                mail, email_id = five_hundred(personal)
                intake0, _ = cpu_by_process(daemon)
                _, cpu, requests = send_one(daemon, provider, sink[1], mail, email_id, 500)
                cpus.append(cpu)
                intakes.append(cpu_by_process(daemon)[0] - intake0)
                if args.verbose:
                    print(f"  {side.label} personal={personal}: {cpu * 1000:.0f} ms, "
                          f"{requests} request(s)", file=sys.stderr)  # fmt: skip
                figures.requests_500.append(requests)
            out.append(statistics.mean(cpus) * 1000)
            if not personal:
                figures.one_text_intake_ms.append(statistics.mean(intakes) * 1000)
        if args.lines == 0:
            return
        mail, email_id = csv_mail(args.lines)
        intake0, worker0 = cpu_by_process(daemon)
        to_provider, to_not, _ = send_one(daemon, provider, sink[1], mail, email_id, args.lines)
        intake1, worker1 = cpu_by_process(daemon)
        figures.csv_intake_us.append((intake1 - intake0) / args.lines * 1e6)
        figures.csv_worker_us.append((worker1 - worker0) / args.lines * 1e6)
        figures.csv_provider_us.append(to_provider / args.lines * 1e6)
        figures.csv_not_us.append(to_not / args.lines * 1e6)
        figures.csv_rss_mb.append(daemon.peak_rss_mb())
    finally:
        daemon.stop()


def table(sides: list[Side], results: dict[str, Figures], lines: int, repeat: int) -> str:
    def cell(values: list[float], unit: str) -> str:
        return " / ".join(f"{v:.0f}" for v in values) + f" {unit}"

    rows = [
        "| side | 500 numbers, one text: CPU to its Not (intake) | 500 personal texts: CPU"
        " | provider requests"
        f" (500) | {lines}-line CSV: CPU per recipient to provider | … to its Not"
        " | … of which intake / worker | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side in sides:
        f = results[side.label]
        rows.append(
            f"| {side.label} | {cell(f.one_text_ms, 'ms')} ({cell(f.one_text_intake_ms, 'ms')})"
            f" | {cell(f.personal_ms, 'ms')}"
            f" | {max(f.requests_500)} | {cell(f.csv_provider_us, 'µs')}"
            f" | {cell(f.csv_not_us, 'µs')}"
            f" | {cell(f.csv_intake_us, 'µs')} / {cell(f.csv_worker_us, 'µs')}"
            f" | {cell(f.csv_rss_mb, 'MB')} |"
        )
    old, new = results[sides[0].label], results[sides[-1].label]
    csv = ""
    if new.csv_provider_us:  # not with --lines 0
        ratio = statistics.mean(new.csv_provider_us) / statistics.mean(old.csv_provider_us)
        ratio_not = statistics.mean(new.csv_not_us) / statistics.mean(old.csv_not_us)
        csv = f"CSV CPU per recipient {ratio:.2f}x to provider, {ratio_not:.2f}x to the Not; "
    rows.append("")
    rows.append(
        f"{sides[-1].label}/{sides[0].label}: {csv}500 numbers one text"
        f" {statistics.mean(new.one_text_ms) / statistics.mean(old.one_text_ms):.2f}x,"
        f" personal {statistics.mean(new.personal_ms) / statistics.mean(old.personal_ms):.2f}x"
        f" (one value per round, rounds alternate sides; 500-number figures: mean of {repeat})"
    )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the old side's venv python, or checkout")
    parser.add_argument("--new", default=sys.executable, help="the new side's, likewise")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lines", type=int, default=100_000, help="0: no CSV mail")
    parser.add_argument("--verbose", action="store_true", help="each mail's CPU on stderr")
    parser.add_argument("--repeat", type=int, default=10, help="500-number mails per figure")
    args = parser.parse_args()
    sides = [side_of("old", args.old), side_of("new", args.new)]
    results = {s.label: Figures() for s in sides}
    tmp = Path(tempfile.mkdtemp(prefix="mb-fanout-ab-"))
    provider = bench.start_server("provider")
    sink = bench.start_report_sink(tmp)
    try:
        for round_no in range(args.rounds):
            order = sides if round_no % 2 == 0 else sides[::-1]
            for side in order:
                started = time.monotonic()
                measure(side, tmp, provider, sink, args, results[side.label])
                print(f"round {round_no + 1} {side.label}: {time.monotonic() - started:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        provider.stop()
        sink[0].stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(sides, results, args.lines, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
