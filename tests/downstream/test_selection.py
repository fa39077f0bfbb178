"""The saved selection split (``volta3d select``): disjoint from the evaluation subjects, stratified,
stable on a re-run, refused when asked for differently, and usable as ``--data`` by every command."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from volta3d.cli import main
from volta3d.data.dataset import read_manifest
from volta3d.errors import InputError
from volta3d.protocol.selection import write_selection


@pytest.fixture()
def labelled(blob_data, tmp_path):
    """The blob set with two scans for one subject and an unlabelled scan."""
    table = pd.read_csv(blob_data / "manifest.csv")
    table["path"] = [str(blob_data / p) for p in table["path"]]
    extra = table.iloc[[0, 1]].copy()
    # copies: a manifest lists each file once
    extra["path"] = [shutil.copy(p, tmp_path / f"scan{i}.npy") for i, p in enumerate(extra["path"])]
    extra["diagnosis"] = [table["diagnosis"].iloc[0], ""]
    extra["subject_id"] = [table["subject_id"].iloc[0], "unlabelled"]
    path = tmp_path / "manifest.csv"
    pd.concat([table, extra]).to_csv(path, index=False)
    return path


def test_selection_and_evaluation_are_disjoint_and_cover_every_row(labelled, tmp_path):
    record = write_selection(labelled, "diagnosis", 0.33, 0, tmp_path / "sel")
    selection, evaluation = (
        read_manifest(tmp_path / "sel" / f"{n}.csv") for n in ("selection", "evaluation")
    )
    assert not set(selection["subject_id"]) & set(evaluation["subject_id"])  # a subject is on one side only
    assert len(selection) + len(evaluation) == len(read_manifest(labelled))
    assert "unlabelled" in set(evaluation["subject_id"])  # rows without the label stay on the evaluation side
    assert (
        set(selection["subject_id"]) == set(record["selection_subjects"])
        and len(record["selection_subjects"]) == 8
    )
    per_subject = selection.drop_duplicates("subject_id")["diagnosis"]
    assert per_subject.value_counts().to_dict() == {"blob": 4, "none": 4}  # stratified
    assert (selection["path"].map(lambda p: p.startswith("/"))).all()  # usable from anywhere


def test_a_rerun_keeps_the_split_and_other_settings_are_refused(labelled, tmp_path):
    first = write_selection(labelled, "diagnosis", 0.33, 0, tmp_path / "sel")
    before = (tmp_path / "sel" / "selection.csv").read_text()
    assert write_selection(labelled, "diagnosis", 0.33, 0, tmp_path / "sel") == first
    assert (tmp_path / "sel" / "selection.csv").read_text() == before
    with pytest.raises(InputError, match="other settings"):
        write_selection(labelled, "diagnosis", 0.33, 1, tmp_path / "sel")
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["seed"] == 0


def test_select_command_and_evaluation_csv_as_probe_data(blob_data, tmp_path, capsys):
    assert main(["select", str(blob_data), "--label", "diagnosis", "--output", str(tmp_path / "sel")]) == 0
    assert "selection: 8 subjects" in capsys.readouterr().out
    evaluation = tmp_path / "sel" / "evaluation.csv"
    emb = tmp_path / "emb.npz"
    assert main(["embed", "--raw-volume", "--raw-grid", "4", "--data", str(evaluation), "--output", str(emb),
                 "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "probe"
    assert main(["probe", "--embeddings", str(emb), "--data", str(evaluation), "--label", "diagnosis", "--output",
                 str(out), "probe.n_splits=2", "probe.knn_k=3"]) == 0  # fmt: skip
    tested = json.loads((out / "linear_raw" / "results.json").read_text())
    assert tested["aggregate"]["auroc"]["mean"] > 0.5
    assert main(["select", str(blob_data), "--label", "no_such_column", "--output", str(tmp_path / "x")]) == 2
    assert "no_such_column" in capsys.readouterr().err
