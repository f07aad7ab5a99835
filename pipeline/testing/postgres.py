"""A throwaway PostgreSQL server for tests, benches and the two-site demo: initdb in a temp dir, a free port.

PostgreSQL refuses to run as root, so when we are root the server runs as the `postgres` user (runuser), in a
directory that user owns. Trust auth on 127.0.0.1 for the `edgepipe` superuser; the role `edgepipe_pw` needs a
password (scram), so tests can prove that PGPASSWORD / db_password_env really reach the server.
"""
from __future__ import annotations

import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.testing.sshd import free_port

SUPERUSER = "edgepipe"
PASSWORD_ROLE = "edgepipe_pw"
HBA = f"""local all all trust
host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
"""


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL server binaries (Debian layout), or None."""
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True):
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    return None


def _as_server_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class PgServer:
    """A running server; `url(db)` for a database in it, `new_database()` for a fresh empty one."""

    root: Path
    port: int
    bin: Path
    running: bool = True
    databases: list[str] = field(default_factory=list)
    opts: str = ""      # the server's options (port, socket dir, ...), to start it again as it was
    down: bool = False  # halted (halt()), data kept for resume()

    def url(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(statement)

    def new_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.sql(f'CREATE DATABASE "{name}"')
        self.sql(f'GRANT ALL ON DATABASE "{name}" TO {PASSWORD_ROLE}')
        self.sql(f"GRANT ALL ON SCHEMA public TO {PASSWORD_ROLE}", dbname=name)
        self.databases.append(name)
        return self.url(name)

    def halt(self) -> None:
        """Stop the server as an outage does (`pg_ctl stop -m fast`: sessions are cut), keeping its data."""
        subprocess.run(_as_server_user() + [str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast",
                                            "-w", "stop"], check=True, capture_output=True, timeout=60)
        self.down = True

    def resume(self) -> None:
        """Start a halted server again on the same port with the same data."""
        subprocess.run(_as_server_user() + [str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-o", self.opts,
                                            "-l", str(self.root / "log"), "-w", "-t", "60", "start"],
                       check=True, capture_output=True, timeout=90)
        self.down = False

    def stop(self) -> None:
        if self.running and not self.down:
            subprocess.run(_as_server_user() + [str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast",
                                                "-w", "stop"], capture_output=True, timeout=60)
            self.running = False
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(password: str = "s3cret-test-only") -> PgServer:
    """initdb + pg_ctl start on a free loopback port; stopped by `stop()` (and at interpreter exit, if forgotten)."""
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="edgepipe-pg-"))
    as_pg = _as_server_user()
    if as_pg:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data = root / "data"
    subprocess.run(as_pg + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8",
                            "--no-sync"], check=True, capture_output=True, timeout=120)
    hba = data / "pg_hba.conf"
    subprocess.run(as_pg + ["sh", "-c", f"cat > {hba}"], input=HBA.encode(), check=True, timeout=30)
    for attempt in range(5):
        port = free_port()
        opts = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off -c max_connections=300")
        proc = subprocess.run(as_pg + [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                                       "-w", "-t", "60", "start"], capture_output=True, text=True, timeout=90)
        if proc.returncode == 0:
            break
        if attempt == 4:
            log = (root / "log").read_text()[-800:] if (root / "log").exists() else proc.stderr
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"PostgreSQL did not start: {log}")
    server = PgServer(root=root, port=port, bin=bindir, opts=opts)
    atexit.register(server.stop)
    server.sql(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{password}'")
    return server
