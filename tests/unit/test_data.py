"""Folder and built-in data sets: layouts, odd files, modes, clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advexplain.shared.data import ImageSet, canonical_split, load_elpv, load_folder, load_images, load_pil_rgb, sample_fraction
from advexplain.shared.errors import DataError


def write_image(path: Path, mode: str = "RGB", size=(40, 30), fmt: str = "PNG", color=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new(mode, size, color)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """Two classes with a double-extension JPEG, a grayscale PNG, an RGBA PNG, CMYK, palette and a corrupt file."""
    root = tmp_path / "faces"
    write_image(root / "Training/female/131422.jpg.jpg", fmt="JPEG", color=(200, 10, 10))
    write_image(root / "Training/female/grey.png", mode="L", color=77)
    write_image(root / "Training/female/cmyk.jpg", mode="CMYK", fmt="JPEG", color=(0, 0, 0, 0))
    write_image(root / "Training/male/rgba.png", mode="RGBA", color=(0, 255, 0, 0))  # fully transparent
    write_image(root / "Training/male/palette.gif", mode="P", fmt="GIF", color=3)
    (root / "Training/male/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "Training/male/notes.txt").write_text("ignored: not an image extension")
    write_image(root / "Validation/female/a.png")
    write_image(root / "Validation/male/b.png")
    return root


def test_folder_loads_odd_files_and_skips_corrupt(odd_folder: Path):
    images = load_folder(odd_folder, "Training", image_size=24, progress=False)
    assert images.classes == ("female", "male")
    assert images.images.shape == (5, 3, 24, 24) and images.images.dtype == torch.uint8
    assert images.labels.tolist() == [0, 0, 0, 1, 1]
    names = [Path(p).name for p in images.paths]
    assert "131422.jpg.jpg" in names
    assert [Path(p).name for p, _ in images.skipped] == ["corrupt.jpg"]
    grey = images.images[names.index("grey.png")]
    assert torch.all(grey == 77), "grayscale must be replicated to three equal channels"
    transparent = images.images[names.index("rgba.png")]
    assert torch.all(transparent == 255), "transparent pixels composite onto white"
    floats = images.as_float()
    assert floats.dtype == torch.float32 and floats.min() >= 0 and floats.max() <= 1


def test_split_aliases(odd_folder: Path, tmp_path: Path):
    assert load_folder(odd_folder, "validation", 16, progress=False).description["split"] == "Validation"
    assert load_folder(odd_folder, "train", 16, progress=False).description["split"] == "Training"
    lower = tmp_path / "lower"
    write_image(lower / "val/cat/x.png")
    write_image(lower / "val/dog/y.png")
    assert load_folder(lower, "Validation", 16, progress=False).classes == ("cat", "dog")
    assert canonical_split("Validation") == "validation"
    with pytest.raises(DataError, match="unknown split"):
        canonical_split("holdout")


def test_clear_errors(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "missing", "train", 16)
    (tmp_path / "nosplit").mkdir()
    with pytest.raises(DataError, match="no train split"):
        load_folder(tmp_path / "nosplit", "train", 16)
    write_image(tmp_path / "one/train/only/a.png")
    with pytest.raises(DataError, match="need at least 2"):
        load_folder(tmp_path / "one", "train", 16)
    (tmp_path / "empty/train/a").mkdir(parents=True)
    write_image(tmp_path / "empty/train/b/x.png")
    with pytest.raises(DataError, match="hold no images"):
        load_folder(tmp_path / "empty", "train", 16)
    (tmp_path / "junk/train/a").mkdir(parents=True)
    (tmp_path / "junk/train/b").mkdir(parents=True)
    (tmp_path / "junk/train/a/x.png").write_bytes(b"junk")
    (tmp_path / "junk/train/b/y.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 2 images"):
        load_folder(tmp_path / "junk", "train", 16, progress=False)


def test_sixteen_bit_png_keeps_its_range():
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16)).save(buf, format="PNG")
    img = load_pil_rgb(io.BytesIO(buf.getvalue()))
    assert img.mode == "RGB"
    assert 120 <= np.asarray(img)[0, 0, 0] <= 135, "16-bit mid-grey must map to 8-bit mid-grey, not clip to white"


def test_elpv_default_is_deterministic_and_stratified():
    train = load_images("elpv", "train", 32)
    val = load_elpv("validation", 32)
    assert train.classes == val.classes == ("defective", "functional")
    assert len(train) + len(val) == 2624
    assert abs(len(val) / 2624 - 0.2) < 0.01
    share = lambda s: float((s.labels == 0).float().mean())  # noqa: E731
    assert abs(share(train) - share(val)) < 0.01, "both splits keep the defective share"
    assert set(train.paths).isdisjoint(val.paths)
    assert torch.equal(load_elpv("validation", 32).images, val.images)
    with pytest.raises(DataError):
        load_elpv("test", 32)


def test_sample_fraction_is_seeded():
    images = ImageSet(images=torch.zeros(100, 3, 4, 4, dtype=torch.uint8), labels=torch.arange(100) % 2,
                      classes=("a", "b"), description={}, paths=[str(i) for i in range(100)])
    a = sample_fraction(images, 0.1, seed=1)
    assert len(a) == 10
    assert a.paths == sample_fraction(images, 0.1, seed=1).paths
    assert a.paths != sample_fraction(images, 0.1, seed=2).paths
    with pytest.raises(DataError):
        sample_fraction(images, 0.0, seed=1)
