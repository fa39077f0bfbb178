"""Fair comparisons: the positive class, the scratch baseline's training mode, the Youden threshold's
data and architecture-matched scratch baselines."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import volta3d.downstream.train_classify as tc
from volta3d.cli import main
from volta3d.data.dataset import read_manifest
from volta3d.downstream.saved import load_fold_models
from volta3d.evaluation.comparison import (
    architecture_warnings,
    compare_results,
    format_comparison,
    positive_class_warnings,
)
from volta3d.models.encoder import VolTAEncoder, build_encoder
from volta3d.models.export import save_encoder_export
from volta3d.models.summariser import CLSSummariser, summariser_kwargs
from volta3d.protocol.labels import prepare_labels
from volta3d.protocol.splits import make_kfold_splits

from ..config_kwargs import kwargs_for, section_kwargs
from .conftest import config_section
from .test_classify import FAST

TINY = {"img_size": 32, "patch_size": 16, "hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 4}


def _run(data, out, *extra):
    return main(
        [
            "finetune",
            "classify",
            "--data",
            str(data),
            "--label",
            "diagnosis",
            "--output",
            str(out),
            "--no-progress",
            *FAST,
            "classify.epochs=1",
            *extra,
        ]
    )


def _export(path, arch=TINY):
    torch.manual_seed(7)
    summariser = {**summariser_kwargs(**config_section("model")["summariser"]), "num_heads": 4}
    save_encoder_export(
        path,
        build_encoder(**section_kwargs("model", **arch, deconv_chns=8)),
        CLSSummariser(arch["hidden_size"], **summariser),
    )
    return path


def test_fold_metrics_use_the_named_positive_class():
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    p1 = np.clip(0.5 * y + rng.uniform(0, 0.6, len(y)), 0, 1)
    s = np.stack([1 - p1, p1], 1)
    m0 = tc.fold_metrics("binary", y, s, y, s, positive=0)
    assert m0["auroc"] == pytest.approx(roc_auc_score(y == 0, s[:, 0]))
    pred0 = s[:, 0] >= 0.5
    assert m0["sensitivity"] == pytest.approx((pred0 & (y == 0)).sum() / (y == 0).sum())
    assert m0["specificity"] == pytest.approx((~pred0 & (y == 1)).sum() / (y == 1).sum())


def test_positive_class_swaps_sensitivity_and_specificity(blob_data, tmp_path):
    assert _run(blob_data, tmp_path / "default") == 0
    assert _run(blob_data, tmp_path / "blob", "classify.positive_class=blob") == 0
    a = json.loads((tmp_path / "default" / "results.json").read_text())
    b = json.loads((tmp_path / "blob" / "results.json").read_text())
    assert a["positive_class"] == "none" and b["positive_class"] == "blob"
    for fa, fb in zip(a["folds"], b["folds"], strict=True):
        assert fb["metrics"]["sensitivity"] == pytest.approx(fa["metrics"]["specificity"])
        assert fb["metrics"]["specificity"] == pytest.approx(fa["metrics"]["sensitivity"])
    pa, pb = (
        pd.read_csv(tmp_path / "default" / "predictions.csv"),
        pd.read_csv(tmp_path / "blob" / "predictions.csv"),
    )
    assert set(pb["positive_class"]) == {"blob"}
    np.testing.assert_allclose(pb["score"], 1 - pa["score"], atol=1e-5)  # the same model, the other class
    for fold, rows in pb.groupby("fold"):
        auroc = roc_auc_score(rows["label"] == "blob", rows["score"])
        assert b["folds"][fold]["metrics"]["auroc"] == pytest.approx(auroc)


def test_unknown_positive_class_is_a_one_line_error(blob_data, tmp_path, capsys):
    assert _run(blob_data, tmp_path / "bad", "classify.positive_class=AD") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1
    assert "classify.positive_class 'AD' is not a class of 'diagnosis' (classes: blob, none)" in err[0]


def _trainable_encoder_share(monkeypatch) -> list[float]:
    seen: list[float] = []
    real = tc.train_model

    def spy(net, *args, **kwargs):
        flags = [
            p.requires_grad
            for n, p in net.encoder.named_parameters()
            if n not in set(net.encoder.unused_parameter_names())
        ]
        seen.append(float(np.mean(flags)))
        return real(net, *args, **kwargs)

    monkeypatch.setattr(tc, "train_model", spy)
    return seen


def test_frozen_mode_freezes_pretrained_encoders_only(blob_data, tmp_path, monkeypatch):
    labels = prepare_labels(read_manifest(blob_data), "diagnosis")
    splits = make_kfold_splits(labels.table["subject_id"], labels.strata, n_splits=2, seed=0)
    seen = _trainable_encoder_share(monkeypatch)
    section = config_section("classify", pooling="mean", mode="frozen", epochs=1)
    scratch = tc.run_classification(
        labels,
        tmp_path / "s",
        splits,
        section,
        encoder_kwargs=kwargs_for(VolTAEncoder, "model", **TINY),
        seed=0,
        device="cpu",
        progress=False,
    )
    assert scratch["mode"] == "full" and seen == [1.0, 1.0]  # the baseline trained fully
    seen.clear()
    pre = tc.run_classification(
        labels,
        tmp_path / "p",
        splits,
        section,
        encoder=_export(tmp_path / "enc"),
        seed=0,
        device="cpu",
        progress=False,
    )
    assert pre["mode"] == "frozen" and seen == [0.0, 0.0]
    (net, meta), *_ = load_fold_models(tmp_path / "p")  # rebuilt from model.json alone, weights strict
    assert meta["encoder"] == str(tmp_path / "enc") and meta["build"]["encoder_kwargs"]["hidden_size"] == 48
    assert net(torch.rand(1, 1, 32, 32, 32)).shape == (1, 2)


def test_test_fold_images_never_move_the_youden_threshold(blob_data, tmp_path):
    splits_file = tmp_path / "splits.json"
    assert _run(blob_data, tmp_path / "clean") == 0
    shutil.copy(tmp_path / "clean" / "splits.json", splits_file)
    noisy = tmp_path / "noisy_data"
    shutil.copytree(blob_data, noisy)
    table = read_manifest(noisy)
    test0 = set(json.loads(splits_file.read_text())["folds"][0]["test"])
    for path in table.loc[table["subject_id"].isin(test0), "path"]:
        np.save(path, np.random.default_rng(1).uniform(0, 1, (1, 32, 32, 32)).astype(np.float16))
    assert _run(noisy, tmp_path / "noisy", "--splits", str(splits_file)) == 0
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())["folds"][0]
    moved = json.loads((tmp_path / "noisy" / "results.json").read_text())["folds"][0]
    assert moved["metrics"]["youden_threshold"] == pytest.approx(clean["metrics"]["youden_threshold"])
    scores = [
        pd.read_csv(tmp_path / run / "predictions.csv").query("fold == 0")["score"]
        for run in ("clean", "noisy")
    ]
    assert not np.allclose(*scores)  # the test fold did change
    assert not set(clean["threshold_subjects"]) & test0


def test_like_builds_the_scratch_model_from_an_export_and_compare_warns(blob_data, tmp_path, capsys):
    enc = _export(tmp_path / "enc")
    small = ["model.hidden_size=32", "model.mlp_dim=64"]  # the config's sizes differ from the export's
    assert _run(blob_data, tmp_path / "like", "--like", str(enc), *small) == 0
    like = json.loads((tmp_path / "like" / "results.json").read_text())
    assert like["encoder"] is None and like["architecture"]["encoder"]["hidden_size"] == 48
    assert like["architecture"]["encoder"]["mlp_dim"] == 96
    splits = str(tmp_path / "like" / "splits.json")
    assert _run(blob_data, tmp_path / "plain", "--splits", splits, *small) == 0
    cmp = compare_results(tmp_path / "like", tmp_path / "plain", n_boot=50)
    assert cmp["warnings"] == [
        "runs A and B have different architectures: encoder.hidden_size 48 vs 32, encoder.mlp_dim 96 vs 64"
    ]
    assert "warning: runs A and B have different architectures" in format_comparison(cmp).splitlines()[1]
    assert compare_results(tmp_path / "like", tmp_path / "like", n_boot=50)["warnings"] == []
    capsys.readouterr()
    assert _run(blob_data, tmp_path / "both", "--like", str(enc), "--encoder", str(enc)) == 2
    assert "--like builds a scratch baseline; it cannot be combined with --encoder" in capsys.readouterr().err


def test_architecture_warnings_need_both_records():
    assert architecture_warnings(None, {"model": "vit"}) == []
    assert architecture_warnings({"model": "unet"}, {"model": "unetr"}) == [
        "runs A and B have different architectures: model unet vs unetr"
    ]


def test_segment_like_takes_the_unetr_widths_from_the_export(tmp_path):
    from .conftest import TINY_OVERRIDES
    from .synthetic import write_sphere_segmentation

    data = write_sphere_segmentation(tmp_path / "sph", n_subjects=5)
    enc = _export(tmp_path / "enc", {**TINY, "num_layers": 12})
    out = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                "segment",
                "--data",
                str(data),
                "--output",
                str(out),
                "--no-progress",
                "--like",
                str(enc),
                *TINY_OVERRIDES,
                "model.num_layers=12",
                "model.hidden_size=32",
                "model.mlp_dim=64",
                "segment.feature_size=8",
                "segment.crop_size=32",
                "segment.epochs=1",
                "segment.samples_per_volume=1",
                "segment.val_fraction=0",
            ]
        )
        == 0
    )
    ((net, meta),) = load_fold_models(out)
    trained = torch.load(out / "fold0_best.pt")
    assert meta["build"]["unetr_kwargs"]["hidden_size"] == 48
    assert all(torch.equal(v, trained[k]) for k, v in net.state_dict().items())
    arch = json.loads((out / "results.json").read_text())["architecture"]
    assert arch["model"] == "unetr" and arch["hidden_size"] == 48 and arch["mlp_dim"] == 96
    assert arch["num_layers"] == 12 and arch["img_size"] == 32 and arch["out_channels"] == 2


def test_compare_warns_when_positive_classes_differ():
    assert positive_class_warnings("AD", "CN") == [
        "runs A and B name different positive classes (AD vs CN): sensitivity and specificity swap"
    ]
    assert positive_class_warnings("AD", "AD") == positive_class_warnings(None, "CN") == []
