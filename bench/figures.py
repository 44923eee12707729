"""The README's figure: docs/panel.png and the numbers its caption quotes (bench/results/panel.json).

The first elpv validation cell (in split order) that the default black box (`models/blackbox`,
label-only) gets wrong and the default explains (the mistakes before it that failed are counted),
explained at its own size by the default method through the default surrogate (`models/surrogate`),
as `POST /explain` would, with the map the answer would carry (the method's default `saliency`);
the panel is Figure 2 (original | adversarial | saliency).

    flock /tmp/advexplain-cpu.lock python -m bench.figures
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from advexplain.shared.checkpoints import load_checkpoint
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.data import BUILTIN, load_photos
from advexplain.shared.evaluation import find_mistakes
from advexplain.shared.explain import DEFAULT_METHOD, explain
from advexplain.shared.render import render_explanation
from advexplain.shared.saliency import default_saliency, explanation_saliency
from bench.common import RESULTS, write_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=ROOT / "models")
    p.add_argument("--panel", type=Path, default=ROOT / "docs" / "panel.png")
    p.add_argument("--out", type=Path, default=RESULTS / "panel.json")
    args = p.parse_args()
    torch.set_num_threads(1)

    box = load_checkpoint(args.models / "blackbox")
    surrogate = load_checkpoint(args.models / "surrogate")
    oracle = LocalClassifier(box.model, box.classes, label_only=True)
    network = LocalClassifier(box.model, box.classes)  # screening: counts nothing
    photos = load_photos(BUILTIN, "validation")
    images = [photos.image(i) for i in range(len(photos))]
    with torch.no_grad():
        mistakes = find_mistakes(lambda x: int(network.logits(x.unsqueeze(0)).argmax()), images, photos.labels)

    # The first mistake (in split order) the default explains; the ones before it failed and are counted.
    source = LocalClassifier(surrogate.model, surrogate.classes).freeze()  # frozen, as the explainer serves it
    failed_before = 0
    for index, _ in mistakes:
        result = explain(images[index], photos.labels[index], source, oracle)
        if result.success:
            break
        failed_before += 1
    saliency, shows = (explanation_saliency(result.perturbation, images[index], default_saliency(DEFAULT_METHOD))
                       if result.success else (None, None))
    pngs = render_explanation(result, saliency)
    args.panel.write_bytes(pngs["panel"])
    record = {k: v for k, v in result.to_dict().items() if k != "trace"}
    record.update(benchmark="figures", photo_index=index, mistakes_failed_before_it=failed_before,
                  photo=photos.paths[index], linf_255=None if result.linf is None else round(result.linf * 255),
                  # the change's grid (cells, rows x columns) at each search query, and the map's kept share
                  grids=[step["grid"] for step in result.trace if "grid" in step],
                  map_keeps=None if saliency is None else float((saliency > 0).float().mean()), saliency=shows,
                  box_val_accuracy=box.meta.metrics.get("val_accuracy"),
                  surrogate_val_accuracy=surrogate.meta.metrics.get("val_accuracy"),
                  panel=str(args.panel.relative_to(ROOT)))
    write_json(args.out, record)
    print({k: record[k] for k in ("success", "label_name", "final_prediction_name", "search_queries", "linf_255")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
