"""Real processes under load: `serve explainer --workers N` (one port, metrics summed over the workers,
exact query counts), and 503 overloaded with Retry-After instead of a queue without end."""

from __future__ import annotations

import io
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from tests.metrics import metric

pytestmark = pytest.mark.integration

EXPLAINER_ID = "advexplain-explainer"


def photos(count: int, size=(96, 80)) -> list[bytes]:
    """Noise 'photos' at a size neither tiny model has (the explainer works at the upload's own size)."""
    out = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def explain_all(url: str, images: list[bytes], clients: int, rounds: int) -> list[httpx.Response]:
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for round_ in range(rounds):  # bounded
                png = images[(index + round_) % len(images)]
                resp = http.post("/explain", files={"image": ("x.png", png, "image/png")},
                                 data={"label": "defective", "max_queries": "4"})
                with lock:
                    results.append(resp)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_workers_share_one_port_and_metrics_count_every_process(service_factory, tiny_models):
    box = service_factory("blackbox", ["--model", str(tiny_models["blackbox"])]).start()
    explainer = service_factory("explainer", ["--surrogate", str(tiny_models["surrogate"]), "--blackbox-url", box.url,
                                              "--workers", "2", "--max-concurrency", "1", "--max-queue", "8"])
    explainer.start(timeout=120)
    tree = explainer.pids()
    assert len(tree) >= 3, tree  # the supervisor and two workers (and maybe multiprocessing's tracker)
    folders = list(Path(tempfile.gettempdir()).glob(f"advexplain-metrics-explainer-{explainer.port}-*"))
    assert len(folders) == 1 and folders[0].is_dir()

    results = explain_all(explainer.url, photos(4), clients=4, rounds=3)
    assert [r.status_code for r in results] == [200] * 12, [r.text[:200] for r in results if r.status_code != 200]
    reported = sum(r.json()["queries"] for r in results)

    # Any worker may answer /metrics: each answer is the sum over both, and they agree.
    scrapes = [httpx.get(f"{explainer.url}/metrics", timeout=10).text for _ in range(6)]
    for text in scrapes:
        assert metric(text, "explainer_explanations_total", route="blackbox") == 12
        assert metric(text, "explainer_oracle_queries_total", route="blackbox") == reported
        assert metric(text, "explainer_request_duration_seconds_count", route="/explain") == 12
        assert metric(text, "explainer_admission_running") == 0
    box_metrics = httpx.get(f"{box.url}/metrics", timeout=10).text
    assert metric(box_metrics, "blackbox_queries_total", client=EXPLAINER_ID) == reported  # exact, across workers

    assert explainer.stop() == 0
    assert not folders[0].exists()  # its own temporary folder, removed at exit
    assert "Traceback" not in explainer.log()


def test_an_overloaded_explainer_answers_503_with_retry_after_not_a_timeout(service_factory, tiny_models):
    box = service_factory("blackbox", ["--model", str(tiny_models["blackbox"])]).start()
    explainer = service_factory("explainer", ["--surrogate", str(tiny_models["surrogate"]), "--blackbox-url", box.url,
                                              "--max-concurrency", "1", "--max-queue", "1"]).start()
    images = photos(3)
    started = time.monotonic()
    results = explain_all(explainer.url, images, clients=8, rounds=2)
    assert time.monotonic() - started < 90
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    for r in results:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
    reported = sum(r.json()["queries"] for r in results if r.status_code == 200)
    box_metrics = httpx.get(f"{box.url}/metrics", timeout=10).text
    assert metric(box_metrics, "blackbox_queries_total", client=EXPLAINER_ID) == reported  # refusals cost nothing
    text = httpx.get(f"{explainer.url}/metrics", timeout=10).text
    assert metric(text, "explainer_admission_refused_total") == statuses.count(503)
    assert httpx.get(f"{explainer.url}/healthz", timeout=10).status_code == 200
