"""The paper's architectures: output shapes for several sizes and widths, and the layer plan."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advexplain.shared.models import MIN_FC_UNITS, ModelConfig, PaperCNN, count_parameters


def test_paper_width_matches_the_paper():
    bb = ModelConfig(architecture="blackbox")
    assert bb.conv_channels == (64, 128, 256, 512)
    assert bb.fc_units == (2048, 1024, 512, 128, 32)
    sur = ModelConfig(architecture="surrogate")
    assert sur.conv_channels == (64, 256, 512)
    assert sur.fc_units == (1024, 256, 32)
    model = PaperCNN(bb)
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [2048, 1024, 512, 128, 32, 2]
    assert linears[0].in_features == 512 * 6 * 6  # 100 -> 50 -> 25 -> 12 -> 6


@settings(max_examples=12, deadline=None)
@given(
    architecture=st.sampled_from(["blackbox", "surrogate"]),
    image_size=st.sampled_from([16, 32, 48, 64, 100]),
    width=st.sampled_from([0.03125, 0.0625, 0.125, 0.25]),
    num_classes=st.integers(2, 5),
    batch=st.integers(1, 3),
)
def test_output_shape(architecture, image_size, width, num_classes, batch):
    config = ModelConfig(architecture=architecture, image_size=image_size, width=width, num_classes=num_classes)
    model = PaperCNN(config).eval()
    out = model(torch.rand(batch, 3, image_size, image_size))
    assert out.shape == (batch, num_classes)
    assert all(u >= MIN_FC_UNITS for u in config.fc_units)


def test_width_shrinks_parameters():
    small = count_parameters(PaperCNN(ModelConfig(architecture="blackbox", image_size=64, width=0.125)))
    large = count_parameters(PaperCNN(ModelConfig(architecture="blackbox", image_size=64, width=0.5)))
    assert small * 4 < large


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        ModelConfig(architecture="blackbox", width=0)
    with pytest.raises(ValueError):
        ModelConfig(architecture="resnet")
    with pytest.raises(ValueError):
        ModelConfig(architecture="blackbox", image_size=8)
    assert ModelConfig(architecture="blackbox", image_size=16).feature_size == 1
