"""systemd's watchdog is fed only while the send side is alive (issue 10).

The real daemon under a notify socket with WATCHDOG_USEC, as systemd runs it
with `WatchdogSec=`: WATCHDOG=1 comes while the worker's heartbeat is fresh;
a worker that hangs without exiting (SIGSTOP) starves the watchdog, so
systemd would restart the service; once it runs again, the pings resume.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support import config_dict, wait_for


class NotifyListener:
    """The notify socket systemd would hold: every datagram, with its time."""

    def __init__(self) -> None:
        self.name = f"mailbridge-watchdog-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except BlockingIOError:
                return self.messages
            self.messages.append(data)

    def pings(self) -> int:
        return sum(1 for m in self.poll() if "WATCHDOG=1" in m)


def test_watchdog_fed_only_while_the_worker_beats(tmp_path: Path) -> None:
    config = config_dict(tmp_path)
    config["dispatch"].update(heartbeat_s=0.2, heartbeat_stale_s=3.0)  # a loaded CI core
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    listener = NotifyListener()
    log_path = tmp_path / "daemon.log"
    env = {
        **os.environ, "NOTIFY_SOCKET": "@" + listener.name, "WATCHDOG_USEC": "600000",
        "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailbridge", "serve", "-c", str(path)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_for(lambda: any("READY=1" in m for m in listener.poll()), what="READY=1")
        wait_for(lambda: listener.pings() >= 2, what="watchdog pings")
        match = wait_for(
            lambda: re.search(r"worker process (\d+) started", log_path.read_text()),
            what="the worker's pid",
        )
        worker = int(match.group(1))
        assert "watchdog not fed" not in log_path.read_text()  # fed from the start
        os.kill(worker, signal.SIGSTOP)  # hangs without exiting
        try:
            wait_for(
                lambda: "watchdog not fed" in log_path.read_text(), timeout=30,
                what="the daemon starving the watchdog",
            )  # fmt: skip
            # Every ping sent before the daemon decided so is in the socket now.
            starved = listener.pings()
            # No ping may come while the worker stays stopped.
            wait_for(
                lambda: log_path.read_text().count("watchdog not fed") >= 3, timeout=30,
                what="three intervals without a ping",
            )  # fmt: skip
            assert listener.pings() == starved
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_for(lambda: listener.pings() > starved, timeout=30, what="pings again")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.sock.close()
