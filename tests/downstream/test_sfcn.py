"""The SFCN brain-age baseline (Peng et al. 2021): shapes, gradients, size, training mode, builder, saved model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from volta3d.config import load_config
from volta3d.downstream.classifier import build_classifier
from volta3d.downstream.saved import load_fold_models, save_fold_model
from volta3d.downstream.sfcn import SFCN, sfcn_kwargs
from volta3d.downstream.train_classify import classifier_build, model_architecture
from volta3d.errors import InputError

from ..config_kwargs import kwargs_for
from .conftest import config_section

TINY = (4, 8, 8, 8, 8, 4)  # six blocks as in the paper, narrow enough for a CPU test
SFCN_CHANNELS = (
    32,
    64,
    128,
    256,
    256,
    64,
)  # Peng et al. 2021, Fig. 1 (default.yaml's classify.sfcn.channels)


def sfcn_parameter_count(channels: tuple[int, ...], num_outputs: int, in_channels: int = 1) -> int:
    """From the paper's layer list: 3^3 convolutions (no bias: BatchNorm follows) in all blocks but the
    last, a 1^3 convolution in the last, a BatchNorm (scale + shift) per block, a 1^3 convolution with bias
    to the outputs."""
    widths = [in_channels, *channels]
    convs = sum(
        (27 if i < len(channels) - 1 else 1) * widths[i] * widths[i + 1] for i in range(len(channels))
    )
    return convs + 2 * sum(channels) + channels[-1] * num_outputs + num_outputs


@pytest.mark.parametrize("side", [64, 32])
def test_output_shapes(side):
    net = SFCN(3, **kwargs_for(SFCN, "classify.sfcn", channels=TINY))
    x = torch.rand(2, 1, side, side, side)
    assert net.features(x).shape == (2, TINY[-1])
    assert net(x).shape == (2, 3)


def test_inputs_below_the_pooling_depth_are_refused():
    with pytest.raises(InputError, match="needs input sides >= 32"):
        SFCN(1, **kwargs_for(SFCN, "classify.sfcn", channels=TINY))(torch.rand(1, 1, 32, 16, 32))
    assert SFCN(1, **kwargs_for(SFCN, "classify.sfcn", channels=(4, 4, 4)))(
        torch.rand(2, 1, 4, 4, 4)
    ).shape == (2, 1)  # 2 pools: sides >= 4


def test_every_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    net = SFCN(1, **kwargs_for(SFCN, "classify.sfcn", channels=TINY))
    net(torch.rand(2, 1, 32, 32, 32)).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_parameter_count_matches_the_paper():
    assert sum(
        p.numel() for p in SFCN(2, **kwargs_for(SFCN, "classify.sfcn", channels=TINY)).parameters()
    ) == sfcn_parameter_count(TINY, 2)
    # the paper's widths and its 40 one-year age bins: "about 3 million parameters" (Peng et al. 2021)
    paper = sum(p.numel() for p in SFCN(40, **kwargs_for(SFCN, "classify.sfcn")).parameters())
    assert paper == sfcn_parameter_count(SFCN_CHANNELS, 40) == 2_952_136


def test_bad_arguments_are_refused():
    with pytest.raises(InputError, match="positive integer channel widths"):
        SFCN(1, **kwargs_for(SFCN, "classify.sfcn", channels=(8,)))
    with pytest.raises(InputError, match="positive integer channel widths"):
        SFCN(1, **kwargs_for(SFCN, "classify.sfcn", channels=(8, 0, 8)))
    with pytest.raises(InputError, match="dropout"):
        SFCN(1, **kwargs_for(SFCN, "classify.sfcn", channels=TINY, dropout=1.0))


@pytest.mark.parametrize("mode", ["frozen", "partial"])
def test_only_full_training_applies(mode):
    net = SFCN(1, **kwargs_for(SFCN, "classify.sfcn", channels=TINY))
    net.set_trainable("full")
    with pytest.raises(InputError, match="trained from scratch"):
        net.set_trainable(mode, 1)


def test_build_classifier_makes_an_sfcn_from_the_config_section():
    section = config_section("classify")
    assert sfcn_kwargs(**section["sfcn"]) == {"channels": list(SFCN_CHANNELS), "dropout": 0.5}
    net = build_classifier(
        "sfcn", 2, pooling="cls", img_size=None, sfcn_kwargs={"channels": TINY, "dropout": 0.2}
    )
    assert isinstance(net, SFCN) and net.architecture == {
        "in_channels": 1,
        "channels": list(TINY),
        "dropout": 0.2,
    }
    assert model_architecture(net, "sfcn", "cls") == {"model": "sfcn", **net.architecture}
    with pytest.raises(InputError, match="the SFCN baseline is trained from scratch"):
        build_classifier("sfcn", 2, encoder="export", pooling="cls", img_size=None)


def test_config_accepts_sfcn_and_checks_its_section():
    assert load_config(overrides=["classify.model=sfcn"]).classify.model == "sfcn"
    with pytest.raises(InputError, match="classify.sfcn.dropout"):
        load_config(overrides=["classify.sfcn.dropout=1.5"])
    with pytest.raises(InputError, match="classify.sfcn.channels"):
        load_config(overrides=["classify.sfcn.channels=[]"])


def test_saved_sfcn_rebuilds_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    net = SFCN(1, **kwargs_for(SFCN, "classify.sfcn", channels=TINY, dropout=0.3))
    x = torch.rand(2, 1, 32, 32, 32)
    net.train()(x)  # BatchNorm running statistics move away from their initial values
    net.eval()
    expected = net(x)
    labels = SimpleNamespace(num_outputs=1)  # classifier_build reads only the output count
    build = classifier_build(net, labels, "sfcn", "cls", None)
    assert build["sfcn_kwargs"] == net.architecture and build["swin_kwargs"] is None
    save_fold_model(
        tmp_path, "fraction1.00_fold0", net, {"task": "classify", "fold": 0, "fraction": 1.0, "build": build}
    )
    [(loaded, meta)] = load_fold_models(tmp_path)
    assert isinstance(loaded, SFCN) and not loaded.training and meta["build"]["model"] == "sfcn"
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
