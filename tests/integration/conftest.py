"""Real services as real processes: `advexplain serve ...` under uvicorn on free loopback ports."""

from __future__ import annotations

import pytest

from advexplain.launch import ServiceProcess

pytestmark = pytest.mark.integration


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
