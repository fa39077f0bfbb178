from __future__ import annotations

import json

import monai
import pytest
import torch
from monai.networks.nets import UNETR, ViT, ViTAutoEnc

from volta3d.config import load_config, to_kwargs
from volta3d.models import (
    CLSSummariser,
    EncoderLoadError,
    VolTAEncoder,
    build_from_export,
    interpolate_pos_embed,
    load_vit_weights,
    read_encoder_export,
    save_encoder_export,
)
from volta3d.models.encoder import build_encoder
from volta3d.models.input_norm import standardise
from volta3d.models.summariser import summariser_kwargs

from ..config_kwargs import section_kwargs

TINY = dict(img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4)
# UNETR hard-codes patch 16 and 12 layers: a narrow 12-layer encoder
NARROW12 = dict(img_size=32, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=12, num_heads=4)
SUMMARISER = summariser_kwargs(**to_kwargs(load_config().model.summariser))  # the default config's: 8 heads


def perturbed_encoder(**kwargs) -> VolTAEncoder:
    """An encoder whose every tensor differs from any fresh initialisation (constant-init norms included)."""
    torch.manual_seed(0)
    enc = build_encoder(**section_kwargs("model", **kwargs))
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05 + 0.01)
    return enc


def vit_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(("summariser.", "conv3d_transpose"))}


def test_round_trip_restores_weights_metadata_and_outputs(tmp_path):
    enc = perturbed_encoder(**TINY).eval()
    summ = CLSSummariser(32, **SUMMARISER).eval()
    weights_path, meta_path = save_encoder_export(tmp_path, enc, summ)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "encoder.json",
        "encoder.safetensors",
    ]  # no temp files

    meta = json.loads(meta_path.read_text())
    assert meta["format"] == "volta3d-encoder" and meta["format_version"] == 1
    assert meta["architecture"] == "monai.ViTAutoEnc" and meta["decoder_strides"] == [4, 4]
    assert {k: meta[k] for k in TINY} == TINY
    assert meta["in_channels"] == 1 and meta["qkv_bias"] is False and meta["deconv_chns"] == 16
    assert meta["dropout"] == 0.0
    assert meta["summariser"] == {"dim": 32, "num_heads": 8, "mlp_ratio": 4.0}
    assert meta["monai_version"] == monai.__version__ and meta["torch_version"] == torch.__version__

    state, _ = read_encoder_export(weights_path)
    assert set(state) == set(enc.state_dict()) | {f"summariser.{k}" for k in summ.state_dict()}
    for k, v in enc.state_dict().items():
        assert torch.equal(state[k], v), k

    enc2, summ2 = build_from_export(tmp_path)
    for k, v in enc.state_dict().items():
        assert torch.equal(enc2.state_dict()[k], v), k
    for k, v in summ.state_dict().items():
        assert torch.equal(summ2.state_dict()[k], v), k
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            summ2(enc2.eval().forward_features(x)["patch_tokens"]),
            summ(enc.forward_features(x)["patch_tokens"]),
        )


def test_export_without_summariser(tmp_path):
    save_encoder_export(tmp_path, perturbed_encoder(**TINY), None)
    _, meta = read_encoder_export(tmp_path / "encoder.json")
    assert meta["summariser"] is None
    enc, summ = build_from_export(tmp_path)
    assert summ is None and isinstance(enc, VolTAEncoder)


def test_rebuilding_for_another_img_size_resamples_the_position_embedding(tmp_path):
    enc = perturbed_encoder(**TINY).eval()
    save_encoder_export(tmp_path, enc, None)
    big, _ = build_from_export(tmp_path, img_size=64)
    assert big.native_grid == (4, 4, 4)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():  # the 32^3 encoder resamples on the fly; the rebuilt one stores the resampled table
        torch.testing.assert_close(
            big.eval().forward_features(x)["patch_tokens"], enc.forward_features(x)["patch_tokens"]
        )


def test_loads_strictly_into_monai_vitautoenc(tmp_path):
    enc = perturbed_encoder(**TINY)
    save_encoder_export(tmp_path, enc, CLSSummariser(32, **SUMMARISER))
    state, _ = read_encoder_export(tmp_path)
    net = ViTAutoEnc(
        in_channels=1, img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4
    )
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("summariser.")}, strict=True)
    fresh = ViTAutoEnc(
        in_channels=1, img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4
    )
    load_vit_weights(fresh, state, drop_decoder=False)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_patch_8_round_trips_and_its_vit_part_loads_into_monai_vit(tmp_path):
    """Patch 8 is not a square: the export says monai.ViT, keeps every key (decoder too) and rebuilds."""
    enc = perturbed_encoder(**{**TINY, "patch_size": 8}).eval()
    summ = CLSSummariser(32, **SUMMARISER).eval()
    save_encoder_export(tmp_path, enc, summ)
    state, meta = read_encoder_export(tmp_path)
    assert (
        meta["architecture"] == "monai.ViT" and meta["patch_size"] == 8 and meta["decoder_strides"] == [2, 4]
    )
    assert set(state) == set(enc.state_dict()) | {f"summariser.{k}" for k in summ.state_dict()}
    assert state["conv3d_transpose_1.weight"].shape == (16, 1, 4, 4, 4)

    enc2, summ2 = build_from_export(tmp_path)
    assert summ2 is not None
    for k, v in enc.state_dict().items():
        assert torch.equal(enc2.state_dict()[k], v), k
    x = torch.rand(2, 1, 32, 64, 32)
    with torch.no_grad():
        ours, theirs = enc.forward_features(x), enc2.eval().forward_features(x)
        torch.testing.assert_close(theirs["patch_tokens"], ours["patch_tokens"])
        assert enc2.decode(theirs["patch_tokens"], theirs["grid"]).shape == x.shape
        torch.testing.assert_close(summ2.eval()(theirs["patch_tokens"]), summ(ours["patch_tokens"]))

    vit = ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4)
    load_vit_weights(vit.eval(), state)  # drops the decoder keys
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        for a, b in zip(enc.forward_features(x)["hidden_states"], vit(standardise(x))[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_loads_into_unetr_vit_and_every_tensor_arrives(tmp_path):
    enc = perturbed_encoder(**NARROW12)
    save_encoder_export(tmp_path, enc, CLSSummariser(48, **SUMMARISER))
    state, _ = read_encoder_export(tmp_path)

    torch.manual_seed(1)
    unetr = UNETR(
        in_channels=1, out_channels=3, img_size=32, feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4
    )
    init = {k: v.clone() for k, v in unetr.vit.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in unetr.state_dict().items() if not k.startswith("vit.")}
    load_vit_weights(unetr, state, prefix="vit.")

    for k, v in unetr.vit.state_dict().items():
        assert torch.equal(v, state[k]), k  # every ViT tensor came from the export ...
        assert not torch.equal(v, init[k]), k  # ... and replaced the random initialisation
    for k, v in unetr.state_dict().items():
        if not k.startswith("vit."):
            assert torch.equal(v, decoder_before[k]), k

    strict_copy = UNETR(
        in_channels=1, out_channels=3, img_size=32, feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4
    )
    strict_copy.vit.load_state_dict(vit_keys(state), strict=True)
    with torch.no_grad():
        assert unetr.eval()(torch.rand(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_unetr_of_another_img_size_gets_the_resampled_position_embedding(tmp_path):
    enc = perturbed_encoder(**NARROW12)
    save_encoder_export(tmp_path, enc, None)
    state, _ = read_encoder_export(tmp_path)
    unetr = UNETR(
        in_channels=1, out_channels=2, img_size=64, feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4
    )
    load_vit_weights(unetr, state, prefix="vit.")
    expected = interpolate_pos_embed(state["patch_embedding.position_embeddings"], (2, 2, 2), (4, 4, 4))
    torch.testing.assert_close(unetr.vit.patch_embedding.position_embeddings.detach(), expected)
    assert torch.equal(unetr.vit.blocks[11].mlp.linear1.weight, state["blocks.11.mlp.linear1.weight"])


def test_loads_into_monai_vit_with_its_own_cls_token_untouched(tmp_path):
    enc = perturbed_encoder(**TINY).eval()
    save_encoder_export(tmp_path, enc, None)
    state, _ = read_encoder_export(tmp_path)

    plain = ViT(
        in_channels=1, img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4
    ).eval()
    load_vit_weights(plain, state)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        ours, theirs = (
            enc.forward_features(x)["hidden_states"],
            plain(standardise(x))[1],
        )  # MONAI ViT takes the standardised input
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    classifier = ViT(
        in_channels=1,
        img_size=32,
        patch_size=16,
        hidden_size=32,
        mlp_dim=64,
        num_layers=2,
        num_heads=4,
        classification=True,
        num_classes=2,
        post_activation=None,
    )
    cls_before = classifier.cls_token.detach().clone()
    load_vit_weights(classifier, state)
    assert torch.equal(classifier.cls_token, cls_before)
    assert torch.equal(classifier.norm.weight, state["norm.weight"])


def test_another_width_is_named_in_the_error(tmp_path):
    save_encoder_export(tmp_path, perturbed_encoder(**TINY), None)
    state, _ = read_encoder_export(tmp_path)
    wider = ViTAutoEnc(
        in_channels=1, img_size=32, patch_size=16, hidden_size=48, mlp_dim=64, num_layers=2, num_heads=4
    )
    with pytest.raises(
        EncoderLoadError,
        match=r"shape mismatch: .*blocks\.0\.attn\.out_proj\.bias export \(32,\) vs target \(48,\)",
    ):
        load_vit_weights(wider, state)


def test_another_depth_is_named_in_the_error(tmp_path):
    save_encoder_export(tmp_path, perturbed_encoder(**TINY), None)
    state, _ = read_encoder_export(tmp_path)
    deeper = ViTAutoEnc(
        in_channels=1, img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=3, num_heads=4
    )
    with pytest.raises(EncoderLoadError, match=r"missing from the export: blocks\.2\."):
        load_vit_weights(deeper, state)
    shallower = ViTAutoEnc(
        in_channels=1, img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=4
    )
    with pytest.raises(EncoderLoadError, match=r"not in the target: blocks\.1\."):
        load_vit_weights(shallower, state)
    with pytest.raises(EncoderLoadError, match="missing from the export: conv3d_transpose"):
        load_vit_weights(
            ViTAutoEnc(
                in_channels=1,
                img_size=32,
                patch_size=16,
                hidden_size=32,
                mlp_dim=64,
                num_layers=2,
                num_heads=4,
            ),
            vit_keys(state),
            drop_decoder=False,
        )


def test_missing_export_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder export file not found: .*encoder.safetensors"):
        read_encoder_export(tmp_path)
    save_encoder_export(tmp_path, perturbed_encoder(**TINY), None)
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        build_from_export(tmp_path / "encoder.safetensors")


def test_json_of_another_format_is_rejected(tmp_path):
    save_encoder_export(tmp_path, perturbed_encoder(**TINY), None)
    (tmp_path / "encoder.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(
        EncoderLoadError, match="is not a volta3d-encoder export \\(format: 'something-else'\\)"
    ):
        read_encoder_export(tmp_path)
    (tmp_path / "encoder.json").write_text("{not json")
    with pytest.raises(EncoderLoadError, match="cannot parse encoder metadata"):
        read_encoder_export(tmp_path)


def test_corrupt_safetensors_is_rejected(tmp_path):
    weights, _ = save_encoder_export(tmp_path, perturbed_encoder(**TINY), None)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(EncoderLoadError, match="cannot read encoder weights .*encoder.safetensors"):
        read_encoder_export(tmp_path)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(EncoderLoadError, match="cannot read encoder weights"):
        read_encoder_export(tmp_path)


def _rewrite_meta(folder, **changes) -> None:
    meta = json.loads((folder / "encoder.json").read_text())
    meta.update(changes)
    (folder / "encoder.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"num_layers": 100, "hidden_size": 8192, "mlp_dim": 32768},
            "claims num_layers=100 but the weights hold 2",
        ),
        ({"hidden_size": 8192, "num_heads": 4}, "claims hidden_size=8192 but the weights have width 32"),
        ({"mlp_dim": 4096}, r"do not fit the architecture encoder.json describes: shape mismatch: .*mlp"),
        ({"hidden_size": "32"}, "hidden_size must be a positive integer, got '32'"),
    ],
)
def test_metadata_is_checked_against_the_weights_before_allocating(tmp_path, monkeypatch, changes, message):
    save_encoder_export(tmp_path, perturbed_encoder(**TINY), None)
    _rewrite_meta(tmp_path, **changes)
    real_init = VolTAEncoder.__init__

    def spy(self, *args, **kwargs):  # only the shape-only meta-device build may run before the check
        if torch.empty(0).device.type != "meta":
            raise AssertionError("a real encoder was built (memory allocated) before the metadata check")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(VolTAEncoder, "__init__", spy)
    with pytest.raises(EncoderLoadError, match=message):
        build_from_export(tmp_path)
