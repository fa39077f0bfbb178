"""One embedding per scan from a frozen encoder: the CLS-style summary (when the encoder has a
summariser) and the mean patch token, saved as ``.npz`` with the scans' subject ids and paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from volta3d.data.dataset import VolumeDataset
from volta3d.models.encoder import VolTAEncoder
from volta3d.models.summariser import CLSSummariser


@torch.no_grad()
def extract_embeddings(
    encoder: VolTAEncoder,
    summariser: CLSSummariser | None,
    dataset: VolumeDataset,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """``{"subject_id": (N,), "path": (N,), "mean": (N, E), "cls": (N, E) if a summariser}`` in dataset order."""
    device = torch.device(device)
    encoder.eval().to(device)
    if summariser is not None:
        summariser.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    mean, cls, index = [], [], []
    for batch in tqdm(loader, desc="embed", unit="batch", disable=not progress, leave=False):
        tokens = encoder.forward_features(batch["image"].to(device))["patch_tokens"]  # (B, N, E)
        mean.append(tokens.mean(1).float().cpu())  # (B, N, E) -> (B, E)
        if summariser is not None:
            cls.append(summariser(tokens).float().cpu())  # (B, N, E) -> (B, E)
        index.append(torch.as_tensor(batch["index"]))
    rows = torch.cat(index).numpy()
    out = {
        # fixed-width unicode arrays (not object arrays): .npz stays loadable without pickle
        "subject_id": np.asarray(dataset.table["subject_id"].astype(str).tolist(), dtype=str)[rows],
        "path": np.asarray(dataset.table["path"].astype(str).tolist(), dtype=str)[rows],
        "mean": torch.cat(mean).numpy(),
    }
    if cls:
        out["cls"] = torch.cat(cls).numpy()
    return out


def save_embeddings(path: str | Path, embeddings: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    p = Path(path)
    if p.suffix != ".npz":
        p = p.with_suffix(".npz")
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, **embeddings, meta=np.asarray(json.dumps(meta)))
    return p


def load_embeddings(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"embeddings file not found: {p}")
    with np.load(p, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    if "subject_id" not in data or "mean" not in data:
        raise ValueError(f"{p} is not a volta3d embeddings file (needs subject_id and mean arrays)")
    meta = json.loads(str(data.pop("meta"))) if "meta" in data else {}
    return data, meta
