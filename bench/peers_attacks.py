"""Query efficiency of our inverted-adversarial search against ART's HopSkipJump and SimBA.

Every method gets the same misclassified validation images and the same black box, and must make
the black box predict the TRUE label (a targeted attack towards the true class). Two conditions:

  hard-label: the black box answers one-hot labels only. Ours (`margin`, `paper`; surrogate
              gradients) against HopSkipJump (decision-based, L2), at two budgets.
  score:      the black box answers probabilities. Ours again (they read the label only) against
              SimBA (pixel and DCT bases), which needs the scores.

Peers' queries are counted exactly: the network handed to ART's PyTorchClassifier is wrapped so
that every image forwarded counts one (batched gradient-estimation samples count per image, ART's
own initial checks included). Ours count every oracle image, the first prediction included
(`queries`; `search queries` = queries - 1 is what the paper reports). Success is checked on the
returned image by the black box itself, outside the count. Prints a markdown table, writes JSON.

    flock /tmp/advexplain-cpu.lock python -m bench.peers_attacks --data $ADVEXPLAIN_FACES
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advexplain.shared.pixels import quantise
from bench.common import (
    OUR_SETTINGS,
    Bench,
    base_parser,
    fmt,
    load_bench,
    markdown_table,
    mean,
    median,
    run_ours,
    seed_everything,
    write_json,
)


class CountingNetwork(nn.Module):
    """The black box as ART sees it: counts every image forwarded; scores or one-hot labels out."""

    def __init__(self, network: nn.Module, label_only: bool):
        super().__init__()
        self.network = network
        self.label_only = label_only
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += int(x.shape[0])
        with torch.no_grad():
            probs = torch.softmax(self.network(x.float()), dim=1)
        if self.label_only:
            return F.one_hot(probs.argmax(1), probs.shape[1]).float()
        return probs


def art_classifier(network: nn.Module, label_only: bool, image_shape, classes: int):
    from art.estimators.classification import PyTorchClassifier
    counting = CountingNetwork(network, label_only).eval()
    clf = PyTorchClassifier(model=counting, loss=nn.CrossEntropyLoss(), input_shape=tuple(image_shape),
                            nb_classes=classes, clip_values=(0.0, 1.0), device_type="cpu")
    return clf, counting


def nearest_correct_of_class(bench: Bench, image: torch.Tensor, label: int) -> torch.Tensor:
    """HSJ's targeted start: the closest (L2) split image of the true class the black box gets right.

    ART's targeted HopSkipJump needs an initial image already classified as the target
    (`x_adv_init`); choosing it is bookkeeping on the labelled split, not counted as queries (the
    same way every method here is told which images are misclassified). HSJ's own check of it is
    counted.
    """
    ok = ((bench.data.labels == label) & (bench.all_predicted == label)).nonzero().flatten()
    pool = bench.data.as_float(ok)
    distances = (pool - image.unsqueeze(0)).flatten(1).norm(dim=1)
    return pool[int(distances.argmin())]


def run_peer(bench: Bench, name: str, make_attack, label_only: bool, uses_init: bool):
    rows = []
    for image, label in zip(bench.images, bench.labels):
        clf, counting = art_classifier(bench.blackbox.model, label_only, image.shape, len(bench.blackbox.classes))
        attack = make_attack(clf)
        x = image.unsqueeze(0).numpy().astype(np.float32)
        y = np.eye(len(bench.blackbox.classes), dtype=np.float32)[[int(label)]]
        kwargs = {}
        if uses_init:
            kwargs["x_adv_init"] = nearest_correct_of_class(bench, image, int(label)).unsqueeze(0).numpy()
        started = time.perf_counter()
        adv = attack.generate(x=x, y=y, **kwargs)
        seconds = time.perf_counter() - started
        adv_t = torch.from_numpy(np.asarray(adv, dtype=np.float32))[0].clamp(0, 1)
        with torch.no_grad():  # outside the count: did the black box end at the true label?
            pred = int(bench.blackbox.model(adv_t.unsqueeze(0)).argmax(1))
            pred_8bit = int(bench.blackbox.model(quantise(adv_t).unsqueeze(0)).argmax(1))
        delta = adv_t - image
        success = pred == int(label)
        rows.append({"success": success, "success_8bit": pred_8bit == int(label), "queries": counting.count,
                     "l2": float(delta.norm()) if success else None,
                     "linf": float(delta.abs().max()) if success else None, "seconds": seconds})
    return rows


def rows_from_ours(bench: Bench, results) -> list[dict]:
    rows = []
    for r in results:
        ok = r.success and not r.already_correct
        with torch.no_grad():  # outside the count: does the 8-bit (PNG) version still get the true label?
            pred_8bit = int(bench.blackbox.model(quantise(r.adversarial).unsqueeze(0)).argmax(1))
        rows.append({"success": bool(r.success), "success_8bit": bool(r.success and pred_8bit == r.label),
                     "queries": r.queries, "search_queries": r.search_queries,
                     "l2": r.l2 if ok else None, "linf": r.linf if ok else None, "seconds": r.seconds})
    return rows


def aggregate(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["success"]]
    out = {
        "images": len(rows),
        "success_rate": sum(r["success"] for r in rows) / len(rows) if rows else None,
        "median_queries": median([r["queries"] for r in rows]),
        "mean_queries": mean([r["queries"] for r in rows]),
        "max_queries": max((r["queries"] for r in rows), default=None),
        "median_l2": median([r["l2"] for r in ok]),
        "median_linf": median([r["linf"] for r in ok]),
        "median_linf_255": None if not ok else median([r["linf"] for r in ok]) * 255,
        "mean_l2": mean([r["l2"] for r in ok]),
        "seconds_per_image": mean([r["seconds"] for r in rows]),
    }
    if rows and "search_queries" in rows[0]:
        out["mean_search_queries"] = mean([r["search_queries"] for r in rows])
        out["median_search_queries"] = median([r["search_queries"] for r in rows])
    out["success_rate_8bit"] = sum(r["success_8bit"] for r in rows) / len(rows) if rows else None
    return out


def main(argv=None) -> int:
    p = base_parser("peers_attacks", __doc__.splitlines()[0])
    p.add_argument("--hsj-small", default="2,10,20", help="HopSkipJump small budget: max_iter,init_eval,max_eval")
    p.add_argument("--hsj", default="10,20,200", help="HopSkipJump budget: max_iter,init_eval,max_eval")
    p.add_argument("--simba-iter", type=int, default=1000, help="SimBA max_iter (each iteration = 2 queries)")
    p.add_argument("--simba-px-eps", type=float, default=0.05)
    p.add_argument("--simba-dct-eps", type=float, default=0.2)
    p.add_argument("--skip-peers", action="store_true")
    args = p.parse_args(argv)
    bench = load_bench(args)
    from art.attacks.evasion import HopSkipJump, SimBA

    methods: dict[str, dict] = {}
    configs: dict[str, dict] = {}

    def ours(name, method, source, oracle):
        seed_everything(args.seed)
        methods[name] = {"rows": rows_from_ours(bench, run_ours(bench, method, source, oracle))}
        configs[name] = {"method": method, "gradient_source": source, "oracle": oracle, "max_queries": 20, "alpha": 2.0}

    # hard-label condition
    ours("hard-label | ours black-box margin", "margin", "surrogate", "label_only")
    ours("hard-label | ours black-box paper", "paper", "surrogate", "label_only")
    ours("hard-label | ours white-box margin", *OUR_SETTINGS["ours white-box margin"])
    ours("hard-label | ours black-box margin-linf", *OUR_SETTINGS["ours black-box margin-linf"])
    ours("hard-label | ours white-box margin-linf", *OUR_SETTINGS["ours white-box margin-linf"])
    ours("hard-label | ours white-box paper", *OUR_SETTINGS["ours white-box paper"])
    if not args.skip_peers:
        for label, spec in (("hard-label | HopSkipJump small", args.hsj_small), ("hard-label | HopSkipJump", args.hsj)):
            it, ie, me = (int(v) for v in spec.split(","))
            seed_everything(args.seed)
            cfg = {"targeted": True, "norm": 2, "max_iter": it, "init_eval": ie, "max_eval": me, "init_size": 100,
                   "x_adv_init": "nearest correctly classified split image of the true class"}
            methods[label] = {"rows": run_peer(bench, label, lambda clf, it=it, me=me, ie=ie: HopSkipJump(
                clf, batch_size=64, targeted=True, norm=2, max_iter=it, max_eval=me, init_eval=ie, init_size=100,
                verbose=False), label_only=True, uses_init=True)}
            configs[label] = cfg
    # score condition
    ours("score | ours black-box margin", "margin", "surrogate", "scores")
    ours("score | ours black-box margin-linf", "margin-linf", "surrogate", "scores")
    ours("score | ours black-box paper", "paper", "surrogate", "scores")
    if not args.skip_peers:
        for label, attack, eps in (
            ("score | SimBA-px", "px", args.simba_px_eps),
            ("score | SimBA-DCT", "dct", args.simba_dct_eps),
        ):
            seed_everything(args.seed)
            methods[label] = {"rows": run_peer(bench, label, lambda clf, attack=attack, eps=eps: SimBA(
                clf, attack=attack, max_iter=args.simba_iter, epsilon=eps, order="random", freq_dim=4, stride=1,
                targeted=True, batch_size=1, verbose=False), label_only=False, uses_init=False)}
            configs[label] = {"attack": attack, "epsilon": eps, "max_iter": args.simba_iter, "targeted": True,
                              "order": "random", "freq_dim": 4}

    for m in methods.values():
        m["aggregate"] = aggregate(m["rows"])
    headers = ["condition | method", "images", "success", "success (8-bit)", "median queries", "mean queries",
               "mean search queries", "median L2", "median L-inf (/255)", "s / image"]
    table = markdown_table(headers, [[
        name, a["images"], fmt(a["success_rate"], ".1%"), fmt(a["success_rate_8bit"], ".1%"),
        fmt(a["median_queries"], ".0f"), fmt(a["mean_queries"], ".1f"), fmt(a.get("mean_search_queries"), ".2f"),
        fmt(a["median_l2"], ".3f"), fmt(a["median_linf_255"], ".2f"), fmt(a["seconds_per_image"], ".3f")]
        for name, m in methods.items() for a in [m["aggregate"]]])
    print(table)
    targets = {
        "black-box margin (hard-label)": check_targets(
            methods["hard-label | ours black-box margin"]["aggregate"], 0.99, 2.0, 4.0
        ),
        "white-box margin": check_targets(methods["hard-label | ours white-box margin"]["aggregate"], 1.0, 1.1, 2.0),
        "black-box margin-linf (hard-label)": check_targets(
            methods["hard-label | ours black-box margin-linf"]["aggregate"], 0.99, 2.0, 4.0
        ),
        "white-box margin-linf": check_targets(
            methods["hard-label | ours white-box margin-linf"]["aggregate"], 1.0, 1.1, 2.0
        ),
    }
    for k, v in targets.items():
        print(f"target {k}: {v}")
    write_json(args.out, {"benchmark": "peers_attacks", "config": {**bench.meta, "methods": configs,
               "counting": "every image forwarded to the black box; ours include the first prediction"},
               "targets": targets, "table": table,
               "methods": {k: {"aggregate": v["aggregate"], "rows": v["rows"]} for k, v in methods.items()}})
    print(f"wrote {args.out}")
    return 0


def check_targets(a: dict, success: float, search_queries: float, linf_255: float) -> dict:
    # 8-bit images: an L-inf of exactly n levels is n/255 up to float32 rounding (1e-4 of a level)
    linf = a["median_linf_255"]
    return {
        "success_rate": a["success_rate"],
        "success_target": success,
        "success_met": a["success_rate"] >= success,
        "mean_search_queries": a["mean_search_queries"],
        "queries_target": search_queries,
        "queries_met": a["mean_search_queries"] <= search_queries,
        "median_linf_255": linf,
        "linf_target_255": linf_255,
        "linf_met": linf is not None and linf <= linf_255 + 1e-4,
    }


if __name__ == "__main__":
    raise SystemExit(main())
