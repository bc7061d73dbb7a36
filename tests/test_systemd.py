"""systemd and packaging (issue 14, item 6).

A SIGTERM is a clean stop from the first instant of the process: the real
daemon is stopped at each moment of its start-up, found by watching it in
/proc (importing its dependencies, the store lock awaited, the store file
open, the worker spawned, READY sent) and over a sweep of delays across the
whole start-up; it exits 0 every time, leaves no worker behind, and the next
start serves. The shipped units pass `systemd-analyze verify`, and
`systemd-analyze security` scores them no worse than the docs say.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailbridge.app import STOP_GRACE_S
from mailbridge.config import OutboxProviderConfig, load_config
from mailbridge.store.sqlite import lock_path
from tests.support import DaemonProcess, ack_code, config_dict, request_mail, wait_reports

ROOT = Path(__file__).parent.parent
UNITS = ROOT / "systemd"
README = ROOT / "README.md"
# The worst `systemd-analyze security` exposure either unit may score (0 best, 10 worst).
EXPOSURE_THRESHOLD = 2.5


# -- the daemon seen from outside -----------------------------------------------


def poll(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll tightly (start-up moments last milliseconds), with a bound."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.0005)
    return value


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (its SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)
    return mask is not None and bool(int(mask.group(1), 16) & (1 << (signal.SIGTERM - 1)))


def importing(pid: int) -> bool:
    """Whether the process is importing the CLI's dependencies (pydantic's
    extension mapped): long before any SIGTERM handler of the event loop."""
    try:
        return "_pydantic_core" in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


def has_open(pid: int, path: Path) -> bool:
    """Whether the process holds `path` open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except FileNotFoundError:
            continue
    return False


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


def workers_of(daemon_pid: int) -> list[int]:
    """Live worker processes started by that daemon (`_worker <its pid> …`),
    wherever they were reparented to."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"_worker" in argv and str(daemon_pid).encode() in argv and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


class Starting:
    """`mailbridge serve` just spawned, with the notify socket systemd would hold."""

    def __init__(self, tmp: Path, config_path: Path) -> None:
        self.name = f"mailbridge-systemd-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.setblocking(False)
        self.log_path = tmp / "daemon.log"
        env = {**os.environ, "NOTIFY_SOCKET": "@" + self.name, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailbridge", "serve", "-c", str(config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        self.pid = self.proc.pid

    def ready(self) -> bool:
        try:
            return "READY=1" in self.sock.recv(4096).decode()
        except BlockingIOError:
            return False

    def terminate_and_wait(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.sock.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.sock.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[dict[str, Any], Path]]:
    config = config_dict(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    yield config, path


@contextmanager
def store_lock_held(db: Path) -> Iterator[None]:
    """A previous run's worker still holding the store (the daemon then waits)."""
    fd = os.open(lock_path(db), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def stop_cleanly(starting: Starting, seen_workers: list[int]) -> None:
    """SIGTERM now: exit 0, no traceback, and no worker left running."""
    code = starting.terminate_and_wait()
    log = starting.log()
    assert code == 0, f"exit {code} on a SIGTERM during start-up:\n{log}"
    assert "Traceback" not in log, log
    assert "stopped with status" not in log, log  # the worker too stopped cleanly
    assert workers_of(starting.pid) == [], "a worker outlived its daemon"
    assert not any(alive(pid) for pid in seen_workers), "a worker outlived its daemon"


def restart_serves(tmp: Path, config: dict[str, Any]) -> None:
    """The store is usable after the stop: a new daemon starts and serves."""
    daemon = DaemonProcess(tmp, config).start()
    try:
        msg = request_mail(num="0601020304", sms="after the stop", emailId="after1")
        code, text = daemon.send(msg)
        assert code == 250, text
        reports = wait_reports(daemon.maildir, "after1")
        assert ack_code(reports["ack"][0]) == 0
        assert daemon.terminate() == 0
    finally:
        daemon.stop()


MOMENTS = ["importing", "lock-wait", "store-open", "worker-spawned", "ready"]


@pytest.mark.e2e
@pytest.mark.parametrize("moment", MOMENTS)
def test_sigterm_during_startup_is_a_clean_stop(
    tmp_path: Path, setup: tuple[dict[str, Any], Path], moment: str
) -> None:
    config, path = setup
    db = Path(config["store"]["sqlite"])
    seen_workers: list[int] = []
    if moment == "lock-wait":
        with store_lock_held(db):
            starting = Starting(tmp_path, path)
            try:
                poll(lambda: has_open(starting.pid, lock_path(db)), "the daemon awaiting the lock")
                started = time.monotonic()
                stop_cleanly(starting, seen_workers)
            finally:
                starting.kill()
        # It gave up the wait at once, not after the 30 s a previous worker gets.
        assert time.monotonic() - started < 10
        assert "stop asked while starting" in starting.log()
    else:
        starting = Starting(tmp_path, path)
        try:
            if moment == "importing":  # not even the config read yet
                poll(lambda: importing(starting.pid), "the imports")
            elif moment == "store-open":
                poll(lambda: has_open(starting.pid, db), "the store file open")
            elif moment == "worker-spawned":
                seen_workers = poll(lambda: children(starting.pid), "the worker process")
            else:
                poll(starting.ready, "READY=1")
            stop_cleanly(starting, seen_workers)
        finally:
            starting.kill()
    restart_serves(tmp_path, config)


@pytest.mark.e2e
def test_sigterm_swept_across_startup(tmp_path: Path, setup: tuple[dict[str, Any], Path]) -> None:
    """SIGTERM at evenly spread moments between the first imports and READY
    (the span measured on a first start), not only at the moments named above."""
    config, path = setup
    first = Starting(tmp_path, path)
    try:
        poll(lambda: importing(first.pid), "the imports")
        t0 = time.monotonic()
        poll(first.ready, "READY=1")
        span = time.monotonic() - t0
        assert first.terminate_and_wait() == 0
    finally:
        first.kill()
    steps = 6
    for k in range(steps):
        stop_after(Starting(tmp_path, path), span * k / steps)
    restart_serves(tmp_path, config)


def stop_after(starting: Starting, delay: float) -> None:
    """SIGTERM `delay` seconds after its first imports (measured by polling)."""
    try:
        poll(lambda: importing(starting.pid), "the imports")
        mark = time.monotonic() + delay
        poll(lambda: time.monotonic() >= mark or starting.proc.poll() is not None, "the mark")
        stop_cleanly(starting, children(starting.pid))
    finally:
        starting.kill()


def test_other_commands_keep_sigterm_default(setup: tuple[dict[str, Any], Path]) -> None:
    """Only serve and _worker hold SIGTERM: a command killed dies as usual."""
    _, path = setup
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailbridge", "send", "-c", str(path), "--num", "0601020304",
         "--sms", "x", "--server", "127.0.0.1:9"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        poll(lambda: catches_sigterm(proc.pid) or proc.poll() is not None, "the handler")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Killed by it (the default) or done already (an unreachable server: 1).
    assert code in (-signal.SIGTERM, 1)


# -- the command line -----------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    mailbridge = Path(sys.executable).parent / "mailbridge"
    return subprocess.run(
        [str(mailbridge), *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_version_comes_from_the_package_metadata() -> None:
    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"mailbridge {version('mailbridge')}"


def test_config_from_the_environment(tmp_path: Path, setup: tuple[dict[str, Any], Path]) -> None:
    _, path = setup
    out = run_cli("check-config", env={"MAILBRIDGE_CONFIG": str(path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{path}: OK")
    # -c wins over the variable.
    out = run_cli("check-config", "-c", str(path), env={"MAILBRIDGE_CONFIG": "/nonexistent"})
    assert out.returncode == 0, out.stderr


# -- the units ------------------------------------------------------------------

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and not os.environ.get("CI"),
    reason="scripts/test.sh installs systemd-analyze (Debian's systemd package)",
)


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def installed_copy(unit: str, tmp: Path) -> Path:
    """The unit as shipped, its ExecStart binary pointed at this venv's script
    (`verify` wants the binary to exist)."""
    text = (UNITS / unit).read_text()
    shipped = unit_settings(UNITS / unit)["ExecStart"][0].split()[0]
    script = Path(sys.executable).parent / "mailbridge"
    copy = tmp / unit
    copy.write_text(text.replace(shipped, str(script)))
    return copy


UNIT_FILES = ["mailbridge.service", "mailbridge@.service"]


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_unit_matches_the_daemon(unit: str) -> None:
    s = unit_settings(UNITS / unit)
    assert s["Type"] == ["notify"] and s["DynamicUser"] == ["yes"]
    assert s["ConfigurationDirectory"] == ["mailbridge"]
    assert s["StateDirectory"][0].startswith("mailbridge")
    assert s["WorkingDirectory"][0] == "/var/lib/" + s["StateDirectory"][0]
    # The watchdog is fed every WatchdogSec/2 after a health check that may
    # take 5 s (the store's answer): room for both, and far more than a beat.
    watchdog = seconds(s["WatchdogSec"][0])
    assert watchdog / 2 + 5 < watchdog and watchdog >= 20
    # The stop waits STOP_GRACE_S for in-flight sends, then up to 15 s more
    # for the worker to park them: systemd must not SIGKILL before that.
    assert seconds(s["TimeoutStopSec"][0]) > STOP_GRACE_S + 15
    # The start may wait 30 s for a previous run's worker to release the store.
    assert seconds(s["TimeoutStartSec"][0]) > 30


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNIT_FILES)
def test_systemd_analyze_verify(tmp_path: Path, unit: str) -> None:
    copy = installed_copy(unit, tmp_path)
    target = copy
    if unit.endswith("@.service"):  # a template is verified as one of its instances
        target = tmp_path / unit.replace("@", "@demo")
        target.symlink_to(copy)
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(target)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    # Only the lines about our unit: a container's own units may warn too.
    ours = [ln for ln in out.stderr.splitlines() if unit.split("@")[0] in ln]
    assert ours == [], out.stderr


def exposure(unit: Path) -> float:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out.stdout)
    assert match, out.stdout
    return float(match.group(1))


def documented_exposure() -> float:
    match = re.search(r"systemd-analyze security[^.]*?exposure (\d+\.\d)", README.read_text())
    assert match, "README: the systemd section states the exposure score"
    return float(match.group(1))


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNIT_FILES)
def test_systemd_analyze_security(tmp_path: Path, unit: str) -> None:
    score = exposure(installed_copy(unit, tmp_path))
    # No worse than the README says, and the README says a good score.
    assert score <= documented_exposure() <= EXPOSURE_THRESHOLD, score


# -- the README's install steps ------------------------------------------------


def readme_systemd_section() -> str:
    text = README.read_text()
    start = text.index("## Running under systemd")
    return text[start : text.index("\n## ", start + 1)]


def test_readme_config_recipe_gives_absolute_state_paths(tmp_path: Path) -> None:
    """The README's `sed` turns the default config into one whose files are all
    under the unit's StateDirectory (relative paths would be read from
    /etc/mailbridge, which ProtectSystem=strict makes read-only)."""
    section = readme_systemd_section()
    match = re.search(r"sed '([^']+)' config\.yaml", section)
    assert match, "the README's sed command"
    out = subprocess.run(
        ["sed", match.group(1), str(ROOT / "config.yaml")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(out.stdout)
    config = load_config(path)
    assert config.store.sqlite == Path("/var/lib/mailbridge/mailbridge.db")
    assert config.reports.maildir == Path("/var/lib/mailbridge/reports")
    outbox = config.providers["outbox"]
    assert isinstance(outbox, OutboxProviderConfig)
    assert outbox.path == Path("/var/lib/mailbridge/outbox.jsonl")
