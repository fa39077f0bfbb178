"""The encoder export records what pretraining saw; downstream runs say how many test subjects it saw
and warn when their data was preprocessed differently."""

from __future__ import annotations

import json

import pandas as pd
import yaml

from volta3d.cli import main
from volta3d.data.dataset import read_manifest
from volta3d.models.provenance import pretraining_provenance, relate_to_pretraining

from .synthetic import write_blob_dataset

PRETRAIN = ["model.img_size=32", "model.patch_size=16", "model.hidden_size=32", "model.mlp_dim=64",
            "model.num_layers=2", "model.num_heads=2", "model.summariser.heads=2", "model.deconv_chns=4",
            "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16", "views.global_size=32",
            "views.local_size=16", "views.n_local=2", "masking.block_size=4", "optim.batch_size=2", "optim.epochs=1",
            "optim.lr_scaling=none", "train.num_workers=0", "train.tensorboard=false", "train.max_steps=1"]  # fmt: skip


def _with_settings(folder, size):
    (folder / "config.yaml").write_text(yaml.safe_dump({"preprocess": {"size": size, "spacing": 1.0,
                                                                       "intensity": "minmax"}}))  # fmt: skip
    return folder


def test_counts_test_subjects_and_volumes_the_encoder_saw(tmp_path):
    seen = write_blob_dataset(tmp_path / "seen", n_subjects=6, seed=1)
    other = write_blob_dataset(tmp_path / "other", n_subjects=4, seed=2)
    record = pretraining_provenance([seen], read_manifest(seen))
    assert len(record["subject_ids"]) == 6 and len(record["volume_sha256"]) == 6
    same, _ = relate_to_pretraining({"provenance": record}, seen, read_manifest(seen))
    assert same == {"known": True, "n_test": 6, "test_subjects_in_pretraining": 6, "test_volumes_in_pretraining": 6,
                    "transductive": True}  # fmt: skip
    renamed = read_manifest(other).assign(subject_id=lambda t: "new-" + t["subject_id"])
    external, _ = relate_to_pretraining({"provenance": record}, other, renamed)
    assert external["transductive"] is False and external["test_subjects_in_pretraining"] == 0
    unknown, warning = relate_to_pretraining({}, seen, read_manifest(seen))
    assert unknown == {"known": False} and "records no pretraining data" in warning


def test_warns_when_preprocessing_matches_no_pretraining_folder(tmp_path):
    a = _with_settings(write_blob_dataset(tmp_path / "a", n_subjects=2), [32, 32, 32])
    b = _with_settings(write_blob_dataset(tmp_path / "b", n_subjects=2, seed=3), [64, 64, 64])
    record = pretraining_provenance([a], read_manifest(a))
    assert relate_to_pretraining({"provenance": record}, a, read_manifest(a))[1] is None
    _, warning = relate_to_pretraining({"provenance": record}, b, read_manifest(b))
    assert "preprocess.size=[64, 64, 64]" in warning and "[32, 32, 32]" in warning


def _pretrained(tmp_path):
    """A one-step pretraining run on 8 blob subjects: (their cache, the run folder)."""
    data = write_blob_dataset(tmp_path / "prep", n_subjects=8)
    enc = tmp_path / "pre"
    assert main(["pretrain", "--data", str(data), "--output", str(enc), "--no-progress", *PRETRAIN]) == 0
    return data, enc


def test_pretrain_records_it_and_finetune_reports_it(tmp_path):
    data, enc = _pretrained(tmp_path)
    meta = json.loads((enc / "encoder.json").read_text())
    assert len(meta["provenance"]["subject_ids"]) == 8
    out = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "classify",
                "--data",
                str(data),
                "--label",
                "diagnosis",
                "--encoder",
                str(enc),
                "--output",
                str(out),
                "--no-progress",
                "classify.epochs=1",
                "classify.n_splits=2",
                "device=cpu",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["encoder_provenance"]["transductive"] is True
    assert results["encoder_provenance"]["test_subjects_in_pretraining"] == 8
    assert (
        "8 of 8 test subjects were in the encoder's pretraining set (transductive)"
        in (out / "log.txt").read_text()
    )
    assert pd.read_csv(out / "predictions.csv")["subject_id"].nunique() == 8


def test_probe_of_moved_export_still_reports_what_pretraining_saw(tmp_path):
    """The embeddings carry the export's pretraining record, so a probe after the export folder has moved
    (or been deleted) still says how many probed subjects the encoder saw."""
    data, enc = _pretrained(tmp_path)
    emb = tmp_path / "emb.npz"
    embed = ["embed", "--encoder", str(enc), "--data", str(data), "--output", str(emb), "--no-progress"]
    assert main(embed) == 0
    enc.rename(tmp_path / "moved")
    out = tmp_path / "probe"
    probe = [
        "probe",
        "--embeddings",
        str(emb),
        "--data",
        str(data),
        "--label",
        "diagnosis",
        "--output",
        str(out),
    ]
    assert main([*probe, "probe.n_splits=2", "probe.features=[mean]", "probe.fractions=[1.0]"]) == 0
    results = json.loads((out / "linear_mean" / "results.json").read_text())
    assert results["encoder_provenance"]["test_subjects_in_pretraining"] == 8
    assert results["encoder_provenance"]["transductive"] is True
