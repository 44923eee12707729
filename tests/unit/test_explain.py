"""Properties of the explanation engine on tiny seeded models, on photos at their own (non-square) size."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import load_photos
from advexplain.shared.errors import InvalidInput
from advexplain.shared.explain import (
    DEFAULT_MAX_LINF,
    DEFAULT_METHOD,
    METHODS,
    EnsembleSurrogate,
    Explanation,
    epsilon_schedule,
    explain,
)
from advexplain.shared.explain.base import no_side_effects, value_and_grad
from advexplain.shared.explain.margin import (
    MarginOptions,
    MarginSearch,
    Views,
    _finer,
    budget_schedule,
    input_side,
    upsample,
)
from advexplain.shared.pixels import quantise

# elpv cells are 300 x 300: a crop of 300 x 240 keeps every test on a non-square photo.
HEIGHT, WIDTH = 300, 240


def photo(photos, i: int) -> torch.Tensor:
    return photos.image(i)[:, :HEIGHT, :WIDTH].contiguous()


@pytest.fixture(scope="module")
def setting(tiny_models):
    blackbox = LocalClassifier.from_checkpoint(tiny_models["blackbox"])
    surrogate = LocalClassifier.from_checkpoint(tiny_models["surrogate"])
    photos = load_photos("elpv", "validation")
    wrong, right = [], []
    for i in range(len(photos)):
        predicted = int(blackbox.predict_proba(photo(photos, i)[None]).argmax())
        (wrong if predicted != photos.labels[i] else right).append(i)
        if len(wrong) >= 8 and len(right) >= 2:
            break
    assert len(wrong) >= 8 and len(right) >= 2
    return {"surrogate": surrogate, "photos": photos, "wrong": wrong, "right": right, "paths": tiny_models}


def image_of(setting, i):
    return photo(setting["photos"], i), setting["photos"].labels[i]


def fresh_oracle(setting, label_only=False):
    return LocalClassifier.from_checkpoint(setting["paths"]["blackbox"], label_only=label_only)


class Recording:
    """An oracle wrapper that keeps every image it was asked about."""

    def __init__(self, oracle):
        self.oracle, self.classes, self.seen = oracle, oracle.classes, []

    def predict_proba(self, x):
        self.seen.extend(x.clone())
        return self.oracle.predict_proba(x)


class Threshold:
    """A box that answers `goal` once any pixel moved by at least `levels`/255, else the other class."""

    def __init__(self, original, goal, levels, classes=("a", "b")):
        self.original, self.goal, self.levels, self.classes = original, goal, levels, classes
        self.queries = 0

    def predict_proba(self, x):
        self.queries += x.shape[0]
        moved = (x - self.original).abs().flatten(1).max(1).values * 255 >= self.levels - 1e-3
        index = torch.where(moved, self.goal, 1 - self.goal)
        return torch.nn.functional.one_hot(index, 2).float()


def check_properties(result: Explanation, image, before, oracle, queries_before, options):
    """What holds for every outcome, then what holds for the one it had. Callers that need a given
    outcome assert it themselves (check_success / check_failure below), so neither half can go unrun."""
    assert torch.equal(image, before), "the input image was mutated"
    assert result.queries == oracle.queries - queries_before, "queries must equal the oracle's own count"
    assert result.queries <= options.get("max_queries", 20)
    assert result.search_queries == result.queries - 1
    assert result.adversarial.shape == image.shape and result.original.shape == image.shape
    assert torch.equal(result.adversarial, quantise(result.adversarial)), "the returned image is 8-bit"
    (check_success if result.success else check_failure)(result, oracle, options)


def check_success(result: Explanation, oracle, options):
    assert result.success and result.failure_reason is None
    assert int(oracle.predict_proba(result.adversarial[None]).argmax()) == result.target
    assert result.final_prediction == result.target
    assert torch.allclose(result.perturbation, result.adversarial - result.original)
    assert math.isclose(result.linf, float(result.perturbation.abs().max()), rel_tol=1e-6, abs_tol=1e-9)
    assert result.linf <= options.get("max_linf", DEFAULT_MAX_LINF) + 1e-9
    assert math.isclose(result.rms, float(result.perturbation.pow(2).mean().sqrt()), rel_tol=1e-5, abs_tol=1e-9)


def check_failure(result: Explanation, oracle=None, options=None):
    assert not result.success
    assert result.failure_reason in ("max_queries", "max_linf", "alpha", "no_gradient")
    assert result.perturbation is None and torch.equal(result.adversarial, result.original)
    assert result.l2 is None and result.linf is None and result.rms is None


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("mode", ["whitebox", "blackbox", "blackbox-label-only"])
def test_properties_on_misclassified_photos(setting, method, mode):
    oracle = fresh_oracle(setting, label_only=mode.endswith("label-only"))
    white = mode == "whitebox"
    source = oracle if white else setting["surrogate"]
    for i in setting["wrong"][:3]:
        image, label = image_of(setting, i)
        before, start = image.clone(), oracle.queries
        result = explain(image, label, source, oracle, method, whitebox=white, max_queries=20)
        check_properties(result, image, before, oracle, start, {"max_queries": 20})
        assert not result.already_correct and result.original_prediction != label and result.target == label


# The paper's step is eps x gradient: on the tiny surrogate it rounds to no 8-bit change at all, so
# Algorithm 1 can fail even against a box that any change flips (failure_reason "alpha").
MOVING_METHODS = sorted(set(METHODS) - {"paper"})


@pytest.mark.parametrize("method", MOVING_METHODS)
def test_every_method_succeeds_where_any_change_is_enough(setting, method):
    # A box that flips to the true label once any pixel moves one 8-bit level: these methods must get there.
    image, label = image_of(setting, setting["wrong"][0])
    oracle = Threshold(image, label, levels=1, classes=setting["surrogate"].classes)
    result = explain(image, label, setting["surrogate"], oracle, method, max_linf=1.0)
    check_properties(result, image, image.clone(), oracle, 0, {"max_linf": 1.0})
    check_success(result, oracle, {"max_linf": 1.0})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_fails_cleanly_against_a_box_that_never_agrees(setting, method):
    image, label = image_of(setting, setting["wrong"][0])
    oracle = Threshold(image, label, levels=10_000, classes=setting["surrogate"].classes)
    result = explain(image, label, setting["surrogate"], oracle, method, max_queries=6, max_linf=1.0)
    check_properties(result, image, image.clone(), oracle, 0, {"max_queries": 6, "max_linf": 1.0})
    check_failure(result)


def test_patience_stops_walks_pinned_by_their_budget(setting):
    """Against a box that never agrees, a walk that stalls stops before max_steps; without patience
    every round runs all of them. The queries asked are the same rounds either way."""
    steps = {}
    for patience in (None, 1):
        walked = []
        for i in setting["wrong"][:3]:
            image, label = image_of(setting, i)
            oracle = Threshold(image, label, levels=10_000, classes=setting["surrogate"].classes)
            result = explain(image, label, setting["surrogate"], oracle, patience=patience, max_steps=8)
            check_failure(result)
            walked += [t["steps"] for t in result.trace if "steps" in t]
        assert all(0 <= n <= 8 for n in walked)
        steps[patience] = walked
    assert sum(steps[1]) < sum(steps[None])
    assert min(steps[1]) < 8


def test_whitebox_default_always_explains_with_one_search_query(setting):
    oracle = fresh_oracle(setting)
    for i in setting["wrong"]:
        image, label = image_of(setting, i)
        result = explain(image, label, oracle, oracle, whitebox=True)
        assert result.success, result.trace
        assert result.search_queries == 1 and result.method == DEFAULT_METHOD


def test_blackbox_default_explains_mistakes_of_a_label_only_box(setting):
    # The tiny surrogate (32x32, trained on 10% for 8 epochs) transfers poorly, so only "some".
    oracle = fresh_oracle(setting, label_only=True)
    results = []
    for i in setting["wrong"]:
        image, label = image_of(setting, i)
        start = oracle.queries
        results.append(explain(image, label, setting["surrogate"], oracle))
        check_properties(results[-1], image, image.clone(), oracle, start, {})
    assert sum(r.success for r in results) >= 1, [(r.failure_reason, r.queries) for r in results]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 7), method=st.sampled_from(sorted(METHODS)), max_queries=st.integers(1, 6),
       max_linf=st.sampled_from([2 / 255, 8 / 255, 32 / 255, 1.0]), label_only=st.booleans(),
       noise_seed=st.integers(0, 2**16), noise=st.sampled_from([0.0, 0.003]))
def test_budget_bound_and_counts_hold_for_any_photo(setting, index, method, max_queries, max_linf, label_only,
                                                    noise_seed, noise):
    image, label = image_of(setting, setting["wrong"][index])
    if noise:  # off the 8-bit grid: the engine rounds, stays in [0,1] and counts exactly
        g = torch.Generator().manual_seed(noise_seed)
        image = (image + noise * torch.randn(image.shape, generator=g)).clamp(0, 1)
    before = image.clone()
    oracle = fresh_oracle(setting, label_only=label_only)
    options = {"max_queries": max_queries, "max_linf": max_linf}
    result = explain(image, label, setting["surrogate"], oracle, method, **options)
    check_properties(result, image, before, oracle, 0, options)
    if result.failure_reason == "max_queries":
        assert result.queries == max_queries


def test_already_there_costs_one_query(setting):
    for method in METHODS:
        oracle = fresh_oracle(setting)
        image, label = image_of(setting, setting["right"][0])
        result = explain(image, label, setting["surrogate"], oracle, method)
        assert result.already_correct and result.success
        assert result.queries == 1 == oracle.queries and result.search_queries == 0
        assert result.l2 == 0.0 and torch.equal(result.adversarial, result.original)


def test_every_queried_image_is_8_bit_and_the_answer_is_the_accepted_one(setting):
    for method in MOVING_METHODS:
        image, label = image_of(setting, setting["wrong"][1])
        # Any change of one level flips this box, so every method succeeds and the check below runs.
        oracle = Recording(Threshold(image, label, levels=1, classes=setting["surrogate"].classes))
        result = explain(image, label, setting["surrogate"], oracle, method, max_linf=1.0)
        assert all(torch.equal(x, quantise(x)) for x in oracle.seen)
        assert result.success, (method, result.failure_reason)
        assert any(torch.equal(result.adversarial, x) for x in oracle.seen[1:]), "the answer is an image the box saw"


def test_paper_follows_the_exact_epsilon_schedule_on_rounded_candidates(setting):
    assert epsilon_schedule(2.0) == [k / 10 for k in range(1, 20)]
    assert epsilon_schedule(0.35) == [0.1, 0.2, 0.3]
    assert epsilon_schedule(0.1) == []
    image, label = image_of(setting, setting["wrong"][0])
    surrogate = setting["surrogate"]
    _, gradient = value_and_grad(lambda x: surrogate.loss(x, label), image[None])
    # An oracle that never agrees: the whole schedule is tried, one 8-bit query per eps, in order.
    never = Threshold(image, label, levels=10_000, classes=surrogate.classes)
    result = explain(image, label, surrogate, never, "paper", alpha=0.75, max_queries=100, max_linf=1.0)
    tried = [step["epsilon"] for step in result.trace if "epsilon" in step]
    assert tried == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7] and result.queries == 8
    assert not result.success and result.failure_reason == "alpha"
    # An oracle that agrees with any change: the first eps whose ROUNDED candidate x - eps g (g at
    # the ORIGINAL image) differs from x wins, and that rounded image is the answer.
    always = Threshold(image, label, levels=1, classes=surrogate.classes)
    result = explain(image, label, surrogate, always, "paper", max_linf=1.0, alpha=100.0, max_queries=1000)
    first = next(k / 10 for k in range(1, 1000) if not torch.equal(quantise(image - k / 10 * gradient[0]), image))
    assert result.success and result.epsilon == first
    assert torch.equal(result.adversarial, quantise(image - first * gradient[0]))


def test_a_larger_change_than_max_linf_is_a_failure(setting):
    image, label = image_of(setting, setting["wrong"][0])
    surrogate = setting["surrogate"]
    for method in METHODS:
        # The box agrees only with a change of 40 levels; max_linf allows 32: never a success.
        box = Threshold(image, label, levels=40, classes=surrogate.classes)
        result = explain(image, label, surrogate, box, method, max_linf=32 / 255, max_queries=50)
        assert not result.success and result.failure_reason in ("max_linf", "alpha", "max_queries")
        assert all(step.get("linf_255", 0) <= 32 for step in result.trace)


@pytest.mark.parametrize("levels", [3, 9, 17])
def test_refine_shrinks_the_change_to_what_the_box_needs(setting, levels):
    image, label = image_of(setting, setting["wrong"][2])
    surrogate = setting["surrogate"]
    plain = explain(image, label, surrogate, Threshold(image, label, levels, surrogate.classes), max_linf=1.0)
    box = Threshold(image, label, levels, surrogate.classes)
    refined = explain(image, label, surrogate, box, max_linf=1.0, refine=8)
    assert plain.success and refined.success
    assert refined.queries == box.queries and refined.queries > plain.queries
    assert round(refined.linf * 255) <= round(plain.linf * 255)
    assert levels <= round(refined.linf * 255) <= levels + 1, refined.trace


def test_target_other_than_the_label(setting):
    image, label = image_of(setting, setting["right"][1])
    oracle = fresh_oracle(setting)
    other = 1 - label
    result = explain(image, label, oracle, oracle, target=other, whitebox=True)
    assert result.success and not result.already_correct
    assert result.label == label and result.target == other and result.final_prediction == other
    assert int(oracle.predict_proba(result.adversarial[None]).argmax()) == other
    d = result.to_dict()
    assert d["target"] == other and d["label"] == label


def test_ensemble_objectives_and_gradients_are_the_sums_of_its_members(setting, tiny_models):
    a = setting["surrogate"]
    b = LocalClassifier.from_checkpoint(tiny_models["blackbox"])
    image, label = image_of(setting, setting["wrong"][2])
    ensemble = EnsembleSurrogate([a, b])
    for objective in ("margin", "loss"):
        value, grad = value_and_grad(lambda x, o=objective: getattr(ensemble, o)(x, label), image[None])
        va, ga = value_and_grad(lambda x, o=objective: getattr(a, o)(x, label), image[None])
        vb, gb = value_and_grad(lambda x, o=objective: getattr(b, o)(x, label), image[None])
        assert torch.allclose(value, va + vb, atol=1e-5) and torch.allclose(grad, ga + gb, atol=1e-6)
    oracle = fresh_oracle(setting)
    result = explain(image, label, ensemble, oracle)
    check_properties(result, image, image.clone(), oracle, 0, {})


def test_no_side_effects_restores_training_mode_and_requires_grad(tiny_models):
    model = LocalClassifier.from_checkpoint(tiny_models["surrogate"])
    model.model.train()
    flags = [p.requires_grad for p in model.model.parameters()]
    with no_side_effects(model):
        assert not model.model.training and not any(p.requires_grad for p in model.model.parameters())
    assert model.model.training and [p.requires_grad for p in model.model.parameters()] == flags
    with pytest.raises(RuntimeError), no_side_effects(model):
        raise RuntimeError("a search failing half-way")
    assert model.model.training and [p.requires_grad for p in model.model.parameters()] == flags


def test_blackbox_search_is_seeded_and_whitebox_ignores_view_options(setting):
    image, label = image_of(setting, setting["wrong"][3])
    runs = [explain(image, label, setting["surrogate"], fresh_oracle(setting, True)) for _ in range(2)]
    assert torch.equal(runs[0].adversarial, runs[1].adversarial) and runs[0].trace == runs[1].trace
    results = []
    for options in ({}, {"samples": 1}, {"samples": 16, "sigma": 0.2, "crop": 0.4}):
        oracle = fresh_oracle(setting)
        results.append(explain(image, label, oracle, oracle, whitebox=True, **options))
    assert all(torch.equal(r.adversarial, results[0].adversarial) and r.trace == results[0].trace for r in results)


@pytest.mark.parametrize("kwargs", [
    {"method": "nope"}, {"max_queries": 0}, {"max_queries": -3}, {"max_queries": 2.5}, {"max_linf": 0},
    {"max_linf": 1.5}, {"max_linf": float("nan")}, {"refine": -1}, {"method": "paper", "alpha": float("nan")},
    {"method": "paper", "alpha": -1.0}, {"method": "paper", "alpha": 0.0}, {"method": "paper", "alpha": 101},
    {"alpha": 2.0}, {"margin": float("nan")}, {"margin": -1.0}, {"norm": "l7"}, {"grid": 1}, {"samples": 0},
    {"view_sizes": [64, 16]}, {"bogus": 1},
])
def test_bad_options_raise_invalid_input(setting, kwargs):
    image, label = image_of(setting, setting["wrong"][0])
    with pytest.raises(InvalidInput):
        explain(image, label, setting["surrogate"], fresh_oracle(setting), **kwargs)


@pytest.mark.parametrize("bad", ["nan", "range", "shape", "label", "target", "bool-label"])
def test_bad_images_and_labels_raise_invalid_input(setting, bad):
    image, label = image_of(setting, setting["wrong"][0])
    target = None
    if bad == "nan":
        image = image.clone()
        image[0, 0, 0] = float("nan")
    elif bad == "range":
        image = image + 1.5
    elif bad == "shape":
        image = image[None]
    elif bad == "label":
        label = 7
    elif bad == "target":
        target = -1
    else:
        label = True
    with pytest.raises(InvalidInput):
        explain(image, label, setting["surrogate"], fresh_oracle(setting), target=target)


def test_to_dict_is_json_safe(setting):
    image, label = image_of(setting, setting["wrong"][0])
    result = explain(image, label, setting["surrogate"], fresh_oracle(setting))
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["queries"] == result.queries and d["search_queries"] == result.queries - 1
    assert d["size"] == [WIDTH, HEIGHT]
    grids = [step["grid"] for step in d["trace"] if "grid" in step]
    assert grids and all(isinstance(g, list) and all(isinstance(n, int) for n in g) for g in grids)


@given(first=st.floats(1 / 255, 1.0), growth=st.floats(1.0, 4.0), cap=st.floats(1 / 255, 1.0))
def test_budget_schedule_grows_to_the_cap(first, growth, cap):
    budgets = budget_schedule(first, growth, cap)
    assert budgets[-1] == cap and all(b <= cap for b in budgets)
    assert all(x < y for x, y in zip(budgets, budgets[1:]))


@given(c=st.sampled_from([1, 3]), h=st.integers(2, 200), w=st.integers(2, 200),
       fh=st.integers(2, 200), fw=st.integers(2, 200))
def test_a_finer_grid_doubles_the_cells_up_to_the_finest(c, h, w, fh, fw):
    finer = _finer((c, h, w), (c, fh, fw))
    if h >= fh and w >= fw:
        assert finer is None
    else:
        assert finer == (c, min(fh, 2 * h), min(fw, 2 * w))
    assert _finer((c, h, w), None) is None


class Checkerboard:
    """A gradient source whose goal margin is the change's match with a checkerboard of 4-pixel
    squares: a change on 8-pixel cells (bilinear) can barely draw it, one on 2-pixel cells can."""

    classes = ("a", "b")

    def __init__(self, image: torch.Tensor, scale: float):
        self.image, self.scale = image, scale
        h, w = image.shape[-2:]
        rows, cols = torch.arange(h)[:, None] // 4, torch.arange(w)[None, :] // 4
        self.pattern = ((rows + cols) % 2 * 2 - 1).float().expand_as(image)

    def margin(self, batch: torch.Tensor, goal: int) -> torch.Tensor:
        return ((batch - self.image) * self.pattern).flatten(1).sum(1) * self.scale - 1.0

    def loss(self, batch: torch.Tensor, label: int) -> torch.Tensor:
        return -self.margin(batch, label)

    def modules(self) -> list[torch.nn.Module]:
        return []


@pytest.mark.parametrize("finer", [False, True])
def test_a_walk_pinned_on_a_coarse_grid_moves_to_a_finer_one(finer):
    """Pinned below the first target on an 8x8 grid, the walk goes on at 16 (then 32) cells and
    reaches the margin; without a finest grid (or above the threshold) it stops where it is pinned."""
    image = quantise(torch.full((3, 64, 64), 0.5))
    source = Checkerboard(image, scale=0.05)
    o = MarginOptions(max_steps=40)
    s = SimpleNamespace(image=image, goal=1, gradient_source=source, snap=quantise, options=o)
    z = torch.zeros(3, 8, 8)
    eps, target = 8 / 255, 8.0
    finest = (3, 32, 32) if finer else None
    z, candidate, reached, _ = MarginSearch()._walk(s, z, eps, target, None, finest, finer_below=target)  # type: ignore[arg-type]
    assert torch.equal(candidate, quantise(image + upsample(z, 64, 64)))
    assert float((candidate - image).abs().max()) <= eps + 1e-6
    if finer:
        assert z.shape in ((3, 16, 16), (3, 32, 32)) and reached >= target
    else:
        assert z.shape == (3, 8, 8) and reached < target
    # A walk pinned above the threshold keeps its grid.
    z2, _, _, _ = MarginSearch()._walk(s, torch.zeros(3, 8, 8), eps, target, None, (3, 32, 32),  # type: ignore[arg-type]
                                       finer_below=-1e9)
    assert z2.shape == (3, 8, 8)


@pytest.mark.parametrize("max_grid", [None, 32])
def test_a_search_pinned_on_the_first_grid_refines_after_finer_after_queries(max_grid):
    """Through the whole search: a box that never agrees, a gradient source the 8-cell grid cannot
    move (Checkerboard), one view (the photo itself). The first `finer_after` queries use the first
    grid; after them the pinned walk moves to a finer one, and without `max_grid` it never does."""
    image = quantise(torch.full((3, 64, 64), 0.5))
    source = Checkerboard(image, scale=0.05)
    oracle = Threshold(image, 1, levels=10_000, classes=source.classes)
    result = explain(image, 1, source, oracle, grid=8, max_grid=max_grid, finer_after=2, samples=1,
                     max_steps=40, max_rounds=5, max_linf=1.0)
    check_failure(result)
    grids = [t["grid"] for t in result.trace if "grid" in t]
    assert len(grids) == result.search_queries == 5
    assert grids[:2] == [[8, 8], [8, 8]]
    if max_grid is None:
        assert all(g == [8, 8] for g in grids)
    else:
        assert grids[2] != [8, 8] and all(8 < g[0] <= 32 for g in grids[2:])


@pytest.mark.parametrize("finer_after", [0, 2, 6])
def test_queries_before_finer_after_use_the_first_grid_and_none_passes_max_grid(setting, finer_after):
    image, label = image_of(setting, setting["wrong"][0])
    oracle = Threshold(image, label, levels=10_000, classes=setting["surrogate"].classes)
    o = {"finer_after": finer_after, "max_grid": 48, "max_linf": 1.0, "max_rounds": 6}
    result = explain(image, label, setting["surrogate"], oracle, **o)
    check_failure(result)
    first = list(MarginSearch._grid_shape(image, 24)[-2:])
    finest = MarginSearch._grid_shape(image, 48)[-2:]
    grids = [t["grid"] for t in result.trace if "grid" in t]
    assert len(grids) == result.search_queries
    assert all(g == first for g in grids[:finer_after])
    assert all(g[0] <= finest[0] and g[1] <= finest[1] for g in grids)
    assert all(a[0] <= b[0] for a, b in zip(grids, grids[1:])), "a grid never gets coarser"


@given(h=st.integers(2, 40), w=st.integers(2, 40), gh=st.integers(2, 12), gw=st.integers(2, 12),
       seed=st.integers(0, 1000))
def test_upsampled_change_never_exceeds_its_grid(h, w, gh, gw, seed):
    z = torch.randn(3, gh, gw, generator=torch.Generator().manual_seed(seed))
    out = upsample(z, h, w)
    assert out.shape == (3, h, w) and float(out.abs().max()) <= float(z.abs().max()) + 1e-6


@given(h=st.integers(8, 600), w=st.integers(8, 600), side=st.one_of(st.none(), st.integers(16, 256)))
def test_working_size_keeps_the_aspect_and_enough_for_the_surrogate_and_the_largest_view(h, w, side):
    o = MarginOptions()
    work = Views(torch.zeros(3, h, w), o, torch.Generator(), side=side).work
    assert work[0] <= max(8, h) and work[1] <= max(8, w), "never above the photo's own size"
    assert max(work) <= max(Views.WORK_SIDE, 8) + 1
    if min(work) > 8:  # (a side is never below 8 pixels, whatever the aspect)
        assert abs(work[0] / work[1] - h / w) <= 2 / min(work) * max(1.0, h / w), "the aspect is kept"
    need = max(side or 0, o.view_sizes[1])
    if max(h, w) * need / min(h, w) <= Views.WORK_SIDE:  # the long-side cap does not bind
        assert min(work) >= min(min(h, w), need) - 1


def test_input_side_of_one_surrogate_an_ensemble_and_an_unknown_source(setting, tiny_models):
    surrogate = setting["surrogate"]
    assert input_side(surrogate) == surrogate.image_size
    assert input_side(EnsembleSurrogate([surrogate, surrogate])) == surrogate.image_size
    assert input_side(SimpleNamespace(classes=("a", "b"))) is None


def test_gradient_at_the_working_size_is_the_photo_size_gradient(setting):
    """The search's gradient path starts at the working size; the value is exactly that of the 8-bit
    candidate at the photo's size, and the gradient points where the photo-size path's does."""
    image, label = image_of(setting, setting["wrong"][0])
    surrogate = setting["surrogate"]
    o = MarginOptions()
    s = SimpleNamespace(image=image, goal=label, gradient_source=surrogate, snap=quantise, options=o)
    shape = MarginSearch._grid_shape(image, o.grid)
    h, w = image.shape[-2:]
    for seed in range(3):
        z = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 6 / 255

        def views(seed=seed):
            return Views(image, o, torch.Generator().manual_seed(seed), side=input_side(surrogate))

        value, grad, candidate = MarginSearch()._margin_and_grad(s, z, views())  # type: ignore[arg-type]
        assert torch.equal(candidate, quantise(image + upsample(z, *image.shape[-2:])))
        v = views()
        assert v.work != (h, w), "the photo must be larger than the working size for this test"
        zz = z.clone().requires_grad_(True)
        x = image + upsample(zz, h, w)
        x = x + (quantise(x) - x).detach()
        margins = surrogate.margin(v(v.to_work(x)), label)
        (reference,) = torch.autograd.grad(margins.mean(), zz)
        assert math.isclose(value, float(margins.detach().mean()), rel_tol=1e-5, abs_tol=1e-5)
        cosine = float(torch.nn.functional.cosine_similarity(grad.flatten(), reference.flatten(), dim=0))
        assert cosine > 0.99, cosine


@pytest.mark.parametrize("whitebox", [False, True])
def test_a_grey_photo_gets_a_grey_change_and_a_colour_photo_may_not(setting, whitebox):
    oracle = fresh_oracle(setting)
    source = oracle if whitebox else setting["surrogate"]
    assert source.trained_on_grey, "the elpv models normalise with equal per-channel statistics"
    explained = []
    for i in setting["wrong"]:
        image, label = image_of(setting, i)
        assert torch.equal(image, image[:1].expand_as(image)), "elpv cells are grey"
        result = explain(image, label, source, oracle, whitebox=whitebox)
        if result.success:
            explained.append(i)
            assert torch.equal(result.adversarial, result.adversarial[:1].expand_as(result.adversarial))
    assert explained, "no success to check"
    # Within two levels between channels (a grey JPEG saved in colour) a photo is still grey; tinted
    # (channels apart), its change is free to differ between channels. Checked on every photo above
    # whose near-grey or tinted copy is explained (a search one level away may go another way).
    greys = tints = 0
    for i in explained:
        image, label = image_of(setting, i)
        near = quantise(image + torch.tensor([0.0, 1.0, -1.0])[:, None, None] / 255)  # channels 2 levels apart
        result = explain(near, label, source, oracle, whitebox=whitebox)
        if result.success:
            greys += 1
            change, unclipped = result.adversarial - near, ((result.adversarial > 0) & (result.adversarial < 1)).all(0)
            assert unclipped.float().mean() > 0.5
            spread = (change - change[:1]).abs().amax(0)[unclipped]
            # A grey change where nothing clipped, up to a rounding tie (one level) on a few pixels.
            assert float(spread.max()) <= 1 / 255 + 1e-6 and float((spread > 1e-6).float().mean()) < 0.01
        tinted = quantise(image * torch.tensor([1.0, 0.97, 0.94])[:, None, None])
        result = explain(tinted, label, source, oracle, whitebox=whitebox)
        if result.success:
            tints += 1
            change = result.adversarial - tinted
            assert not torch.equal(change, change[:1].expand_as(change))
    assert greys and tints, (greys, tints, len(explained))


def test_a_source_trained_in_colour_changes_a_grey_photo_in_colour_unless_told(setting):
    oracle = fresh_oracle(setting)
    colour = LocalClassifier.from_checkpoint(setting["paths"]["surrogate"])
    colour.trained_on_grey = False  # as a surrogate trained on colour photos says
    for i in setting["wrong"]:
        image, label = image_of(setting, i)
        grey = explain(image, label, setting["surrogate"], oracle)
        if not grey.success:
            continue
        auto = explain(image, label, colour, oracle, max_linf=1.0)
        forced = explain(image, label, colour, oracle, max_linf=1.0, grey_change=True)
        if not (auto.success and forced.success):
            continue
        change = auto.adversarial - image
        assert not torch.equal(change, change[:1].expand_as(change)), "channels change apart"
        assert torch.equal(forced.adversarial, forced.adversarial[:1].expand_as(forced.adversarial))
        return
    pytest.fail("no photo both searches explain, to compare")


def test_trained_on_grey_reads_the_per_channel_statistics():
    from advexplain.shared.models import ModelConfig, PaperCNN

    def source(mean, std):
        return LocalClassifier(PaperCNN(ModelConfig(architecture="surrogate", image_size=32, width=0.125,
                                                    mean=mean, std=std)), ("a", "b"))

    grey, colour = source((0.6,) * 3, (0.15,) * 3), source((0.65, 0.48, 0.41), (0.23, 0.2, 0.2))
    assert grey.trained_on_grey and not colour.trained_on_grey
    assert EnsembleSurrogate([grey, grey]).trained_on_grey and not EnsembleSurrogate([grey, colour]).trained_on_grey


def _weights(source) -> list[torch.Tensor]:
    return [p.detach().clone() for m in source.modules() for p in m.parameters()]


@pytest.mark.parametrize("ensemble", [False, True])
def test_adaptation_tunes_a_copy_only_and_every_query_is_counted(setting, tiny_models, ensemble):
    """With adapt_steps, each rejected query fine-tunes the search's own copy of the surrogate:
    later queries say so in the trace, the shared surrogate's weights never change, and the
    properties of every outcome hold."""
    surrogate = setting["surrogate"]
    source = EnsembleSurrogate([surrogate, LocalClassifier.from_checkpoint(tiny_models["blackbox"])]) \
        if ensemble else surrogate
    before = _weights(source)
    adapted = 0
    for i in setting["wrong"][:4]:
        image, label = image_of(setting, i)
        oracle = fresh_oracle(setting, label_only=True)
        result = explain(image, label, source, oracle, adapt_steps=5)
        check_properties(result, image, image.clone(), oracle, 0, {})
        flags = [t["adapted"] for t in result.trace if "adapted" in t]
        assert len(flags) == result.search_queries
        # Only the first query comes before any answer to adapt to; every later one is adapted.
        assert flags[:1] == [False][:len(flags)] and all(flags[1:])
        adapted += sum(flags)
    assert adapted > 0, "no search got past its first query: nothing was adapted"
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(source)))


def test_adaptation_pulls_the_tuned_copy_below_the_goal_on_rejected_candidates(setting):
    """_adapt lowers the goal's margin on a candidate the box rejected, one the surrogate itself
    accepts, to about 0 on its copy, and returns None for a source it cannot copy."""
    surrogate = setting["surrogate"]
    image, _ = image_of(setting, setting["wrong"][0])
    options = MarginOptions(adapt_steps=200, adapt_lr=1e-2)
    views = Views(image, options, torch.Generator().manual_seed(0), side=input_side(surrogate))
    rejected = quantise((image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1)))
                        .clamp(0, 1))
    batch = views(views.to_work(rejected))
    with torch.no_grad():
        goal = int(surrogate.logits(batch).mean(0).argmax())  # the class the surrogate gives it
        start = surrogate.margin(batch, goal)
    assert float(start.mean()) > 0, "the surrogate must accept the candidate for there to be anything to undo"
    s = SimpleNamespace(gradient_source=surrogate, goal=goal, options=options)
    tuned = MarginSearch._adapt(s, None, [rejected], views, options)  # type: ignore[arg-type]
    assert tuned is not None and tuned is not surrogate
    with torch.no_grad():
        after = tuned.margin(batch, goal)
        assert torch.equal(surrogate.margin(batch, goal), start), "the shared surrogate changed"
    assert float(after.mean()) <= 0.5 * float(start.mean())
    s.gradient_source = SimpleNamespace(margin=surrogate.margin, modules=surrogate.modules)
    assert MarginSearch._adapt(s, None, [rejected], views, options) is None  # type: ignore[arg-type]
