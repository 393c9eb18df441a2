"""A PostgreSQL server for the feature-database tests: the one named by ``INTERPLAB_TEST_POSTGRES_URL`` (a role
that may create databases), or a throwaway one started here from Debian's ``postgresql`` binaries (initdb +
pg_ctl in a temporary folder, listening on 127.0.0.1 only, trust authentication, fsync off; stopped and
removed at the end of the session). Each test gets a fresh database of its own (`PostgresServer.new_db`).

Neither: the PostgreSQL half of the tests skips, saying how to get one; with ``INTERPLAB_REQUIRE_POSTGRES=1``
(CI) it fails instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

URL_ENV = "INTERPLAB_TEST_POSTGRES_URL"
REQUIRE_ENV = "INTERPLAB_REQUIRE_POSTGRES"
HOW = (
    f"no PostgreSQL server: set {URL_ENV}=postgresql://user@host/db (a role that may create databases) or "
    "install Debian's postgresql (apt-get install postgresql; scripts/postgres-deps.sh does) so the tests "
    "start one on loopback"
)


def find_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else the newest under /usr/lib/postgresql/*/bin (Debian)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A server the tests may create databases on: ``url`` (its admin database)."""

    def __init__(
        self, url: str, folder: Path | None = None, pg_ctl: str | None = None, user: str | None = None
    ):
        self.url, self.folder, self._pg_ctl, self._user = url.rstrip("/"), folder, pg_ctl, user
        from sqlalchemy import create_engine

        from interplab.features.dialect import engine_url

        self._admin = create_engine(engine_url(self.url), isolation_level="AUTOCOMMIT")
        self.created: list[str] = []

    @classmethod
    def start(cls) -> PostgresServer:
        """A throwaway server on a free loopback port (as the ``postgres`` user when run as root: the
        server refuses to run as root)."""
        initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise FileNotFoundError(HOW)
        user = None
        folder = Path(tempfile.mkdtemp(prefix="interplab-pg-"))
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise FileNotFoundError(HOW + " (as root, a 'postgres' user must exist)") from None
            os.chown(folder, pw.pw_uid, pw.pw_gid)
            user = "postgres"
        port = _free_port()
        data = folder / "data"
        run = {"user": user, "check": True, "capture_output": True, "text": True, "timeout": 60}
        subprocess.run(
            [
                initdb,
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "-N",
            ],
            **run,
        )
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c full_page_writes=off"
        subprocess.run(
            [
                pg_ctl,
                "-D",
                str(data),
                "-o",
                opts,
                "-l",
                str(folder / "server.log"),
                "-w",
                "-t",
                "30",
                "start",
            ],
            **run,
        )
        return cls(f"postgresql://postgres@127.0.0.1:{port}/postgres", folder, pg_ctl, user)

    def new_db(self, prefix: str = "t", *, name: str | None = None) -> str:
        """The URL of a new, empty database (``name``: exactly that name, replacing one the tests made)."""
        from sqlalchemy import text

        name = name or f"{prefix}_{uuid.uuid4().hex[:12]}"
        with self._admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            c.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return self.url.rsplit("/", 1)[0] + "/" + name

    def stop(self) -> None:
        if self.folder is None:  # a server of the user's: only drop what the tests made
            from sqlalchemy import text

            with self._admin.connect() as c:
                for name in self.created:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._admin.dispose()
        if self.folder is not None and self._pg_ctl is not None:
            subprocess.run(
                [self._pg_ctl, "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop"],
                user=self._user,
                capture_output=True,
                timeout=60,
            )
            # removed in the background: a database is some hundred files, and a session makes dozens
            subprocess.Popen(
                ["rm", "-rf", str(self.folder)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
