"""The online probe during pretraining: its references, its resume, and equality with offline embed + probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from volta3d.cli import main
from volta3d.config import load_config
from volta3d.engine.trainer import pretrain

from .conftest import write_volume_folder

EVAL = [
    "eval.labels=[sex,age]",
    "eval.every=2",
    "eval.n_splits=3",
    "probe.knn_k=3",
    "eval.features=[cls,mean,tokens]",
]


def _labelled_folder(folder: Path, n: int = 12) -> Path:
    write_volume_folder(folder, n=n, seed=5)
    table = pd.read_csv(folder / "manifest.csv")
    table["sex"] = ["F", "M"] * (n // 2)
    table["age"] = np.linspace(20, 80, n).round(1)
    table.to_csv(folder / "manifest.csv", index=False)
    return folder


def _pretrain(tiny_overrides, data, eval_data, out, *extra):
    cfg = load_config(overrides=tiny_overrides + [f"eval.data={eval_data}", *EVAL, *extra])
    return pretrain(cfg, data, out, progress=False)


def test_online_rows_have_references_and_teacher_and_student_steps(tiny_overrides, volume_folder, tmp_path):
    eval_data = _labelled_folder(tmp_path / "eval")
    out = _pretrain(tiny_overrides, volume_folder, eval_data, tmp_path / "run", "train.max_steps=3")
    rows = pd.read_csv(out / "online_eval.csv")
    assert set(rows["source"]) == {"init", "raw", "teacher", "student"}
    for network in ("teacher", "student"):  # every 2 steps + the last
        assert sorted(rows.loc[rows["source"] == network, "step"].unique()) == [2, 3]
    assert (rows.loc[rows["source"].isin(["init", "raw"]), "step"] == 0).all()
    assert set(rows.loc[rows["label"] == "sex", "metric"]) == {"auroc"}
    assert set(rows.loc[rows["label"] == "age", "metric"]) == {"mae"}
    assert set(rows.loc[rows["source"] == "raw", "feature"]) == {"raw"}
    assert set(rows.loc[rows["source"] == "teacher", "feature"]) == {"cls", "mean", "tokens"}
    final = rows[rows["step"] == 3].pivot_table(
        index=["label", "feature", "probe"], columns="source", values="value"
    )
    assert not np.allclose(final["teacher"], final["student"])  # two networks, probed apart
    assert rows["value"].notna().all()
    assert (out / "online_eval_splits" / "sex.json").is_file()
    assert "online probe at step 3" in (out / "log.txt").read_text()


def test_online_probe_equals_offline_embed_and_probe(tiny_overrides, volume_folder, tmp_path):
    eval_data = _labelled_folder(tmp_path / "eval")
    out = _pretrain(tiny_overrides, volume_folder, eval_data, tmp_path / "run", "train.max_steps=2")
    online = pd.read_csv(out / "online_eval.csv")
    emb = tmp_path / "teacher.npz"
    features = "probe.features=[cls,mean,tokens]"
    assert main(["embed", "--encoder", str(out), "--data", str(eval_data), "--output", str(emb), "--no-progress",
                 features]) == 0  # fmt: skip
    for label in ("sex", "age"):
        probe_out = tmp_path / f"probe-{label}"
        code = main(["probe", "--embeddings", str(emb), "--data", str(eval_data), "--label", label, "--splits",
                     str(out / "online_eval_splits" / f"{label}.json"), "--output", str(probe_out), "probe.knn_k=3",
                     features])  # fmt: skip
        assert code == 0
        summary = pd.read_json(probe_out / "summary.json")
        for probe in ("linear", "knn"):
            for feature in ("cls", "mean", "tokens"):
                mine = online[(online["step"] == 2) & (online["source"] == "teacher") & (online["label"] == label)
                              & (online["probe"] == probe) & (online["feature"] == feature)]["value"]  # fmt: skip
                metric = "auroc" if label == "sex" else "mae"
                offline = summary[f"{probe}_{feature}"][metric]["mean"]
                assert mine.item() == pytest.approx(offline, rel=1e-6), (label, probe, feature)


def test_resume_with_online_probe_is_bitwise_and_keeps_references(tiny_overrides, volume_folder, tmp_path):
    import torch

    from volta3d.engine.checkpoint import load_checkpoint

    eval_data = _labelled_folder(tmp_path / "eval")
    det = ["train.deterministic=true"]
    straight = _pretrain(tiny_overrides, volume_folder, eval_data, tmp_path / "a", "train.max_steps=4", *det)
    plain = pretrain(load_config(overrides=tiny_overrides + ["train.max_steps=4", *det]), volume_folder,
                     tmp_path / "plain", progress=False)  # fmt: skip
    resumed = tmp_path / "b"
    _pretrain(tiny_overrides, volume_folder, eval_data, resumed, "train.max_steps=2", *det)
    _pretrain(tiny_overrides, volume_folder, eval_data, resumed, "train.max_steps=4", *det)
    a, b, c = (load_checkpoint(p / "checkpoints/last.pt")["model"] for p in (straight, resumed, plain))
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k  # evaluating changes no training step
    rows = pd.read_csv(resumed / "online_eval.csv")
    assert (rows["source"] == "init").sum() == (
        pd.read_csv(straight / "online_eval.csv")["source"] == "init"
    ).sum()
    assert sorted(rows.loc[rows["source"] == "teacher", "step"].unique()) == [2, 4]


def test_eval_needs_labels(tiny_overrides, volume_folder, tmp_path):
    with pytest.raises(ValueError, match="eval.labels is empty"):
        pretrain(load_config(overrides=tiny_overrides + [f"eval.data={volume_folder}", "train.max_steps=1"]),
                 volume_folder, tmp_path / "run", progress=False)  # fmt: skip
    eval_data = _labelled_folder(tmp_path / "eval")
    with pytest.raises(ValueError, match="label column 'diagnosis'"):
        pretrain(load_config(overrides=tiny_overrides + [f"eval.data={eval_data}", "eval.labels=[diagnosis]",
                                                         "train.max_steps=1"]), volume_folder, tmp_path / "r2",
                 progress=False)  # fmt: skip
