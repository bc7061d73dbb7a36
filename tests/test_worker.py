"""The worker process that runs the send and report stages (mailbridge/worker.py).

The real daemon over SMTP: its worker is killed and must come back without
losing or repeating anything; a killed daemon takes its worker along; the
store lock keeps two daemons (or a dying worker) off one store.
"""

from __future__ import annotations

import ast
import asyncio
import os
import signal
from pathlib import Path

import pytest

import mailbridge
from mailbridge import worker
from mailbridge.cli import build_parser, cmd_worker
from mailbridge.store import StoreUnavailable, acquire_store_lock, sqlite
from tests.support import (
    DaemonProcess,
    ack_code,
    config_dict,
    make_config,
    not_codes,
    outbox_lines,
    request_mail,
    wait_for,
    wait_reports,
)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def worker_pid(daemon: DaemonProcess) -> int:
    proc = daemon.proc
    assert proc is not None
    return wait_for(lambda: next(iter(children(proc.pid)), 0), what="the worker process")


def submit(daemon: DaemonProcess, number: str) -> str:
    msg = request_mail(num=number, sms="worker test")
    email_id: str = msg.get_content().split("<emailId>")[1].split("<")[0]
    code, text = daemon.send(msg)
    assert code == 250, text
    return email_id


def test_a_killed_worker_is_replaced_and_the_work_completes(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, config_dict(tmp_path)).start()
    try:
        first = worker_pid(daemon)
        email_id = submit(daemon, "0601020304")
        wait_reports(daemon.maildir, email_id)
        os.kill(first, signal.SIGKILL)
        # Mail taken while no worker runs is stored and sent once one is back.
        email_id = submit(daemon, "0601020305")
        second = wait_for(lambda: worker_pid(daemon) if worker_pid(daemon) != first else 0,
                          what="a new worker process")  # fmt: skip
        assert second != first
        reports = wait_reports(daemon.maildir, email_id)
        assert ack_code(reports["ack"][0]) == 0
        assert not_codes(reports["not"][0]) == [("0601020305", 0)]
        numbers = [line["to"] for line in outbox_lines(daemon.outbox)]
        assert sorted(numbers) == ["+33601020304", "+33601020305"]  # each sent once
        assert "worker process exited" in daemon.log()
    finally:
        daemon.stop()


def test_a_killed_daemon_takes_its_worker_along_and_restarts_cleanly(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, config_dict(tmp_path)).start()
    try:
        child = worker_pid(daemon)
        daemon.kill()
        wait_for(lambda: not alive(child), what="the orphaned worker to die")
        # The store lock is free again: a new daemon starts on the same store.
        daemon.start()
        email_id = submit(daemon, "0601020306")
        assert ack_code(wait_reports(daemon.maildir, email_id)["ack"][0]) == 0
    finally:
        daemon.stop()


def test_sigterm_stops_the_worker_and_exits_zero(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, config_dict(tmp_path)).start()
    child = worker_pid(daemon)
    email_id = submit(daemon, "0601020307")
    wait_reports(daemon.maildir, email_id)
    assert daemon.terminate() == 0
    assert not alive(child)
    assert "Traceback" not in daemon.log()


def test_the_store_lock_keeps_a_second_daemon_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path)
    monkeypatch.setattr(sqlite, "LOCK_WAIT_S", 0.2)

    async def scenario() -> None:
        held = await acquire_store_lock(config.store)
        assert held is not None
        with pytest.raises(StoreUnavailable, match="another mailbridge"):
            await acquire_store_lock(config.store)
        os.close(held)  # the holder is gone: the next one gets it
        again = await acquire_store_lock(config.store)
        assert again is not None
        os.close(again)

    asyncio.run(scenario())


def test_the_worker_entry_is_a_subcommand_hidden_from_help() -> None:
    parser = build_parser()
    assert worker.WORKER_COMMAND not in parser.format_help()
    args = parser.parse_args([worker.WORKER_COMMAND, "123", "7"])
    assert (args.func, args.parent, args.wake_fd) == (cmd_worker, 123, 7)


def test_no_module_of_the_package_imports_the_cli() -> None:
    # The CLI is the entry of both processes; a module importing it back is a cycle.
    package = Path(mailbridge.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.module else []
            )  # fmt: skip
            if any(n == "mailbridge.cli" or n.startswith("mailbridge.cli.") for n in names):
                offenders.append(str(path.relative_to(package)))
    assert offenders == []


@pytest.mark.parametrize(
    "what, feedback, sending",
    [
        (worker.WAKE_ALL, True, True),  # SIGUSR1, PostgreSQL NOTIFY, a request finished at intake
        (worker.WAKE_EVENTS, True, False),  # stored callbacks: not the dispatcher's claims
        (worker.WAKE_REQUESTS, False, True),  # a new request: not the feedback stage's polls
        (worker.WAKE_REQUESTS * 3, False, True),  # several bytes read at once
        (worker.WAKE_REQUESTS + worker.WAKE_EVENTS, True, True),
    ],
)
def test_who_a_wake_byte_wakes(what: bytes, feedback: bool, sending: bool) -> None:
    assert worker.woken_by(what) == (feedback, sending)
