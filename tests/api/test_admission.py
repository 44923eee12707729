"""Admission control in both services: a bounded queue, a bounded wait, and 503 overloaded with Retry-After
for the rest; refused requests cost no query; settings that follow the cores."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import anyio
import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

import advexplain.services.explainer.settings as settings_module
from advexplain.services.blackbox.app import create_app as create_blackbox
from advexplain.services.blackbox.settings import BlackboxSettings
from advexplain.services.common.admission import QUEUE_FULL, WAITED_TOO_LONG, Admission
from advexplain.services.common.errors import Overloaded
from advexplain.services.explainer.app import create_app as create_explainer
from advexplain.services.explainer.settings import ExplainerSettings
from advexplain.shared.explain import BatchedSurrogate
from tests.metrics import metric

CLIENT = "explainer-under-test"


def png(seed: int = 0, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 40 + seed).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def assert_overloaded(resp: httpx.Response) -> int:
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "overloaded" and resp.json()["error"]["message"]
    retry_after = int(resp.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    return retry_after


# ---------------------------------------------------------------- Admission itself

def test_the_queue_holds_max_queue_and_refuses_the_next_at_once():
    release = threading.Event()
    registry = CollectorRegistry()

    def job(i: int) -> int:
        assert release.wait(10)
        return i

    async def main():
        admission = Admission(1, max_queue=1, max_wait=None, namespace="t", registry=registry)
        first = asyncio.create_task(admission.run(job, 1))
        second = asyncio.create_task(admission.run(job, 2))
        while admission.running + admission.waiting < 2:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(Overloaded) as refused:
            await admission.run(job, 3)
        refused_in = time.monotonic() - started
        assert (admission.running, admission.waiting) == (1, 1)
        release.set()
        return await asyncio.gather(first, second), refused.value, refused_in, admission

    results, refused, refused_in, admission = asyncio.run(main())
    assert results == [1, 2] and refused_in < 0.1
    assert refused.details["reason"] == QUEUE_FULL and int(refused.headers["Retry-After"]) >= 1
    assert (admission.running, admission.waiting) == (0, 0)
    assert registry.get_sample_value("t_admission_refused_total", {"reason": QUEUE_FULL}) == 1
    assert registry.get_sample_value("t_admission_wait_seconds_count") == 2
    assert registry.get_sample_value("t_admission_running") == 0 == registry.get_sample_value("t_admission_queued")


def test_a_request_that_waits_past_max_wait_is_refused_and_frees_its_place():
    release = threading.Event()

    def slow() -> str:
        assert release.wait(10)
        return "done"

    async def main():
        admission = Admission(1, max_queue=10, max_wait=0.2)
        first = asyncio.create_task(admission.run(slow))
        while admission.running < 1:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(Overloaded) as refused:
            await admission.run(slow)
        waited = time.monotonic() - started
        assert admission.waiting == 0
        release.set()
        assert await first == "done"
        # The slot came back: the next job runs at once.
        assert await admission.run(lambda: "next") == "next"
        return refused.value, waited, admission

    refused, waited, admission = asyncio.run(main())
    assert 0.15 < waited < 1.0 and refused.details["reason"] == WAITED_TOO_LONG
    assert (admission.running, admission.waiting) == (0, 0)


def test_max_queue_zero_runs_up_to_capacity_in_parallel_and_refuses_the_rest():
    barrier = threading.Barrier(3, timeout=10)  # three jobs must be inside at the same time
    release = threading.Event()

    def job() -> None:
        barrier.wait()
        assert release.wait(10)

    async def main():
        admission = Admission(3, max_queue=0, max_wait=5)
        tasks = [asyncio.create_task(admission.run(job)) for _ in range(3)]
        while admission.running < 3:
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await admission.run(job)
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_retry_after_follows_the_jobs_ahead_and_their_duration():
    async def main():
        admission = Admission(2, max_queue=None, max_wait=None)
        for _ in range(3):
            await admission.run(time.sleep, 0.05)
        assert admission.retry_after() == 1  # nothing ahead: the floor
        assert 0.05 <= admission._mean_seconds < 0.5
        admission._mean_seconds = 0.25
        admission.running, admission.waiting = 2, 38  # 40 jobs ahead of 0.25 s on 2 slots: 5 s
        assert admission.retry_after() == 5
        admission._mean_seconds = 3.0  # 40 x 3 s / 2 = 60 s, the cap
        admission.waiting = 100
        assert admission.retry_after() == 60

    asyncio.run(main())


def test_a_cancelled_waiter_gives_its_place_back():
    release = threading.Event()

    async def main():
        admission = Admission(1, max_queue=1, max_wait=None)
        first = asyncio.create_task(admission.run(release.wait, 10))
        while admission.running < 1:
            await asyncio.sleep(0.01)
        with anyio.move_on_after(0.1):
            await admission.run(release.wait, 10)
        assert admission.waiting == 0
        release.set()
        await first
        assert await admission.run(lambda: 7) == 7

    asyncio.run(main())


# ---------------------------------------------------------------- the explainer

@pytest.fixture
def box(tiny_models):
    with TestClient(create_blackbox(BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1))) as c:
        yield c


@pytest.fixture
def explainer_settings(tiny_models):
    def make(**overrides) -> ExplainerSettings:
        values = dict(surrogate=[tiny_models["surrogate"]], blackbox_url="http://testserver", client_id=CLIENT,
                      device="cpu", threads=1)
        return ExplainerSettings(**{**values, **overrides})

    return make


def test_explainer_refuses_past_its_queue_with_503_overloaded_and_no_query(box, explainer_settings, monkeypatch):
    import advexplain.services.explainer.service as service

    entered, release = threading.Event(), threading.Event()
    real_explain = service.explain

    def held_explain(*args, **kwargs):
        entered.set()
        assert release.wait(10)
        return real_explain(*args, **kwargs)

    monkeypatch.setattr(service, "explain", held_explain)
    app = create_explainer(explainer_settings(max_concurrency=1, max_queue=0), blackbox_client=box)
    form = {"files": {"image": ("x.png", png(), "image/png")}, "data": {"label": "defective", "max_queries": "3"}}

    async def main():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://explainer") as http:
                first = asyncio.create_task(http.post("/explain", **form))
                assert await asyncio.to_thread(entered.wait, 10)
                counted_before = box.app.state.blackbox.counter.of(CLIENT)
                refused = await http.post("/explain", **form)
                counted_after_refusal = box.app.state.blackbox.counter.of(CLIENT)
                health = await http.get("/healthz")
                release.set()
                done = await first
                metrics = (await http.get("/metrics")).text
        return refused, counted_before, counted_after_refusal, health, done, metrics

    refused, before, after, health, done, metrics = asyncio.run(main())
    assert_overloaded(refused)
    assert after == before  # refused before any work: no black-box query
    assert health.status_code == 200  # busy, not dead
    assert done.status_code == 200
    assert metric(metrics, "explainer_admission_refused_total", reason=QUEUE_FULL) == 1
    assert metric(metrics, "explainer_errors_total", code="overloaded", status="503") == 1
    assert metric(metrics, "explainer_explanations_total", route="blackbox", outcome="error") == 0


def test_explainer_serves_max_concurrency_explanations_at_once(box, explainer_settings, monkeypatch):
    import advexplain.services.explainer.service as service

    inside, lock, peak = [0], threading.Lock(), [0]
    barrier = threading.Barrier(2, timeout=10)
    real_explain = service.explain

    def counting_explain(*args, **kwargs):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        try:
            barrier.wait()  # both explanations must be inside together
            return real_explain(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(service, "explain", counting_explain)
    app = create_explainer(explainer_settings(max_concurrency=2, max_queue=0), blackbox_client=box)
    form = {"files": {"image": ("x.png", png(), "image/png")}, "data": {"label": "defective", "max_queries": "2"}}

    async def main():
        async with app.router.lifespan_context(app):
            network = app.state.explainer.surrogate.model
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://explainer") as http:
                return network, await asyncio.gather(*(http.post("/explain", **form) for _ in range(2)))

    network, results = asyncio.run(main())
    assert [r.status_code for r in results] == [200, 200] and peak[0] == 2
    # Served networks are frozen, so overlapping searches' save-and-restore cannot leave them trainable.
    assert not network.training and not any(p.requires_grad for p in network.parameters())


def test_concurrent_explanations_share_batched_surrogate_passes(box, explainer_settings, tiny_models):
    """surrogate_batch > 0: four explanations at once go through one batching thread, every answer
    is a real one, queries reconcile with the box's counter, and shutdown stops the thread."""
    app = create_explainer(explainer_settings(max_concurrency=4, max_queue=0, surrogate_batch=64), blackbox_client=box)
    data = png()
    predicted = box.post("/predict", files={"image": ("x.png", data, "image/png")}).json()["predictions"][0]["label"]
    wrong = next(c for c in ("defective", "functional") if c != predicted)  # the box's answer is a mistake
    form = {"files": {"image": ("x.png", data, "image/png")}, "data": {"label": wrong, "max_queries": "4"}}

    async def main():
        async with app.router.lifespan_context(app):
            shared = app.state.explainer.surrogate
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://explainer") as http:
                before = box.app.state.blackbox.counter.of(CLIENT)
                answers = await asyncio.gather(*(http.post("/explain", **form) for _ in range(4)))
                after = box.app.state.blackbox.counter.of(CLIENT)
        return shared, answers, after - before

    shared, answers, counted = asyncio.run(main())
    assert isinstance(shared, BatchedSurrogate) and shared.passes > 0
    assert [a.status_code for a in answers] == [200] * 4
    assert counted == sum(a.json()["queries"] for a in answers)
    assert not shared._thread.is_alive()  # the lifespan closed it


def test_surrogate_batch_defaults_to_off_on_the_cpu_and_on_for_cuda(tiny_models, monkeypatch):
    surrogate = [tiny_models["surrogate"]]
    assert ExplainerSettings(surrogate=surrogate, device="cpu").surrogate_batch == 0
    assert ExplainerSettings(surrogate=surrogate, device="cpu", surrogate_batch=32).surrogate_batch == 32
    monkeypatch.setattr(settings_module, "pick_device", lambda device: torch.device("cuda"))
    s = ExplainerSettings(surrogate=[tiny_models["surrogate"]], device="cpu")
    assert s.surrogate_batch == settings_module.DEFAULT_SURROGATE_BATCH
    with pytest.raises(ValidationError):
        ExplainerSettings(surrogate=[tiny_models["surrogate"]], surrogate_batch=-1)


# ---------------------------------------------------------------- the black box

def test_black_box_refuses_past_its_queue_and_counts_only_what_it_classified(tiny_models, monkeypatch):
    from advexplain.services.blackbox.service import BlackBox

    entered, release = threading.Event(), threading.Event()
    real_classify = BlackBox.classify

    def held_classify(self, files):
        entered.set()
        assert release.wait(10)
        return real_classify(self, files)

    monkeypatch.setattr(BlackBox, "classify", held_classify)
    settings = BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1, workers=1, max_queue=0)
    app = create_blackbox(settings)
    image = {"files": [("image", ("x.png", png(), "image/png"))], "headers": {"X-Client-Id": "alice"}}

    async def main():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://box") as http:
                first = asyncio.create_task(http.post("/predict", **image))
                assert await asyncio.to_thread(entered.wait, 10)
                refused = await http.post("/predict", **image)
                health = await http.get("/healthz")
                release.set()
                done = await first
                metrics = (await http.get("/metrics")).text
        return refused, health, done, metrics, app.state

    refused, health, done, metrics, _ = asyncio.run(main())
    assert_overloaded(refused)
    assert health.status_code == 200 and done.status_code == 200
    assert done.headers["X-Query-Count"] == "1"  # the refused request counted nothing
    assert metric(metrics, "blackbox_queries_total", client="alice") == 1
    assert metric(metrics, "blackbox_admission_refused_total", reason=QUEUE_FULL) == 1


def test_black_box_wait_limit(tiny_models, monkeypatch):
    from advexplain.services.blackbox.service import BlackBox

    entered, release = threading.Event(), threading.Event()
    real_classify = BlackBox.classify

    def held_classify(self, files):
        entered.set()
        assert release.wait(10)
        return real_classify(self, files)

    monkeypatch.setattr(BlackBox, "classify", held_classify)
    settings = BlackboxSettings(model=tiny_models["blackbox"], device="cpu", threads=1, max_queue=4, max_queue_wait=0.2)
    app = create_blackbox(settings)
    image = {"files": [("image", ("x.png", png(), "image/png"))]}

    async def main():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://box") as http:
                first = asyncio.create_task(http.post("/predict", **image))
                assert await asyncio.to_thread(entered.wait, 10)
                refused = await http.post("/predict", **image)
                release.set()
                await first
                return refused, (await http.get("/metrics")).text

    refused, metrics = asyncio.run(main())
    assert_overloaded(refused)
    assert metric(metrics, "blackbox_admission_refused_total", reason=WAITED_TOO_LONG) == 1


# ---------------------------------------------------------------- settings

@pytest.mark.parametrize("cpus, workers, want", [
    (2, 1, (2, 8, 1)), (16, 1, (16, 64, 1)), (16, 4, (4, 16, 1)), (1, 1, (1, 4, 1)), (2, 4, (1, 4, 1)),
])
def test_explainer_defaults_follow_the_usable_cores(tiny_models, monkeypatch, cpus, workers, want):
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: cpus)
    s = ExplainerSettings(surrogate=[tiny_models["surrogate"]], workers=workers)
    assert (s.max_concurrency, s.max_queue, s.threads) == want
    assert s.max_queue_wait == 10.0


def test_explicit_concurrency_sets_the_threads_and_the_queue(tiny_models, monkeypatch):
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: 8)
    s = ExplainerSettings(surrogate=[tiny_models["surrogate"]], max_concurrency=2)
    assert (s.max_concurrency, s.max_queue, s.threads) == (2, 8, 4)  # 2 explanations x 4 threads = 8 cores
    monkeypatch.setenv("EXPLAINER_MAX_QUEUE", "0")
    monkeypatch.setenv("EXPLAINER_MAX_QUEUE_WAIT", "2.5")
    monkeypatch.setenv("EXPLAINER_THREADS", "3")
    s = ExplainerSettings(surrogate=[tiny_models["surrogate"]], max_concurrency=2)
    assert (s.max_queue, s.max_queue_wait, s.threads) == (0, 2.5, 3)


@pytest.mark.parametrize("bad", [{"max_queue": -1}, {"max_queue_wait": 0}, {"max_queue_wait": float("nan")},
                                 {"workers": 0}, {"max_concurrency": 0}, {"threads": 0}])
def test_bad_admission_settings_fail_fast(tiny_models, bad):
    with pytest.raises(ValidationError):
        ExplainerSettings(surrogate=[tiny_models["surrogate"]], **bad)


def test_black_box_admission_defaults(tiny_models):
    s = BlackboxSettings(model=tiny_models["blackbox"])
    assert (s.workers, s.max_queue, s.max_queue_wait) == (1, 64, 5.0)
    with pytest.raises(ValidationError):
        BlackboxSettings(model=tiny_models["blackbox"], max_queue=-1)


def test_openapi_documents_503_on_the_work_routes(box, explainer_settings):
    explainer = create_explainer(explainer_settings(), blackbox_client=box)
    assert "503" in explainer.openapi()["paths"]["/explain"]["post"]["responses"]
    assert "503" in box.app.openapi()["paths"]["/predict"]["post"]["responses"]


def test_serve_flags_reach_the_settings(tiny_models):
    from advexplain.cli import build_parser
    from advexplain.commands.serve import _settings_or_exit

    args = build_parser().parse_args(
        [
            "--threads",
            "2",
            "serve",
            "explainer",
            "--surrogate",
            str(tiny_models["surrogate"]),
            "--workers",
            "2",
            "--max-concurrency",
            "3",
            "--max-queue",
            "5",
            "--max-queue-wait",
            "1.5",
            "--surrogate-batch",
            "128",
        ]
    )
    s = _settings_or_exit(ExplainerSettings, {n: getattr(args, n, None) for n in ExplainerSettings.model_fields})
    assert (s.workers, s.max_concurrency, s.max_queue, s.max_queue_wait, s.threads) == (2, 3, 5, 1.5, 2)
    assert s.surrogate_batch == 128
    args = build_parser().parse_args(["serve", "blackbox", "--model", str(tiny_models["blackbox"]), "--max-queue", "0",
                                      "--max-queue-wait", "0.5"])
    s = _settings_or_exit(BlackboxSettings, {n: getattr(args, n, None) for n in BlackboxSettings.model_fields})
    assert (s.max_queue, s.max_queue_wait) == (0, 0.5)


def test_worker_settings_travel_as_json_without_the_token(tiny_models, monkeypatch):
    from advexplain.services.explainer.app import SETTINGS_ENV, create_app_from_environment, settings_to_environment

    token = "a-token-of-sixteen-plus"
    monkeypatch.setenv("EXPLAINER_WHITEBOX_TOKEN", token)
    s = ExplainerSettings(surrogate=[tiny_models["surrogate"]], whitebox_model=tiny_models["blackbox"], workers=3,
                          max_side=0, max_queue=7)
    text = settings_to_environment(s)
    assert token not in text
    monkeypatch.setenv(SETTINGS_ENV, text)
    app = create_app_from_environment()  # what each worker process runs
    assert app.state.settings == s and app.state.settings.whitebox_token.get_secret_value() == token
