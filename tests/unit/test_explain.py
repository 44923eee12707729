"""Properties of the explanation engine on tiny seeded models (white-box and black-box)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import load_images
from advexplain.shared.errors import InvalidInput
from advexplain.shared.explain import (DEFAULT_METHOD, METHODS, EnsembleSurrogate, Explanation, epsilon_schedule, explain,
                            quantise)
from advexplain.shared.explain.base import loss_gradient
from advexplain.shared.training import predict


@pytest.fixture(scope="module")
def setting(tiny_models):
    blackbox = LocalClassifier.from_checkpoint(tiny_models["blackbox"])
    surrogate = LocalClassifier.from_checkpoint(tiny_models["surrogate"])
    data = load_images("elpv", "validation", 32, progress=False)
    predicted = predict(blackbox.model, data)
    wrong = (predicted != data.labels).nonzero().flatten()
    right = (predicted == data.labels).nonzero().flatten()
    assert len(wrong) >= 8 and len(right) >= 1
    return {"blackbox": blackbox, "surrogate": surrogate, "data": data, "wrong": wrong[:8].tolist(),
            "right": right[:2].tolist(), "paths": tiny_models}


def image_of(setting, i):
    data = setting["data"]
    return data.as_float(slice(i, i + 1))[0], int(data.labels[i])


def fresh_oracle(setting, label_only=False):
    return LocalClassifier.from_checkpoint(setting["paths"]["blackbox"], label_only=label_only)


def check_properties(result: Explanation, image, before, label, oracle, queries_before, max_queries):
    assert torch.equal(image, before), "the input image was mutated"
    assert result.queries == oracle.queries - queries_before
    assert result.queries <= max_queries
    assert result.search_queries == result.queries - 1
    assert result.adversarial.shape == image.shape
    assert float(result.adversarial.min()) >= 0.0 and float(result.adversarial.max()) <= 1.0
    if result.success:
        assert int(oracle.predict_proba(result.adversarial[None]).argmax()) == label
        assert result.final_prediction == label
        assert torch.allclose(result.perturbation, result.adversarial - image)
        assert math.isclose(result.linf, float(result.perturbation.abs().max()), rel_tol=1e-6, abs_tol=1e-9)
    else:
        assert result.perturbation is None and torch.equal(result.adversarial, image)


CASES = [(m, mode, lo) for m in METHODS for mode in ("whitebox", "blackbox") for lo in (False, True)]


@pytest.mark.parametrize("method,mode,label_only", CASES)
def test_properties_on_misclassified_images(setting, method, mode, label_only):
    oracle = fresh_oracle(setting, label_only)
    source = oracle if mode == "whitebox" else setting["surrogate"]
    params = [(n, p.requires_grad) for n, p in setting["surrogate"].model.named_parameters()]
    successes = 0
    for i in setting["wrong"][:4]:
        image, label = image_of(setting, i)
        before = image.clone()
        start = oracle.queries
        result = explain(image, label, source, oracle, method, max_queries=20)
        check_properties(result, image, before, label, oracle, start, 20)
        assert not result.already_correct and result.original_prediction != label
        successes += result.success
    if mode == "whitebox" and method == DEFAULT_METHOD:
        assert successes == 4
    assert not setting["surrogate"].model.training
    assert [(n, p.requires_grad) for n, p in setting["surrogate"].model.named_parameters()] == params


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 7), method=st.sampled_from(sorted(METHODS)), max_queries=st.integers(1, 6),
       blackbox=st.booleans(), noise_seed=st.integers(0, 2**16), noise=st.sampled_from([0.0, 0.003]))
def test_budget_and_counts_hold_for_any_image(setting, index, method, max_queries, blackbox, noise_seed, noise):
    image, label = image_of(setting, setting["wrong"][index])
    if noise:  # off the 8-bit grid: the engine must still keep [0,1] and count exactly
        g = torch.Generator().manual_seed(noise_seed)
        image = (image + noise * torch.randn(image.shape, generator=g)).clamp(0, 1)
    before = image.clone()
    oracle = fresh_oracle(setting, label_only=blackbox)
    source = setting["surrogate"] if blackbox else oracle
    result = explain(image, label, source, oracle, method, max_queries=max_queries)
    check_properties(result, image, before, label, oracle, 0, max_queries)
    if not result.success and not result.already_correct:
        assert result.queries == max_queries or not result.budget_exhausted


def test_already_correct_costs_one_query(setting):
    for method in METHODS:
        oracle = fresh_oracle(setting)
        image, label = image_of(setting, setting["right"][0])
        result = explain(image, label, setting["surrogate"], oracle, method)
        assert result.already_correct and result.success
        assert result.queries == 1 == oracle.queries and result.search_queries == 0
        assert result.l2 == 0.0 and torch.equal(result.adversarial, image)


def test_paper_follows_the_exact_epsilon_schedule(setting):
    assert epsilon_schedule(2.0) == [k / 10 for k in range(1, 20)]
    assert epsilon_schedule(0.35) == [0.1, 0.2, 0.3]
    assert epsilon_schedule(0.1) == []
    oracle = fresh_oracle(setting)
    image, label = image_of(setting, setting["wrong"][0])
    # A gradient source pointing the wrong way (negated loss) never fixes the image: the whole
    # schedule is tried, one query per eps, then NIL.
    class Away:
        classes = setting["surrogate"].classes
        def logits(self, x):
            return -setting["surrogate"].logits(x)
        def predict_proba(self, x):
            return torch.softmax(self.logits(x), 1)
    gradient = loss_gradient(setting["surrogate"], image, label)
    result = explain(image, label, Away(), oracle, "paper", alpha=0.75, max_queries=100)
    tried = [step["epsilon"] for step in result.trace if "epsilon" in step]
    assert tried[: len(tried)] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7][: len(tried)]
    if not result.success:
        assert tried == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7] and result.queries == 8
    # And every candidate is x - eps * g with g at the ORIGINAL image (the real gradient here).
    oracle = fresh_oracle(setting)
    result = explain(image, label, setting["surrogate"], oracle, "paper", alpha=2.0)
    if result.success:
        expected = (image - result.epsilon * gradient).clamp(0, 1)
        assert torch.allclose(result.adversarial, expected, atol=1e-6)
        assert [s["epsilon"] for s in result.trace[1:]] == [k / 10 for k in range(1, len(result.trace))]


def test_default_method_queries_8_bit_images(setting):
    oracle = fresh_oracle(setting)
    image, label = image_of(setting, setting["wrong"][1])
    result = explain(image, label, oracle, oracle)
    assert result.success and result.method == DEFAULT_METHOD
    assert torch.equal(result.adversarial, quantise(result.adversarial))
    assert result.search_queries == 1


def test_ensemble_gradient_is_the_sum_of_its_members(setting):
    a, b = setting["surrogate"], setting["blackbox"]
    image, label = image_of(setting, setting["wrong"][2])
    ensemble = EnsembleSurrogate([a, b])
    assert torch.allclose(ensemble.loss_gradient(image, label),
                          loss_gradient(a, image, label) + loss_gradient(b, image, label), atol=1e-6)
    oracle = fresh_oracle(setting)
    result = explain(image, label, ensemble, oracle)
    check_properties(result, image, image.clone(), label, oracle, 0, 20)


@pytest.mark.parametrize("kwargs", [
    {"method": "nope"}, {"max_queries": 0}, {"max_queries": -3}, {"max_queries": 2.5}, {"alpha": float("nan")},
    {"alpha": -1.0}, {"alpha": 0.0}, {"alpha": float("inf")}, {"margin": float("nan")}, {"margin": -1.0},
    {"norm": "l7"}, {"bogus": 1},
])
def test_bad_parameters_raise_invalid_input(setting, kwargs):
    image, label = image_of(setting, setting["wrong"][0])
    with pytest.raises(InvalidInput):
        explain(image, label, setting["surrogate"], fresh_oracle(setting), **kwargs)


@pytest.mark.parametrize("bad", ["nan", "range", "shape", "label"])
def test_bad_images_and_labels_raise_invalid_input(setting, bad):
    image, label = image_of(setting, setting["wrong"][0])
    if bad == "nan":
        image = image.clone(); image[0, 0, 0] = float("nan")
    elif bad == "range":
        image = image + 1.5
    elif bad == "shape":
        image = image[None]
    else:
        label = 7
    with pytest.raises(InvalidInput):
        explain(image, label, setting["surrogate"], fresh_oracle(setting))


def test_to_dict_is_json_safe(setting):
    import json
    image, label = image_of(setting, setting["wrong"][0])
    result = explain(image, label, setting["surrogate"], fresh_oracle(setting))
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["queries"] == result.queries and d["search_queries"] == result.queries - 1


def test_margin_smooths_surrogate_gradients_only(setting):
    from advexplain.shared.explain.base import BudgetedOracle, Search, margin_and_gradient
    image, label = image_of(setting, setting["wrong"][3])
    surrogate, method = setting["surrogate"], METHODS["margin"]
    # Black-box: the gradient is averaged over seeded noisy copies; the margin itself is exact.
    s = Search(image, label, surrogate, BudgetedOracle(fresh_oracle(setting), 20), 2.0, method.validate_options({}))
    exact_value, exact_grad = margin_and_gradient(surrogate, image, label)
    value, grad = method._margin_and_gradient(s, image, torch.Generator().manual_seed(0))
    assert value == exact_value and not torch.allclose(grad, exact_grad)
    assert torch.equal(method._margin_and_gradient(s, image, None)[1], exact_grad)
    # Seeded, so a black-box explanation is reproducible, and it stays within the budget.
    runs = [explain(image, label, surrogate, fresh_oracle(setting, True), max_queries=20) for _ in range(2)]
    assert torch.equal(runs[0].adversarial, runs[1].adversarial) and runs[0].queries == runs[1].queries <= 20
    # White-box keeps the exact gradient: the smoothing options change nothing.
    results = []
    for options in ({}, {"smooth": 0}, {"smooth": 8, "sigma": 0.2}):
        oracle = fresh_oracle(setting)
        results.append(explain(image, label, oracle, oracle, **options))
    assert all(torch.equal(r.adversarial, results[0].adversarial) and r.trace == results[0].trace for r in results)
