"""Explanations as pictures: heat map, overlay, the 8-bit adversarial image and a Figure-2 panel.

Everything comes back as PNG bytes (lossless), drawn with Pillow and numpy only. The heat map
uses a black-red-yellow-white ramp, scaled so that the map's largest value is white (or by
`vmax`, to draw several maps on one scale as Algorithm 2's batch mode intends).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from advexplain.shared.pixels import encode_png, to_uint8

if TYPE_CHECKING:  # the explain package imports nothing from here; at run time any object with these fields does
    from advexplain.shared.explain import Explanation

# (position, RGB) anchors of the heat ramp; 0 is black so that Algorithm 2's zeros vanish.
_RAMP = np.array([(0.0, 0, 0, 0), (0.35, 180, 20, 20), (0.7, 255, 170, 0), (1.0, 255, 255, 230)], dtype=np.float64)
PANEL_TILE = 192


def _lut() -> np.ndarray:
    x = np.linspace(0, 1, 256)
    return np.stack([np.interp(x, _RAMP[:, 0], _RAMP[:, i]) for i in (1, 2, 3)], axis=1).round().astype(np.uint8)


LUT = _lut()


# zlib level of the returned PNGs: 3 renders an explanation's four 300x300 PNGs in 29 ms instead of
# 68 ms at 6, for 10% more bytes (bench/results/render_png.json); PNG stays lossless at every level.
PNG_LEVEL = 3


def png(array: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (lossless)."""
    return encode_png(array, compress_level=PNG_LEVEL)


def heat(saliency: torch.Tensor | None, shape: tuple[int, int], vmax: float | None = None) -> np.ndarray:
    """(H, W) saliency >= 0 -> (H, W, 3) uint8 heat map; None (a failed search) draws black."""
    if saliency is None:
        return np.zeros((*shape, 3), dtype=np.uint8)
    values = saliency.detach().cpu().double().numpy()
    top = float(vmax) if vmax else float(values.max())
    scaled = np.zeros_like(values) if top <= 0 else np.clip(values / top, 0, 1)
    return LUT[(scaled * 255).round().astype(np.int64)]


def overlay(
    image: np.ndarray, heat_map: np.ndarray, saliency: torch.Tensor | None, vmax: float | None = None
) -> np.ndarray:
    """Heat map over the image, opaque where the saliency is high and transparent where it is 0."""
    if saliency is None:
        return image
    values = saliency.detach().cpu().double().numpy()
    top = float(vmax) if vmax else float(values.max())
    alpha = np.zeros_like(values) if top <= 0 else np.clip(values / top, 0, 1) * 0.6 + (values > 0) * 0.3
    alpha = np.clip(alpha, 0, 1)[..., None]
    blended: np.ndarray = (image * (1 - alpha) + heat_map * alpha).round().astype(np.uint8)
    return blended


def _label(explanation: Explanation, index: int) -> str:
    classes = getattr(explanation, "classes", ()) or ()
    return classes[index] if 0 <= index < len(classes) else str(index)


def panel(
    explanation: Explanation,
    original: np.ndarray,
    adversarial: np.ndarray,
    heat_map: np.ndarray,
    tile: int = PANEL_TILE,
) -> np.ndarray:
    """Original | adversarial | saliency, each scaled (nearest-neighbour, so the pixels stay visible)
    to fit a `tile` x `tile` square with its aspect ratio kept, with the predictions and the true
    label written above them."""
    font = ImageFont.load_default()
    top = 34
    h, w = original.shape[:2]
    scale = tile / max(h, w)
    tile_w, tile_h = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (3 * tile + 4 * 6, tile + top + 6), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    e = explanation
    if e.success and not e.already_correct and e.linf is not None and e.l2 is not None:  # a change has norms
        note = f"L-inf {e.linf * 255:.1f}/255  L2 {e.l2:.3f}  queries {e.queries}"
        adv_caption = f"adversarial: {_label(e, e.final_prediction)}"
    elif e.already_correct:
        note, adv_caption = f"already correct (queries {e.queries})", "unchanged"
    else:
        reason = f", {e.failure_reason}" if getattr(e, "failure_reason", None) else ""
        note, adv_caption = f"no explanation found (queries {e.queries}{reason})", "search failed"
    captions = (
        f"original: predicted {_label(e, e.original_prediction)}",
        adv_caption,
        f"saliency (true: {_label(e, e.label)})",
    )
    for i, (array, caption) in enumerate(zip((original, adversarial, heat_map), captions)):
        x = 6 + i * (tile + 6)
        canvas.paste(Image.fromarray(array).resize((tile_w, tile_h), Image.Resampling.NEAREST),
                     (x + (tile - tile_w) // 2, top + (tile - tile_h) // 2))
        draw.text((x, 4), caption, fill=(0, 0, 0), font=font)
    draw.text((6, 18), note, fill=(90, 90, 90), font=font)
    return np.asarray(canvas)


def render_explanation(explanation: Explanation, saliency: torch.Tensor | None, *, vmax: float | None = None,
                       tile: int = PANEL_TILE) -> dict[str, bytes]:
    """PNG bytes of one explanation: 'saliency' (heat map), 'overlay' (heat map over the original),
    'adversarial' (the 8-bit adversarial image at the photo's own size, lossless) and 'panel' (Figure 2);
    all but the panel at the photo's size.

    explanation: an `Explanation` (its `original`, `adversarial`, labels and classes are used).
    saliency: (H, W) map from Algorithm 2, or None when the search failed.

    >>> pngs = render_explanation(result, saliency_map(result.perturbation))   # doctest: +SKIP
    >>> open("panel.png", "wb").write(pngs["panel"])                          # doctest: +SKIP
    """
    original = to_uint8(explanation.original)
    adversarial = to_uint8(explanation.adversarial)
    heat_map = heat(saliency, original.shape[:2], vmax)
    return {
        "saliency": png(heat_map),
        "overlay": png(overlay(original, heat_map, saliency, vmax)),
        "adversarial": png(adversarial),
        "panel": png(panel(explanation, original, adversarial, heat_map, tile)),
    }
