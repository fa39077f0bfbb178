"""Tiny pretraining set-ups shared by the engine tests: a 2-layer 32-wide ViT on 32^3 volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

TINY_OVERRIDES = [
    "model.img_size=32", "model.patch_size=16", "model.hidden_size=32", "model.mlp_dim=64",
    "model.num_layers=2", "model.num_heads=2", "model.summariser.heads=2", "model.deconv_chns=4",
    "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
    "views.global_size=32", "views.local_size=16", "views.n_local=2", "masking.block_size=4",
    "optim.batch_size=2", "optim.epochs=2", "optim.warmup_epochs=1", "optim.lr_scaling=none",
    "optim.lr=1e-3", "loss.warmup_teacher_temp_epochs=1", "train.num_workers=0", "train.tensorboard=false",
    "train.checkpoint_every=1",
]  # fmt: skip


def write_volume_folder(folder: Path, n: int = 4, size: int = 32, seed: int = 0) -> Path:
    """A preprocessed-format folder (manifest.csv + .npy volumes in [0, 1]) of smooth random blobs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    rows = []
    for i in range(n):
        center = rng.uniform(-0.4, 0.4, size=(3, 1, 1, 1))
        vol = np.exp(-((grid - center) ** 2).sum(0) / rng.uniform(0.1, 0.4))[None].astype(np.float16)
        np.save(folder / f"s{i}.npy", vol)
        rows.append({"subject_id": f"s{i}", "path": f"s{i}.npy", "source": f"synthetic-{i}"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY_OVERRIDES)


@pytest.fixture
def volume_folder(tmp_path: Path) -> Path:
    return write_volume_folder(tmp_path / "prep")
