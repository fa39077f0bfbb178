"""The fine-tuning recipe: layer-wise decay, the head's rate, warm-up and cosine, drop path, LP-FT, and
the same schedule for scratch and pretrained runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import volta3d.downstream.train_classify as tc
from volta3d.data.dataset import read_manifest
from volta3d.downstream.classifier import ViTClassifier
from volta3d.downstream.loop import train_model
from volta3d.downstream.recipe import FinetuneRecipe, lr_factors, param_groups
from volta3d.errors import InputError
from volta3d.models.encoder import VolTAEncoder, build_encoder
from volta3d.models.export import save_encoder_export
from volta3d.models.summariser import CLSSummariser
from volta3d.protocol.labels import prepare_labels
from volta3d.protocol.splits import make_kfold_splits

from ..config_kwargs import kwargs_for, section_kwargs
from .conftest import config_section

TINY = {"img_size": 32, "patch_size": 16, "hidden_size": 48, "mlp_dim": 96, "num_layers": 4, "num_heads": 4}


def _classifier(pooling: str = "cls") -> ViTClassifier:
    torch.manual_seed(0)
    enc = build_encoder(**section_kwargs("model", **TINY))
    return ViTClassifier(enc, CLSSummariser(48, num_heads=4, mlp_ratio=2.0), 2, pooling=pooling)


def _expected_lr(name: str, lr: float, decay: float, head: float, layers: int) -> float:
    """Written from BEiT's rule: patch embedding layer 0, block i layer i + 1, norm and summariser L + 1."""
    if name.startswith("head."):
        return lr * head
    if name.startswith("encoder.blocks."):
        return lr * decay ** (layers - int(name.split(".")[2]))
    if name.startswith("encoder.patch_embedding."):
        return lr * decay ** (layers + 1)
    return lr  # encoder.norm.*, summariser.*


def test_layer_decay_gives_every_parameter_its_rate_and_decay():
    net = _classifier()
    recipe = FinetuneRecipe.plain(lr=1e-3, weight_decay=0.05, layer_decay=0.5, head_lr_scale=10.0)
    groups = param_groups(net, recipe, num_layers=4)
    seen = {}
    for g in groups:
        for name in g["names"]:
            seen[name] = (g["lr"], g["weight_decay"], g["head"])
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert set(seen) == trainable  # every trainable parameter in exactly one group
    for name, (lr, wd, head) in seen.items():
        assert lr == pytest.approx(_expected_lr(name, 1e-3, 0.5, 10.0, 4)), name
        param = net.get_parameter(name)
        no_decay = param.ndim <= 1 or "position_embeddings" in name or name == "summariser.token"
        assert wd == (0.0 if no_decay else 0.05), name
        assert head == name.startswith("head."), name
    assert seen["encoder.blocks.0.mlp.linear1.weight"][0] == pytest.approx(1e-3 * 0.5**4)


def test_scratch_recipe_has_one_rate_for_all():
    recipe = FinetuneRecipe.plain(lr=1e-3, weight_decay=0.0, layer_decay=0.5, head_lr_scale=10.0, lp_epochs=2)
    scratch = recipe.for_scratch()
    assert (scratch.layer_decay, scratch.head_lr_scale, scratch.lp_epochs) == (1.0, 1.0, 0)
    assert {g["lr"] for g in param_groups(_classifier(), scratch, 4)} == {1e-3}


@pytest.mark.parametrize(
    "bad", [{"layer_decay": 0.0}, {"layer_decay": 1.5}, {"drop_path": 1.0}, {"warmup_epochs": -1}]
)
def test_out_of_range_recipe_is_refused(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        FinetuneRecipe.plain(lr=1e-3, weight_decay=0.0, **bad)


def test_warmup_then_cosine_per_step():
    f = lr_factors(
        FinetuneRecipe.plain(lr=1.0, weight_decay=0.0, warmup_epochs=1), epochs=3, steps_per_epoch=4
    )
    assert len(f) == 12
    assert f[:4].tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75])  # linear from 0
    cos = [0.5 * (1 + math.cos(math.pi * t / 7)) for t in range(8)]  # 8 decay steps, 1 -> 0
    assert f[4:].tolist() == pytest.approx(cos)


def _toy_loop(net: nn.Module, recipe: FinetuneRecipe, epochs: int) -> list[dict[str, torch.Tensor]]:
    """Train on random volumes, returning a snapshot of the weights after each epoch."""
    x, y = torch.rand(4, 1, 32, 32, 32), torch.tensor([0, 1, 0, 1])
    snapshots = []

    def loss(m: nn.Module, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch["x"]), batch["y"])

    def validate(m: nn.Module) -> float:
        snapshots.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return 0.0

    train_model(net, [{"x": x, "y": y}] * 2, loss, epochs=epochs, recipe=recipe, num_layers=4,
                validate=validate, progress=False)  # fmt: skip
    return snapshots


def test_linear_probe_phase_trains_only_the_head_then_everything():
    net = _classifier()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    recipe = FinetuneRecipe.plain(lr=1e-3, weight_decay=0.0, lp_epochs=1)
    after_lp, after_ft = _toy_loop(net, recipe, epochs=2)
    changed = {k for k in start if not torch.equal(start[k], after_lp[k])}
    assert changed == {"head.weight", "head.bias"}
    assert not torch.equal(
        after_lp["encoder.blocks.0.mlp.linear1.weight"], after_ft["encoder.blocks.0.mlp.linear1.weight"]
    )
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags  # the LP phase's freeze is undone


def test_lp_epochs_must_leave_fine_tuning_epochs():
    with pytest.raises(InputError, match="lp_epochs"):
        _toy_loop(_classifier(), FinetuneRecipe.plain(lr=1e-3, weight_decay=0.0, lp_epochs=2), epochs=2)


def test_drop_path_is_stochastic_in_training_only_and_zero_is_exact():
    enc = build_encoder(**section_kwargs("model", **TINY)).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    reference = enc.forward_features(x)["patch_tokens"]
    enc.set_drop_path(0.5)
    assert [round(d.drop_prob, 4) for d in enc.block_drop_paths] == [0.0, 0.1667, 0.3333, 0.5]
    assert torch.equal(enc.forward_features(x)["patch_tokens"], reference)  # eval: no drop
    enc.train()
    torch.manual_seed(0)
    a = enc.forward_features(x)["patch_tokens"]
    b = enc.forward_features(x)["patch_tokens"]
    assert not torch.allclose(a, b)
    enc.set_drop_path(0.0)
    assert torch.allclose(enc.forward_features(x)["patch_tokens"], enc.forward_features(x)["patch_tokens"])
    assert "block_drop_paths" not in " ".join(enc.state_dict())  # a training setting, never exported
    with pytest.raises(InputError, match="drop_path"):
        enc.set_drop_path(1.0)


def test_scratch_and_pretrained_get_the_same_epochs_and_schedule(blob_data, tmp_path, monkeypatch):
    labels = prepare_labels(read_manifest(blob_data), "diagnosis")
    splits = make_kfold_splits(labels.table["subject_id"], labels.strata, n_splits=2, seed=0)
    calls: list[dict] = []
    real = tc.train_model

    def spy(net, *args, **kwargs):
        calls.append({"epochs": kwargs["epochs"], "recipe": kwargs["recipe"], "drop": _drop(net)})
        return real(net, *args, **kwargs)

    monkeypatch.setattr(tc, "train_model", spy)
    section = config_section(
        "classify", pooling="mean", epochs=2, lp_epochs=1, layer_decay=0.5, drop_path=0.2
    )
    common = {"seed": 0, "device": "cpu", "progress": False}
    tiny = {k: v for k, v in TINY.items()} | {"num_layers": 2}
    tc.run_classification(
        labels,
        tmp_path / "s",
        splits,
        section,
        encoder_kwargs=kwargs_for(VolTAEncoder, "model", **tiny),
        **common,
    )
    enc = build_encoder(**section_kwargs("model", **tiny))
    save_encoder_export(tmp_path / "enc", enc, None)
    tc.run_classification(labels, tmp_path / "p", splits, section, encoder=tmp_path / "enc", **common)
    scratch, pretrained = calls[0], calls[-1]
    assert scratch["epochs"] == pretrained["epochs"] == 2 and len(calls) == 4
    assert (scratch["recipe"].layer_decay, scratch["recipe"].lp_epochs) == (1.0, 0)
    assert (pretrained["recipe"].layer_decay, pretrained["recipe"].lp_epochs) == (0.5, 1)
    for field in ("lr", "weight_decay", "warmup_epochs", "drop_path"):
        assert getattr(scratch["recipe"], field) == getattr(pretrained["recipe"], field)
    assert scratch["drop"] == pretrained["drop"] == pytest.approx(0.2)


def _drop(net: nn.Module) -> float:
    return float(np.max([d.drop_prob for d in net.encoder.block_drop_paths]))
