"""Tiny preprocessed-format datasets with a known answer, written in the manifest contract
(``manifest.csv`` + one ``(1, D, H, W)`` float ``.npy`` per scan, masks as int ``.npy``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

TINY_VIT = {
    "img_size": 32,
    "patch_size": 16,
    "hidden_size": 48,
    "mlp_dim": 96,
    "num_layers": 2,
    "num_heads": 4,
    "in_channels": 1,
    "dropout": 0.0,
    "qkv_bias": False,
    "deconv_chns": 8,
    "fused_attention": True,
}


def _ball(size: int, center: np.ndarray, radius: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=0)
    return ((grid - center[:, None, None, None]) ** 2).sum(0) <= radius**2


def write_blob_dataset(
    root: Path,
    n_subjects: int = 20,
    scans_per_subject: int = 1,
    size: int = 32,
    seed: int = 0,
    max_offset: float = 0.0,
) -> Path:
    """Label 'blob' = a bright ball somewhere in the volume; 'none' = noise only. Also an 'age'
    column that equals 20 + 150 * offset, offset in [0, max_offset]: a numeric label visible in the
    volume as a brighter slab covering that fraction of the first axis (a shape, so it survives the
    networks' per-volume z-scoring, and it hides the ball from a mean-intensity shortcut)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(n_subjects):
        has_blob = s % 2 == 0
        for j in range(scans_per_subject):
            offset = rng.uniform(0.0, max_offset)
            vol = rng.uniform(0.0, 0.2, (size, size, size)).astype(np.float32)
            vol[: int(round(offset * size))] += 0.4
            if has_blob:
                vol[_ball(size, rng.uniform(9, size - 9, 3), rng.uniform(6, 8))] = 1.0
            path = root / f"sub{s:02d}_{j}.npy"
            np.save(path, vol[None].astype(np.float16))
            rows.append(
                {
                    "subject_id": f"sub{s:02d}",
                    "path": path.name,
                    "diagnosis": "blob" if has_blob else "none",
                    "age": 20 + 150 * offset,
                    "site": "A",
                }
            )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def write_sphere_segmentation(root: Path, n_subjects: int = 10, size: int = 32, seed: int = 0) -> Path:
    """A bright ball (label 1) at a random place in noise; the mask is the ball."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(n_subjects):
        ball = _ball(size, rng.uniform(10, size - 10, 3), rng.uniform(5, 7))
        vol = rng.uniform(0.0, 0.4, (size, size, size)).astype(np.float32)
        vol[ball] += 0.6
        np.save(root / f"img{s:02d}.npy", vol[None].astype(np.float16))
        np.save(root / f"lab{s:02d}.npy", ball[None].astype(np.uint8))
        rows.append({"subject_id": f"sub{s:02d}", "path": f"img{s:02d}.npy", "label_path": f"lab{s:02d}.npy"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root
