"""Explaining mistakes on photos at their own size, against boxes whose input geometry the explainer does not know.

Boxes (`--box`), each with the gradient-faces or elpv surrogate the explainer would host:
  thirdparty  bench/third_party_box.py on gender faces: another architecture, a 32x32 input
              reached by resize-shorter-side + centre crop, ImageNet normalisation, another
              training split; ONNX under onnxruntime, label-only. Surrogate: models-faces/surrogate.
  faces       our gender-faces CPU black box (64x64 squash), label-only; same surrogate.
  elpv        our built-in elpv CPU black box, label-only; surrogate models/surrogate.

Every photo is explained at its own resolution (faces about 80x105, elpv 300x300): the first
prediction, every query and every norm are at that size. For each method setting it reports
success (the box agrees AND the change is within max_linf), mean and median search queries,
median and 90th-percentile L-inf (in 8-bit levels, over successes), median RMS change, seconds per
explanation (and per failure), and, with --maps, deletion AUC of our map against Captum's maps on
the same box's network (lower = the map ranks first the pixels behind the mistake), beside two
controls: a map of no photo (closeness to the centre), and every map scored on the next photo
instead of its own. A map that says something about its own photo beats both. --detail-maps adds
the served `saliency=detail` map (the change's alignment with the photo's own detail) and its
controls (the detail alone, the next photo's change on this photo's detail).

    flock /tmp/advexplain-cpu.lock python -m bench.native_resolution --box thirdparty --split validation --maps
    python -m bench.native_resolution --box faces --split train --limit 60 --set grid=16 --set samples=4

Tune on `--split train` (images of the training split the box gets wrong); report on validation.
A search on an 8-bit rounding edge can go either way when the surrogate's logits move by float
rounding (~1e-6), so one run of 60 photos moves by a photo or two on its own. `--perturb K` runs
every setting K times, with the surrogate as loaded and with K-1 copies whose weights are jittered by
1e-6 (relative), and pools them: compare settings on the pooled numbers.

    python -m bench.native_resolution --box elpv --split train --limit 60 --perturb 3 \
        --method margin:patience=3 --method margin:patience=2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2.functional import gaussian_blur as tv_blur

from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.classifiers import LocalClassifier, fit_to_size
from advexplain.shared.data import load_photos, served_input
from advexplain.shared.evaluation import find_mistakes
from advexplain.shared.explain import EnsembleSurrogate, explain, method_options
from advexplain.shared.explain.margin import MarginOptions, Views, input_side
from advexplain.shared.pixels import quantise
from advexplain.shared.saliency import (
    DETAIL,
    detail_alignment,
    explanation_saliency,
    photo_detail,
    pixel_magnitude,
    saliency_map,
)
from bench.common import (
    RESULTS,
    auc,
    blend_curve_inputs,
    centre_map,
    fmt,
    gaussian_blur,
    jitter_weights,
    markdown_table,
    parse_sets,
    resized_map,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = [i / 32 for i in range(33)]


@dataclass
class Setup:
    """The box (oracle, counts), the surrogate, the misclassified photos and evaluation-only views of the box."""

    name: str
    oracle: object
    surrogate: object                            # a GradientSource: one surrogate or an ensemble
    photos: list[torch.Tensor]                  # (3, H, W) float [0, 1] on the 8-bit grid, own sizes
    labels: list[int]
    mistaken: list[int]                         # the box's (wrong) prediction
    paths: list[str]
    probabilities: Callable[[torch.Tensor], torch.Tensor]   # (N, 3, H, W) -> (N, K), not counted
    network_for: Callable[[int, int], torch.nn.Module]      # (H, W) -> differentiable box on that size
    gradcam_layer: Callable[[torch.nn.Module], torch.nn.Module]
    whitebox_source: object = None              # the box's own network as a GradientSource (ours only)
    meta: dict = field(default_factory=dict)


def _photos(data: str, split: str, grey: bool = False, upscale: float = 1.0):
    photos = load_photos(data, split)
    images = [photos.image(i) for i in range(len(photos))]
    if upscale != 1.0:  # each photo as a larger one (bicubic, 8-bit), as a phone or camera would give
        images = [quantise(torch.nn.functional.interpolate(
            x.unsqueeze(0), size=(round(x.shape[-2] * upscale), round(x.shape[-1] * upscale)),
            mode="bicubic", align_corners=False)[0].clamp(0, 1)) for x in images]
    if grey:  # each photo as a grey one saved in colour (ITU-R 601 luma, 8-bit, three equal channels)
        luma = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
        images = [quantise((x * luma).sum(0, keepdim=True)).expand(3, -1, -1).contiguous() for x in images]
    return images, photos.labels, photos.classes, photos.paths


def _screen(setup_probs, photos, labels, limit):
    """Indices of the photos the box gets wrong (evaluation bookkeeping: not counted as queries)."""
    mistakes = find_mistakes(lambda x: int(setup_probs(x.unsqueeze(0)).argmax(1)), photos, labels)
    misclassified = len(mistakes)
    if limit:
        mistakes = mistakes[:limit]
    return [i for i, _ in mistakes], [p for _, p in mistakes], misclassified


def load_setup(args) -> Setup:
    faces = args.data or os.environ.get("ADVEXPLAIN_FACES")
    if args.box in ("thirdparty", "faces") and not faces:
        raise SystemExit("no faces data: pass --data or set ADVEXPLAIN_FACES")
    if args.box == "thirdparty":
        from bench.third_party_box import LocalThirdPartyBox, ThirdPartyBox, torch_view

        folder = args.thirdparty
        box = ThirdPartyBox.load(folder)
        oracle = LocalThirdPartyBox(box)
        surrogate_paths = args.surrogate or [ROOT / "models-faces" / "surrogate"]

        def probabilities(x):
            from PIL import Image
            arrays = quantise(x).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            return torch.softmax(torch.from_numpy(box.logits([Image.fromarray(a) for a in arrays])), 1)

        network_for = lambda h, w: torch_view(folder, h, w)  # noqa: E731
        gradcam_layer = lambda net: net.net[5]  # noqa: E731  (the last residual stage)
        data, record = faces, json.loads((folder / "box.json").read_text())
        meta = {"box": "third-party (bench/third_party_box.py)", "box_val_accuracy": record["val_accuracy"],
                "box_input": "shorter side 36 (Pillow bicubic), centre crop 32x32, ImageNet normalisation"}
    else:
        models = ROOT / ("models-faces" if args.box == "faces" else "models")
        bb = load_checkpoint(args.blackbox or models / "blackbox")
        network = LocalClassifier(bb.model, bb.classes)
        # --served: the box exactly as our black-box service runs it (the 8-bit upload resized as
        # uint8, shared.data.served_input); otherwise resized as floats inside the graph.
        oracle = LocalClassifier(bb.model, bb.classes, label_only=True, served_inputs=args.served)

        @torch.no_grad()
        def probabilities(x):
            x = served_input(x, bb.meta.image_size) if args.served else quantise(x)
            return torch.softmax(network.logits(x), 1)

        surrogate_paths = args.surrogate or [models / "surrogate"]

        class Squash(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = bb.model

            def forward(self, x):
                return self.model(fit_to_size(x, bb.meta.image_size))

        network_for = lambda h, w: Squash().eval()  # noqa: E731
        gradcam_layer = lambda net: net.model.features[-1]  # noqa: E731
        data = faces if args.box == "faces" else "elpv"
        meta = {
            "box": f"our {args.box} black box (label-only)",
            "box_val_accuracy": bb.meta.metrics.get("val_accuracy"),
            "box_input": f"{bb.meta.image_size}x{bb.meta.image_size} squash (bilinear, antialiased"
                         + (", resized as uint8 as the service does)" if args.served else ", float)"),
        }
    # Frozen, as the explainer serves them (folded BatchNorm, channels-last on the CPU).
    members = [LocalClassifier.from_checkpoint(path).freeze() for path in surrogate_paths]
    surrogate = members[0] if len(members) == 1 else EnsembleSurrogate(members)
    photos, labels, classes, paths = _photos(data, args.split, grey=args.grey, upscale=args.upscale)
    if tuple(classes) != tuple(surrogate.classes):
        raise SystemExit(f"data classes {classes} are not the surrogate's {surrogate.classes}")
    wrong, predicted, misclassified = _screen(probabilities, photos, labels, args.limit)
    sizes = [tuple(photos[i].shape[-2:]) for i in wrong]
    meta.update(
        {
            "data": str(data),
            "split": args.split,
            "images_in_split": len(photos),
            "misclassified": misclassified,
            "images_used": len(wrong),
            "surrogates": [str(p) for p in surrogate_paths],
            "surrogate_inputs": [m.image_size for m in members],
            "surrogate_val_accuracy": [load_checkpoint(p).meta.metrics.get("val_accuracy") for p in surrogate_paths],
            "median_photo_size_hw": [float(np.median([s[0] for s in sizes])), float(np.median([s[1] for s in sizes]))]
            if sizes
            else None,
        }
    )
    # The white box as the explainer serves it: not folded (it is its own oracle there).
    whitebox = None if args.box == "thirdparty" else LocalClassifier(
        bb.model, bb.classes, served_inputs=args.served).freeze(fold=False)
    return Setup(args.box, oracle, surrogate, [photos[i] for i in wrong], [labels[i] for i in wrong], predicted,
                 [paths[i] for i in wrong], probabilities, network_for, gradcam_layer,
                 whitebox_source=whitebox, meta=meta)


# -- our method -------------------------------------------------------------------------------------

def jittered(source: LocalClassifier | EnsembleSurrogate, seed: int) -> LocalClassifier | EnsembleSurrogate:
    """A frozen copy of `source` with its weights jittered by 1e-6 (`--perturb`); an ensemble, member by member."""
    if isinstance(source, EnsembleSurrogate):
        members = [m for m in source.members if isinstance(m, LocalClassifier)]
        if len(members) != len(source.members):
            raise SystemExit("--perturb jitters our own networks: every ensemble member must be one")
        return EnsembleSurrogate([jittered(m, seed * 1000 + i) for i, m in enumerate(members)])
    return LocalClassifier(jitter_weights(source.model, seed), source.classes).freeze()


def run_method(setup: Setup, method: str, options: dict, whitebox: bool = False, source=None):
    """Explain every photo; white-box mode takes the box's own network as the gradient source."""
    source = source or (setup.whitebox_source if whitebox else setup.surrogate)
    out = []
    for x, y in zip(setup.photos, setup.labels):
        before = setup.oracle.queries
        r = explain(x, y, source, setup.oracle, method, whitebox=whitebox, **options)
        assert setup.oracle.queries - before == r.queries, "queries must equal the box's own count"
        out.append(r)
    return out


def summary(results) -> dict:
    ok = [r for r in results if r.success and not r.already_correct]
    kept = [float((saliency_map(r.perturbation) > 0).float().mean()) for r in ok]
    failed = [r for r in results if not r.success]
    linf = np.array([r.linf * 255 for r in ok]) if ok else np.array([])
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else None  # noqa: E731
    return {
        "images": len(results),
        "success_rate": sum(r.success for r in results) / len(results) if results else None,
        "mean_search_queries": float(np.mean([r.search_queries for r in results])) if results else None,
        "median_search_queries": pct(np.array([r.search_queries for r in results]), 50),
        "median_linf_255": pct(linf, 50),
        "p90_linf_255": pct(linf, 90),
        "max_linf_255": float(linf.max()) if len(linf) else None,
        "median_l2": pct(np.array([r.l2 for r in ok]), 50),
        "median_rms_255": pct(np.array([r.rms * 255 for r in ok]), 50),
        "seconds_per_explanation": float(np.mean([r.seconds for r in results])) if results else None,
        "seconds_per_failure": float(np.mean([r.seconds for r in failed])) if failed else None,
        "max_seconds_failure": float(max(r.seconds for r in failed)) if failed else None,
        "failure_reasons": {k: sum(r.failure_reason == k for r in failed) for k in {r.failure_reason for r in failed}},
        # Algorithm 2 (single mode, default tau and beta): the share of pixels each map keeps, and how
        # many successes get an empty map (a change so even that no pixel stands out).
        "mean_kept_share": float(np.mean(kept)) if kept else None,
        "empty_maps": sum(k == 0 for k in kept),
    }


# -- maps and deletion AUC -----------------------------------------------------------------------

class SurrogateNet(torch.nn.Module):
    """The gradient source as a module for Captum: the surrogate's logits (an ensemble: its members'
    mean), each resized to its own input inside the graph, as the search sees it."""

    def __init__(self, source):
        super().__init__()
        self.members = list(getattr(source, "members", [source]))
        self.layers = torch.nn.ModuleList(m.model for m in self.members)

    def forward(self, x):
        return torch.stack([m.logits(x) for m in self.members]).mean(0)


def captum_maps(setup: Setup, which: list[str], on: str = "box") -> dict[str, list[torch.Tensor]]:
    """Captum's maps of every photo, targeting the true class, on the box's own network (`on="box"`:
    white-box access an end user does not have) or on the surrogate (`on="surrogate"`: the access
    our black-box maps have). GradCAM on the surrogate takes the first member's last conv block."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency

    out: dict[str, list[torch.Tensor]] = {name: [] for name in which}
    for x, y in zip(setup.photos, setup.labels):
        h, w = x.shape[-2:]
        net = setup.network_for(h, w) if on == "box" else SurrogateNet(setup.surrogate).eval()
        inp = x.unsqueeze(0).clone().requires_grad_(True)
        norm = lambda a: a.detach()[0].abs().pow(2).sum(0).sqrt()  # noqa: E731  (Algorithm 2's reduction)
        if "Saliency" in which:
            out["Saliency"].append(norm(Saliency(net).attribute(inp, target=y, abs=True)))
        if "Integrated Gradients" in which:
            out["Integrated Gradients"].append(norm(IntegratedGradients(net).attribute(
                inp, baselines=torch.zeros_like(inp), target=y, n_steps=32, internal_batch_size=32)))
        if "GradCAM" in which:
            layer = setup.gradcam_layer(net) if on == "box" else net.layers[0].features[-1]
            cam = LayerGradCam(net, layer).attribute(inp, target=y, relu_attributions=True)
            out["GradCAM"].append(LayerAttribution.interpolate(cam, (h, w), interpolate_mode="bilinear").detach()[0, 0])
        if "Integrated Gradients (blur baseline)" in which:
            out["Integrated Gradients (blur baseline)"].append(norm(IntegratedGradients(net).attribute(
                inp, baselines=gaussian_blur(x).unsqueeze(0), target=y, n_steps=32, internal_batch_size=32)))
        if "Occlusion" in which:
            window, stride = max(4, round(min(h, w) / 12)), max(2, round(min(h, w) / 24))
            out["Occlusion"].append(norm(Occlusion(net).attribute(
                x.unsqueeze(0), target=y, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                baselines=0.0, perturbations_per_eval=64)))
    return out


def smoothed_maps(setup: Setup, ours: list[torch.Tensor], samples: int = 32,
                  sigma: float = 5.0) -> dict[str, list[torch.Tensor]]:
    """Candidate black-box maps from the search's own gradient views (`--smoothed-maps`): the
    surrogate's true-class margin gradient averaged over `samples` views of the photo (the crops,
    resizes and noise of margin.Views: a SmoothGrad over geometries), its magnitude (Algorithm 2's
    reduction), that blurred (Gaussian, `sigma` pixels), and our map weighted by the blurred one."""
    kernel = 2 * round(2 * sigma) + 1
    out: dict[str, list[torch.Tensor]] = {"views SmoothGrad (surrogate)": [], "views SmoothGrad, blurred": [],
                                          "ours x views SmoothGrad, blurred": []}
    for x, y, m in zip(setup.photos, setup.labels, ours):
        views = Views(x, MarginOptions(samples=samples), torch.Generator().manual_seed(1),
                      side=input_side(setup.surrogate))
        inp = x.clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(setup.surrogate.margin(views(views.to_work(inp)), y).mean(), inp)
        magnitude = pixel_magnitude(grad)
        smooth = tv_blur(magnitude[None], kernel_size=[kernel, kernel], sigma=[sigma, sigma])[0]
        out["views SmoothGrad (surrogate)"].append(magnitude)
        out["views SmoothGrad, blurred"].append(smooth)
        out["ours x views SmoothGrad, blurred"].append(m * smooth)
    return out


def detail_maps(setup: Setup, results) -> tuple[dict[str, list[torch.Tensor]], dict]:
    """Candidate maps that weigh a change by the photo's own detail (`--detail-maps`). Deleting a
    pixel (the deletion curve's step) moves it by detail = blur(x) - x; the change that fixes the
    mistake says which way each pixel should move. Their per-pixel dot product over channels is the
    first-order share of that fix which deleting the pixel would make, like gradient x (baseline -
    input) with the change in place of a gradient. Compared: the positive part of that product for
    our change and for the surrogate's true-vs-mistaken margin gradient at the photo (black-box
    access both; ours . detail is the service's `saliency=detail` before Algorithm 2's fence, and "as
    served" after it: the pixels below the fence are zero, so they come in random order), and the
    magnitude product |change| x |detail| (no sign). Two controls: the detail's own magnitude, a map
    of no model (what ranking by what deletion removes scores alone), and the next photo's change
    (resized) on this photo's detail (what the detail scores with a change that is not this photo's fix).
    Also returns what the served map keeps of the successful changes and how often it fell back to
    the change's map."""
    out: dict[str, list[torch.Tensor]] = {"ours . detail": [], "ours . detail, as served": [], "|ours| x |detail|": [],
                                          "surrogate gradient . detail": [], "detail (no model)": [],
                                          "next photo's change . detail": []}
    net = SurrogateNet(setup.surrogate).eval()
    n = len(setup.photos)
    changes = [r.perturbation.detach().float() if r.success and r.perturbation is not None else None
               for r in results]
    kept, fell_back = [], 0
    for i, (x, y, wrong, change) in enumerate(zip(setup.photos, setup.labels, setup.mistaken, changes)):
        detail = photo_detail(x)
        inp = x.unsqueeze(0).clone().requires_grad_(True)
        with torch.enable_grad():
            logits = net(inp)[0]
            (grad,) = torch.autograd.grad(logits[y] - logits[wrong], inp)
        out["surrogate gradient . detail"].append((grad[0] * detail).sum(0).clamp(min=0))
        out["detail (no model)"].append(pixel_magnitude(detail))
        other = changes[(i + 1) % n]
        out["next photo's change . detail"].append(
            torch.zeros(x.shape[-2:]) if other is None else
            (torch.nn.functional.interpolate(other[None], size=tuple(x.shape[-2:]), mode="bilinear",
                                             align_corners=False)[0] * detail).sum(0).clamp(min=0))
        if change is None:
            for name in ("ours . detail", "ours . detail, as served", "|ours| x |detail|"):
                out[name].append(torch.zeros(x.shape[-2:]))
            continue
        served, source = explanation_saliency(change, x, DETAIL)
        kept.append(float((served > 0).float().mean()))
        fell_back += source != DETAIL
        out["ours . detail"].append(detail_alignment(change, x))
        out["ours . detail, as served"].append(served)
        out["|ours| x |detail|"].append(pixel_magnitude(change) * pixel_magnitude(detail))
    served_stats = {"maps": len(kept), "mean_kept_share": float(np.mean(kept)) if kept else None,
                    "fell_back_to_change": fell_back}
    return out, served_stats


def deletion_aucs(setup: Setup, maps: list[torch.Tensor], seed: int, shift: int = 0) -> list[float]:
    """Per image: area under P(mistaken class) as the top-k% pixels are replaced by a blurred copy.
    shift k > 0 ranks photo i's pixels by photo i+k's map (resized; the other-photo control)."""
    out = []
    n = len(setup.photos)
    for i, (x, mistaken) in enumerate(zip(setup.photos, setup.mistaken)):
        m = resized_map(maps[(i + shift) % n], *x.shape[-2:])
        blurred = gaussian_blur(x)
        curve = setup.probabilities(blend_curve_inputs(x, blurred, m, FRACTIONS, seed + i))[:, mistaken]
        out.append(auc(FRACTIONS, curve.tolist()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", choices=("thirdparty", "faces", "elpv"), required=True)
    p.add_argument("--data", default=None, help="gender-faces folder (default: $ADVEXPLAIN_FACES)")
    p.add_argument("--split", default="validation")
    p.add_argument("--thirdparty", type=Path, default=ROOT / "models-thirdparty")
    p.add_argument("--blackbox", type=Path, default=None)
    p.add_argument("--surrogate", type=Path, action="append", default=None,
                   help="surrogate checkpoint; repeat for an ensemble (default: the box's data's CPU surrogate)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--method", action="append", default=None,
                   help="[whitebox-]method[:key=value;...] to run (repeatable; whitebox- takes the box's own "
                        "gradients, for our boxes); default: margin, margin-linf, paper, paper unbounded")
    p.add_argument("--set", action="append", default=[], help="key=value option for every method run (JSON value)")
    p.add_argument("--maps", action="store_true", help="also deletion AUC of our maps against Captum's")
    p.add_argument("--captum-on-surrogate", action="store_true",
                   help="with --maps: also Captum's maps computed on the surrogate (the access our black-box "
                        "maps have), beside those on the box's own network")
    p.add_argument("--smoothed-maps", action="store_true",
                   help="with --maps: also candidate maps from the surrogate's gradient over the search's views "
                        "(raw, blurred, and the first --method's map weighted by the blurred one)")
    p.add_argument("--detail-maps", action="store_true",
                   help="with --maps: also maps that weigh the first --method's change (and the surrogate's "
                        "gradient) by the photo's detail that deletion removes, and Captum's Integrated "
                        "Gradients from the deletion's own blurred baseline")
    p.add_argument("--served", action="store_true",
                   help="faces/elpv: the box (and the white box's answers) as our service runs it, resizing "
                        "the 8-bit image as uint8")
    p.add_argument("--upscale", type=float, default=1.0,
                   help="explain copies of the photos enlarged by this factor (bicubic, 8-bit): large photos "
                        "of the same scenes, for boxes whose input is far smaller than the photo")
    p.add_argument("--grey", action="store_true",
                   help="explain grey copies of the photos (luma, three equal channels): a box trained in colour "
                        "meets grey photos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", type=int, default=1,
                   help="run every setting this many times: as loaded, then with the gradient source's weights "
                        "jittered by 1e-6 (seeds 1..K-1); results pooled")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.perturb < 1 or (args.perturb > 1 and args.maps):
        raise SystemExit("--perturb takes K >= 1, and --maps only without it")
    needs_maps = [flag for flag, on in (("--captum-on-surrogate", args.captum_on_surrogate),
                                        ("--smoothed-maps", args.smoothed_maps),
                                        ("--detail-maps", args.detail_maps)) if on]
    if needs_maps and not args.maps:
        raise SystemExit(f"{', '.join(needs_maps)} only with --maps")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    started = time.perf_counter()
    setup = load_setup(args)
    common_options = parse_sets(args.set)
    specs = args.method or ["margin", "margin-linf", "paper", "paper:max_linf=1.0"]
    rows, runs = [], {}
    for spec in specs:
        method, _, extra = spec.partition(":")
        white = method.startswith("whitebox-")
        method = method.removeprefix("whitebox-")
        options = {**common_options, **parse_sets([kv for kv in extra.split(";") if kv])}
        resolved = method_options(method, **options).model_dump()
        results, tags = [], []
        for k in range(args.perturb):
            source = None if k == 0 else jittered(setup.whitebox_source if white else setup.surrogate, k)
            results += run_method(setup, method, options, whitebox=white, source=source)
            tags += [{"path": path, "perturbation": k} for path in setup.paths]
        s = summary(results)
        runs[spec] = {"method": method, "mode": "whitebox" if white else "blackbox", "options": resolved, "summary": s,
                      "rows": [r.to_dict() | tag for r, tag in zip(results, tags)],
                      "_results": results}
        rows.append(
            [
                spec,
                s["images"],
                fmt(s["success_rate"], ".1%"),
                fmt(s["mean_search_queries"], ".2f"),
                fmt(s["median_search_queries"], ".0f"),
                fmt(s["median_linf_255"], ".1f"),
                fmt(s["p90_linf_255"], ".1f"),
                fmt(s["median_rms_255"], ".2f"),
                fmt(s["seconds_per_explanation"], ".3f"),
                fmt(s["seconds_per_failure"], ".2f"),
                fmt(s["mean_kept_share"], ".1%"),
                s["empty_maps"],
            ]
        )
        print(rows[-1], flush=True)
    table = markdown_table(["method", "images", "success", "mean search q", "median search q", "median L-inf /255",
                            "p90 L-inf /255", "median RMS /255", "s / expl.", "s / failure", "map keeps",
                            "empty maps"], rows)
    print(table)

    maps_table, map_scores, served_detail = None, {}, None
    if args.maps:
        maps: dict[str, list[torch.Tensor]] = {}
        for spec, run in runs.items():
            maps[f"ours: {spec}"] = [pixel_magnitude(r.perturbation) if r.success and r.perturbation is not None
                                     else torch.zeros(x.shape[-2:]) for r, x in zip(run["_results"], setup.photos)]
        captum = ["Saliency", "Integrated Gradients", "GradCAM", "Occlusion"]
        maps.update(captum_maps(setup, captum + ["Integrated Gradients (blur baseline)"] * args.detail_maps))
        if args.smoothed_maps:
            first = next(iter(maps.values()))
            maps.update(smoothed_maps(setup, first))
        if args.detail_maps:
            detail, served_detail = detail_maps(setup, next(iter(runs.values()))["_results"])
            maps.update(detail)
            print(f"served detail maps: {served_detail}")
        if args.captum_on_surrogate:
            maps.update({f"{k} (surrogate)": v for k, v in captum_maps(setup, captum, on="surrogate").items()})
        g = torch.Generator().manual_seed(args.seed)
        maps["random"] = [torch.rand(x.shape[-2:], generator=g) for x in setup.photos]
        # References: a map of no image at all (closeness to the centre), and every map laid on the
        # next photo instead of its own: what a map scores for where such photos keep their subject.
        maps["centre (no image)"] = [centre_map(*x.shape[-2:]) for x in setup.photos]
        curves = {name: (deletion_aucs(setup, per_image, args.seed),
                         deletion_aucs(setup, per_image, args.seed, shift=1))
                  for name, per_image in maps.items()}
        centre = curves["centre (no image)"][0]
        map_scores = {name: {"deletion_auc": float(np.mean(scores)), "per_image": scores,
                             "deletion_auc_other_photo": float(np.mean(other)),
                             "own_beats_other_photo": int(sum(a < b for a, b in zip(scores, other))),
                             "beats_centre": int(sum(a < b for a, b in zip(scores, centre)))}
                      for name, (scores, other) in curves.items()}
        n = len(setup.photos)
        maps_table = markdown_table(
            ["map", "deletion AUC (lower = better)", "with the next photo's map", f"own map better (of {n})",
             f"better than centre (of {n})"],
            [[name, fmt(v["deletion_auc"], ".4f"), fmt(v["deletion_auc_other_photo"], ".4f"),
              v["own_beats_other_photo"], v["beats_centre"]] for name, v in map_scores.items()])
        print(maps_table)

    for run in runs.values():
        run.pop("_results")
    out = args.out or RESULTS / f"native_resolution_{args.box}_{args.split}.json"
    write_json(out, {
        "benchmark": "native_resolution", "box": args.box,
        "config": {**setup.meta, "seed": args.seed, "limit": args.limit, "set": common_options,
                   "perturb": args.perturb, "grey_photos": args.grey, "upscale": args.upscale,
                   "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                   "torch": torch.__version__, "machine": platform.machine(),
                   "wall_seconds": time.perf_counter() - started,
                   "deletion_protocol": "replace the top-k% pixels (by the map) with a Gaussian-blurred copy "
                                        "(kernel 11, sigma 5), k = 0..100% in 32 steps; area under the box's "
                                        "P(mistaken class); Captum maps target the true class on the box's network, "
                                        "those marked (surrogate) on the surrogate; 'centre (no image)' ranks "
                                        "pixels by closeness to the photo's centre; 'with the next photo's map' "
                                        "ranks each photo's pixels by the next photo's map, resized",
                   "captum_on_surrogate": args.captum_on_surrogate, "smoothed_maps": args.smoothed_maps,
                   "detail_maps": args.detail_maps},
        "table": table, "maps_table": maps_table, "runs": runs, "maps": map_scores,
        "served_detail_map": served_detail})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
