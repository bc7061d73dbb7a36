"""Where the daemon's time goes: py-spy samples of the real daemon under load.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile.py burst      # 3000 single-recipient emails, 20 connections
    .venv/bin/python bench/profile.py csv        # one mobiles.csv of 100 000 lines
    .venv/bin/python bench/profile.py fanout     # 40 emails of 500 numbers, one text, one at a time

Samples only while the GIL is held (`py-spy --gil`): CPU spent in Python, the
resource the daemon's threads share. Prints each thread's share and the share
of the pipeline stages (a sample counts for every stage on its stack).
"""

from __future__ import annotations

import argparse
import collections
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

# Stage -> frames (function names) that mark it on a stack. Examine runs on a
# worker thread and provider calls in their own tasks: each stage is marked by
# its own frames, not by a parent's.
STAGES = {
    "SMTP dialogue (aiosmtpd)": ("SMTP._handle_client",),
    "parse + checks (examine)": ("IntakeHandler.examine",),
    "store thread (SQLite)": ("Engine._serve",),
    "dispatch (claim, route, batch, record)": ("Dispatcher.process", "Dispatcher._send_chunk"),
    "  of which the provider adapter (CM JSON, HTTP)": ("CmProvider.send",),
    "reports (render, relay, marks)": ("Mailer.run_once", "Mailer._deliver_lane"),
    "  of which the relay client (pipelined SMTP)": ("RelayConnection.send",),
    "  of which rendering (bodies and headers)": ("Mailer._letters",),
    "  of which relay connection set-up (aiosmtplib)": ("RelayConnection.open",),
}


def summarise(raw: Path) -> str:
    total = 0
    threads: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        # py-spy --subprocesses: "process <pid>:<command>" frames (the parent's,
        # then the child's), then "thread (<id>): <name>".
        head = 0
        while head < len(frames) and frames[head].startswith(("process ", "thread ")):
            head += 1
        where = frames[:head]
        process = next((f for f in reversed(where) if f.startswith("process ")), "")
        thread = next((f for f in where if f.startswith("thread ")), "")
        label = "worker process" if "mailbridge _worker" in process else "intake process"
        label += " / " + (thread.split(":", 1)[1].strip() if ":" in thread else "thread")
        threads[label] += n
        names = {f.split(" (")[0] for f in frames[head:]}
        for stage, markers in STAGES.items():
            if names.intersection(markers):
                stages[stage] += n
    out = [f"{total} samples holding the GIL"]
    out += [f"  thread {name}: {n / total:.0%}" for name, n in threads.most_common()]
    out += [f"  {stage}: {stages[stage] / total:.0%}" for stage in STAGES]
    rest = total - sum(n for stage, n in stages.items() if not stage.startswith(" "))
    out.append(f"  the rest (event loop, transports, timers): {rest / total:.0%}")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["burst", "csv", "fanout"])
    parser.add_argument("--raw", type=Path, help="also keep py-spy's raw stacks here")
    args = parser.parse_args()
    spy_exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="mb-profile-"))
    provider = bench.start_server("provider")
    sink, sink_log = bench.start_report_sink(tmp)
    daemon = bench.start_daemon(tmp / "d", provider.port, sink.port, "full")
    raw = tmp / "profile.txt"
    spy = subprocess.Popen(
        [spy_exe, "record", "-p", str(daemon.p.pid), "-o", str(raw), "-f", "raw",
         "-r", "200", "--threads", "--gil", "--subprocesses"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1)  # py-spy attaches
        if args.scenario == "burst":
            mails, ids = bench.single_mails(3000, "prof")
            bench.load(daemon.port, mails, 20, True)
            bench.wait_until(
                lambda: sink_log.has_all([f"etatNot {e}" for e in ids]), 600, "the Nots"
            )
        elif args.scenario == "fanout":
            numbers = {f"num{i + 1}": f"06{10_000_000 + i:08d}" for i in range(500)}
            for _ in range(40):  # each alone, as bench/run.py's fan-out row
                email_id = secrets.token_hex(6)
                mail = bench.envoi_mail(email_id, numbers | {"sms": "Promo -10% ce week-end"})
                bench.load(daemon.port, [mail], 1, False)
                bench.wait_until(
                    lambda e=email_id: sink_log.has_all([f"etatNot {e}"]), 600, "the Not"
                )
        else:
            lines = 100_000
            mobiles = "".join(f"06{10_000_000 + i:08d};;client {i}\n" for i in range(lines))
            mail = bench.envoi_mail(
                secrets.token_hex(6),
                {},
                {"mobiles.csv": mobiles.encode(), "message.csv": b"Bonjour [1], votre colis"},
            )
            bench.load(daemon.port, [mail], 1, False)
            bench.wait_until(
                lambda: bench.provider_stats(provider.port)["messages"] >= lines, 600, "the SMS"
            )
    finally:
        spy.send_signal(2)
        spy.wait()
        for p in (daemon, provider, sink):
            p.stop()
    print(summarise(raw))
    if args.raw is not None:
        shutil.copyfile(raw, args.raw)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
