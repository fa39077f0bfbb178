"""volta3d import-encoder: each layout is built here (MONAI networks, or a small module with the source
project's key names), saved the way that project saves it, imported, and the imported encoder's output
compared with the original network's on the same input. Tiny networks (width 48, 2 blocks, 32^3)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNETR, ViT, ViTAutoEnc
from safetensors.torch import save_file
from torch import nn

from volta3d.cli import main
from volta3d.models import EncoderLoadError, build_from_export, interpolate_pos_embed, read_encoder_export
from volta3d.models.imports import ImportOptions, UnsafeCheckpointError, import_encoder
from volta3d.models.provenance import relate_to_pretraining

SIZES = dict(img_size=32, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4)


def perturbed(net: nn.Module, seed: int = 0) -> nn.Module:
    """Every tensor moved off its initialisation (LayerNorms too), so a wrongly mapped key shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval()


def monai_vit(seed: int = 0, **kwargs) -> ViT:
    torch.manual_seed(seed)
    return perturbed(ViT(in_channels=1, **{**SIZES, **kwargs}), seed)


def volumes(n: int = 2, edge: int = 32) -> torch.Tensor:
    return torch.randn(n, 1, edge, edge, edge, generator=torch.Generator().manual_seed(1))


def imported(checkpoint: Path, out: Path, **options) -> tuple:
    """(the rebuilt encoder in eval mode, the provenance record) after importing ``checkpoint``."""
    record = import_encoder(
        checkpoint, out, ImportOptions(**{"num_heads": 4, "input_norm": "none", **options})
    )
    encoder, summariser = build_from_export(out)
    assert summariser is None
    return encoder.eval(), record["external"]


@torch.no_grad()
def assert_same_vit(encoder, reference: nn.Module, x: torch.Tensor) -> None:
    """A MONAI ViT's (patch tokens after the final norm, per-block hidden states) against the encoder's."""
    tokens, hidden = reference(x)
    feats = encoder.forward_features(x)
    torch.testing.assert_close(feats["patch_tokens"], tokens, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(feats["hidden_states"], hidden, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_monai_vit_state_dict(tmp_path, suffix):
    vit = monai_vit(qkv_bias=True)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    else:
        torch.save(vit.state_dict(), path)
    encoder, record = imported(path, tmp_path / "enc")
    assert {k: encoder.architecture[k] for k in SIZES} == SIZES and encoder.architecture["qkv_bias"] is True
    assert_same_vit(encoder, vit, volumes())
    assert (
        record["layout"] == "monai"
        and record["prefix"] == ""
        and record["pretraining_data"] == "unknown to volta3d"
    )
    assert set(record["initialised"]) == {
        "conv3d_transpose.*",
        "conv3d_transpose_1.*",
    }  # a ViT has no decoder


def _older_monai(state: dict, version: str) -> dict:
    """The keys MONAI ``version`` saved for the same network (see volta3d.models.imports.monai_keys)."""
    state = dict(state)
    if version in ("1.3", "0.8"):  # no cross-attention norm before 1.4
        state = {k: v for k, v in state.items() if ".norm_cross_attn." not in k}
    if version == "0.8":  # an unused class token inside the patch embedding
        state["patch_embedding.cls_token"] = torch.randn(1, 1, SIZES["hidden_size"])
    if version == "1.4":  # an unused CrossAttentionBlock in every block
        width = SIZES["hidden_size"]
        for i in range(SIZES["num_layers"]):
            for name in ("to_q", "to_k", "to_v", "out_proj"):
                state[f"blocks.{i}.cross_attn.{name}.weight"] = torch.randn(width, width)
            state[f"blocks.{i}.cross_attn.out_proj.bias"] = torch.randn(width)
    if version == "split-qkv":  # SABlock(use_combined_linear=False)
        for key in [k for k in state if ".attn.qkv." in k]:
            for name, part in zip(("to_q", "to_k", "to_v"), state.pop(key).chunk(3), strict=True):
                state[key.replace("qkv", name)] = part
    return state


@pytest.mark.parametrize(
    ("version", "dropped", "initialised"),
    [
        ("1.3", set(), {"blocks.*.norm_cross_attn.*"}),
        ("0.8", {"patch_embedding.cls_token"}, {"blocks.*.norm_cross_attn.*"}),
        ("1.4", {f"blocks.*.cross_attn.{n}.*" for n in ("to_q", "to_k", "to_v", "out_proj")}, set()),
        ("split-qkv", set(), set()),
    ],
)
def test_monai_key_names_across_versions(tmp_path, version, dropped, initialised):
    vit = monai_vit(qkv_bias=True)
    torch.save(_older_monai(vit.state_dict(), version), tmp_path / "old.pt")
    encoder, record = imported(tmp_path / "old.pt", tmp_path / "enc")
    assert_same_vit(encoder, vit, volumes())
    assert set(record["dropped"]) == dropped
    assert set(record["initialised"]) - {"conv3d_transpose.*", "conv3d_transpose_1.*"} == initialised


def test_monai_perceptron_patch_embedding(tmp_path):
    vit = monai_vit(proj_type="perceptron")
    assert "patch_embedding.patch_embeddings.1.weight" in vit.state_dict()
    torch.save(vit.state_dict(), tmp_path / "perceptron.pt")
    encoder, record = imported(tmp_path / "perceptron.pt", tmp_path / "enc")
    assert_same_vit(encoder, vit, volumes())
    assert any("perceptron" in note for note in record["converted"])


def test_monai_vitautoenc_keeps_its_decoder(tmp_path):
    torch.manual_seed(0)
    net = perturbed(ViTAutoEnc(in_channels=1, out_channels=1, deconv_chns=8, **SIZES))
    torch.save(net.state_dict(), tmp_path / "autoenc.pth")
    encoder, record = imported(tmp_path / "autoenc.pth", tmp_path / "enc")
    assert encoder.architecture["deconv_chns"] == 8 and record["initialised"] == {}
    x = volumes()
    with torch.no_grad():
        (ours, ours_hidden), (theirs, theirs_hidden) = encoder(x), net(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # the reconstruction, through the decoder
    torch.testing.assert_close(ours_hidden[-1], theirs_hidden[-1], rtol=1e-4, atol=1e-4)


def test_unetr_vit_from_a_whole_unetr(tmp_path):
    torch.manual_seed(0)
    unetr = perturbed(UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=48,
                            mlp_dim=96, num_heads=4))  # fmt: skip
    torch.save({"state_dict": unetr.state_dict(), "epoch": 3}, tmp_path / "unetr.pt")
    encoder, record = imported(tmp_path / "unetr.pt", tmp_path / "enc")
    assert record["prefix"] == "state_dict.vit." and encoder.architecture["num_layers"] == 12
    assert record["outside_encoder"]["tensors"] > 0  # UNETR's convolutional decoder is not the encoder
    assert_same_vit(encoder, unetr.vit, volumes())


def test_brainiac_lightning_checkpoint(tmp_path):
    """BrainIAC: a MONAI ViT-B/16 (here narrow) saved by PyTorch Lightning with MONAI < 1.4, under
    ``backbone.`` inside ``state_dict``, beside a projection head, optimiser state and hyper-parameters."""
    vit = monai_vit(save_attn=True)  # BrainIAC's ViT: qkv_bias False, save_attn True
    backbone = _older_monai(vit.state_dict(), "1.3")
    checkpoint = {
        "epoch": 18, "global_step": 1234, "pytorch-lightning_version": "2.1.0",
        "state_dict": {**{f"backbone.{k}": v for k, v in backbone.items()},
                       "projection_head.0.weight": torch.randn(128, 48), "projection_head.0.bias": torch.randn(128)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 5e-4}]}],
        "hyper_parameters": {"lr": 5e-4, "temperature": 0.1},
    }  # fmt: skip
    torch.save(checkpoint, tmp_path / "BrainIAC.ckpt")
    encoder, record = imported(tmp_path / "BrainIAC.ckpt", tmp_path / "enc", licence="CC BY-NC 4.0")
    assert record["prefix"] == "state_dict.backbone." and record["licence"] == "CC BY-NC 4.0"
    assert encoder.architecture["qkv_bias"] is False
    assert record["outside_encoder"]["tensors"] == 3  # projection head (2) and the optimiser's moment
    assert_same_vit(encoder, vit, volumes())


def test_dino_checkpoint_of_a_monai_backbone_takes_the_teacher(tmp_path):
    teacher, student = monai_vit(seed=0), monai_vit(seed=1)
    checkpoint = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, "head.last_layer.weight": torch.randn(8, 48)},
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "epoch": 10,
    }  # fmt: skip
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    encoder, record = imported(tmp_path / "checkpoint.pth", tmp_path / "teacher")
    assert record["prefix"] == "teacher.backbone." and record["other_encoders"] == [
        "student.module.backbone."
    ]
    assert_same_vit(encoder, teacher, volumes())
    encoder, _ = imported(tmp_path / "checkpoint.pth", tmp_path / "student", prefix="student.module.backbone")
    assert_same_vit(encoder, student, volumes())


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, e = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(
            q @ k.transpose(-2, -1) / math.sqrt(e // self.heads), dim=-1
        )  # Vaswani et al. eq. 1
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, e))


class _Scale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))


class _Block(nn.Module):
    """A DINOv2-style pre-norm block with LayerScale, under timm / DINO's names."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.ls1, self.ls2 = _Attention(dim, heads), _Scale(dim), _Scale(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1.gamma * self.attn(self.norm1(x))
        return x + self.ls2.gamma * self.mlp(self.norm2(x))


class DinoViT3D(nn.Module):
    """A 3D ViT with DINOv2's key names and no class token; ``forward`` gives (normed tokens, block outputs)."""

    def __init__(self, dim: int = 48, heads: int = 4, mlp: int = 96, depth: int = 2, grid: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(1, dim, 16, stride=16)
        self.pos_embed = nn.Parameter(torch.randn(1, grid**3, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = (
            self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        )  # (B, C, D, H, W) -> (B, N, E)
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return self.norm(x), hidden


@pytest.mark.parametrize("chunked", [False, True])
def test_dino_style_timm_keys(tmp_path, chunked):
    """Layer scale folded, the LayerNorm epsilon (1e-6) matched by scaling the residual stream, DINOv2's
    chunked blocks unchunked; the normalised tokens equal, the hidden states sqrt(10) x the source's."""
    torch.manual_seed(0)
    net = perturbed(DinoViT3D())
    state = net.state_dict()
    if chunked:  # DINOv2 BlockChunk: blocks.{chunk}.{i}
        state = {re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k): v for k, v in state.items()}
    torch.save(
        {"teacher": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "teacher_checkpoint.pth"
    )
    encoder, record = imported(tmp_path / "teacher_checkpoint.pth", tmp_path / "enc")
    assert record["layout"] == "timm" and set(record["dropped"]) == {"mask_token"}
    assert encoder.architecture["qkv_bias"] is True
    x = volumes()
    with torch.no_grad():
        tokens, hidden = net(x)
        feats = encoder.forward_features(x)
    torch.testing.assert_close(feats["patch_tokens"], tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats["hidden_states"][-1], hidden[-1] * math.sqrt(10), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"cls_token": torch.zeros(1, 1, 48)}, "cls_token"),
        ({"register_tokens": torch.zeros(1, 4, 48)}, "register_tokens"),
    ],
)
def test_extra_tokens_are_refused(tmp_path, extra, named):
    torch.save({**DinoViT3D().state_dict(), **extra}, tmp_path / "tokens.pth")
    with pytest.raises(EncoderLoadError, match=rf"{named}: extra tokens"):
        imported(tmp_path / "tokens.pth", tmp_path / "enc")


def test_monai_class_token_and_2d_vit_are_refused(tmp_path):
    torch.save(monai_vit(classification=True, num_classes=2).state_dict(), tmp_path / "cls.pt")
    with pytest.raises(EncoderLoadError, match=r"classification_head.*cls_token: a class token"):
        imported(tmp_path / "cls.pt", tmp_path / "enc")
    flat = {"patch_embed.proj.weight": torch.zeros(48, 3, 16, 16), "pos_embed": torch.zeros(1, 4, 48)}
    torch.save(flat, tmp_path / "vit2d.pt")
    with pytest.raises(EncoderLoadError, match="a 2D patch embedding"):
        imported(tmp_path / "vit2d.pt", tmp_path / "enc")


def test_missing_extra_and_misshaped_keys_in_one_error(tmp_path):
    state = dict(monai_vit().state_dict())
    del state["blocks.1.norm2.bias"]
    state["blocks.0.attn.rel_pos_h"] = torch.zeros(3, 12)
    state["blocks.1.mlp.linear2.bias"] = torch.zeros(7)
    torch.save({"model": {f"encoder.{k}": v for k, v in state.items()}}, tmp_path / "broken.pt")
    with pytest.raises(EncoderLoadError) as err:
        imported(tmp_path / "broken.pt", tmp_path / "enc")
    message = str(err.value)
    assert "\n" not in message
    assert "missing (MONAI names): blocks.1.norm2.bias" in message
    assert "not mapped: model.encoder.blocks.0.attn.rel_pos_h" in message
    assert "shape mismatch: model.encoder.blocks.1.mlp.linear2.bias (7,) vs (48,)" in message
    assert not (tmp_path / "enc" / "encoder.json").exists()


class _Payload:
    """Unpickling this runs ``exec``: it would write ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_pickle_that_would_run_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save(
        {"state_dict": monai_vit().state_dict(), "callbacks": _Payload(marker)}, tmp_path / "evil.ckpt"
    )
    with pytest.raises(UnsafeCheckpointError, match=r"refused: unpickling it needs the global exec"):
        imported(tmp_path / "evil.ckpt", tmp_path / "enc")
    assert not marker.exists()
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.read_text() == "ran"


def test_position_embedding_resampled_to_another_image_size(tmp_path):
    vit = monai_vit()
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    same, record = imported(tmp_path / "vit.pt", tmp_path / "same", img_size=32)
    source = vit.state_dict()["patch_embedding.position_embeddings"]
    assert torch.equal(same.patch_embedding.position_embeddings, source)  # same size: exact
    larger, record = imported(tmp_path / "vit.pt", tmp_path / "larger", img_size=64)
    assert record["img_size"] == {"checkpoint": 32, "export": 64}
    assert larger.patch_embedding.position_embeddings.shape == (1, 4**3, 48)
    torch.testing.assert_close(
        larger.patch_embedding.position_embeddings, interpolate_pos_embed(source, (2, 2, 2), (4, 4, 4))
    )
    assert larger.forward_features(volumes(1, 64))["patch_tokens"].shape == (1, 64, 48)


def test_what_the_weights_cannot_say_must_be_given(tmp_path):
    torch.save(monai_vit().state_dict(), tmp_path / "vit.pt")
    with pytest.raises(EncoderLoadError, match="pass --num-heads"):
        import_encoder(tmp_path / "vit.pt", tmp_path / "enc", ImportOptions())
    both = {
        **{f"a.{k}": v for k, v in monai_vit().state_dict().items()},
        **{f"b.{k}": v for k, v in monai_vit().state_dict().items()},
    }
    torch.save(both, tmp_path / "two.pt")
    with pytest.raises(ValueError, match=r"2 encoders, under 'a\.', 'b\.'; choose one with --prefix"):
        imported(tmp_path / "two.pt", tmp_path / "enc")


def test_cli_import_then_embed_and_the_downstream_provenance(tmp_path, capsys):
    from tests.engine.conftest import write_volume_folder

    torch.save(
        {"state_dict": {f"backbone.{k}": v for k, v in monai_vit().state_dict().items()}}, tmp_path / "b.ckpt"
    )
    out = tmp_path / "enc"
    argv = ["import-encoder", str(tmp_path / "b.ckpt"), "--output", str(out), "--num-heads", "4",
            "--licence", "CC BY-NC 4.0", "--source", "https://example.org/weights", "--preprocessing", "spacing=2.0"]  # fmt: skip
    assert main(argv) == 0
    assert "encoder under 'state_dict.backbone.'" in capsys.readouterr().out
    assert (
        main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    )  # an export is never replaced silently
    meta = read_encoder_export(out)[1]
    assert meta["provenance"]["external"]["source"] == "https://example.org/weights"
    assert meta["provenance"]["preprocessing"] == [{"spacing": 2.0, "size": [32, 32, 32]}]
    assert meta["input_norm"] == "zscore" and meta["summariser"] is None

    data = write_volume_folder(tmp_path / "prep", n=3)
    (data / "config.yaml").write_text(
        "preprocess:\n  size: [32, 32, 32]\n  spacing: 1.0\n  orientation: RAS\n"
    )
    assert (
        main(
            [
                "embed",
                "--encoder",
                str(out),
                "--data",
                str(data),
                "--output",
                str(tmp_path / "emb.npz"),
                "--no-progress",
            ]
        )
        == 0
    )
    import numpy as np

    assert np.load(tmp_path / "emb.npz")["mean"].shape == (3, 48)
    import pandas as pd

    summary, warning = relate_to_pretraining(meta, data, pd.read_csv(data / "manifest.csv"))
    assert summary == {"known": False, "external": True}
    assert "imported" in warning and "preprocess.spacing=1.0" in warning and "2.0" in warning
    json.dumps(meta)  # the record is plain JSON
