import pytest
import torch

from volta3d.downstream.segmenter import build_unet, build_unetr
from volta3d.models.input_norm import apply_input_norm, standardise

from ..config_kwargs import kwargs_for


def test_standardise_per_volume():
    x = torch.stack([torch.rand(1, 4, 4, 4) * 3 + 1, torch.rand(1, 4, 4, 4) * 0.1])
    y = standardise(x)
    for v in y:
        assert v.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert v.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(standardise(x * 7 + 2), y, atol=1e-4, rtol=0)  # affine intensity invariance
    assert torch.equal(
        standardise(torch.zeros(1, 1, 2, 2, 2)), torch.zeros(1, 1, 2, 2, 2)
    )  # constant: no NaN


def test_unknown_norm_is_an_error():
    with pytest.raises(ValueError, match="input_norm must be one of"):
        apply_input_norm(torch.zeros(1, 1, 1, 1, 1), "minmax")


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_unet(1, 2, channels=(4, 8), strides=(2,), num_res_units=0),
        lambda: build_unetr(
            1,
            2,
            32,
            **kwargs_for(
                build_unetr, "model", "segment", hidden_size=32, mlp_dim=64, num_heads=2, feature_size=4
            ),
        ),
    ],
)
def test_segmenters_are_intensity_invariant(build):
    """The baselines standardise their input too: an affine change of intensity leaves the output unchanged."""
    torch.manual_seed(0)
    net = build().eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x * 5 + 3), net(x), atol=1e-3, rtol=1e-3)
