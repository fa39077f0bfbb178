"""Non-finite numbers in downstream work stop with one line naming where, not a late sklearn error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from volta3d.cli import main
from volta3d.downstream.loop import train_model
from volta3d.downstream.recipe import FinetuneRecipe
from volta3d.models.export import save_encoder_export
from volta3d.protocol.embeddings import save_embeddings

from ..config_kwargs import tiny_encoder
from .conftest import config_section
from .synthetic import write_blob_dataset


def test_nan_loss_stops_training_naming_the_fold_and_epoch():
    model = torch.nn.Linear(2, 1)
    seen: list[int] = []

    def nan_on_second_batch(m, batch):
        seen.append(1)
        loss = m(batch["x"]).sum()
        return loss * float("nan") if len(seen) == 2 else loss

    with pytest.raises(ValueError, match=r"fold2_frac1: non-finite loss \(nan\) at epoch 1, batch 2"):
        train_model(model, [{"x": torch.ones(1, 2)}] * 3, nan_on_second_batch, epochs=2,
                    recipe=FinetuneRecipe.plain(lr=1e-3, weight_decay=config_section("classify")["weight_decay"]), desc="fold2_frac1",
                    progress=False)  # fmt: skip
    assert len(seen) == 2  # stopped at once


def test_embed_refuses_a_non_finite_encoder(tmp_path, capsys):
    data = write_blob_dataset(tmp_path / "prep", n_subjects=4, size=32)
    encoder = tiny_encoder()
    with torch.no_grad():
        encoder.norm.weight.fill_(float("nan"))
    save_encoder_export(tmp_path / "enc", encoder, None)
    code = main(["embed", "--encoder", str(tmp_path / "enc"), "--data", str(data), "--output", str(tmp_path / "e.npz"),
                 "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "non-finite 'mean' embeddings from" in err[-1] and str(tmp_path / "enc") in err[-1]
    assert not (tmp_path / "e.npz").exists()


def test_probe_refuses_non_finite_embeddings(tmp_path, capsys):
    data = write_blob_dataset(tmp_path / "prep", n_subjects=6, size=32)
    table = pd.read_csv(data / "manifest.csv")
    features = np.ones((len(table), 3))
    features[1, 2] = np.inf
    emb = save_embeddings(tmp_path / "e.npz", {"subject_id": table["subject_id"].to_numpy(str),
                                               "path": (data / table["path"]).astype(str).to_numpy(str),
                                               "mean": features}, {})  # fmt: skip
    code = main(["probe", "--embeddings", str(emb), "--data", str(data), "--label", "diagnosis", "--output",
                 str(tmp_path / "p")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "holds non-finite 'mean' features" in err[-1]
