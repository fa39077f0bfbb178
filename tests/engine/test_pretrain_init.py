"""`volta3d pretrain --init`: student and teacher start from an encoder export (here an imported MONAI ViT),
the heads fresh; the first step's teacher is the imported encoder; a resume must name the same export."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import ViT

from volta3d.cli import main
from volta3d.engine.meta_arch import VolTA3D
from volta3d.models import build_from_export
from volta3d.models.imports import ImportOptions, import_encoder


def import_vit(tmp_path, name: str, seed: int):
    """A tiny MONAI ViT (as the engine tests' model: width 32, 2 blocks, patch 16, 32^3), imported."""
    torch.manual_seed(seed)
    vit = ViT(
        in_channels=1, img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2
    )
    torch.save(vit.state_dict(), tmp_path / f"{name}.pt")
    import_encoder(tmp_path / f"{name}.pt", tmp_path / name, ImportOptions(num_heads=2, seed=seed))
    return tmp_path / name


def pretrain_argv(init, data, out, overrides, *extra):
    return ["pretrain", "--init", str(init), "--data", str(data), "--output", str(out), "--no-progress",
            *overrides, "train.deterministic=true", *extra]  # fmt: skip


def test_first_step_teacher_is_the_imported_encoder(tmp_path, volume_folder, tiny_overrides, monkeypatch):
    export = import_vit(tmp_path, "imported", seed=0)
    seen = {}
    real = VolTA3D.compute_losses

    def spy(self, batch, *args, **kwargs):
        if not seen:  # the first micro-batch: the teacher before any EMA update
            views = batch["global"].flatten(0, 1)  # (2, B, C, G, G, G) -> (2B, C, G, G, G)
            with torch.no_grad():
                seen["views"] = views.clone()
                seen["teacher"] = self.teacher.encoder.forward_features(views)["patch_tokens"]
                seen["student"] = self.student.encoder.forward_features(views)["patch_tokens"]
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(VolTA3D, "compute_losses", spy)
    out = tmp_path / "run"
    # tiny_overrides set model sizes (deconv_chns=4 among them): the export's win
    assert main(pretrain_argv(export, volume_folder, out, tiny_overrides, "train.max_steps=2")) == 0

    encoder, _ = build_from_export(export)
    with torch.no_grad():
        expected = encoder.eval().forward_features(seen["views"])["patch_tokens"]
    torch.testing.assert_close(seen["teacher"], expected)
    assert torch.equal(seen["teacher"], seen["student"])  # the teacher starts equal to the student

    meta = json.loads((out / "encoder.json").read_text())
    assert meta["deconv_chns"] == 16 and meta["training"]["step"] == 2
    init = meta["provenance"]["init"]
    assert (
        init["encoder"] == str(export.resolve())
        and init["summariser"] == "fresh"
        and init["heads"] == "fresh"
    )
    assert meta["provenance"]["external"]["pretraining_data"] == "unknown to volta3d"
    assert meta["provenance"]["subject_ids"] == ["s0", "s1", "s2", "s3"]  # what this run saw is still counted
    assert json.loads((out / "pretrain_data.json").read_text())["provenance"]["init"] == init


def test_resume_keeps_its_init_and_refuses_another(tmp_path, volume_folder, tiny_overrides, capsys):
    first, other = import_vit(tmp_path, "first", seed=0), import_vit(tmp_path, "other", seed=1)
    out = tmp_path / "run"
    assert main(pretrain_argv(first, volume_folder, out, tiny_overrides, "train.max_steps=1")) == 0
    capsys.readouterr()
    assert main(pretrain_argv(other, volume_folder, out, tiny_overrides, "train.max_steps=2")) == 2
    assert "train.init" in capsys.readouterr().err
    assert main(pretrain_argv(first, volume_folder, out, tiny_overrides, "train.max_steps=2")) == 0
    assert json.loads((out / "encoder.json").read_text())["training"]["step"] == 2
    assert "resumed from" in (out / "log.txt").read_text()


def test_online_probe_starts_from_the_imported_encoder(tmp_path, volume_folder, tiny_overrides):
    """The online probe's step-0 'init' rows are the probes of the imported encoder itself."""
    import pandas as pd

    from tests.engine.conftest import write_volume_folder
    from volta3d.config import load_config, to_kwargs
    from volta3d.engine.online_eval import OnlineProbe
    from volta3d.protocol.probes import PROBE_SETTINGS
    from volta3d.runtime import MetricsCSV

    labelled = write_volume_folder(tmp_path / "labelled", n=12, seed=3)
    table = pd.read_csv(labelled / "manifest.csv")
    table.assign(group=["a", "b"] * 6).to_csv(labelled / "manifest.csv", index=False)
    export, out = import_vit(tmp_path, "imported", seed=0), tmp_path / "run"
    settings = ["probe.logreg_cs=[1.0]", "probe.knn_k=3", "eval.n_splits=3", "eval.features=[mean]"]
    argv = pretrain_argv(export, volume_folder, out, [*tiny_overrides, *settings], "train.max_steps=1")
    assert main([*argv, "--eval-data", str(labelled), "--eval-label", "group"]) == 0

    rows = [r for r in MetricsCSV(out / "online_eval.csv").read() if r["source"] == "init"]
    assert rows and {r["step"] for r in rows} == {"0"}
    probe_kwargs = {
        k: v for k, v in to_kwargs(load_config(overrides=settings).probe).items() if k in PROBE_SETTINGS
    }
    probe = OnlineProbe(labelled, ["group"], out / "online_eval_splits", n_splits=3, raw_grid=16, max_volumes=0,
                        seed=0, batch_size=2, probe_kwargs=probe_kwargs, features=["mean"])  # fmt: skip
    encoder, _ = build_from_export(export)
    expected = probe.evaluate(0, "init", encoder.eval(), None, torch.device("cpu"))
    assert [float(r["value"]) for r in rows] == pytest.approx([r["value"] for r in expected])
