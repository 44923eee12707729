"""The paper's architectures: output shapes for several sizes and widths, and the layer plan."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advexplain.shared.models import MIN_FC_UNITS, ModelConfig, PaperCNN, count_parameters, fold_batchnorm


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


def _with_random_statistics(model: PaperCNN, seed: int) -> PaperCNN:
    """Give every BatchNorm non-trivial running statistics and affine parameters, as training would."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


@settings(max_examples=10, deadline=None)
@given(
    architecture=st.sampled_from(["blackbox", "surrogate"]),
    image_size=st.sampled_from([16, 32, 48]),
    width=st.sampled_from([0.03125, 0.0625, 0.125]),
    seed=st.integers(0, 10_000),
)
def test_folded_batchnorm_is_the_same_function_with_the_same_input_gradient(architecture, image_size, width, seed):
    config = ModelConfig(architecture=architecture, image_size=image_size, width=width)
    torch.manual_seed(seed)
    model = _with_random_statistics(PaperCNN(config), seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 2 * len(config.conv_channels)
    x = torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    grads = []
    for net in (model, folded):
        xx = x.clone().requires_grad_(True)
        out = net(xx)
        (g,) = torch.autograd.grad(out[:, 0].sum(), xx)
        grads.append((out.detach(), g))
    (out_a, grad_a), (out_b, grad_b) = grads
    scale = float(out_a.abs().max()) + 1
    assert torch.allclose(out_a, out_b, rtol=1e-4, atol=1e-4 * scale)
    # Relative to the gradient's own size (random statistics can make it tiny, 1e-11).
    assert float((grad_a - grad_b).norm()) <= 1e-3 * float(grad_a.norm()) + 1e-30
    # The original network is left as it was (other wrappers share it).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_freeze_serves_a_folded_copy_once_and_leaves_other_wrappers_alone():
    from advexplain.shared.classifiers import LocalClassifier

    torch.manual_seed(0)
    model = _with_random_statistics(PaperCNN(ModelConfig(architecture="surrogate", image_size=32, width=0.0625)), 0)
    served = LocalClassifier(model, ["a", "b"])
    other = LocalClassifier(model, ["a", "b"], label_only=True)
    x = torch.rand(4, 3, 45, 37)
    expected = served.logits(x).detach()
    assert served.freeze() is served
    network = served.model
    assert served.freeze().model is network  # idempotent: folded once
    assert not any(p.requires_grad for p in network.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())
    assert other.model is model and all(p.requires_grad for p in model.parameters())
    assert torch.allclose(served.logits(x), expected, atol=1e-4)
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(served.margin(xx, 1).sum(), xx)
    assert g.abs().sum() > 0


def test_freeze_without_folding_computes_exactly_what_the_served_model_computes():
    from advexplain.shared.classifiers import LocalClassifier

    torch.manual_seed(1)
    model = _with_random_statistics(PaperCNN(ModelConfig(architecture="blackbox", image_size=32, width=0.0625)), 1)
    served = LocalClassifier(model, ["a", "b"])
    x = torch.rand(5, 3, 40, 33)
    expected = served.logits(x).detach()
    oracle = LocalClassifier(model, ["a", "b"]).freeze(fold=False)
    assert oracle.model is model and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(oracle.logits(x), expected)  # bit for bit: the white box is its own oracle


@settings(max_examples=15, deadline=None)
@given(h=st.integers(20, 120), w=st.integers(20, 120), seed=st.integers(0, 1000))
def test_served_inputs_give_the_served_models_values_and_a_float_gradient(h, w, seed):
    from advexplain.shared.classifiers import LocalClassifier, fit_to_size
    from advexplain.shared.data import served_input
    from advexplain.shared.pixels import quantise

    torch.manual_seed(seed)
    model = PaperCNN(ModelConfig(architecture="surrogate", image_size=32, width=0.125)).eval()
    served = LocalClassifier(model, ("a", "b"), served_inputs=True)
    plain = LocalClassifier(model, ("a", "b"))
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    # Values: the network on what the black-box service feeds it (up to the straight-through's float
    # rounding, v + (s - v) for s).
    with torch.no_grad():
        expected = model(served_input(x, 32))
        assert torch.allclose(served.logits(x), expected, atol=1e-5, rtol=0)
        assert torch.allclose(served.predict_proba(x), torch.softmax(expected, 1), atol=1e-5, rtol=0)
        if (h, w) != (32, 32):  # the service's uint8 resize is not the float one
            assert not torch.equal(served_input(x, 32), fit_to_size(quantise(x), 32))
    # Gradients: those of the float resize (straight through the service's rounding).
    xs, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (gs,) = torch.autograd.grad(served.margin(xs, 1).sum(), xs)
    (gp,) = torch.autograd.grad(plain.margin(xp, 1).sum(), xp)
    assert gs.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(gs.flatten(), gp.flatten(), dim=0) > 0.9
