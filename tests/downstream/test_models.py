from __future__ import annotations

import pytest
import torch

from volta3d.downstream.classifier import SwinClassifier, build_classifier, swin_kwargs
from volta3d.downstream.segmenter import build_segmenter, build_unetr
from volta3d.models.encoder import VolTAEncoder, build_encoder
from volta3d.models.export import EncoderLoadError, save_encoder_export
from volta3d.models.summariser import CLSSummariser, summariser_kwargs

from ..config_kwargs import kwargs_for, section_kwargs
from .conftest import config_section

UNETR_VIT = {
    "img_size": 32,
    "patch_size": 16,
    "hidden_size": 48,
    "mlp_dim": 96,
    "num_layers": 12,
    "num_heads": 4,
}
SMALL_VIT = {**UNETR_VIT, "num_layers": 2}
# the default config's summariser (4 heads: 48 wide) and classifier settings
SUMMARISER = {**summariser_kwargs(**config_section("model")["summariser"]), "num_heads": 4}
CLASSIFY = config_section("classify")


def _export(tmp_path, arch, with_summariser=True):
    torch.manual_seed(123)
    enc = build_encoder(**section_kwargs("model", **arch, deconv_chns=8))
    summ = CLSSummariser(arch["hidden_size"], **SUMMARISER) if with_summariser else None
    with torch.no_grad():  # 'pretrained' weights: far from any fresh initialisation
        for p in [*enc.parameters(), *(summ.parameters() if summ else [])]:
            p.add_(torch.randn_like(p))
    save_encoder_export(tmp_path, enc, summ)
    return enc, summ


def test_vit_classifier_starts_from_the_export(tmp_path):
    enc, summ = _export(tmp_path, SMALL_VIT)
    model = build_classifier("vit", 2, encoder=tmp_path, pooling="cls", img_size=CLASSIFY["img_size"])
    scratch = build_classifier(
        "vit",
        2,
        encoder_kwargs=kwargs_for(VolTAEncoder, "model", **SMALL_VIT),
        summariser_kwargs=SUMMARISER,
        pooling="cls",
        img_size=CLASSIFY["img_size"],
    )
    loaded, fresh = model.state_dict(), scratch.state_dict()
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded[f"encoder.{k}"], v), k
    for k, v in summ.state_dict().items():
        assert torch.equal(loaded[f"summariser.{k}"], v), k
    assert not torch.equal(
        loaded["encoder.blocks.1.mlp.linear1.weight"], fresh["encoder.blocks.1.mlp.linear1.weight"]
    )
    assert model(torch.rand(2, 1, 32, 32, 32)).shape == (2, 2)


def test_unetr_vit_starts_from_the_export_and_wrong_depth_is_refused(tmp_path):
    enc, _ = _export(tmp_path / "e12", UNETR_VIT)
    unetr = build_unetr(
        1, 3, 32, **kwargs_for(build_unetr, "model", "segment", encoder=tmp_path / "e12", feature_size=8)
    )
    scratch = build_unetr(
        1,
        3,
        32,
        **kwargs_for(
            build_unetr, "model", "segment", hidden_size=48, mlp_dim=96, num_heads=4, feature_size=8
        ),
    )
    vit = unetr.vit.state_dict()
    for k, v in enc.state_dict().items():
        if not k.startswith("conv3d_transpose"):
            assert torch.equal(vit[k], v), k
    assert not torch.equal(
        vit["blocks.11.attn.qkv.weight"], scratch.vit.state_dict()["blocks.11.attn.qkv.weight"]
    )
    assert unetr(torch.rand(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    _export(tmp_path / "e2", SMALL_VIT)
    with pytest.raises(EncoderLoadError, match="UNETR with patch 16 .* needs num_layers >= 4, got 2"):
        build_unetr(1, 3, 32, **kwargs_for(build_unetr, "model", "segment", encoder=tmp_path / "e2"))


def test_cls_pooling_needs_a_summariser_in_the_export(tmp_path):
    _export(tmp_path, SMALL_VIT, with_summariser=False)
    with pytest.raises(ValueError, match="has no summariser; use classify.pooling=mean"):
        build_classifier("vit", 2, encoder=tmp_path, pooling="cls", img_size=CLASSIFY["img_size"])
    assert (
        build_classifier("vit", 2, encoder=tmp_path, pooling="mean", img_size=CLASSIFY["img_size"]).summariser
        is None
    )


def test_partial_mode_trains_only_the_last_blocks():
    model = build_classifier(
        "vit",
        2,
        encoder_kwargs=kwargs_for(VolTAEncoder, "model", **SMALL_VIT),
        summariser_kwargs=SUMMARISER,
        pooling=CLASSIFY["pooling"],
        img_size=CLASSIFY["img_size"],
    )
    model.set_trainable("partial", 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.blocks.1.attn.qkv.weight" in trainable and "encoder.norm.weight" in trainable
    assert "encoder.blocks.0.attn.qkv.weight" not in trainable
    assert "encoder.patch_embedding.position_embeddings" not in trainable
    assert {"head.weight", "summariser.token"} <= trainable
    model.set_trainable("frozen")
    assert not any(p.requires_grad for p in model.encoder.parameters())
    with pytest.raises(ValueError, match="unfreeze_last must be in 1..2"):
        model.set_trainable("partial", 5)


def test_swin_classifier_and_unet_shapes():
    swin = SwinClassifier(
        3,
        **{
            **swin_kwargs(**CLASSIFY["swin"]),
            "feature_size": 12,
            "depths": (1, 1, 1, 1),
            "num_heads": (3, 3, 3, 3),
            "window_size": 4,
        },
    )
    assert swin(torch.rand(2, 1, 32, 32, 32)).shape == (2, 3)
    unet = build_segmenter(
        "unet", 1, 3, 32, unet_kwargs={"num_res_units": config_section("segment")["unet_res_units"]}
    )
    assert unet(torch.rand(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    with pytest.raises(ValueError, match="the 3D U-Net baseline is trained from scratch"):
        build_segmenter("unet", 1, 3, 32, encoder="x")
