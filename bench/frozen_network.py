"""What serving a frozen network buys: BatchNorm folded into the convs and channels-last weights, side by side.

`LocalClassifier.freeze()` (what the explainer does to every network it serves) replaces the network
with a copy whose eval-mode BatchNorms are folded into the preceding convs (`fold_batchnorm`) and, on
the CPU, whose weights are channels-last. This bench measures, in one process and one run:

1. one input-gradient pass, the unit of a search's work (a batch of `samples` views at the working
   size, resized into the network, margin, gradient back to the views), for each checkpoint:
   as loaded / folded / folded + channels-last, interleaved in rounds, median ms and the ratios;
   and the largest logit difference from the loaded network on real photos;
2. whole explanations (default `margin`, black-box, label-only box, photos at their own size) on
   elpv training mistakes with the loaded and the frozen surrogate, interleaved: seconds per
   explanation and outcomes. The folded network computes the same function up to float rounding
   (logits ~1e-6), and a search on an 8-bit rounding edge can then take another path. As a
   control, the same search with the loaded network's weights jittered by 1e-6 (relative, three
   seeds) shows how many outcomes such rounding-sized changes move on their own.

    flock /tmp/advexplain-cpu.lock python -m bench.frozen_network        # writes bench/results/frozen_network.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import load_photos
from advexplain.shared.explain import explain, method_options
from advexplain.shared.explain.margin import Views
from advexplain.shared.models import fold_batchnorm
from bench.common import fmt, jitter_weights, markdown_table, photo_mistakes, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
WORK = Views.WORK_SIDE  # the margin search's working size


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    plain = copy.deepcopy(model).eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    folded = fold_batchnorm(plain)
    return {"as loaded": plain, "folded": folded,
            "folded + channels-last": copy.deepcopy(folded).to(memory_format=torch.channels_last)}


def gradient_pass(model: torch.nn.Module, views: torch.Tensor, size: int) -> None:
    x = views.clone().requires_grad_(True)
    logits = model(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    (grad,) = torch.autograd.grad((logits[:, 0] - logits[:, 1]).sum(), x)
    assert grad.shape == x.shape


def time_passes(models: dict[str, torch.nn.Module], size: int, samples: int, rounds: int, reps: int) -> dict:
    views = torch.rand(samples, 3, WORK, WORK, generator=torch.Generator().manual_seed(0))
    for m in models.values():  # warm-up
        for _ in range(5):
            gradient_pass(m, views, size)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits every variant alike
        for name, m in models.items():
            t = time.perf_counter()
            for _ in range(reps):
                gradient_pass(m, views, size)
            times[name].append((time.perf_counter() - t) / reps * 1000)
    return {name: statistics.median(v) for name, v in times.items()}


def logit_difference(models: dict[str, torch.nn.Module], photos: list[torch.Tensor], size: int) -> dict[str, float]:
    batch = torch.stack([F.interpolate(p.unsqueeze(0), size=(size, size), mode="bilinear", antialias=True,
                                       align_corners=False)[0] for p in photos])
    with torch.no_grad():
        ref = models["as loaded"](batch)
        return {name: float((m(batch) - ref).abs().max()) for name, m in models.items() if name != "as loaded"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, action="append", default=None,
                   help="checkpoint to time (repeatable; default: models/surrogate, models/blackbox and "
                        "models-faces/surrogate where present)")
    p.add_argument("--samples", type=int, default=method_options("margin").samples)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--photos", type=int, default=40, help="elpv training mistakes explained in part 2")
    p.add_argument("--out", type=Path, default=RESULTS / "frozen_network.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()

    paths = args.checkpoint or [q for q in (ROOT / "models" / "surrogate", ROOT / "models" / "blackbox",
                                            ROOT / "models-faces" / "surrogate") if (q / "config.json").exists()]
    elpv = load_photos("elpv", "train")
    sample = [elpv.image(i) for i in range(32)]
    passes, rows = {}, []
    for path in paths:
        ckpt = load_checkpoint(path)
        models = variants(ckpt.model)
        size = ckpt.meta.image_size
        ms = time_passes(models, size, args.samples, args.rounds, args.reps)
        diff = logit_difference(models, sample, size)
        key = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        passes[key] = {"input_size": size, "width": ckpt.meta.architecture.width, "ms_per_pass": ms,
                       "ratio_vs_loaded": {n: ms["as loaded"] / v for n, v in ms.items()},
                       "max_logit_difference_on_photos": diff}
        rows.append([key, size, *(fmt(v, ".2f") for v in ms.values()),
                     fmt(ms["as loaded"] / ms["folded + channels-last"], ".2f") + "x",
                     f"{diff['folded + channels-last']:.1e}"])
        print(rows[-1], flush=True)
    pass_table = markdown_table(["checkpoint", "input", "as loaded ms", "folded ms", "folded + channels-last ms",
                                 "speed-up", "max logit diff"], rows)
    print(pass_table)

    # Part 2: whole explanations, the surrogate as loaded vs frozen (+ the rounding-size control).
    bb = load_checkpoint(ROOT / "models" / "blackbox")
    images, labels = photo_mistakes(LocalClassifier(bb.model, bb.classes), "elpv", "train", args.photos)
    sur = load_checkpoint(ROOT / "models" / "surrogate")
    loaded = LocalClassifier(sur.model, sur.classes)
    for q in loaded.model.parameters():
        q.requires_grad_(False)
    frozen = LocalClassifier(sur.model, sur.classes).freeze()
    sources = {"as loaded": loaded, "frozen": frozen}
    seconds: dict[str, list[float]] = {n: [] for n in sources}
    outcomes: dict[str, list] = {}
    for rnd in range(2):  # interleaved: loaded, frozen, loaded, frozen
        for name, source in sources.items():
            oracle = LocalClassifier(bb.model, bb.classes, label_only=True)
            t = time.perf_counter()
            res = [explain(x, y, source, oracle, "margin") for x, y in zip(images, labels)]
            seconds[name].append((time.perf_counter() - t) / len(images))
            outcomes[name] = [(r.success, r.search_queries, round((r.linf or 0) * 255)) for r in res]
            print(name, rnd, fmt(seconds[name][-1], ".3f"), "s/expl", flush=True)
    for seed in (1, 2, 3):
        source = LocalClassifier(jitter_weights(loaded.model, seed), sur.classes)
        oracle = LocalClassifier(bb.model, bb.classes, label_only=True)
        res = [explain(x, y, source, oracle, "margin") for x, y in zip(images, labels)]
        outcomes[f"as loaded, weights x (1 + 1e-6 N(0,1)), seed {seed}"] = [
            (r.success, r.search_queries, round((r.linf or 0) * 255)) for r in res]
    ref = outcomes["as loaded"]
    search = {}
    search_rows = []
    for name, out in outcomes.items():
        entry = {"successes": sum(o[0] for o in out), "search_queries": sum(o[1] for o in out),
                 "outcomes_differing_from_loaded": sum(a != b for a, b in zip(out, ref)),
                 "successes_differing_from_loaded": sum(a[0] != b[0] for a, b in zip(out, ref))}
        if name in seconds:
            entry["seconds_per_explanation"] = statistics.mean(seconds[name])
            entry["seconds_per_explanation_by_round"] = seconds[name]
        search[name] = entry
        search_rows.append([name, f"{entry['successes']}/{len(out)}", entry["search_queries"],
                            entry["outcomes_differing_from_loaded"], entry["successes_differing_from_loaded"],
                            fmt(entry.get("seconds_per_explanation"), ".3f")])
    speedup = search["as loaded"]["seconds_per_explanation"] / search["frozen"]["seconds_per_explanation"]
    search_table = markdown_table(["surrogate", "successes", "search queries", "outcomes differing",
                                   "successes differing", "s / expl."], search_rows)
    print(search_table)
    print(f"whole-explanation speed-up (loaded / frozen): {speedup:.2f}x")
    write_json(args.out, {
        "benchmark": "frozen_network",
        "what": "LocalClassifier.freeze(): BatchNorm folded into the convs + channels-last weights on the CPU",
        "command": "python -m bench.frozen_network",
        "gradient_pass": {"samples": args.samples, "working_size": WORK, "rounds": args.rounds, "reps": args.reps,
                          "checkpoints": passes, "table": pass_table},
        "explanations": {"data": "elpv train, first mistakes of models/blackbox", "photos": len(images),
                         "method": "margin (default), black-box, label-only box", "results": search,
                         "speedup_loaded_over_frozen": speedup, "table": search_table},
        "meta": {"torch": torch.__version__, "python": platform.python_version(), "threads": 1,
                 "seconds": time.perf_counter() - started},
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
