"""Rendering: every picture is a decodable PNG; the adversarial one is the exact 8-bit image."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from advexplain.shared.explain import Explanation
from advexplain.shared.pixels import quantise
from advexplain.shared.render import render_explanation
from advexplain.shared.saliency import saliency_map

H, W = 16, 24  # a non-square photo: every picture but the panel comes back at its size


def make(success=True, already=False):
    g = torch.Generator().manual_seed(0)
    original = quantise(torch.rand(3, H, W, generator=g))
    adversarial = quantise(original + 0.02 * torch.randn(3, H, W, generator=g)) if success and not already else original
    delta = adversarial - original if success else None
    return Explanation(success=success, already_correct=already, label=1, target=1,
                       original_prediction=0 if not already else 1, final_prediction=1 if success else 0,
                       original=original, adversarial=adversarial, perturbation=delta, epsilon=None, queries=2,
                       l2=0.1 if success else None, linf=0.02 if success else None, rms=0.01 if success else None,
                       method="margin", classes=("female", "male"),
                       failure_reason=None if success else "max_linf")


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_all_pictures_are_pngs_and_adversarial_is_lossless():
    e = make()
    pngs = render_explanation(e, saliency_map(e.perturbation))
    assert set(pngs) == {"saliency", "overlay", "adversarial", "panel"}
    adv = decode(pngs["adversarial"])
    assert adv.shape == (H, W, 3)
    expected = (e.adversarial * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(adv, expected)
    assert torch.equal(torch.from_numpy(adv.copy()).permute(2, 0, 1).float().div(255), e.adversarial)
    heat = decode(pngs["saliency"])
    assert heat.shape == (H, W, 3) and decode(pngs["overlay"]).shape == (H, W, 3)
    zero = saliency_map(e.perturbation) == 0
    assert (heat[zero.numpy()] == 0).all()  # Algorithm 2's zeros are drawn black
    panel = decode(pngs["panel"])
    assert panel.shape[1] > 3 * W and panel.shape[0] > H


def test_failed_and_already_correct_explanations_render():
    for e in (make(success=False), make(already=True)):
        sal = None if e.perturbation is None else saliency_map(e.perturbation + 1e-9)
        pngs = render_explanation(e, sal)
        assert np.array_equal(decode(pngs["adversarial"]), decode(render_explanation(e, None)["adversarial"]))
        decode(pngs["panel"])


def test_a_failure_draws_a_black_map_the_unchanged_photo_and_a_different_panel():
    failed, found = make(success=False), make()
    pngs = render_explanation(failed, None)
    assert not decode(pngs["saliency"]).any(), "no change, no saliency"
    assert np.array_equal(decode(pngs["overlay"]), decode(pngs["adversarial"]))
    assert np.array_equal(
        decode(pngs["adversarial"]), (failed.original * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    )
    assert not np.array_equal(
        decode(pngs["panel"]), decode(render_explanation(found, saliency_map(found.perturbation))["panel"])
    )


def test_the_panel_keeps_the_photos_aspect_ratio():
    e = make()
    panel = decode(render_explanation(e, saliency_map(e.perturbation), tile=96)["panel"])
    # The first tile's photo is 96 wide and 64 high (16 x 24 scaled by 4), centred in a 96 x 96 cell:
    # the rows above and below it stay white.
    top = 34
    cell = panel[top:top + 96, 6:6 + 96]
    assert (cell[:16] == 255).all() and (cell[-16:] == 255).all()
    assert not (cell[16:80] == 255).all()
