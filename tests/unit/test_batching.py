"""BatchedSurrogate: one network pass for concurrent searches, each getting its own values and gradients."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import load_photos
from advexplain.shared.explain import explain
from advexplain.shared.explain.batching import BatchedSurrogate


@pytest.fixture(scope="module")
def surrogate(tiny_models):
    return LocalClassifier.from_checkpoint(tiny_models["surrogate"])


def direct(surrogate, x, objective, cls, weights):
    x = x.clone().requires_grad_(True)
    values = getattr(surrogate, objective)(x, cls)
    (grad,) = torch.autograd.grad((values * weights).sum(), x)
    return values.detach(), grad


class Gate(nn.Module):
    """Wraps a network; its first forward waits until `release` is set (so work piles up meanwhile)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.entered, self.release, self.calls = net, threading.Event(), threading.Event(), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(10)
        return self.net(x)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(jobs=st.lists(st.tuples(st.integers(1, 5), st.integers(16, 90), st.integers(16, 90),
                               st.sampled_from(["margin", "loss"]), st.integers(0, 1)), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_concurrent_submissions_get_their_own_values_and_gradients(surrogate, jobs, seed):
    torch.manual_seed(seed)
    inputs = [(torch.rand(n, 3, h, w), objective, cls, torch.rand(n)) for n, h, w, objective, cls in jobs]
    expected = [direct(surrogate, x, objective, cls, wt) for x, objective, cls, wt in inputs]
    got: list = [None] * len(inputs)
    start = threading.Barrier(len(inputs))
    with BatchedSurrogate(surrogate) as shared:

        def run(k):
            start.wait()
            got[k] = direct(shared, *inputs[k][:3], inputs[k][3])

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert shared.images == sum(x.shape[0] for x, *_ in inputs)
    for (values, grad), (v, g) in zip(expected, got, strict=True):
        torch.testing.assert_close(v, values, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g, grad, rtol=1e-3, atol=1e-5 * float(grad.abs().max()) + 1e-7)


def behind_a_held_pass(tiny_models, first: int, later: list[tuple[str, int]], **options) -> BatchedSurrogate:
    """Submit `first` images, hold that pass until every `later` (objective, images) submission is
    queued behind it, then let everything run; the closed BatchedSurrogate keeps its counts."""
    surrogate = LocalClassifier.from_checkpoint(tiny_models["surrogate"]).freeze()  # frozen before it is wrapped
    gate = Gate(surrogate.model)
    surrogate.model = gate
    with BatchedSurrogate(surrogate, **options) as shared:
        threads = [threading.Thread(target=shared.margin, args=(torch.rand(first, 3, 40, 50), 0))]
        threads[0].start()
        assert gate.entered.wait(10)
        for objective, n in later:
            threads.append(threading.Thread(target=getattr(shared, objective), args=(torch.rand(n, 3, 30, 30), 1)))
            threads[-1].start()
        while shared._queue.qsize() < len(later):  # all of them wait for the pass in progress
            threading.Event().wait(0.01)
        gate.release.set()
        for t in threads:
            t.join()
    return shared


def test_work_submitted_during_a_pass_goes_through_the_next_pass_together(tiny_models):
    shared = behind_a_held_pass(tiny_models, 2, [("loss", 3)] * 4)
    assert (shared.passes, shared.images) == (2, 2 + 4 * 3)


def test_max_batch_bounds_a_pass(tiny_models):
    shared = behind_a_held_pass(tiny_models, 1, [("margin", 4)] * 3, max_batch=6)
    assert shared.images == 13 and shared.passes == 4  # 4 + 4 > 6: each of the three in its own pass


class FailsOnce(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.failed = net, False

    def forward(self, x):
        if not self.failed:
            self.failed = True
            raise RuntimeError("device fault")
        return self.net(x)


def test_an_error_reaches_the_waiting_search_and_the_batcher_goes_on(tiny_models):
    surrogate = LocalClassifier.from_checkpoint(tiny_models["surrogate"]).freeze()
    surrogate.model = FailsOnce(surrogate.model)
    with BatchedSurrogate(surrogate) as shared:
        with pytest.raises(RuntimeError, match="device fault"):
            shared.margin(torch.rand(2, 3, 32, 32), 1)
        assert shared.margin(torch.rand(2, 3, 32, 32), 1).shape == (2,)
        with pytest.raises(ValueError, match="class 7"):
            shared.margin(torch.rand(2, 3, 32, 32), 7)
    with pytest.raises(RuntimeError, match="closed"):
        shared.margin(torch.rand(1, 3, 32, 32), 0)


def test_concurrent_explanations_through_the_batcher_are_real_explanations(tiny_models):
    """Four searches at once share passes; every success is one the counted label-only box agrees with."""
    blackbox = LocalClassifier.from_checkpoint(tiny_models["blackbox"], label_only=True)
    photos = load_photos("elpv", "validation")
    wrong = [i for i in range(80) if int(blackbox.predict_proba(photos.image(i)[None]).argmax()) != photos.labels[i]]
    assert len(wrong) >= 4
    blackbox = LocalClassifier.from_checkpoint(tiny_models["blackbox"], label_only=True)  # a fresh counter
    results: list = [None] * 4
    with BatchedSurrogate(LocalClassifier.from_checkpoint(tiny_models["surrogate"])) as shared:

        def run(k):
            i = wrong[k]
            results[k] = explain(photos.image(i), photos.labels[i], shared, blackbox)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert shared.passes > 0 and shared.images % 6 == 0  # the default's six views per step
    assert blackbox.queries == sum(r.queries for r in results)
    assert any(r.success for r in results)
    for k, r in enumerate(results):
        assert r.adversarial.shape == photos.image(wrong[k]).shape
        if r.success:
            assert int(blackbox.predict_proba(r.adversarial[None]).argmax()) == photos.labels[wrong[k]]
            assert r.linf <= 32 / 255 + 1e-9
