"""`advexplain train blackbox|surrogate`: train one of the paper's CNNs and save a checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from advexplain.commands.blackbox_flags import add_oip_flags, oip_options
from advexplain.shared.checkpoints import save_checkpoint
from advexplain.shared.data import BUILTIN, fingerprint, load_images, sample_fraction
from advexplain.shared.devices import pick_device
from advexplain.shared.distill import distill_labels
from advexplain.shared.errors import InvalidInput
from advexplain.shared.models import ModelConfig
from advexplain.shared.training import channel_stats, predict, train_model

# The paper's schedule (Adam, lr 0.001, batch 64; 20 epochs black box, 50 surrogate).
PAPER_EPOCHS = {"blackbox": 20, "surrogate": 50}
DEFAULT_FRACTION = {"blackbox": 1.0, "surrogate": 0.1}
# Full size (100x100, width 1.0) is a GPU job; on the CPU the defaults shrink the networks so
# that `make up` trains both in minutes on two cores.
DEVICE_DEFAULTS = {"cuda": {"image_size": 100, "width": 1.0}, "cpu": {"image_size": 64, "width": 0.125}}


def register(sub) -> None:
    p = sub.add_parser("train", help="train the black box or the surrogate and save a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("kind", choices=("blackbox", "surrogate"))
    p.add_argument(
        "--data",
        default=BUILTIN,
        help="'elpv' (built-in, 2 classes), 'elpv4' (built-in, 4 classes) or a folder <root>/<split>/<class>/<image>",
    )
    p.add_argument("--out", type=Path, default=None, help="checkpoint folder (default models/<kind>)")
    p.add_argument("--fraction", type=float, default=None,
                   help="seeded random share of the training split (default 1.0 black box, 0.1 surrogate)")
    p.add_argument("--epochs", type=int, default=None, help="default: the paper's (20 black box, 50 surrogate)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=None, help="default: 100 on CUDA, 64 on the CPU")
    p.add_argument(
        "--width",
        type=float,
        default=None,
        help="layer width multiplier, 1.0 = the paper (default: 1.0 on CUDA, 0.125 on the CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset-seed", type=int, default=None,
                   help="seed of the --fraction draw (default: --seed); keep it and change --seed for another "
                        "initialisation on the same images")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="validation")
    p.add_argument("--distill-from", default=None, metavar="URL|CHECKPOINT",
                   help="surrogate only: label the local images with this black box (a running service's URL: POST "
                        "/predict, or an Open Inference Protocol model URL http(s)://host:port/v2/models/<name>; or a "
                        "checkpoint folder) and train on its answers instead of the folder labels")
    p.add_argument("--distill-budget", type=int, default=None,
                   help="most black-box queries distillation may spend (default: one per local image)")
    p.add_argument("--distill-label-only", action="store_true",
                   help="with a CHECKPOINT: use only its labels, as from a hard-label black box")
    add_oip_flags(p)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="train on random views of each batch (crops, flips, a lower resolution, noise); default: on "
                        "for a surrogate (its transfer to a box it did not learn from holds across draws), off for a "
                        "distilled one (it learns the box's answers on the images as they are) and for a black box "
                        "(the paper's training)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args) -> int:
    device = pick_device(args.device)
    defaults = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    image_size = args.image_size or defaults["image_size"]
    width = args.width or defaults["width"]
    epochs = args.epochs or PAPER_EPOCHS[args.kind]
    fraction = args.fraction if args.fraction is not None else DEFAULT_FRACTION[args.kind]
    out = args.out or Path("models") / args.kind
    progress = not args.quiet
    # Default: a surrogate learning the images' own labels trains on augmented views; one distilled from a
    # box learns its answers on the images as the box saw them (bench/README.md, "Three draws").
    augment = (args.kind == "surrogate" and not args.distill_from) if args.augment is None else args.augment

    started = time.perf_counter()
    train_set = load_images(args.data, args.train_split, image_size, progress=progress)
    val_set = load_images(args.data, args.val_split, image_size, progress=progress)
    if train_set.classes != val_set.classes:
        raise SystemExit(f"train classes {train_set.classes} differ from validation classes {val_set.classes}")
    if fraction < 1.0:
        subset_seed = args.seed if args.subset_seed is None else args.subset_seed
        train_set = sample_fraction(train_set, fraction, seed=subset_seed)
    load_seconds = time.perf_counter() - started
    print(f"{args.kind}: {len(train_set)} training images {train_set.class_counts()}, {len(val_set)} validation, "
          f"{image_size}x{image_size}, width {width:g}, {epochs} epochs on {device}"
          f"{', on augmented views' if augment else ''} "
          f"(data loaded in {load_seconds:.1f}s; {len(train_set.skipped)} unreadable skipped)")

    distillation, targets, agreement_set = None, None, None
    if args.distill_from:
        if args.kind != "surrogate":
            raise InvalidInput("--distill-from trains a surrogate: use it with `train surrogate`")
        oracle, source = distillation_oracle(args.distill_from, args.distill_label_only, train_set.classes,
                                             **oip_options(args, args.distill_from, "--distill-from"))
        labelled = distill_labels(oracle, train_set, budget=args.distill_budget, seed=args.seed)
        train_set, targets, agreement_set = labelled.train, labelled.targets, labelled.held_back
        distillation = {"source": source, "queries": labelled.queries, "budget": args.distill_budget,
                        "targets": "soft" if labelled.soft else "hard", "train_images": len(train_set),
                        "held_back_images": len(agreement_set)}
        print(f"distillation: {labelled.queries} black-box queries spent on {source} "
              f"({distillation['targets']} targets; {len(agreement_set)} images held back to measure agreement)")

    mean, std = channel_stats(train_set)
    config = ModelConfig(architecture=args.kind, image_size=image_size, num_classes=len(train_set.classes),
                         width=width, mean=mean, std=std)
    result = train_model(config, train_set, val_set, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, device=device, progress=progress, targets=targets, augment=augment)
    metrics = {"val_accuracy": result.val_accuracy, "train_accuracy": result.train_accuracy,
               "val_balanced_accuracy": result.val_balanced_accuracy}
    # config.json's metrics are flat numbers: one key per class, absent for a class without validation images.
    metrics.update({f"val_class_accuracy/{name}": a for name, a in result.val_class_accuracy.items() if a is not None})
    if distillation is not None:
        agreement = float((predict(result.model, agreement_set, device=device) == agreement_set.labels).float().mean())
        distillation["agreement"] = round(agreement, 6)
        metrics["blackbox_agreement"] = distillation["agreement"]
        print(f"distillation: the surrogate agrees with the black box on {agreement:.1%} of the held-back images")
    data = {
        "spec": args.data,
        "train": train_set.description,
        "validation": val_set.description,
        "train_images": len(train_set),
        "validation_images": len(val_set),
        "fraction": fraction,
        "skipped": len(train_set.skipped) + len(val_set.skipped),
        "train_fingerprint": fingerprint(train_set),
    }
    save_checkpoint(out, result.model, kind=args.kind, classes=train_set.classes, data=data, training=result.record,
                    metrics=metrics, distillation=distillation)
    print(f"{args.kind}: validation accuracy {result.val_accuracy:.4f} after {result.record.seconds:.1f}s of training; "
          f"saved to {out}")
    support = val_set.class_counts()
    per_class = ", ".join(f"{name} {'-' if a is None else f'{a:.4f}'} ({support[name]})"
                          for name, a in result.val_class_accuracy.items())
    print(
        f"{args.kind}: validation accuracy per class (images): {per_class}; balanced {result.val_balanced_accuracy:.4f}"
    )
    return 0


def distillation_oracle(source: str, label_only: bool, classes: tuple[str, ...], **oip):
    """The black box to distil from: a running service (URL: only its /predict is used, and its labels
    must be among the local data's `classes`; or an OIP model URL, whose output index k is `classes[k]`,
    with `oip` the pixel options of `connect_black_box`) or a checkpoint folder (for benchmarks)."""
    if source.startswith(("http://", "https://")):
        from advexplain.shared.remote import connect_black_box

        return connect_black_box(source, classes, client_id="advexplain-distill", **oip), source
    from advexplain.shared.classifiers import LocalClassifier

    path = Path(source)
    if not path.is_dir():
        raise InvalidInput(f"--distill-from {source!r} is neither an http(s) URL nor a checkpoint folder")
    return LocalClassifier.from_checkpoint(path, label_only=label_only), f"checkpoint:{path.resolve().name}" + (
        " (label-only)" if label_only else "")
