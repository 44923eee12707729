"""Folder and built-in data sets: layouts, odd files, modes, clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from advexplain.shared import data as data_module
from advexplain.shared.data import (
    ELPV4_CLASSES,
    ImageSet,
    canonical_split,
    elpv_four_labels,
    elpv_split_indices,
    load_elpv,
    load_folder,
    load_images,
    load_pil_rgb,
    sample_fraction,
)
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


ELPV4_COUNTS = {
    "p0-functional": 1508,
    "p33-possibly-defective": 295,
    "p67-likely-defective": 106,
    "p100-defective": 715,
}


def test_elpv4_is_stratified_deterministic_and_named():
    train = load_images("elpv4", "train", 16)
    val = load_images("elpv4", "Validation", 16)
    assert train.classes == val.classes == ELPV4_CLASSES == tuple(ELPV4_COUNTS)
    assert train.description["view"] == val.description["view"] == "elpv4"
    assert set(train.paths).isdisjoint(val.paths) and len(train) + len(val) == 2624
    assert val.class_counts() == {"p0-functional": 302, "p33-possibly-defective": 59, "p67-likely-defective": 21,
                                  "p100-defective": 143}
    for name, total in ELPV4_COUNTS.items():
        assert train.class_counts()[name] + val.class_counts()[name] == total
        assert val.class_counts()[name] == round(total * 0.2), f"{name}: 20% of the class goes to validation"
    again = load_elpv("validation", 16, view="elpv4")
    assert again.paths == val.paths and torch.equal(again.images, val.images) and torch.equal(again.labels, val.labels)
    with pytest.raises(DataError, match="only train and validation"):
        load_images("elpv4", "test", 16)


def test_elpv4_refines_elpv_and_shares_its_decoded_data():
    """Every image keeps its defect probability: p0/p33 are `functional` in elpv, p67/p100 `defective`."""
    load_images("elpv", "validation", 16)
    misses = data_module._elpv_raw.cache_info().misses
    binary, four = {}, {}
    for split in ("train", "validation"):
        for view, out in (("elpv", binary), ("elpv4", four)):
            images = load_images(view, split, 16)
            out.update((p, images.classes[int(y)]) for p, y in zip(images.paths, images.labels))
    assert data_module._elpv_raw.cache_info().misses == misses, "both views read the package data once"
    assert binary.keys() == four.keys() and len(four) == 2624
    coarse = {"p0-functional": "functional", "p33-possibly-defective": "functional",
              "p67-likely-defective": "defective", "p100-defective": "defective"}
    assert all(binary[p] == coarse[four[p]] for p in four)


def test_elpv4_labels_only_the_four_probabilities():
    assert elpv_four_labels(np.array([0.0, 1 / 3, 2 / 3, 1.0])).tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match="elpv4"):
        elpv_four_labels(np.array([0.0, 0.5]))
    with pytest.raises(DataError, match="unknown built-in"):
        load_elpv("train", 16, view="elpv3")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=300))
def test_elpv_split_is_a_stratified_partition(labels):
    labels = np.array(labels)
    split = elpv_split_indices(labels)
    train, val = split["train"], split["validation"]
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels))), "a partition"
    for cls in np.unique(labels):
        n = int((labels == cls).sum())
        assert abs(int((labels[val] == cls).sum()) - 0.2 * n) <= 0.5, "20% of every class, rounded"
    again = elpv_split_indices(labels)
    assert np.array_equal(again["train"], train) and np.array_equal(again["validation"], val)


def test_sample_fraction_is_seeded():
    images = ImageSet(images=torch.zeros(100, 3, 4, 4, dtype=torch.uint8), labels=torch.arange(100) % 2,
                      classes=("a", "b"), description={}, paths=[str(i) for i in range(100)])
    a = sample_fraction(images, 0.1, seed=1)
    assert len(a) == 10
    assert a.paths == sample_fraction(images, 0.1, seed=1).paths
    assert a.paths != sample_fraction(images, 0.1, seed=2).paths
    with pytest.raises(DataError):
        sample_fraction(images, 0.0, seed=1)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 90), w=st.integers(1, 90), size=st.sampled_from([8, 32, 64]), seed=st.integers(0, 10_000))
def test_served_input_is_what_the_black_box_feeds_its_network(h, w, size, seed):
    from advexplain.shared.data import served_input
    from advexplain.shared.images import decode_image
    from advexplain.shared.pixels import encode_png

    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    served = served_input(x, size)
    assert served.shape == (2, 3, size, size)
    for i in range(2):
        assert torch.equal(served[i], decode_image(encode_png(x[i]), size, max_pixels=10**6))
