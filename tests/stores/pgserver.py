"""A throwaway PostgreSQL server for tests and benchmarks: Debian's own
binaries (`scripts/bootstrap --test` installs the `postgresql` package),
`initdb` into a fresh directory, `pg_ctl start` on a free loopback port, TCP
only, `pg_ctl stop` and the directory removed at the end.

PostgreSQL refuses to run as root: as root, the cluster is owned by and run
as the `postgres` user Debian's package creates (or `nobody`), through
`runuser`. Standalone (no pytest), so benchmarks use it too.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "trunkline"  # the cluster's superuser; trust auth on loopback only


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def bin_dir() -> Path:
    """The newest Debian PostgreSQL bin directory (or pg_config's)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("initdb")
    if exe:
        return Path(exe).parent
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (initdb): run scripts/bootstrap --test, "
        "which installs Debian's postgresql package"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """`start()` a cluster, `url(db)` to reach it, `stop()` to remove it.
    `durable=False` (tests) turns fsync off: a crash of the test machine
    loses the cluster, which is thrown away anyway."""

    def __init__(self, *, durable: bool = False) -> None:
        self.bin = bin_dir()
        self.port = _free_port()
        self.durable = durable
        self.dir = Path(tempfile.mkdtemp(prefix="trunkline-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as: list[str] = []
        if os.getuid() == 0:
            user = "postgres"
            try:
                pwd.getpwnam(user)
            except KeyError:
                user = "nobody"
            self._as = ["runuser", "-u", user, "--"]
            os.chown(self.dir, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        self.started = False

    def _run(self, *cmd: str, timeout: float = 60.0) -> None:
        proc = subprocess.run(
            [*self._as, *cmd], capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd[:2])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                + (f"\nlog:\n{self.log.read_text()}" if self.log.exists() else "")
            )

    def start(self) -> None:
        """Create the cluster (first time) and start it; again after `halt`."""
        if not self.data.exists():
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust",
                "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
            )  # fmt: skip
        opts = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            "-c unix_socket_directories=''",
            "-c max_connections=50",
        ]
        if not self.durable:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
            "-t", "60", "-o", " ".join(opts), "start",
        )  # fmt: skip
        self.started = True

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def halt(self) -> None:
        """Stop the server, keeping its data (`start` brings it back, same port)."""
        if self.started:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
            self.started = False

    def stop(self) -> None:
        try:
            if self.started:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")
                self.started = False
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
