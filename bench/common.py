"""Shared helpers for the comparison benchmarks (peers_attacks, saliency_faithfulness, agreement).

Loading (models, the misclassified validation images), our explanations, map ranking, the
perturbation curves and their AUC, top-k IoU and Spearman correlation, markdown tables, JSON.
Every image here is a (C, H, W) or (N, C, H, W) float tensor in [0, 1]; every map is (H, W).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2.functional import gaussian_blur as blur

from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import load_images, load_photos
from advexplain.shared.evaluation import find_mistakes
from advexplain.shared.explain import explain
from advexplain.shared.saliency import pixel_magnitude

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=os.environ.get("ADVEXPLAIN_FACES"),
                   help="gender-faces folder <root>/<split>/<class>/<image> (default: $ADVEXPLAIN_FACES)")
    p.add_argument("--split", default="Validation")
    p.add_argument("--blackbox", type=Path, default=ROOT / "models-faces" / "blackbox")
    p.add_argument("--surrogate", type=Path, default=ROOT / "models-faces" / "surrogate")
    p.add_argument("--limit", type=int, default=None, help="only the first N misclassified images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / f"{name}.json")
    return p


@dataclass
class Bench:
    """What every benchmark starts from: the two models, the data, and the images to explain."""

    blackbox: LocalClassifier      # scores; its .model is the network ART/captum get
    surrogate: LocalClassifier
    images: torch.Tensor           # (N, 3, S, S) float [0, 1], the misclassified ones
    labels: torch.Tensor           # (N,) true labels
    predicted: torch.Tensor        # (N,) the black box's (wrong) predictions
    indices: list[int]             # positions in the split
    data: object                   # the whole ImageSet (for correctly classified references)
    all_predicted: torch.Tensor    # the black box's prediction for every image of the split
    meta: dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)


def load_bench(args) -> Bench:
    """Seed, load both checkpoints and the split; find what the black box gets wrong (no queries counted)."""
    seed_everything(args.seed)
    if not args.data:
        raise SystemExit("no data: pass --data or set ADVEXPLAIN_FACES")
    bb_ckpt, sg_ckpt = load_checkpoint(args.blackbox), load_checkpoint(args.surrogate)
    blackbox = LocalClassifier(bb_ckpt.model, bb_ckpt.classes)
    surrogate = LocalClassifier(sg_ckpt.model, sg_ckpt.classes)
    data = load_images(args.data, args.split, bb_ckpt.meta.image_size, progress=False)
    if tuple(data.classes) != tuple(bb_ckpt.classes):
        raise SystemExit(f"data classes {data.classes} differ from the black box's {bb_ckpt.classes}")
    with torch.no_grad():
        predicted = torch.cat([blackbox.logits(data.as_float(slice(i, i + 256))).argmax(1)
                               for i in range(0, len(data), 256)])
    wrong = (predicted != data.labels).nonzero().flatten().tolist()
    misclassified = len(wrong)
    if args.limit is not None:
        wrong = wrong[: args.limit]
    idx = torch.tensor(wrong, dtype=torch.long)
    meta = {
        "data": str(args.data), "split": args.split, "blackbox": str(args.blackbox), "surrogate": str(args.surrogate),
        "blackbox_val_accuracy": bb_ckpt.meta.metrics.get("val_accuracy"),
        "surrogate_val_accuracy": sg_ckpt.meta.metrics.get("val_accuracy"),
        "image_size": bb_ckpt.meta.image_size, "validation_images": len(data), "misclassified": misclassified,
        "images_used": len(wrong), "limit": args.limit, "seed": args.seed, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
    }
    return Bench(blackbox, surrogate, data.as_float(idx), data.labels[idx].clone(), predicted[idx].clone(),
                 wrong, data, predicted, meta)


# -- our explanations ---------------------------------------------------------------------------

OUR_SETTINGS = {
    # name: (method, gradient source, oracle[, options]) -- white-box: the real model is both.
    "ours white-box margin": ("margin", "blackbox", "blackbox"),
    "ours white-box paper": ("paper", "blackbox", "blackbox"),
    "ours black-box margin": ("margin", "surrogate", "label_only"),
    "ours black-box paper": ("paper", "surrogate", "label_only"),
    # The default margin walk takes L2 steps (pixels move in proportion to the gradient);
    # margin-linf takes L-inf steps (|g|_1 sign(g)), which move nearly every pixel by the same amount.
    "ours white-box margin-linf": ("margin-linf", "blackbox", "blackbox"),
    "ours black-box margin-linf": ("margin-linf", "surrogate", "label_only"),
}


def run_ours(bench: Bench, method: str, source: str, oracle: str, options: dict | None = None):
    """Explain every image with one of our settings; a fresh counting oracle per image."""
    grad = bench.blackbox if source == "blackbox" else bench.surrogate
    out = []
    for image, label in zip(bench.images, bench.labels):
        white = oracle == "blackbox" and source == "blackbox"
        if white:
            box = bench.blackbox          # white-box: gradient source IS the oracle
        else:
            box = LocalClassifier(bench.blackbox.model, bench.blackbox.classes, label_only=(oracle == "label_only"))
        out.append(explain(image, int(label), grad, box, method, whitebox=white, **(options or {})))
    return out


def magnitude_map(perturbation: torch.Tensor | None, shape) -> torch.Tensor:
    """The unthresholded Algorithm-2 magnitude (per-pixel L2 over channels); zeros when NIL.

    Algorithm 2 keeps exactly the pixels above a quantile of this magnitude, in the same order, so
    ranking by it ranks Algorithm 2's kept pixels first and orders the rest instead of tying them.
    """
    if perturbation is None:
        return torch.zeros(shape)
    return pixel_magnitude(perturbation)


# -- map ranking and the curves -----------------------------------------------------------------

def rank_order(saliency: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(H, W) map -> flat pixel indices, most salient first; ties broken by a seeded random order."""
    flat = saliency.detach().float().flatten()
    g = torch.Generator().manual_seed(seed)
    tiebreak = torch.randperm(flat.numel(), generator=g)
    # stable sort of a random permutation by value = random tie-breaking, reproducible
    perm = flat[tiebreak].argsort(descending=True, stable=True)
    return tiebreak[perm]


def topk_mask(saliency: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """(H, W) bool mask of the top `fraction` of pixels (at least one when fraction > 0)."""
    n = saliency.numel()
    k = 0 if fraction <= 0 else max(1, int(round(fraction * n)))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rank_order(saliency, seed)[:k]] = True
    return mask.view_as(saliency)


def centre_map(h: int, w: int) -> torch.Tensor:
    """(H, W) reference map that knows nothing of the image: pixels ranked by their closeness to the
    centre (the negative distance, in pixels). Photos of one subject (faces) put it in the middle,
    so a deletion curve rewards this prior alone; a map is worth its image only if it beats this."""
    yy = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
    xx = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
    return -(yy[:, None] ** 2 + xx[None, :] ** 2).sqrt()


def resized_map(saliency: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(H', W') map -> (h, w), bilinear: another photo's map laid on this one (the control for
    whether a map says something about its own image rather than where such images keep their subject)."""
    if tuple(saliency.shape) == (h, w):
        return saliency.detach().float().clone()
    return torch.nn.functional.interpolate(saliency.detach().float()[None, None], size=(h, w), mode="bilinear",
                                           align_corners=False)[0, 0]


def blend_curve_inputs(start: torch.Tensor, end: torch.Tensor, saliency: torch.Tensor,
                       fractions, seed: int = 0) -> torch.Tensor:
    """(len(fractions), C, H, W): `start` with its top-f pixels (by the map) taken from `end`."""
    order = rank_order(saliency, seed)
    n = order.numel()
    out = start.unsqueeze(0).repeat(len(fractions), 1, 1, 1)
    flat_out, flat_end = out.flatten(2), end.flatten(1)
    for row, f in enumerate(fractions):
        k = int(round(f * n))
        if k:
            sel = order[:k]
            flat_out[row][:, sel] = flat_end[:, sel]
    return flat_out.view_as(out)


@torch.no_grad()
def class_probability(model, x: torch.Tensor, label: int) -> torch.Tensor:
    """Probability of `label` from an nn.Module returning logits; not counted as queries."""
    return torch.softmax(model(x), dim=1)[:, label]


def auc(fractions, values) -> float:
    """Trapezoid area under values(fraction) over [0, 1]."""
    return float(np.trapezoid(np.asarray(values, dtype=np.float64), np.asarray(fractions, dtype=np.float64)))


def gaussian_blur(image: torch.Tensor, kernel: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """(C, H, W) -> the same image blurred (torchvision's, reflect padding): the RISE-style 'removed' baseline."""
    return blur(image, kernel_size=[kernel, kernel], sigma=[sigma, sigma]).clamp(0, 1)


# -- agreement ----------------------------------------------------------------------------------

def topk_iou(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.1, seed: int = 0) -> float:
    """Intersection over union of the top-`fraction` pixel sets of two (H, W) maps."""
    ma, mb = topk_mask(a, fraction, seed), topk_mask(b, fraction, seed + 1)
    union = int((ma | mb).sum())
    return float((ma & mb).sum()) / union if union else 1.0


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation over pixels (average ranks for ties); nan when a map is constant."""
    from scipy.stats import spearmanr
    x, y = a.detach().flatten().double().numpy(), b.detach().flatten().double().numpy()
    if np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


# -- reporting ----------------------------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return float(statistics.median(values)) if values else None


def mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return float(statistics.fmean(values)) if values else None


def fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _clean(value):
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def photo_mistakes(network: LocalClassifier, data: str, split: str,
                   limit: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
    """The photos of a split, at their own size and in split order, that `network` gets wrong (the
    first `limit`), with their true labels; screening by logits counts no query."""
    photos = load_photos(data, split)
    images = [photos.image(i) for i in range(len(photos))]
    with torch.no_grad():
        wrong = find_mistakes(lambda x: int(network.logits(x.unsqueeze(0)).argmax()), images, photos.labels)
    wrong = wrong[:limit] if limit is not None else wrong
    return [images[i] for i, _ in wrong], [photos.labels[i] for i, _ in wrong]


def jitter_weights(model: torch.nn.Module, seed: int, scale: float = 1e-6) -> torch.nn.Module:
    """A copy of `model` whose every weight is multiplied by 1 + scale * N(0, 1) (seeded): a change of
    float rounding's size, to see how many outcomes sit on a rounding edge."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(1 + scale * torch.randn(p.shape, generator=g))
    return out


def parse_sets(pairs) -> dict:
    """['key=value', ...] -> {key: value}: JSON values, None or none for None."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise SystemExit(f"{pair!r} is not key=value")
        out[key.strip()] = None if value.strip() in ("None", "none") else json.loads(value)
    return out


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(payload), indent=2, allow_nan=False) + "\n")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
