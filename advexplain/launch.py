"""Run `advexplain serve <service>` as a child process on loopback: start, wait for /healthz, stop.

Used by `make up` (advexplain/up.py), the integration tests and the benchmarks, so all of them run the services
exactly as an operator does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0, log: Path | None = None,
                 path: str = "/healthz") -> None:
    """Poll `url` + `path` until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    tail = lambda: log.read_text(errors="replace")[-4000:] if log and log.exists() else ""  # noqa: E731
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with status {proc.returncode} before it was ready\n{tail()}")
        try:
            if httpx.get(f"{url}{path}", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not ready after {timeout:.0f}s\n{tail()}")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants that are alive now (Linux /proc; just `pid` elsewhere)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return out


class ServiceProcess:
    """One `advexplain serve <service>` child on a loopback port, its output in a log file."""

    def __init__(self, service: str, args: list[str], env: dict[str, str] | None = None, port: int | None = None,
                 log_dir: Path | None = None, health_path: str = "/healthz", threads: int | None = 1,
                 host: str = "127.0.0.1", console: bool = False, new_session: bool = False):
        """`threads`: `advexplain --threads N` (one torch thread by default, for tests on shared cores);
        None leaves it to the service's own default (the explainer's: cores / (workers x concurrency)).
        `console`: the child writes to this process's terminal instead of a log file (`make up`).
        `new_session`: the child gets its own session, so a Ctrl-C in the terminal reaches only the
        caller, which then stops its children in order."""
        self.service = service
        self.threads = threads
        self.health_path = health_path  # e.g. /v2/models/blackbox/ready for `serve blackbox --protocol oip`
        self.host = host
        self.port = port or free_port()
        self.args = args
        self.new_session = new_session
        self.env = {**os.environ, "ADVEXPLAIN_THREADS": str(threads or 1), **(env or {})}
        # Multiprocess metrics are per service: a folder inherited from the caller would mix two services.
        if "PROMETHEUS_MULTIPROC_DIR" not in (env or {}):
            self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log_path = None if console else (log_dir or Path("/tmp")) / f"{service}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        threads = [] if self.threads is None else ["--threads", str(self.threads)]
        return [sys.executable, "-m", "advexplain", *threads, "serve", self.service,
                "--host", self.host, "--port", str(self.port), *self.args]

    def pids(self) -> list[int]:
        """The process and all its descendants (uvicorn's workers under `--workers N`), from /proc."""
        if self.proc is None:
            return []
        return process_tree(self.proc.pid)

    def start(self, wait: bool = True, timeout: float = 60.0) -> ServiceProcess:
        if self.log_path is None:
            self.proc = subprocess.Popen(self.command(), env=self.env, start_new_session=self.new_session)
        else:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=self.new_session)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_healthy(self.url, self.proc, timeout, self.log_path, self.health_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path and self.log_path.exists() else ""

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGINT (what Ctrl-C sends) and wait: uvicorn shuts down cleanly and exits 0."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.resume()
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
