"""UNETR at any power-of-two patch (volta3d.downstream.segmenter.AnyPatchUNETR): at patch 16 it is MONAI's
UNETR key for key and output for output; at patch 8 it has one up-sampling stage fewer, keeps the
input grid, takes a patch-8 VolTA-3D export and survives the save / rebuild that ``volta3d predict`` does."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR

from volta3d.downstream.saved import build_saved, load_fold_models
from volta3d.downstream.segmenter import AnyPatchUNETR, build_unetr
from volta3d.downstream.train_segment import save_segmenter, segmenter_architecture
from volta3d.errors import InputError
from volta3d.models.encoder import VolTAEncoder
from volta3d.models.export import EncoderLoadError, save_encoder_export
from volta3d.models.input_norm import standardise

from ..config_kwargs import kwargs_for

WIDTHS = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "feature_size": 8}
# MONAI UNETR's modules at patch 16; at patch 8 each name keeps its resolution level
NAMES = {
    16: ["vit", *(f"encoder{i}" for i in (1, 2, 3, 4)), *(f"decoder{i}" for i in (5, 4, 3, 2)), "out"],
    8: ["vit", *(f"encoder{i}" for i in (1, 2, 3)), *(f"decoder{i}" for i in (4, 3, 2)), "out"],
}


def _patch8_export(path, num_layers: int = 3) -> VolTAEncoder:
    """A tiny 'pretrained' patch-8 VolTA-3D encoder (weights far from any fresh initialisation), exported."""
    torch.manual_seed(0)
    vit_widths = {k: v for k, v in WIDTHS.items() if k != "feature_size"}
    enc = VolTAEncoder(
        32, 8, **kwargs_for(VolTAEncoder, "model", num_layers=num_layers, deconv_chns=8, **vit_widths)
    )
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p))
    save_encoder_export(path, enc, None)
    return enc.eval()


def test_patch16_is_monai_unetr_key_for_key_and_output_for_output():
    torch.manual_seed(0)
    monai_unetr = UNETR(1, 3, (32,) * 3, proj_type="conv", norm_name="instance", **WIDTHS).eval()
    ours = build_unetr(
        1, 3, 32, **kwargs_for(build_unetr, "model", "segment", **WIDTHS)
    ).eval()  # patch 16, 12 layers, behind the z-score wrapper
    expected = {k: v.shape for k, v in monai_unetr.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert [name for name, _ in ours.named_children()] == NAMES[16] and ours.taps == (3, 6, 9)
    ours.load_state_dict(monai_unetr.state_dict(), strict=True)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), monai_unetr(standardise(x)))


@pytest.mark.parametrize("patch_size, num_layers, taps", [(16, 4, (1, 2, 3)), (8, 3, (1, 2)), (8, 6, (2, 4))])
def test_output_grid_equals_input_grid_and_every_parameter_learns(patch_size, num_layers, taps):
    torch.manual_seed(0)
    net = build_unetr(
        1,
        3,
        32,
        **kwargs_for(build_unetr, "model", "segment", patch_size=patch_size, num_layers=num_layers, **WIDTHS),
    )
    assert [name for name, _ in net.named_children()] == NAMES[patch_size] and net.taps == taps
    out = net(torch.rand(2, 1, 32, 32, 32))
    assert out.shape == (2, 3, 32, 32, 32) and torch.isfinite(out).all()
    out.square().mean().backward()
    # MONAI builds a cross-attention norm in every block that is never used
    silent = [n for n, p in net.named_parameters() if p.grad is None and "norm_cross_attn" not in n]
    assert not silent


def test_patch8_decoder_widths_follow_monai():
    net = AnyPatchUNETR(
        1, 2, 32, **kwargs_for(AnyPatchUNETR, "model", "segment", patch_size=8, num_layers=3, **WIDTHS)
    )
    fs, hidden = WIDTHS["feature_size"], WIDTHS["hidden_size"]
    # level j holds feature_size * 2^j channels; the deepest decoder takes the tokens' width
    assert net.encoder3.transp_conv_init.conv.in_channels == hidden and len(net.encoder3.blocks) == 0
    assert net.encoder2.transp_conv_init.conv.out_channels == 2 * fs and len(net.encoder2.blocks) == 1
    assert net.decoder4.transp_conv.conv.in_channels == hidden
    assert net.decoder4.conv_block.conv1.conv.out_channels == 4 * fs
    assert net.decoder2.conv_block.conv1.conv.out_channels == fs


def test_bad_patch_depth_and_crop_are_refused(tmp_path):
    with pytest.raises(InputError, match="power of two >= 4"):
        build_unetr(1, 2, 36, **kwargs_for(build_unetr, "model", "segment", patch_size=12, **WIDTHS))
    with pytest.raises(InputError, match="patch 16 up-samples in 4 stages and needs num_layers >= 4, got 3"):
        build_unetr(
            1, 2, 32, **kwargs_for(build_unetr, "model", "segment", patch_size=16, num_layers=3, **WIDTHS)
        )
    with pytest.raises(
        InputError, match=r"segment.crop_size \(40\) must be a multiple of the UNETR patch size 16"
    ):
        build_unetr(1, 2, 40, **kwargs_for(build_unetr, "model", "segment", **WIDTHS))
    _patch8_export(tmp_path / "p8")
    _patch8_export(tmp_path / "shallow", num_layers=2)
    with pytest.raises(EncoderLoadError, match="shallow: UNETR with patch 8 .* needs num_layers >= 3, got 2"):
        build_unetr(
            1,
            2,
            32,
            **kwargs_for(build_unetr, "model", "segment", encoder=tmp_path / "shallow", feature_size=8),
        )
    with pytest.raises(
        InputError, match=r"segment.crop_size \(36\) must be a multiple of the UNETR patch size 8"
    ):
        # the export's patch 8 sets the rule, not the patch_size argument
        build_unetr(
            1,
            2,
            36,
            **kwargs_for(
                build_unetr, "model", "segment", encoder=tmp_path / "p8", patch_size=16, feature_size=8
            ),
        )


def test_patch8_export_loads_into_the_vit(tmp_path):
    enc = _patch8_export(tmp_path)
    enc.set_fused_attention(False)  # MONAI's einsum attention, as in the segmenter's ViT
    net = build_unetr(
        1, 2, 32, **kwargs_for(build_unetr, "model", "segment", encoder=tmp_path, feature_size=8)
    ).eval()
    assert net.patch_size == 8 and net.num_layers == 3
    vit = net.vit.state_dict()
    for k, v in enc.state_dict().items():
        if not k.startswith("conv3d_transpose"):
            assert torch.equal(vit[k], v), k
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        ours = net.vit(standardise(x))[0]  # the segmenter standardises before its ViT, as the encoder does
        assert torch.equal(ours, enc.forward_features(x)["patch_tokens"])
        assert net(x).shape == (2, 2, 32, 32, 32)


@pytest.mark.parametrize("from_export", [True, False])
def test_saved_fold_model_rebuilds_for_predict(tmp_path, from_export):
    """A patch-8 UNETR (from an export, or from scratch with ``model:`` sizes) round-trips through
    ``models/<key>/`` with its patch and depth recorded."""
    encoder = tmp_path / "export" if from_export else None
    if encoder is not None:
        _patch8_export(encoder)
    sizes = {"feature_size": 8} if from_export else {"patch_size": 8, "num_layers": 3, **WIDTHS}
    sizes = kwargs_for(
        build_unetr, "model", "segment", **sizes
    )  # the rest from default.yaml, as finetune does
    net = build_unetr(1, 2, 32, encoder=encoder, **sizes).eval()
    save_segmenter(tmp_path / "run", "fold0", net, 0, 2, model="unetr", encoder=encoder, unetr_kwargs=sizes,
                   unet_kwargs=None, crop_size=32, sw_batch_size=1, sw_overlap=0.25, preprocessing=None)  # fmt: skip
    ((rebuilt, meta),) = load_fold_models(tmp_path / "run")
    recorded = meta["build"]["unetr_kwargs"]
    assert recorded["patch_size"] == 8 and recorded["num_layers"] == 3
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
    arch = segmenter_architecture(net, "unetr", encoder, 2, 32, sizes)
    assert arch["patch_size"] == 8 and arch["num_layers"] == 3 and arch["hidden_size"] == 48


def test_record_saved_before_patch_and_depth_rebuilds_monai_unetr():
    """``model.json`` files written when UNETR was MONAI's carry no patch_size / num_layers."""
    unetr_kwargs = {**WIDTHS, "qkv_bias": False, "input_norm": "zscore"}
    build = {"model": "unetr", "in_channels": 1, "out_channels": 2, "img_size": 32,
             "unetr_kwargs": unetr_kwargs, "unet_kwargs": {}}  # fmt: skip
    net = build_saved({"task": "segment", "build": build})
    monai_unetr = UNETR(1, 2, (32,) * 3, **WIDTHS)
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in monai_unetr.state_dict().items()
    }
    arch = segmenter_architecture(net, "unetr", None, 2, 32, unetr_kwargs)
    assert arch["patch_size"] == 16 and arch["num_layers"] == 12
