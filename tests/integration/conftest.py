"""Real services as real processes: `advexplain serve ...` under uvicorn on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """One `advexplain serve <service>` child process; start/stop/pause/resume like an operator would."""

    def __init__(self, service: str, args: list[str], env: dict[str, str] | None = None, port: int | None = None,
                 log_dir: Path | None = None):
        self.service = service
        self.port = port or free_port()
        self.args = args
        self.env = {**os.environ, "ADVEXPLAIN_THREADS": "1", **(env or {})}
        self.log_path = (log_dir or Path("/tmp")) / f"{service}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = 60.0) -> "ServiceProcess":
        log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "services.cli", "--threads", "1", "serve", self.service,
               "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.service} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.service} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

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


@pytest.fixture
def service_factory(tmp_path):
    """Start services; every one still running is stopped at the end of the test."""
    started: list[ServiceProcess] = []

    def make(service: str, args: list[str], **kwargs) -> ServiceProcess:
        proc = ServiceProcess(service, args, log_dir=tmp_path, **kwargs)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        try:
            proc.stop()
        except Exception:  # noqa: BLE001 - teardown must reach every process
            proc.kill()


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("integration")
