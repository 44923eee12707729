"""The metric functions behind bench/{peers_attacks,saliency_faithfulness,agreement}.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bench.common import (  # noqa: E402
    auc,
    blend_curve_inputs,
    centre_map,
    gaussian_blur,
    rank_order,
    resized_map,
    spearman,
    topk_iou,
    topk_mask,
)
from bench.peers_attacks import CountingNetwork  # noqa: E402

FRACTIONS = [i / 16 for i in range(17)]


class RegionModel(nn.Module):
    """Toy 2-class model: the 'mistaken' class 0 is driven by the brightness of one 4x4 region."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.region = torch.zeros(size, size, dtype=torch.bool)
        self.region[2:6, 9:13] = True

    def forward(self, x):
        evidence = (x * self.region).sum(dim=(1, 2, 3)) / self.region.sum() / 3
        logit = 20 * (evidence - 0.5)
        return torch.stack([logit, -logit], dim=1)


def deletion_auc(model, image, saliency):
    baseline = torch.zeros_like(image)
    batch = blend_curve_inputs(image, baseline, saliency, FRACTIONS, seed=0)
    with torch.no_grad():
        p = torch.softmax(model(batch), dim=1)[:, 0]
    return auc(FRACTIONS, p.tolist())


def test_deletion_auc_ranks_a_perfect_map_above_random_and_inverted():
    model = RegionModel()
    image = torch.full((3, 16, 16), 0.9)
    perfect = model.region.float()
    random_map = torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    inverted = 1 - perfect
    perfect_auc = deletion_auc(model, image, perfect)
    assert perfect_auc < deletion_auc(model, image, random_map) < deletion_auc(model, image, inverted)
    assert perfect_auc < 0.1  # the 16 region pixels are the first 1/16 removed


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40))
def test_centre_map_ranks_pixels_by_their_distance_from_the_centre(h, w):
    m = centre_map(h, w)
    assert m.shape == (h, w)
    order = rank_order(m)
    rows, cols = order // w, order % w
    distance = ((rows - (h - 1) / 2) ** 2 + (cols - (w - 1) / 2) ** 2).sqrt()
    assert bool((distance[1:] >= distance[:-1] - 1e-6).all())  # removed from the middle outwards
    assert torch.equal(m, m.flip(0)) and torch.equal(m, m.flip(1))  # no side is favoured


def test_centre_map_is_a_strong_deletion_prior_only_when_the_evidence_is_central():
    """The reason for the reference row: a map that knows nothing of the image wins when the evidence
    sits in the middle and loses to random when it does not."""
    image = torch.full((3, 16, 16), 0.9)
    central, corner = RegionModel(), RegionModel()
    central.region.zero_()
    central.region[6:10, 6:10] = True
    corner.region.zero_()
    corner.region[:4, 12:] = True
    random_map = torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    assert deletion_auc(central, image, centre_map(16, 16)) < 0.1 < deletion_auc(central, image, random_map)
    assert deletion_auc(corner, image, centre_map(16, 16)) > deletion_auc(corner, image, random_map)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 30), st.integers(2, 30), st.integers(2, 30), st.integers(2, 30))
def test_resized_map_keeps_a_map_and_lays_another_on_any_size(h, w, h2, w2):
    m = torch.rand(h, w, generator=torch.Generator().manual_seed(h * 31 + w))
    assert torch.equal(resized_map(m, h, w), m)
    out = resized_map(m, h2, w2)
    assert out.shape == (h2, w2)
    assert float(out.min()) >= float(m.min()) - 1e-6 and float(out.max()) <= float(m.max()) + 1e-6


def test_blend_endpoints_and_counts():
    start, end = torch.zeros(3, 8, 8), torch.ones(3, 8, 8)
    saliency = torch.arange(64.0).view(8, 8)
    out = blend_curve_inputs(start, end, saliency, [0.0, 0.25, 1.0])
    assert torch.equal(out[0], start) and torch.equal(out[2], end)
    changed = out[1][0] == 1
    assert int(changed.sum()) == 16
    assert bool(changed.flatten()[-16:].all())  # the 16 highest values were replaced first
    assert torch.equal(start, torch.zeros(3, 8, 8))  # inputs untouched


def test_auc_of_constants():
    assert auc(FRACTIONS, [1.0] * len(FRACTIONS)) == pytest.approx(1.0)
    assert auc(FRACTIONS, FRACTIONS) == pytest.approx(0.5)


def test_rank_order_and_ties_are_seeded():
    saliency = torch.tensor([[0.0, 3.0], [1.0, 2.0]])
    assert rank_order(saliency).tolist() == [1, 3, 2, 0]
    flat = torch.zeros(10, 10)
    assert torch.equal(rank_order(flat, seed=3), rank_order(flat, seed=3))
    assert not torch.equal(rank_order(flat, seed=3), rank_order(flat, seed=4))
    assert int(topk_mask(torch.rand(10, 10), 0.1).sum()) == 10


def test_topk_iou_on_hand_made_maps():
    a = torch.zeros(10, 10)
    a[0] = torch.arange(1.0, 11.0)          # top 10% = row 0
    b = torch.zeros(10, 10)
    b[9] = torch.arange(1.0, 11.0)          # top 10% = row 9
    c = a.clone()
    c[0, :5] = 0
    c[1, :5] = 100                         # half of row 0 swapped for half of row 1
    assert topk_iou(a, a * 2 + 1) == 1.0
    assert topk_iou(a, b) == 0.0
    assert topk_iou(a, c) == pytest.approx(5 / 15)


def test_spearman_on_hand_made_maps():
    a = torch.rand(8, 8, generator=torch.Generator().manual_seed(1))
    assert spearman(a, a.exp()) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert torch.isnan(torch.tensor(spearman(a, torch.zeros(8, 8))))


def test_gaussian_blur_keeps_constants_and_smooths():
    flat = torch.full((3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(flat), flat, atol=1e-6)
    spike = torch.zeros(1, 16, 16)
    spike[0, 8, 8] = 1
    blurred = gaussian_blur(spike)
    assert blurred.max() < 0.1 and blurred.sum() == pytest.approx(1.0, abs=1e-4)


def test_counting_network_counts_every_image_and_hides_scores():
    net = CountingNetwork(RegionModel(), label_only=True)
    out = net(torch.rand(7, 3, 16, 16))
    net(torch.rand(2, 3, 16, 16))
    assert net.count == 9
    assert set(out.unique().tolist()) <= {0.0, 1.0} and torch.equal(out.sum(1), torch.ones(7))
    scores = CountingNetwork(RegionModel(), label_only=False)(torch.rand(3, 3, 16, 16))
    assert torch.allclose(scores.sum(1), torch.ones(3)) and not set(scores.unique().tolist()) <= {0.0, 1.0}


def test_perturbed_surrogates_for_tuning_move_weights_by_rounding_size_only():
    from advexplain.shared.classifiers import LocalClassifier
    from advexplain.shared.models import ModelConfig, PaperCNN
    from bench.native_resolution import jittered

    torch.manual_seed(0)
    source = LocalClassifier(PaperCNN(ModelConfig(architecture="surrogate", image_size=32, width=0.0625)), ["a", "b"])
    source.freeze()
    copies = [jittered(source, seed) for seed in (1, 2)]
    x = torch.rand(3, 3, 40, 40)
    base = source.logits(x).detach()
    for copy in copies:
        assert copy is not source and not any(p.requires_grad for p in copy.model.parameters())
        ratios = [(q / p)[p != 0] - 1 for p, q in zip(source.model.parameters(), copy.model.parameters())]
        moved = torch.cat([r.flatten() for r in ratios]).abs()
        assert 0 < float(moved.max()) < 1e-5 and float(moved.mean()) > 1e-8  # every weight moved, by ~1e-6
        assert torch.allclose(copy.logits(x), base, atol=1e-4)
    assert not torch.equal(copies[0].logits(x), copies[1].logits(x))  # seeds differ


def test_perturbed_ensemble_jitters_every_member_apart():
    from advexplain.shared.classifiers import LocalClassifier
    from advexplain.shared.explain import EnsembleSurrogate
    from advexplain.shared.models import ModelConfig, PaperCNN
    from bench.native_resolution import jittered

    torch.manual_seed(0)
    members = [LocalClassifier(PaperCNN(ModelConfig(architecture="surrogate", image_size=32, width=0.0625)),
                               ["a", "b"]).freeze() for _ in range(2)]
    ensemble = EnsembleSurrogate(members)
    copy = jittered(ensemble, 1)
    assert isinstance(copy, EnsembleSurrogate) and len(copy.members) == 2
    x = torch.rand(2, 3, 40, 40)
    for member, moved in zip(members, copy.members):
        assert isinstance(moved, LocalClassifier) and moved is not member
        assert not torch.equal(moved.logits(x), member.logits(x))
        assert torch.allclose(moved.logits(x), member.logits(x), atol=1e-4)
    # Each member gets its own jitter, and another perturbation seed another one.
    assert not torch.equal(jittered(ensemble, 2).margin(x, 0), copy.margin(x, 0))


def test_paper_scale_variants_parse_to_labelled_options():
    from bench.paper_scale import parse_variant

    assert parse_variant("before:patience=null;max_grid=None") == ("before", {"patience": None, "max_grid": None})
    assert parse_variant("wide:grid=48;sigma=0.05;") == ("wide", {"grid": 48, "sigma": 0.05})
    assert parse_variant("plain:") == ("plain", {})
    for bad in ("no-colon", ":grid=4", "x:grid"):
        with pytest.raises(SystemExit):
            parse_variant(bad)


def test_captum_surrogate_net_is_the_surrogates_mean_logits():
    from advexplain.shared.classifiers import LocalClassifier
    from advexplain.shared.explain import EnsembleSurrogate
    from advexplain.shared.models import ModelConfig, PaperCNN
    from bench.native_resolution import SurrogateNet

    torch.manual_seed(0)
    a, b = (LocalClassifier(PaperCNN(ModelConfig(architecture="surrogate", image_size=size, width=0.0625)),
                            ["a", "b"]).freeze() for size in (32, 48))
    x = torch.rand(2, 3, 50, 40)
    assert torch.allclose(SurrogateNet(a)(x), a.logits(x))
    assert torch.allclose(SurrogateNet(EnsembleSurrogate([a, b]))(x), (a.logits(x) + b.logits(x)) / 2, atol=1e-6)
    # Captum differentiates it with respect to the photo.
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(SurrogateNet(a)(x)[:, 1].sum(), x)
    assert grad.shape == x.shape and bool(grad.abs().sum() > 0)
