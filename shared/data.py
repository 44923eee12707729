"""Image data sets: Kaggle-layout folders and the built-in elpv default, decoded once into memory.

Every image set holds uint8 RGB tensors of one square size; `as_float` turns them into the [0,1]
float images that cross every boundary in advexplain.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2
from tqdm import tqdm

from advexplain.shared.errors import DataError

log = logging.getLogger(__name__)

BUILTIN = "elpv"
ELPV_CLASSES = ("defective", "functional")
# elpv4: one class per defect probability the experts gave (0, 1/3, 2/3, 1), in rising order.
ELPV4 = "elpv4"
ELPV4_CLASSES = ("p0-functional", "p33-possibly-defective", "p67-likely-defective", "p100-defective")
ELPV_VALIDATION_SHARE = 0.2
ELPV_SPLIT_SEED = 0

# Split names as they appear on disk, by the canonical split they stand for.
SPLIT_ALIASES = {
    "train": ("Training", "train", "training", "Train"),
    "validation": ("Validation", "val", "validation", "Val", "valid"),
    "test": ("test", "Test", "Testing"),
}
# Pillow opens more than torchvision lists; accept everything it has a decoder for.
EXTENSIONS = tuple(sorted(set(IMG_EXTENSIONS) | {".gif", ".jfif", ".tga", ".jp2"}))


@dataclass
class ImageSet:
    """Decoded images of one split.

    images: uint8 tensor (N, 3, S, S); labels: int64 tensor (N,); classes in index order.
    skipped: files that could not be decoded, with the reason.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    description: dict[str, Any]
    paths: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def as_float(self, index: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0,1], float32, (N, 3, S, S)."""
        images = self.images if index is None else self.images[index]
        return images.float().div_(255.0)

    def subset(self, indices: torch.Tensor, note: str | None = None) -> ImageSet:
        description = dict(self.description)
        if note:
            description["subset"] = note
        return ImageSet(
            images=self.images[indices],
            labels=self.labels[indices],
            classes=self.classes,
            description=description,
            paths=[self.paths[i] for i in indices.tolist()] if self.paths else [],
            skipped=list(self.skipped),
        )

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))


def canonical_split(split: str) -> str:
    lowered = split.lower()
    for canonical, names in SPLIT_ALIASES.items():
        if lowered == canonical or lowered in (n.lower() for n in names):
            return canonical
    raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLIT_ALIASES)}")


def _resize(image_size: int) -> v2.Resize:
    """uint8 (..., C, H, W) tensor -> (..., C, S, S), resized like the paper (plain resize, no crop)."""
    return v2.Resize((image_size, image_size), antialias=True)


def resize_transform(image_size: int) -> v2.Compose:
    """PIL image -> uint8 (3, S, S) tensor, resized like the paper (plain resize, no crop)."""
    return v2.Compose([v2.PILToTensor(), _resize(image_size)])


def served_input(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, C, H, W) float in [0, 1] -> (N, C, S, S) float: exactly what our black box feeds its
    network for the 8-bit PNGs of these images (`shared.images.decode_image`: 8-bit pixels,
    `resize_transform`'s resize of the uint8 image, which rounds the resized pixels to 8 bits)."""
    pixels = x.detach().clamp(0, 1).mul(255).round().to(torch.uint8)
    if pixels.shape[-2:] != (image_size, image_size):
        pixels = _resize(image_size)(pixels)
    return pixels.to(x.dtype).div(255.0)


def load_pil_rgb(source: str | Path | BinaryIO) -> Image.Image:
    """Open any image Pillow reads (first frame of animations) as RGB, whatever its mode."""
    with Image.open(source) as opened:
        opened.seek(0)
        img: Image.Image = opened
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16/32-bit grey: scale to 8 bits instead of letting convert() clip at 255.
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def find_split_dir(root: Path, split: str) -> Path:
    canonical = canonical_split(split)
    for name in SPLIT_ALIASES[canonical]:
        candidate = root / name
        if candidate.is_dir():
            return candidate
    names = ", ".join(SPLIT_ALIASES[canonical])
    raise DataError(f"{root} has no {canonical} split: expected a folder named one of {names}")


def load_folder(root: str | os.PathLike[str], split: str, image_size: int, progress: bool = True) -> ImageSet:
    """Load `<root>/<split>/<class>/<image>` (Kaggle layout), classes in sorted folder order.

    Unreadable images are skipped with a warning naming the file; they are listed in `skipped`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    split_dir = find_split_dir(root, split)
    try:
        classes, class_to_idx = find_classes(str(split_dir))
    except FileNotFoundError as exc:
        raise DataError(f"{split_dir} has no class folders") from exc
    if len(classes) < 2:
        raise DataError(f"{split_dir} has {len(classes)} class folder(s) ({', '.join(classes)}): need at least 2")
    samples = make_dataset(str(split_dir), class_to_idx, extensions=EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataError(f"{split_dir} holds no images with a known extension")
    empty = [c for c in classes if not any(t == class_to_idx[c] for _, t in samples)]
    if empty:
        raise DataError(f"class folder(s) {', '.join(empty)} in {split_dir} hold no images")

    transform = resize_transform(image_size)
    images = torch.empty((len(samples), 3, image_size, image_size), dtype=torch.uint8)
    labels: list[int] = []
    paths: list[str] = []
    skipped: list[tuple[str, str]] = []
    for path, target in tqdm(samples, desc=f"decoding {split_dir.name}", unit="img", disable=not progress, leave=False):
        try:
            tensor = transform(load_pil_rgb(path))
        except Exception as exc:  # noqa: BLE001 - any decoder failure means: skip this one file
            log.warning("skipping unreadable image %s: %s", path, exc)
            skipped.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        images[len(labels)] = tensor
        labels.append(target)
        paths.append(path)
    if not labels:
        raise DataError(f"none of the {len(samples)} images in {split_dir} could be read")
    if skipped:
        log.warning("%d of %d images in %s were unreadable and skipped", len(skipped), len(samples), split_dir)
    return ImageSet(
        images=images[: len(labels)].clone(),
        labels=torch.tensor(labels, dtype=torch.int64),
        classes=tuple(classes),
        description={
            "source": "folder",
            "path": str(root.resolve()),
            "split": split_dir.name,
            "image_size": image_size,
        },
        paths=paths,
        skipped=skipped,
    )


def elpv_split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Deterministic stratified split of elpv: 20% of each class (rounded) to validation."""
    rng = np.random.default_rng(ELPV_SPLIT_SEED)
    train, validation = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * ELPV_VALIDATION_SHARE))
        validation.append(idx[:n_val])
        train.append(idx[n_val:])
    return {"train": np.sort(np.concatenate(train)), "validation": np.sort(np.concatenate(validation))}


def elpv_binary_labels(probabilities: np.ndarray) -> np.ndarray:
    """`defective` when the defect probability is >= 0.5, else `functional` (indices into ELPV_CLASSES)."""
    labels: np.ndarray = np.where(probabilities >= 0.5, ELPV_CLASSES.index("defective"),
                                  ELPV_CLASSES.index("functional"))
    return labels


def elpv_four_labels(probabilities: np.ndarray) -> np.ndarray:
    """One class per defect probability, 0, 1/3, 2/3, 1 -> 0, 1, 2, 3 (indices into ELPV4_CLASSES)."""
    labels: np.ndarray = np.rint(probabilities * 3).astype(np.int64)
    if not np.allclose(labels / 3, probabilities):
        raise DataError("elpv defect probabilities other than 0, 1/3, 2/3 and 1: elpv4 cannot label them")
    return labels


# The built-in views of the one elpv data set: name -> (classes in index order, labelling).
ELPV_VIEWS = {
    BUILTIN: (ELPV_CLASSES, elpv_binary_labels),
    ELPV4: (ELPV4_CLASSES, elpv_four_labels),
}


@functools.lru_cache(maxsize=1)
def _elpv_raw() -> tuple[np.ndarray, np.ndarray]:
    """The decoded package data, read once per process and shared by every view and split."""
    from elpv_dataset.utils import load_dataset

    raw, probabilities, _types = load_dataset()
    raw.setflags(write=False)
    probabilities.setflags(write=False)
    return raw, probabilities


def load_elpv(split: str, image_size: int, view: str = BUILTIN) -> ImageSet:
    """The built-in data set: 2,624 electroluminescence images of solar cells (elpv-dataset).

    view `elpv`: `defective` when the defect probability is >= 0.5, else `functional`.
    view `elpv4`: one class per defect probability, `p0-functional` (1,508 images),
    `p33-possibly-defective` (295), `p67-likely-defective` (106), `p100-defective` (715).
    Each view splits 20% of every one of its classes to validation with the same seed, so the
    splits are deterministic and stratified, but they are not the same images: an `elpv` model
    has trained on some of `elpv4`'s validation images and the other way round.
    """
    canonical = canonical_split(split)
    if canonical == "test":
        raise DataError(f"the built-in {view} data set has only train and validation splits")
    if view not in ELPV_VIEWS:
        raise DataError(f"unknown built-in data set {view!r}: use one of {', '.join(ELPV_VIEWS)}")
    classes, labelling = ELPV_VIEWS[view]
    raw, probabilities = _elpv_raw()
    labels = labelling(probabilities)
    indices = elpv_split_indices(labels)[canonical]
    grey = torch.from_numpy(raw[indices]).unsqueeze(1)  # (N,1,300,300) uint8
    resized = v2.functional.resize(grey, [image_size, image_size], antialias=True)
    return ImageSet(
        images=resized.expand(-1, 3, -1, -1).contiguous(),
        labels=torch.from_numpy(labels[indices].astype(np.int64)),
        classes=classes,
        description={"source": "elpv-dataset", "view": view, "split": canonical, "image_size": image_size,
                     "split_seed": ELPV_SPLIT_SEED, "validation_share": ELPV_VALIDATION_SHARE},
        paths=[f"elpv:{i}" for i in indices.tolist()],
    )


def load_images(data: str, split: str, image_size: int, progress: bool = True) -> ImageSet:
    """`data` is `elpv` (the built-in default), `elpv4` (its four-class view) or a Kaggle-layout folder."""
    if data in ELPV_VIEWS:
        return load_elpv(split, image_size, view=data)
    return load_folder(data, split, image_size, progress=progress)


# -- photos at their own size ---------------------------------------------------------------------
# Training decodes every image to one square size (ImageSet); explaining and evaluating must not,
# since a box of unknown input geometry judges the photo as it is.

@dataclass
class PhotoSet:
    """photos: uint8 (3, H_i, W_i) tensors, each at its own size; labels; classes in index order."""

    photos: list[torch.Tensor]
    labels: list[int]
    classes: tuple[str, ...]
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.photos)

    def image(self, i: int) -> torch.Tensor:
        """Photo i as (3, H, W) float32 in [0, 1] (on the 8-bit grid)."""
        return self.photos[i].float().div(255.0)


def load_photos(data: str, split: str) -> PhotoSet:
    """Every image of a split at its own size: a built-in view (300x300 greyscale cells, as RGB) or a folder
    `<root>/<split>/<class>/<image>` (classes in sorted folder order; unreadable files are skipped
    with a warning and listed)."""
    if data in ELPV_VIEWS:
        canonical = canonical_split(split)
        if canonical == "test":
            raise DataError(f"the built-in {data} data set has only train and validation splits")
        classes, labelling = ELPV_VIEWS[data]
        raw, probabilities = _elpv_raw()
        labels = labelling(probabilities)
        indices = elpv_split_indices(labels)[canonical]
        photos = [torch.from_numpy(raw[i].copy()).unsqueeze(0).expand(3, -1, -1).contiguous() for i in indices]
        return PhotoSet(photos, [int(labels[i]) for i in indices], classes, [f"elpv:{i}" for i in indices])
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    split_dir = find_split_dir(root, split)
    classes, class_to_idx = find_classes(str(split_dir))
    samples = make_dataset(str(split_dir), class_to_idx, extensions=EXTENSIONS, allow_empty=True)
    out = PhotoSet([], [], tuple(classes), [])
    for path, target in samples:
        try:
            rgb = load_pil_rgb(path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means: skip this one file
            log.warning("skipping unreadable image %s: %s", path, exc)
            out.skipped.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        out.photos.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous())
        out.labels.append(target)
        out.paths.append(path)
    if not out.photos:
        raise DataError(f"{split_dir} holds no readable images")
    return out


def sample_fraction(images: ImageSet, fraction: float, seed: int) -> ImageSet:
    """A seeded random `fraction` of the images (the paper's surrogate gets 10% of the training data)."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    n = max(len(images.classes), int(round(len(images) * fraction)))
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(images), generator=generator)[:n].sort().values
    return images.subset(indices, note=f"random {fraction:g} of {len(images)} (seed {seed})")


def fingerprint(images: ImageSet) -> str:
    """Short content hash of the decoded pixels and labels, stored with checkpoints."""
    digest = hashlib.sha256()
    digest.update(images.images.numpy().tobytes())
    digest.update(images.labels.numpy().tobytes())
    return digest.hexdigest()[:16]
