"""Shared fixtures for the ops test suite (manifests, observability, CI/CD).

- `repo`: the repository root.
- `database_url`: TEST_DATABASE_URL if set, else a throwaway MariaDB started with
  scripts/throwaway-mariadb.sh for the whole session (removed afterwards). With no server
  installed the tests fail with one sentence saying what to install.
- `fresh_database_url`: a new, empty database on that server for one test.
- `kvstore_bin`: the debug binary, built with `cargo build` if it is missing or stale.
- `start_kvstore(env)`: runs the binary with KV_* settings, waits for its "listening" log
  line and returns a handle with `.http`, `.metrics` base URLs, `.proc`, `.logs()`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import threading
import time
import urllib.parse
import uuid

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo() -> pathlib.Path:
    return REPO


def _mysql_admin(url: str, sql: str) -> None:
    u = urllib.parse.urlparse(url)
    cmd = ["mariadb", "--no-defaults", "-h", u.hostname or "127.0.0.1", "-P", str(u.port or 3306),
           "-u", urllib.parse.unquote(u.username or "root"), "-e", sql]
    if u.password:
        cmd.insert(2, f"-p{urllib.parse.unquote(u.password)}")
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def database_url():
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    script = REPO / "scripts" / "throwaway-mariadb.sh"
    res = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        pytest.fail("no MySQL-protocol server for the tests: install a MariaDB server "
                    "(apt-get install -y mariadb-server) or set TEST_DATABASE_URL. "
                    + res.stderr.strip(), pytrace=False)
    info = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    try:
        yield info["URL"]
    finally:
        subprocess.run([str(script), "stop", info["DIR"]], timeout=60)


@pytest.fixture
def fresh_database_url(database_url):
    """A new empty database on the test server; dropped after the test."""
    name = "kv_ops_" + uuid.uuid4().hex[:12]
    _mysql_admin(database_url, f"CREATE DATABASE `{name}`")
    u = urllib.parse.urlparse(database_url)
    yield urllib.parse.urlunparse(u._replace(path="/" + name))
    _mysql_admin(database_url, f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(scope="session")
def kvstore_bin() -> pathlib.Path:
    # cargo decides whether anything is stale; a no-op build takes well under a second.
    subprocess.run(["cargo", "build", "--quiet", "--bin", "kvstore"], cwd=REPO, check=True)
    return REPO / "target" / "debug" / "kvstore"


class Kvstore:
    def __init__(self, proc: subprocess.Popen, http: str, metrics: str, lines: list[str]):
        self.proc = proc
        self.http = http
        self.metrics = metrics
        # Live: the reader thread keeps appending stdout lines.
        self.lines = lines

    def logs(self) -> list[str]:
        return list(self.lines)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=timeout)


def launch_kvstore(binary, env: dict[str, str], args: tuple[str, ...] = (),
                   timeout: float = 30) -> Kvstore:
    """Runs the binary with only the given KV_* settings (ports 0) and waits for its
    "listening" log line; the stdout lines keep being collected in the background."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KV_")}
    full_env.update({"KV_LISTEN_ADDR": "127.0.0.1:0", "KV_METRICS_ADDR": "127.0.0.1:0"})
    full_env.update(env)
    proc = subprocess.Popen([str(binary), *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    lines: list[str] = []
    found: dict = {}
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "listening":
                found.update(rec)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found and time.monotonic() < deadline and proc.poll() is None:
        ready.wait(0.1)
    if not found:
        proc.kill()
        raise AssertionError("kvstore did not log its listening line:\n" + "\n".join(lines))
    return Kvstore(proc, f"http://{found['http_addr']}", f"http://{found['metrics_addr']}", lines)


@pytest.fixture
def start_kvstore(kvstore_bin):
    started: list[Kvstore] = []

    def start(env: dict[str, str], args: tuple[str, ...] = (), timeout: float = 30) -> Kvstore:
        k = launch_kvstore(kvstore_bin, env, args, timeout)
        started.append(k)
        return k

    yield start
    for k in started:
        if k.proc.poll() is None:
            k.proc.kill()
            k.proc.wait(timeout=10)
