"""``shoprank team up`` / ``team down``: the servers a team runs shoprank on, on one machine.

* **PostgreSQL** (Debian's ``postgresql`` package) with three databases owned by the role
  ``shoprank``: ``prefect`` (the Prefect server's), ``mlflow`` (the tracking server's backend
  store and model registry) and ``optuna`` (the studies' shared storage);
* **a Prefect server** on that database, with a process work pool (``shoprank``) for workers
  started by ``prefect worker start``;
* **an MLflow tracking server** on that database, proxying artifacts stored under
  ``--artifacts-destination`` (a folder here, standing for object storage).

Every server binds 127.0.0.1 unless ``host`` says otherwise. The generated database password is
written only to ``<folder>/env`` (mode 600), which exports ``PREFECT_API_URL``,
``MLFLOW_TRACKING_URI`` and ``SHOPRANK_OPTUNA_STORAGE`` for a shell that starts workers or runs
``shoprank``; the servers receive their database URLs through their environment, never on a
command line, and the config never holds them (so no MLflow param or tag does).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from models.errors import ShoprankError

logger = logging.getLogger(__name__)

ROLE = "shoprank"
DATABASES = ("prefect", "mlflow", "optuna")
SERVERS = ("prefect", "mlflow")
ENV_FILE = "env"


def postgres_bin() -> Path:
    """The newest installed PostgreSQL server's ``bin`` folder (Debian's layout)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda path: int(path.parent.parent.name)
                   if path.parent.parent.name.isdigit() else 0)
    if not found:
        raise ShoprankError(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb). Install Debian's "
            "package: sudo apt-get install -y postgresql (make team-up does it).")
    return found[-1].parent


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the ``postgres`` user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class Team:
    """The team servers of one folder (their data, logs, process ids and the env file)."""

    folder: Path
    host: str = "127.0.0.1"
    pg_port: int = 5433
    prefect_port: int = 4200
    mlflow_port: int = 5000
    pool: str = "shoprank"

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()

    @property
    def pgdata(self) -> Path:
        """The database cluster's folder."""
        return self.folder / "pgdata"

    @property
    def sockets(self) -> Path:
        """The folder of PostgreSQL's Unix socket."""
        return self.folder / "sockets"

    def url(self, database: str, driver: str = "psycopg2") -> str:
        """The SQLAlchemy URL of one database, with the role's password."""
        return (f"postgresql+{driver}://{ROLE}:{self.password()}@127.0.0.1:{self.pg_port}/"
                f"{database}")

    def password(self) -> str:
        """The role's password: generated once, kept in ``<folder>/secrets`` (mode 600)."""
        path = self.folder / "secrets" / "db-password"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.touch(mode=0o600)
            path.write_text(secrets.token_hex(24))
        return path.read_text().strip()

    def env(self) -> dict[str, str]:
        """What a worker's or a user's shell needs to use the servers."""
        client_host = "127.0.0.1" if self.host in ("127.0.0.1", "0.0.0.0") else self.host
        return {"PREFECT_API_URL": f"http://{client_host}:{self.prefect_port}/api",
                "MLFLOW_TRACKING_URI": f"http://{client_host}:{self.mlflow_port}",
                "SHOPRANK_OPTUNA_STORAGE": self.url("optuna")}

    # ---- PostgreSQL ----

    def start_postgres(self) -> None:
        """Create the cluster (once), start it, and create the role and the databases."""
        bin_dir = postgres_bin()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)  # the postgres user walks into it when run as root
        for folder in (self.pgdata, self.sockets):
            folder.mkdir(exist_ok=True, mode=0o700)
            if os.geteuid() == 0:
                shutil.chown(folder, "postgres", "postgres")
        if not (self.pgdata / "PG_VERSION").is_file():
            _run(_as_postgres([str(bin_dir / "initdb"), "-D", str(self.pgdata), "-U",
                               "postgres", "-E", "UTF8", "--auth-local=trust",
                               "--auth-host=scram-sha-256"]), "initdb")
        options = f"-c listen_addresses={self.host} -p {self.pg_port} -k {self.sockets}"
        _run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(self.pgdata), "-l",
                           str(self.pgdata / "postgres.log"), "-o", options, "-w", "-t", "60",
                           "start"]), "pg_ctl start")
        quoted = self.password().replace("'", "''")
        sql = (f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') "
               f"THEN CREATE ROLE {ROLE} LOGIN; END IF; END $$;\n"
               f"ALTER ROLE {ROLE} PASSWORD '{quoted}';\n")
        for database in DATABASES:
            sql += (f"SELECT 'CREATE DATABASE {database} OWNER {ROLE}' WHERE NOT EXISTS "
                    f"(SELECT FROM pg_database WHERE datname = '{database}')\\gexec\n")
        # the SQL (with the password) goes through stdin, not the command line
        _run([str(bin_dir / "psql"), "-X", "-q", "-h", str(self.sockets), "-p",
              str(self.pg_port), "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1",
              "-f", "-"], "psql", stdin=sql)

    def stop_postgres(self) -> None:
        """Stop the cluster (fast shutdown); nothing when it does not run."""
        if (self.pgdata / "postmaster.pid").is_file():
            _run(_as_postgres([str(postgres_bin() / "pg_ctl"), "-D", str(self.pgdata), "-m",
                               "fast", "-w", "stop"]), "pg_ctl stop")

    # ---- Prefect and MLflow servers ----

    def create_study_tables(self) -> None:
        """Create Optuna's tables in ``optuna`` now, before workers open studies at once.

        Two trainings opening their first study together would both create the tables, and
        PostgreSQL refuses one of two concurrent ``CREATE TABLE`` of one name.
        """
        import optuna

        optuna.storages.RDBStorage(self.url("optuna")).remove_session()

    def start_servers(self) -> None:
        """Start the Prefect and MLflow servers in their own process groups; wait for them."""
        logs = self.folder / "logs"
        logs.mkdir(exist_ok=True)
        bin_dir = Path(sys.executable).parent
        base = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        base.pop("PREFECT_API_URL", None)
        commands = {
            "prefect": ([str(bin_dir / "prefect"), "server", "start", "--host", self.host,
                         "--port", str(self.prefect_port)],
                        {"PREFECT_HOME": str(self.folder / "prefect-home"),
                         "PREFECT_API_DATABASE_CONNECTION_URL": self.url("prefect", "asyncpg")},
                        f"http://127.0.0.1:{self.prefect_port}/api/health"),
            "mlflow": ([str(bin_dir / "mlflow"), "server", "--host", self.host, "--port",
                        str(self.mlflow_port), "--workers", "1", "--artifacts-destination",
                        str(self.folder / "artifacts")],
                       {"MLFLOW_BACKEND_STORE_URI": self.url("mlflow"),
                        # no GenAI job runners (seven processes of ~270 MB) for shoprank
                        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                       f"http://127.0.0.1:{self.mlflow_port}/health"),
        }
        for name, (command, env, _) in commands.items():
            if self._running(name):
                continue
            with (logs / f"{name}.log").open("ab") as log:
                process = subprocess.Popen(command, env={**base, **env}, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           cwd=self.folder)
            (self.folder / f"{name}.pid").write_text(str(process.pid))
        for name, (_, _, health) in commands.items():
            _wait_healthy(name, health, logs / f"{name}.log")

    def _running(self, name: str) -> bool:
        path = self.folder / f"{name}.pid"
        if not path.is_file():
            return False
        try:
            os.killpg(int(path.read_text()), 0)
        except (ProcessLookupError, ValueError):
            return False
        return True

    def stop_servers(self) -> None:
        """Stop each server's whole process group (its workers included)."""
        for name in SERVERS:
            path = self.folder / f"{name}.pid"
            if path.is_file():
                stop_group(int(path.read_text()))
                path.unlink()

    def create_pool(self) -> None:
        """The process work pool that ``shoprank deploy --pool`` deploys onto."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectAlreadyExists
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.env()["PREFECT_API_URL"]}), \
                get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name=self.pool, type="process"))

    # ---- the whole setup ----

    def up(self) -> Path:
        """Start everything; returns the env file to source."""
        self.start_postgres()
        self.create_study_tables()
        self.start_servers()
        self.create_pool()
        path = self.folder / ENV_FILE
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text("".join(f"export {key}='{value}'\n" for key, value in self.env().items()))
        return path

    def down(self) -> None:
        """Stop the servers and the database; their data stays in the folder."""
        self.stop_servers()
        self.stop_postgres()


def stop_group(pid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group ``pid`` leads, then SIGKILL what is left after ``timeout_s``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _run(command: list[str], what: str, stdin: str | None = None) -> None:
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ShoprankError(f"{what} failed (exit {done.returncode}): "
                            f"{(done.stderr or done.stdout).strip()[-2000:]}")


def _wait_healthy(name: str, url: str, log: Path, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 (localhost)
                if answer.status == 200:
                    logger.info("%s server healthy at %s", name, url)
                    return
        except OSError:
            time.sleep(1)
    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
    raise ShoprankError(f"the {name} server did not answer {url} within {timeout_s:.0f} s; "
                        f"its log ({log}) ends with:\n{tail}")
