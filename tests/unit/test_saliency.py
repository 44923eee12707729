"""Algorithm 2 against quartiles computed by hand, in batch and single mode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advexplain.shared.errors import InvalidInput
from advexplain.shared.saliency import (
    DEFAULT_BETA,
    DEFAULT_TAU,
    TOP_TOLERANCE,
    _threshold,
    pixel_magnitude,
    quartiles,
    saliency_map,
    saliency_maps,
)


def grid(values):
    return torch.tensor(values, dtype=torch.float32).reshape(1, 2, 2)


def test_channels_combine_as_euclidean_length():
    p = torch.zeros(3, 1, 2)
    p[0, 0, 0], p[1, 0, 0] = 3.0, -4.0
    p[2, 0, 1] = -0.5
    assert torch.allclose(pixel_magnitude(p), torch.tensor([[5.0, 0.5]]))


def test_single_mode_hand_quartiles():
    # [0, 1, 2, 3]: q1 = 0.75, q3 = 2.25 (linear interpolation), iqr 1.5; tau 0.25 -> cut 2.625.
    assert quartiles([grid([0, 1, 2, 3])]) == (0.75, 2.25)
    out = saliency_map(grid([0, 1, 2, -3]), tau=0.25, beta=3.0)
    assert torch.equal(out, torch.tensor([[0.0, 0.0], [0.0, 9.0]]))
    # The cut is inclusive of keeping: a value equal to q3 + tau * iqr is kept (paper: "< cut" -> 0).
    out = saliency_map(grid([0, 1, 2, 3]), tau=0.5, beta=2.0)  # cut = 3.0
    assert torch.equal(out, torch.tensor([[0.0, 0.0], [0.0, 6.0]]))


def test_batch_mode_uses_quartiles_of_all_non_nil_perturbations():
    # Together 0..7: q1 = 1.75, q3 = 5.25, iqr 3.5; tau 0.25 -> cut 6.125: only the 7 survives.
    first, second = grid([0, 1, 2, 3]), grid([4, 5, 6, 7])
    maps = saliency_maps([first, None, second], tau=0.25, beta=2.0)
    assert maps[1] is None
    assert torch.equal(maps[0], torch.zeros(2, 2))
    assert torch.equal(maps[2], torch.tensor([[0.0, 0.0], [0.0, 14.0]]))
    # Single mode on each differs: [0..3] keeps its 3, [4..7] (cut 6.625) keeps its 7.
    assert torch.equal(saliency_map(first, tau=0.25, beta=2.0), torch.tensor([[0.0, 0.0], [0.0, 6.0]]))
    assert torch.equal(saliency_map(second, tau=0.25, beta=2.0), torch.tensor([[0.0, 0.0], [0.0, 14.0]]))


def test_all_nil_batch_and_defaults():
    assert saliency_maps([None, None]) == [None, None]
    assert DEFAULT_TAU > 0 and DEFAULT_BETA > 1
    p = torch.randn(3, 8, 8) * 0.01
    before = p.clone()
    out = saliency_map(p)
    assert out.shape == (8, 8) and float(out.min()) >= 0 and torch.equal(p, before)


@pytest.mark.parametrize("tau,beta", [(0, 2), (-1, 2), (float("nan"), 2), (1.5, 1.0), (1.5, float("inf")), (1.5, -2)])
def test_bad_parameters(tau, beta):
    with pytest.raises(InvalidInput):
        saliency_map(grid([0, 1, 2, 3]), tau=tau, beta=beta)
    with pytest.raises(InvalidInput):
        saliency_map(None)


def test_tau_and_beta_change_the_map_of_a_real_sized_perturbation():
    perturbation = torch.randn(3, 40, 30, generator=torch.Generator().manual_seed(0))
    magnitude = pixel_magnitude(perturbation)
    base = saliency_map(perturbation, tau=0.5, beta=2.0)
    higher_fence = saliency_map(perturbation, tau=1.5, beta=2.0)
    bigger_boost = saliency_map(perturbation, tau=0.5, beta=5.0)
    kept, kept_higher = base > 0, higher_fence > 0
    # tau moves the fence: a higher one keeps a strict subset of the pixels.
    assert 0 < kept_higher.sum() < kept.sum() and not (kept_higher & ~kept).any()
    # beta boosts what is kept and nothing else: same pixels, values scaled by the ratio.
    assert torch.equal(bigger_boost > 0, kept) and not torch.equal(bigger_boost, base)
    assert torch.allclose(bigger_boost[kept], magnitude[kept] * 5.0) and torch.allclose(
        base[kept], magnitude[kept] * 2.0
    )


def test_a_change_pinned_at_its_budget_keeps_its_largest_pixels():
    # A grey change with 40% of its pixels at the budget (12 levels): q3 is the maximum, so the
    # paper's fence lies above every change; single mode keeps the pinned pixels, batch mode nothing.
    levels = torch.tensor([12.0] * 40 + [6.0] * 30 + [0.0] * 30).reshape(1, 10, 10) / 255
    perturbation = levels.expand(3, -1, -1)
    q1, q3 = quartiles([pixel_magnitude(perturbation)])
    assert not (_threshold(pixel_magnitude(perturbation), q1, q3, 0.5, 2.0) > 0).any()
    assert saliency_maps([perturbation])[0].sum() == 0
    out = saliency_map(perturbation, tau=0.5, beta=2.0)
    assert torch.equal(out > 0, levels[0] == 12 / 255)
    assert torch.allclose(out[out > 0], pixel_magnitude(perturbation)[out > 0] * 2.0)


@settings(max_examples=200, deadline=None)
@given(levels=st.lists(st.integers(-40, 40), min_size=4, max_size=64), channels=st.sampled_from([1, 3]),
       tau=st.floats(0.1, 3.0), beta=st.floats(1.01, 10.0))
def test_single_mode_is_the_papers_map_unless_that_is_empty(levels, channels, tau, beta):
    # 8-bit changes, as the searches return them (a difference of two 8-bit images).
    base = torch.rand(channels, 1, len(levels), generator=torch.Generator().manual_seed(len(levels)))
    base = (base * 255).round() / 255
    changed = ((base * 255 + torch.tensor(levels, dtype=torch.float32)).clamp(0, 255)).round() / 255
    perturbation = changed - base
    magnitude = pixel_magnitude(perturbation)
    q1, q3 = quartiles([magnitude])
    paper = _threshold(magnitude, q1, q3, tau, beta)
    out = saliency_map(perturbation, tau=tau, beta=beta)
    if (paper > 0).any() or float(magnitude.max()) == 0:
        assert torch.equal(out, paper)
    else:
        top = float(magnitude.max())
        assert (out > 0).any(), "a non-zero change never gets an empty map"
        assert torch.equal(out > 0, magnitude >= top - TOP_TOLERANCE)
        assert torch.allclose(out[out > 0], magnitude[out > 0] * beta)


# -- the detail map (saliency=detail) ------------------------------------------------------------

from advexplain.shared.saliency import (  # noqa: E402
    CHANGE,
    DETAIL,
    default_saliency,
    detail_alignment,
    explanation_saliency,
    photo_detail,
)

photos = st.tuples(st.integers(1, 24), st.integers(1, 24), st.integers(0, 2**31 - 1))


def photo_and_change(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g), (torch.rand(3, h, w, generator=g) - 0.5) * 0.1


@given(photos)
@settings(max_examples=40, deadline=None)
def test_flat_photo_has_no_detail(shape):
    h, w, seed = shape
    colour = torch.rand(3, 1, 1, generator=torch.Generator().manual_seed(seed))
    assert photo_detail(colour.expand(3, h, w).clone()).abs().max() < 1e-6


@given(photos)
@settings(max_examples=40, deadline=None)
def test_detail_map_is_the_positive_part_of_change_dot_detail(shape):
    photo, change = photo_and_change(*shape)
    score = detail_alignment(change, photo)
    assert score.shape == photo.shape[-2:] and bool((score >= 0).all())
    # The change that moves each pixel exactly as deleting its detail would scores |detail|^2 there;
    # its opposite scores nothing.
    detail = photo_detail(photo)
    assert torch.allclose(detail_alignment(detail, photo), detail.pow(2).sum(0), atol=1e-7)
    assert detail_alignment(-detail, photo).abs().max() < 1e-7
    # A pixel counts only by its own change: zeroing the change somewhere zeroes the map there.
    rows = max(1, shape[0] // 2)
    change[:, :rows] = 0
    assert float(detail_alignment(change, photo)[:rows].abs().max()) == 0.0


def test_detail_map_points_at_the_edge_the_change_works_against():
    # A bright square on black: its detail (blur - photo) is negative inside the border, positive just
    # outside. A change that darkens the square's border (it "removes" the edge) scores there only.
    photo = torch.zeros(3, 32, 32)
    photo[:, 10:22, 10:22] = 1.0
    change = torch.zeros(3, 32, 32)
    change[:, 10:22, 10:22] = -0.05
    score = detail_alignment(change, photo)
    assert score[10, 10] > 0 and score[16, 16] < score[10, 10] and score[0, 0] == 0
    assert float(score[:, :10].abs().max()) == 0.0


def test_explanation_saliency_sources_and_fallback():
    photo, change = photo_and_change(20, 30, 1)
    m, shows = explanation_saliency(change, photo, DETAIL)
    assert shows == DETAIL and m.shape == (20, 30) and bool((m > 0).any())
    score = detail_alignment(change, photo)
    assert bool((m[score == 0] == 0).all()) and bool((score[m > 0] > 0).all())
    assert torch.allclose(m[m > 0], 2.0 * score[m > 0])                 # Algorithm 2's boost, beta = 2
    m, shows = explanation_saliency(change, photo, CHANGE)
    assert shows == CHANGE and torch.equal(m, saliency_map(change))
    flat = torch.full((3, 20, 30), 0.5)
    m, shows = explanation_saliency(change, flat, DETAIL)        # no detail at all: the change's map
    assert shows == CHANGE and torch.equal(m, saliency_map(change))
    with pytest.raises(InvalidInput):
        explanation_saliency(change, photo, "gradient")
    with pytest.raises(InvalidInput):
        explanation_saliency(change, photo[:, :10], DETAIL)
    assert default_saliency("paper") == CHANGE and default_saliency("margin") == DETAIL
