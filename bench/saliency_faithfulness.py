"""Saliency faithfulness on misclassified images: captum's attributions against our maps.

Maps (one value per pixel, H x W), all for the same misclassified images:
  Saliency, Integrated Gradients, GradCAM, Occlusion  captum on the black box's own network
      (white-box access), target = the TRUE class; channel-signed attributions reduced to the
      per-pixel L2 norm over channels of their absolute value, GradCAM standard (ReLU) upsampled.
  ours white-box margin / ours black-box margin / ours black-box paper  Algorithm 2's magnitude
      (per-pixel L2 over channels of the inverted perturbation), unthresholded for ranking: its top
      pixels are exactly Algorithm 2's kept pixels in the same order.
  ours ... margin-linf  the margin search with L-inf instead of L2 steps, whose perturbation
      follows the gradient's sign (every pixel moves by about the same amount) instead of its size.
  random  a seeded random map (the floor).

Scores, all from the black box's probabilities (evaluation only; not counted as queries); the
"mistaken class" is the black box's wrong prediction of the original image:
  deletion AUC   replace the top-k% pixels (by the map) with a Gaussian-blurred copy of the image
                 (kernel 11, sigma 5), k = 0..100% in 32 steps; area under P(mistaken class).
                 Lower = the map found the evidence behind the mistake.
  insertion AUC  start from the blurred copy and put back the top-k% original pixels; area under
                 P(mistaken class). Higher = better.
  flip@k (blur)  share of images predicted as the TRUE class once only the top-k% pixels are
                 blurred (k = 1, 5, 10%).
  flip@k (step)  share predicted TRUE once only the top-k% pixels move by a fixed step eps along
                 the sign of the SURROGATE's true-class logit-margin gradient (same step for every
                 map; note it shares a gradient source with our black-box maps).
  s / map        seconds to compute one map (ours: the whole search plus Algorithm 2).

    flock /tmp/advexplain-cpu.lock python -m bench.saliency_faithfulness --data $ADVEXPLAIN_FACES
"""

from __future__ import annotations

import numpy as np
import torch

from advexplain.shared.explain.base import value_and_grad
from advexplain.shared.saliency import saliency_map
from bench.common import (
    OUR_SETTINGS,
    Timer,
    auc,
    base_parser,
    blend_curve_inputs,
    fmt,
    gaussian_blur,
    load_bench,
    magnitude_map,
    markdown_table,
    mean,
    run_ours,
    seed_everything,
    topk_mask,
    write_json,
)

FRACTIONS = [i / 32 for i in range(33)]
FLIP_FRACTIONS = (0.01, 0.05, 0.10)
OURS = ("ours white-box margin", "ours black-box margin", "ours black-box paper",
        "ours white-box margin-linf", "ours black-box margin-linf")


def channel_norm(attribution: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) attribution -> (H, W): L2 over channels of |a| (Algorithm 2's reduction)."""
    return attribution.detach()[0].abs().pow(2).sum(0).sqrt()


def captum_methods(network, args):
    """name -> function(image (C,H,W), label) -> (H, W) map, on the black box's network."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency

    last_block = network.features[-1]
    saliency, ig = Saliency(network), IntegratedGradients(network)
    gradcam, occlusion = LayerGradCam(network, last_block), Occlusion(network)

    def with_input(fn):
        def run(image, label):
            x = image.unsqueeze(0).clone().requires_grad_(True)
            return fn(x, label)
        return run

    def grad_cam(x, label):
        cam = gradcam.attribute(x, target=label, relu_attributions=True)
        return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear").detach()[0, 0]

    return {
        "Saliency": with_input(lambda x, t: channel_norm(saliency.attribute(x, target=t, abs=True))),
        "Integrated Gradients": with_input(lambda x, t: channel_norm(ig.attribute(
            x, baselines=torch.zeros_like(x), target=t, n_steps=args.ig_steps, internal_batch_size=args.ig_steps))),
        "GradCAM": with_input(grad_cam),
        "Occlusion": lambda image, t: channel_norm(occlusion.attribute(
            image.unsqueeze(0), target=t, sliding_window_shapes=(3, args.window, args.window),
            strides=(3, args.stride, args.stride), baselines=0.0)),
    }


@torch.no_grad()
def probabilities(network, batch: torch.Tensor) -> torch.Tensor:
    return torch.softmax(network(batch), dim=1)


def score_map(network, image, label, mistaken, saliency, blurred, step_direction, eps, seed) -> dict:
    """Deletion / insertion curves and flip rates of one map on one image."""
    deletion = blend_curve_inputs(image, blurred, saliency, FRACTIONS, seed)
    insertion = blend_curve_inputs(blurred, image, saliency, FRACTIONS, seed)
    blur_flip = blend_curve_inputs(image, blurred, saliency, FLIP_FRACTIONS, seed)
    stepped = torch.stack([(image + eps * step_direction * topk_mask(saliency, f, seed).float()).clamp(0, 1)
                           for f in FLIP_FRACTIONS])
    probs = probabilities(network, torch.cat([deletion, insertion, blur_flip, stepped]))
    n = len(FRACTIONS)
    p_del, p_ins = probs[:n, mistaken], probs[n:2 * n, mistaken]
    flips = probs[2 * n:].argmax(1) == label
    k = len(FLIP_FRACTIONS)
    return {"deletion_auc": auc(FRACTIONS, p_del.tolist()), "insertion_auc": auc(FRACTIONS, p_ins.tolist()),
            "deletion_curve": p_del.tolist(), "insertion_curve": p_ins.tolist(),
            "flip_blur": flips[:k].tolist(), "flip_step": flips[k:].tolist()}


def main(argv=None) -> int:
    p = base_parser("saliency_faithfulness", __doc__.splitlines()[0])
    p.add_argument("--eps", type=float, default=16 / 255, help="flip@k step size (in [0,1] pixel units)")
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--window", type=int, default=8, help="Occlusion window (pixels)")
    p.add_argument("--stride", type=int, default=4, help="Occlusion stride (pixels)")
    p.add_argument("--rows", action="store_true", help="also write every image's curves")
    args = p.parse_args(argv)
    bench = load_bench(args)
    network = bench.blackbox.model

    maps: dict[str, list[torch.Tensor]] = {}
    seconds: dict[str, list[float]] = {}
    for name, fn in captum_methods(network, args).items():
        seed_everything(args.seed)
        maps[name], seconds[name] = [], []
        for image, label in zip(bench.images, bench.labels):
            with Timer() as t:
                m = fn(image, int(label))
            maps[name].append(m.detach().float())
            seconds[name].append(t.seconds)
    successes = {}
    for name in OURS:
        seed_everything(args.seed)
        results = run_ours(bench, *OUR_SETTINGS[name])
        shape = bench.images.shape[-2:]
        maps[name] = [magnitude_map(r.perturbation if r.success else None, shape) for r in results]
        # seconds: the search itself plus Algorithm 2 on its perturbation (single mode)
        seconds[name] = []
        for r in results:
            with Timer() as t2:
                if r.success and not r.already_correct:
                    saliency_map(r.perturbation)
            seconds[name].append(r.seconds + t2.seconds)
        successes[name] = sum(r.success for r in results) / len(results)
    g = torch.Generator().manual_seed(args.seed)
    maps["random"] = [torch.rand(bench.images.shape[-2:], generator=g) for _ in range(len(bench.images))]
    seconds["random"] = [0.0] * len(bench.images)

    # Shared references, identical for every map.
    blurred = [gaussian_blur(image) for image in bench.images]
    directions = [value_and_grad(lambda x, y=int(label): bench.surrogate.margin(x, y), image[None])[1][0].sign()
                  for image, label in zip(bench.images, bench.labels)]

    results: dict[str, dict] = {}
    for name, per_image in maps.items():
        scores = [score_map(network, image, int(label), int(mistaken), m, blur, direction, args.eps, args.seed + i)
                  for i, (image, label, mistaken, m, blur, direction) in enumerate(
                      zip(bench.images, bench.labels, bench.predicted, per_image, blurred, directions))]
        agg = {
            "deletion_auc": mean([s["deletion_auc"] for s in scores]),
            "insertion_auc": mean([s["insertion_auc"] for s in scores]),
            "mean_deletion_curve": np.mean([s["deletion_curve"] for s in scores], axis=0).tolist(),
            "mean_insertion_curve": np.mean([s["insertion_curve"] for s in scores], axis=0).tolist(),
            "seconds_per_map": mean(seconds[name]),
        }
        for j, f in enumerate(FLIP_FRACTIONS):
            agg[f"flip_blur@{f:.0%}"] = mean([float(s["flip_blur"][j]) for s in scores])
            agg[f"flip_step@{f:.0%}"] = mean([float(s["flip_step"][j]) for s in scores])
        if name in successes:
            agg["search_success_rate"] = successes[name]
        results[name] = {"aggregate": agg}
        if args.rows:
            results[name]["rows"] = scores

    headers = ["map", "deletion AUC (lower better)", "insertion AUC (higher better)"]
    headers += [f"flip@{f:.0%} blur" for f in FLIP_FRACTIONS] + [f"flip@{f:.0%} step" for f in FLIP_FRACTIONS]
    headers += ["s / map"]
    table = markdown_table(headers, [
        [name, fmt(a["deletion_auc"]), fmt(a["insertion_auc"])]
        + [fmt(a[f"flip_blur@{f:.0%}"], ".1%") for f in FLIP_FRACTIONS]
        + [fmt(a[f"flip_step@{f:.0%}"], ".1%") for f in FLIP_FRACTIONS]
        + [fmt(a["seconds_per_map"], ".4f")]
        for name, r in results.items() for a in [r["aggregate"]]])
    with torch.no_grad():
        blur_true = float(np.mean([int(probabilities(network, b.unsqueeze(0)).argmax(1)) == int(y)
                                   for b, y in zip(blurred, bench.labels)]))
        full_step = float(
            np.mean(
                [
                    int(probabilities(network, (x + args.eps * d).clamp(0, 1).unsqueeze(0)).argmax(1)) == int(y)
                    for x, d, y in zip(bench.images, directions, bench.labels)
                ]
            )
        )
    print(table)
    print(f"\nreferences: the fully blurred image is predicted as the true class for {blur_true:.1%} of images; "
          f"the full-image step (every pixel, eps {args.eps * 255:.0f}/255) for {full_step:.1%}.")
    write_json(
        args.out,
        {
            "benchmark": "saliency_faithfulness",
            "config": {
                **bench.meta,
                "fractions": FRACTIONS,
                "flip_fractions": list(FLIP_FRACTIONS),
                "eps": args.eps,
                "eps_255": args.eps * 255,
                "blur": {"kernel": 11, "sigma": 5.0},
                "ig_steps": args.ig_steps,
                "ig_baseline": "zeros (black)",
                "occlusion": {"window": args.window, "stride": args.stride, "baseline": 0.0},
                "gradcam_layer": "features[-1] (last conv block, after pooling), ReLU, bilinear upsampling",
                "captum_model": "the black box's network (white-box access), target = true class",
                "curve_probability": "black box P(mistaken class), softmax of its logits",
            },
            "references": {"blurred_image_true_rate": blur_true, "full_step_true_rate": full_step},
            "table": table,
            "methods": results,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
