"""How much of a map Algorithm 2 keeps at each tau, for the default search's changes (the choice of DEFAULT_TAU).

Explains the first `--limit` training-split mistakes of a box (`bench/native_resolution.py`'s boxes
and surrogates) with the default method, then, for every tau, the mean share of pixels the map keeps
(`q3 + tau * IQR` fence) and how many successful explanations get an empty map. Tuning data only:
training images, never validation.

    ADVEXPLAIN_FACES=... flock /tmp/advexplain-cpu.lock python -m bench.saliency_tau --box thirdparty
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from advexplain.shared.explain import explain
from advexplain.shared.saliency import DEFAULT_TAU, saliency_map
from bench.common import RESULTS, write_json
from bench.native_resolution import load_setup

ROOT = Path(__file__).resolve().parents[1]
TAUS = (0.1, 0.25, 0.5, 1.0, 1.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", choices=("thirdparty", "faces", "elpv"), default="thirdparty")
    p.add_argument("--data", default=None, help="gender-faces folder (default: $ADVEXPLAIN_FACES)")
    p.add_argument("--thirdparty", type=Path, default=ROOT / "models-thirdparty")
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--out", type=Path, default=RESULTS / "saliency_tau_train.json")
    args = p.parse_args()
    args.split, args.blackbox, args.surrogate = "train", None, None
    torch.set_num_threads(1)

    setup = load_setup(args)
    results = [explain(x, y, setup.surrogate, setup.oracle) for x, y in zip(setup.photos, setup.labels, strict=True)]
    changed = [r for r in results if r.success and not r.already_correct]
    rows = []
    for tau in TAUS:
        kept = [float((saliency_map(r.perturbation, tau=tau) > 0).float().mean()) for r in changed]
        rows.append({"tau": tau, "mean_share_kept": float(np.mean(kept)) if kept else None,
                     "empty_maps": sum(k == 0 for k in kept), "maps": len(kept)})
    print(f"{args.box}, training mistakes: {len(results)} explained, {len(changed)} maps; default tau {DEFAULT_TAU}")
    print("| tau | mean share of pixels kept | empty maps |\n|---:|---:|---:|")
    for row in rows:
        print(f"| {row['tau']} | {row['mean_share_kept']:.3f} | {row['empty_maps']} / {row['maps']} |")
    write_json(args.out, {"benchmark": "saliency_tau", "box": args.box, "split": "train", "limit": args.limit,
                          "explained": len(results), "default_tau": DEFAULT_TAU, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
