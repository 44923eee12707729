"""The real gender-faces data set (CI sets ADVEXPLAIN_FACES): the folder loader reads all of it."""

from __future__ import annotations

import pytest

from advexplain.shared.data import load_folder

pytestmark = pytest.mark.faces


def test_gender_faces_loads_with_the_folder_loader(faces_root):
    train = load_folder(faces_root, "Training", image_size=32, progress=False)
    val = load_folder(faces_root, "Validation", image_size=32, progress=False)
    assert train.classes == val.classes == ("female", "male")
    assert len(train) + len(val) == 12_000
    assert train.class_counts() == {"female": 5000, "male": 5000}
    assert val.class_counts() == {"female": 1000, "male": 1000}
    assert not train.skipped and not val.skipped
    assert any(p.endswith(".jpg.jpg") for p in train.paths)
