"""A private Postfix instance for tests: the MTA in front of mailbridge.

`PostfixInstance` writes a config directory under a fresh temporary
directory, runs `postfix -c DIR start-fg` in the foreground (its log, via
`maillog_file = /dev/stdout`, goes to `postfix.log` in that directory), waits
with a bound until its SMTP port answers `220`, and stops it with
`postfix -c DIR stop`, killing whatever is left of its process group.

The instance
- relays mail for `relay_recipients` (the intake addresses of mailbridge) to
  `[127.0.0.1]:<relay_port>` (`relay_domains`, `relay_recipient_maps`,
  `transport_maps`), and
- delivers mail for `mailboxes` (address -> Maildir name) into Maildirs under
  `<root>/mail` with its `virtual` delivery agent (`virtual_mailbox_domains`).
It relays nothing else: `smtpd_relay_restrictions = reject_unauth_destination`.

Postfix's master must run as root, and the delivery agent writes the Maildirs
as `nobody`, so the root directory is made under /tmp (pytest's own temporary
directories are private to root) and made world-traversable.

`postfix_unavailable()` says why Postfix cannot run here (None when it can).
"""

from __future__ import annotations

import mailbox
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# The Debian package puts the binaries here; /usr/sbin may be missing from PATH.
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"
VIRTUAL_ID = 65534  # nobody/nogroup: the owner of the Maildirs

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_binary() -> str | None:
    found = shutil.which("postfix")
    if found:
        return found
    for directory in SBIN:
        candidate = Path(directory) / "postfix"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def postfix_unavailable() -> str | None:
    """Why Postfix cannot run in this environment, or None when it can."""
    if postfix_binary() is None:
        return "Postfix is not installed (scripts/test.sh installs it with apt-get)"
    if not Path(DAEMON_DIRECTORY, "master").exists():
        return f"Postfix's master is not in {DAEMON_DIRECTORY}"
    if os.geteuid() != 0:
        return "Postfix's master daemon must be started as root"
    return None


def free_port() -> int:
    """A loopback port that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _inline(mapping: dict[str, str]) -> str:
    return "inline:{ " + ", ".join(f"{k}={v}" for k, v in mapping.items()) + " }"


class PortTaken(Exception):
    """The port asked for was taken by another process."""


class PostfixInstance:
    """One private Postfix: config in `<root>/etc`, queue in `<root>/spool`."""

    def __init__(
        self,
        *,
        relay_port: int,
        relay_recipients: list[str],
        mailboxes: dict[str, str],
        myhostname: str = "mta.postfix.test",
    ) -> None:
        self.relay_port = relay_port
        self.relay_recipients = [r.lower() for r in relay_recipients]
        self.mailboxes = mailboxes
        self.myhostname = myhostname
        self.root = Path(tempfile.mkdtemp(prefix="mailbridge-postfix-"))
        self.root.chmod(0o755)  # the virtual delivery agent runs as nobody
        self.etc = self.root / "etc"
        self.log_path = self.root / "postfix.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.master_pid: int | None = None
        self._binary = postfix_binary() or "postfix"

    # -- configuration ----------------------------------------------------

    def main_cf(self) -> str:
        relay_domains = sorted({r.rpartition("@")[2] for r in self.relay_recipients})
        mailbox_domains = sorted({a.rpartition("@")[2].lower() for a in self.mailboxes})
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.root / "spool"),
            "data_directory": str(self.root / "data"),
            "maillog_file": "/dev/stdout",
            "myhostname": self.myhostname,  # must differ from mailbridge's greeting name
            "mydomain": "postfix.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_peername_lookup": "no",  # no DNS in a sandbox
            "smtp_dns_support_level": "disabled",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "relay_domains": ", ".join(relay_domains),
            "relay_recipient_maps": _inline({r: "ok" for r in self.relay_recipients}),
            "transport_maps": _inline(
                {d: f"smtp:[127.0.0.1]:{self.relay_port}" for d in relay_domains}
            ),
            "virtual_mailbox_domains": ", ".join(mailbox_domains),
            "virtual_mailbox_base": str(self.root / "mail"),
            "virtual_mailbox_maps": _inline(
                {a.lower(): f"{name}/" for a, name in self.mailboxes.items()}
            ),
            "virtual_uid_maps": f"static:{VIRTUAL_ID}",
            "virtual_gid_maps": f"static:{VIRTUAL_ID}",
            # A failed delivery is retried within seconds, not minutes (tests
            # also call flush()); never hold a bounce back for hours.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0h",
        }
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def _write_config(self) -> None:
        for sub in ("etc", "spool", "data", "mail"):
            (self.root / sub).mkdir(exist_ok=True)
        shutil.chown(self.root / "data", "postfix", "postfix")
        os.chown(self.root / "mail", VIRTUAL_ID, VIRTUAL_ID)
        (self.etc / "main.cf").write_text(self.main_cf(), encoding="ascii")
        listen = f"127.0.0.1:{self.port}"
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=listen), encoding="ascii")

    # -- running ----------------------------------------------------------

    def _postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self._binary, "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, port: int | None = None, timeout: float = 60.0) -> PostfixInstance:
        """Start on `port`, or on a free port (another one if it was taken meanwhile).

        With an explicit `port` that is already in use, raises `PortTaken`.
        """
        for attempt in range(1, 4):
            self.port = port or free_port()
            self._write_config()
            checked = self._postfix("check")
            if checked.returncode != 0:
                raise AssertionError(f"postfix check failed:\n{checked.stdout}{checked.stderr}")
            (self.root / "spool" / "quick-start").touch()  # start-fg: skip a second check
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [self._binary, "-c", str(self.etc), "start-fg"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group, killed at stop()
                )
            if self._wait_ready(timeout):
                self.master_pid = self._read_master_pid()
                return self
            self.stop()
            taken = "Address already in use" in self.log()[log_size:]
            if taken and port is not None:
                raise PortTaken(f"127.0.0.1:{port} is in use")
            if not taken or attempt == 3:
                break
        raise AssertionError(f"Postfix did not start in {timeout}s:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    sock.settimeout(5)
                    if sock.recv(512).startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return True
            except OSError:
                pass
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        return False

    def stop(self) -> None:
        """`postfix stop`, then kill whatever is left of the processes it started."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self._postfix("stop", timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # not reaped yet: still our group
                self.proc.wait(timeout=30)
        # The master runs in a session of its own (setsid); a process group id is
        # not reused while the group has members, so those members are Postfix's.
        master = self.master_pid or self._read_master_pid()  # None: it never got that far
        if master is not None:
            try:
                os.killpg(master, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc = None
        self.master_pid = None

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.root / "spool" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- observing --------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def flush(self) -> None:
        """Ask Postfix to retry every deferred message now."""
        done = self._postfix("flush")
        assert done.returncode == 0, done.stdout + done.stderr

    def queue(self) -> str:
        """`postqueue -j`: one JSON line per queued message; "" when empty."""
        queue_bin = shutil.which("postqueue") or "/usr/sbin/postqueue"
        done = subprocess.run(
            [queue_bin, "-c", str(self.etc), "-j"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip()

    def wait_queue_empty(self, timeout: float = 60.0) -> None:
        """Bounded wait until nothing is queued, flushing deferred mail meanwhile."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while queued := self.queue():
            if time.monotonic() > deadline:
                raise AssertionError(f"Postfix queue not empty after {timeout}s:\n{queued}")
            self.flush()
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def maildir(self, address: str) -> mailbox.Maildir:
        return mailbox.Maildir(self.root / "mail" / self.mailboxes[address], create=False)

    def messages(self, address: str) -> list[mailbox.MaildirMessage]:
        """Every message delivered for `address` (in file-name order)."""
        path = self.root / "mail" / self.mailboxes[address]
        if not (path / "new").exists():
            return []
        box = self.maildir(address)
        return [box[key] for key in sorted(box.keys())]
