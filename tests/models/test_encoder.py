from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT, ViTAutoEnc

from volta3d.config import load_config, to_kwargs
from volta3d.errors import InputError
from volta3d.models import VolTAEncoder, build_encoder
from volta3d.models.encoder import decoder_strides
from volta3d.models.input_norm import standardise

from ..config_kwargs import section_kwargs


def tiny_encoder(**overrides) -> VolTAEncoder:
    kwargs = dict(img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return build_encoder(**section_kwargs("model", **kwargs))


@pytest.mark.parametrize(
    ("img_size", "patch_size", "shape"),
    [
        (32, 16, (32, 32, 32)),  # native grid
        (32, 16, (16, 16, 16)),  # smaller cube (local crop)
        (32, 16, (48, 32, 16)),  # box
        (16, 4, (16, 16, 16)),  # patch 4, native
        (16, 4, (8, 12, 20)),  # patch 4, box
        (32, 8, (32, 32, 32)),  # patch 8 (not a square: decoder strides 2 then 4), native
        (32, 8, (64, 32, 32)),  # patch 8, box: an (8, 4, 4) token grid
        (24, 12, (24, 36, 12)),  # patch 12 (strides 3 then 4)
        (12, 6, (12, 12, 12)),  # patch 6 (strides 2 then 3)
    ],
)
def test_shapes_on_any_grid(img_size, patch_size, shape):
    enc = tiny_encoder(img_size=img_size, patch_size=patch_size, in_channels=2).eval()
    x = torch.rand(3, 2, *shape)
    grid = tuple(s // patch_size for s in shape)
    n_tokens = grid[0] * grid[1] * grid[2]
    with torch.no_grad():
        feats = enc.forward_features(x)
        recon, hidden = enc(x)
    assert feats["grid"] == grid
    assert feats["patch_tokens"].shape == (3, n_tokens, 32)
    assert len(feats["hidden_states"]) == 2
    assert all(h.shape == (3, n_tokens, 32) for h in feats["hidden_states"])
    assert recon.shape == x.shape
    assert len(hidden) == 2
    assert torch.isfinite(recon).all() and torch.isfinite(feats["patch_tokens"]).all()


def test_patch_tokens_are_the_normed_last_hidden_state():
    enc = tiny_encoder().eval()
    with torch.no_grad():
        feats = enc.forward_features(torch.rand(2, 1, 32, 32, 32))
    torch.testing.assert_close(feats["patch_tokens"], enc.norm(feats["hidden_states"][-1]))


@pytest.mark.parametrize("input_norm", ["zscore", "none"])
def test_native_grid_matches_monai_vitautoenc_exactly(input_norm):
    """Same weights, same output as MONAI's ViTAutoEnc fed the (standardised) input."""
    enc = tiny_encoder(fused_attention=False, input_norm=input_norm).eval()
    monai_net = ViTAutoEnc(
        in_channels=1, img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4
    ).eval()
    monai_net.load_state_dict(enc.state_dict(), strict=True)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        ours, ours_hidden = enc(x)
        ref, ref_hidden = monai_net(standardise(x) if input_norm == "zscore" else x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    for a, b in zip(ours_hidden, ref_hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("patch_size", [16, 4])
def test_square_patch_is_monai_vitautoenc_bit_for_bit(patch_size):
    """Square patches keep MONAI's own build: same keys, shapes and (same seed) initial weights."""
    enc = tiny_encoder(patch_size=patch_size)
    torch.manual_seed(0)
    monai_net = ViTAutoEnc(
        in_channels=1,
        img_size=32,
        patch_size=patch_size,
        hidden_size=32,
        mlp_dim=64,
        num_layers=2,
        num_heads=4,
    )
    assert list(enc.state_dict()) == list(monai_net.state_dict())
    assert {k: v.shape for k, v in enc.state_dict().items()} == {
        k: v.shape for k, v in monai_net.state_dict().items()
    }
    for k, v in monai_net.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v), k
    root = int(patch_size**0.5)
    assert enc.decoder_strides == (root, root)


def test_non_square_patch_keeps_monai_names_with_its_own_decoder_kernels():
    """MONAI's ViTAutoEnc refuses patch 8; the encoder builds MONAI ViT's trunk and a (2, 4) decoder."""
    with pytest.raises(ValueError, match="square number"):
        ViTAutoEnc(
            in_channels=1, img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4
        )
    enc = tiny_encoder(patch_size=8)
    square = ViTAutoEnc(
        in_channels=1, img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4
    )
    assert list(enc.state_dict()) == list(square.state_dict())
    vit = ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4)
    decoder = {k: v.shape for k, v in enc.state_dict().items() if k.startswith("conv3d_transpose")}
    assert {k: v.shape for k, v in enc.state_dict().items() if k not in decoder} == {
        k: v.shape for k, v in vit.state_dict().items()
    }
    assert enc.decoder_strides == (2, 4)
    assert decoder == {
        "conv3d_transpose.weight": (32, 16, 2, 2, 2),
        "conv3d_transpose.bias": (16,),
        "conv3d_transpose_1.weight": (16, 1, 4, 4, 4),
        "conv3d_transpose_1.bias": (1,),
    }
    assert enc.patch_size == (8, 8, 8) and enc.img_size == (32, 32, 32) and enc.native_grid == (4, 4, 4)


@pytest.mark.parametrize(
    ("patch_size", "strides"),
    [(1, (1, 1)), (7, (1, 7)), (8, (2, 4)), (9, (3, 3)), (12, (3, 4)), (16, (4, 4))],
)
def test_decoder_strides_multiply_to_the_patch(patch_size, strides):
    assert decoder_strides(patch_size) == strides


@pytest.mark.parametrize(
    ("img_size", "patch_size", "message"),
    [
        (32, 0, "patch_size must be an integer >= 1, got 0"),
        (32, -8, "patch_size must be an integer >= 1, got -8"),
        (32, 2.5, "patch_size must be an integer >= 1, got 2.5"),
        (32, 12, r"patch_size 12 does not divide img_size 32 \(the encoder's cube edge\)"),
        (32, 64, "patch_size 64 does not divide img_size 32"),
        (0, 8, "img_size must be an integer >= 1, got 0"),
    ],
)
def test_unusable_patch_size_is_a_one_line_input_error(img_size, patch_size, message):
    with pytest.raises(InputError, match=message) as err:
        tiny_encoder(img_size=img_size, patch_size=patch_size)
    assert "\n" not in str(err.value)


def test_local_crop_through_96_cube_model():
    enc = build_encoder(
        **section_kwargs(
            "model",
            img_size=96,
            patch_size=16,
            hidden_size=32,
            mlp_dim=64,
            num_layers=2,
            num_heads=4,
        )
    ).eval()
    with torch.no_grad():
        feats = enc.forward_features(torch.rand(1, 1, 48, 48, 48))
        recon, _ = enc(torch.rand(1, 1, 48, 48, 48))
    assert feats["grid"] == (3, 3, 3)
    assert feats["patch_tokens"].shape == (1, 27, 32)
    assert recon.shape == (1, 1, 48, 48, 48)


@pytest.mark.parametrize("shape", [(33, 32, 32), (32, 32, 8)])
def test_side_not_a_multiple_of_patch_is_rejected(shape):
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="not a multiple of patch_size 16"):
        enc.forward_features(torch.rand(1, 1, *shape))


def test_wrong_channels_or_rank_is_rejected():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match=r"expected input \(B, 1, D, H, W\)"):
        enc.forward_features(torch.rand(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match=r"expected input \(B, 1, D, H, W\)"):
        enc.forward_features(torch.rand(1, 32, 32, 32))
    with pytest.raises(ValueError, match="do not fill the grid"):
        enc.decode(torch.rand(1, 7, 32), (2, 2, 2))


@pytest.mark.parametrize("patch_size", [16, 8])
def test_every_used_parameter_gets_a_gradient_and_unused_ones_are_exactly_norm_cross_attn(patch_size):
    enc = tiny_encoder(patch_size=patch_size).train()
    recon, hidden = enc(torch.rand(2, 1, 16, 32, 16))  # off the native grid: pos-embed interpolation path
    (recon.pow(2).mean() + hidden[0].mean()).backward()
    without_grad = {n for n, p in enc.named_parameters() if p.grad is None}
    expected_unused = {f"blocks.{i}.norm_cross_attn.{w}" for i in range(2) for w in ("weight", "bias")}
    assert without_grad == expected_unused
    assert set(enc.unused_parameter_names()) == expected_unused
    assert {n for n, p in enc.named_parameters() if not p.requires_grad} == expected_unused
    for name, p in enc.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_fused_and_unfused_attention_agree_and_share_keys():
    fused = tiny_encoder(fused_attention=True).eval()
    unfused = tiny_encoder(fused_attention=False).eval()
    assert all(blk.attn.use_flash_attention for blk in fused.blocks)
    assert not any(blk.attn.use_flash_attention for blk in unfused.blocks)
    assert list(fused.state_dict()) == list(unfused.state_dict())
    unfused.load_state_dict(fused.state_dict(), strict=True)
    x = torch.rand(2, 1, 48, 32, 32)
    with torch.no_grad():
        a, b = fused.forward_features(x), unfused.forward_features(x)
    torch.testing.assert_close(a["patch_tokens"], b["patch_tokens"], rtol=1e-4, atol=1e-5)


def test_fused_attention_has_no_dropout_in_eval_mode():
    enc = tiny_encoder(dropout=0.5, fused_attention=True).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        first, second = enc.forward_features(x)["patch_tokens"], enc.forward_features(x)["patch_tokens"]
        enc.set_fused_attention(False)
        unfused = enc.forward_features(x)["patch_tokens"]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, unfused, rtol=1e-4, atol=1e-5)
    enc.set_fused_attention(True)
    enc.train()
    with torch.no_grad():
        noisy = enc.forward_features(x)["patch_tokens"]
    assert not torch.allclose(noisy, first)


def test_build_encoder_takes_the_model_section_and_ignores_summariser_keys():
    cfg = load_config(
        overrides=[
            "model.img_size=32",
            "model.hidden_size=32",
            "model.mlp_dim=64",
            "model.num_layers=2",
            "model.num_heads=4",
        ]
    )
    enc = build_encoder(**to_kwargs(cfg.model))
    assert enc.native_grid == (2, 2, 2)
    assert enc.embed_dim == 32 and enc.num_layers == 2 and enc.fused_attention is True
    with pytest.raises(TypeError, match="depth"):
        build_encoder(**to_kwargs(cfg.model), depth=3)
