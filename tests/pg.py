"""A throwaway PostgreSQL cluster for the tests (RECIPES.md), on loopback.

`PgCluster().start()` runs initdb and pg_ctl from Debian's
postgresql package (scripts/test.sh installs it) on a free port, as the
`postgres` system user when the tests run as root (initdb refuses root), with
fsync off (a test cluster, not a durability test: the durability of a commit
is PostgreSQL's own). `dsn(db)` makes a fresh database; `restart()` and
`stop()`/`start()` let tests take the server away under a running daemon.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def pg_bin() -> Path | None:
    """The directory of initdb/pg_ctl, newest version first; None when absent."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    return Path(found[0]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    def __init__(
        self, directory: Path | None = None, *, fsync: bool = False,
        settings: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (scripts/test.sh installs it)")
        self.bin = bin_dir
        # Its own directory under /tmp by default: the postgres user must be able
        # to reach it, and pytest's tmp_path is private to root (0700).
        self.dir = directory or Path(tempfile.mkdtemp(prefix="mailbridge-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        self.log = self.dir / "pg.log"
        self.fsync = fsync  # off for tests; on for benchmarks (a commit then costs its fsync)
        self.settings = settings or {}  # more `-c name=value` (benchmarks: as an operator tunes)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=check)

    def init(self) -> PgCluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.dir.chmod(0o755)
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--locale=C.UTF-8",
        )  # fmt: skip
        return self

    def start(self) -> PgCluster:
        if not self.data.exists():
            self.init()
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
            f" -c fsync={'on' if self.fsync else 'off'}"
            " -c max_connections=200 -c shared_buffers=64MB"
        ) + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def postmaster_pid(self) -> int:
        """The server's main process (its children are the backends and helpers)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh empty database; its DSN."""
        import psycopg

        name = "mb_" + secrets.token_hex(6)
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
