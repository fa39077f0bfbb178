"""One embedding per scan from a frozen encoder: the CLS-style summary (when the encoder has a
summariser) and the mean patch token, saved as ``.npz`` with the scans' subject ids and paths.

Also the raw-volume baseline: the preprocessed volume itself, z-scored and average-pooled to a
small grid. It is the floor a learned representation must clear to be worth its pretraining."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from volta3d.data.dataset import VolumeDataset
from volta3d.errors import InputError, InputFileNotFound
from volta3d.models.encoder import VolTAEncoder
from volta3d.models.input_norm import standardise
from volta3d.models.summariser import CLSSummariser

FEATURES = ("mean", "cls", "tokens", "raw")  # the feature arrays an embeddings file may hold


@torch.no_grad()
def extract_embeddings(
    encoder: VolTAEncoder,
    summariser: CLSSummariser | None,
    dataset: VolumeDataset,
    batch_size: int,
    device: str | torch.device = "cpu",
    progress: bool = True,
    tokens: bool = False,
) -> dict[str, np.ndarray]:
    """``{"subject_id": (N,), "path": (N,), "mean": (N, E), "cls": (N, E) if a summariser}`` in dataset order,
    and with ``tokens`` the whole patch-token grid, ``"tokens": (N, n * E)`` (tokens in the patch
    embedding's d-major order): pooling to one vector discards where in the brain a feature sits,
    which the raw-volume floor keeps, so the grid is the like-for-like learned counterpart."""
    device = torch.device(device)
    encoder.eval().to(device)
    if summariser is not None:
        summariser.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    mean, cls, grid, index = [], [], [], []
    for batch in tqdm(loader, desc="embed", unit="batch", disable=not progress, leave=False):
        patch = encoder.forward_features(batch["image"].to(device))["patch_tokens"]  # (B, N, E)
        mean.append(patch.mean(1).float().cpu())  # (B, N, E) -> (B, E)
        if summariser is not None:
            cls.append(summariser(patch).float().cpu())  # (B, N, E) -> (B, E)
        if tokens:
            grid.append(patch.flatten(1).float().cpu())  # (B, N, E) -> (B, N * E)
        index.append(torch.as_tensor(batch["index"]))
    out = {**_identities(dataset, index), "mean": torch.cat(mean).numpy()}
    if cls:
        out["cls"] = torch.cat(cls).numpy()
    if grid:
        out["tokens"] = torch.cat(grid).numpy()
    return out


def _identities(dataset: VolumeDataset, index: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Subject ids and paths of the embedded rows, in the order they were embedded."""
    rows = torch.cat(index).numpy()
    return {
        # fixed-width unicode arrays (not object arrays): .npz stays loadable without pickle
        "subject_id": np.asarray(dataset.table["subject_id"].astype(str).tolist(), dtype=str)[rows],
        "path": np.asarray(dataset.table["path"].astype(str).tolist(), dtype=str)[rows],
    }


def raw_volume_features(images: torch.Tensor, grid: int = 16) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C * grid**3) float32: each volume z-scored as every network's input
    is (so intensity scale carries no signal a network would not see), then average-pooled to
    ``grid`` cells per axis (a side that is not a multiple of ``grid`` gets PyTorch's overlapping
    adaptive bins)."""
    if images.ndim != 5:
        raise ValueError(
            f"raw_volume_features expects (B, C, D, H, W) images, got shape {tuple(images.shape)}"
        )
    if grid < 1:
        raise InputError(f"raw-volume grid must be a positive integer, got {grid}")
    side = min(images.shape[2:])
    if grid > side:  # before pooling allocates B x C x grid^3 (1000^3 floats: 4 GB a volume)
        raise InputError(
            f"raw-volume grid {grid} is finer than the volumes' smallest side ({side} voxels, shape "
            f"{tuple(images.shape[2:])}): pooling adds no detail; give at most {side} (embed --raw-grid, eval.raw_grid)"
        )
    x = standardise(images.float())
    return F.adaptive_avg_pool3d(x, grid).flatten(1).float()  # (B, C, grid, grid, grid) -> (B, C * grid^3)


@torch.no_grad()
def extract_raw_embeddings(
    dataset: VolumeDataset, grid: int, batch_size: int, progress: bool = True
) -> dict[str, np.ndarray]:
    """``{"subject_id": (N,), "path": (N,), "raw": (N, C * grid**3)}`` in dataset order (no encoder)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    raw, index = [], []
    for batch in tqdm(loader, desc="raw volume", unit="batch", disable=not progress, leave=False):
        raw.append(raw_volume_features(batch["image"], grid))
        index.append(torch.as_tensor(batch["index"]))
    return {**_identities(dataset, index), "raw": torch.cat(raw).numpy()}


def embedding_rows(embedded_paths: Sequence[str], wanted_paths: Sequence[str], source: str) -> np.ndarray:
    """Index into the embeddings of each wanted scan (matched by its preprocessed path); a scan with
    no embedding is an error naming ``source``."""
    position = {str(p): i for i, p in enumerate(embedded_paths)}
    missing = [p for p in map(str, wanted_paths) if p not in position]
    if missing:
        raise InputError(f"{len(missing)} scans have no embedding in {source} (e.g. {missing[0]})")
    return np.asarray([position[str(p)] for p in wanted_paths])


def save_embeddings(path: str | Path, embeddings: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    p = Path(path)
    if p.suffix != ".npz":
        p = p.with_suffix(".npz")
    p.parent.mkdir(parents=True, exist_ok=True)
    # mypy also matches **embeddings against savez's allow_pickle: bool
    np.savez(p, **embeddings, meta=np.asarray(json.dumps(meta)))  # type: ignore[arg-type]
    return p


def load_embeddings(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise InputFileNotFound(f"embeddings file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # not an .npz, or a damaged one
        reason = " ".join(str(err).split()) or type(err).__name__
        raise InputError(
            f"cannot read embeddings file {p} (not an .npz from volta3d embed?): {reason}"
        ) from None
    if "subject_id" not in data or not any(k in data for k in FEATURES):
        raise InputError(
            f"{p} is not a volta3d embeddings file (needs subject_id and one of {', '.join(FEATURES)} arrays)"
        )
    meta = json.loads(str(data.pop("meta"))) if "meta" in data else {}
    return data, meta


def random_init_encoder(
    model: dict[str, Any], export: str | Path | None
) -> tuple[VolTAEncoder, CLSSummariser | None]:
    """The honest baseline: an untrained encoder (and summariser) with the architecture of ``export``,
    or, without one, of the ``model:`` config section (and its ``summariser:``)."""
    from volta3d.models.encoder import build_encoder, encoder_from_architecture
    from volta3d.models.export import encoder_kwargs_from_meta, read_encoder_meta
    from volta3d.models.summariser import build_summariser

    if export is None:
        return build_encoder(**model), build_summariser(**model)
    meta = read_encoder_meta(export)
    encoder = encoder_from_architecture(encoder_kwargs_from_meta(meta))
    return encoder, CLSSummariser(**meta["summariser"]) if meta.get("summariser") else None


def _encoder_embeddings(
    cfg: Any, dataset: VolumeDataset, export: str | Path | None, random_init: bool, progress: bool
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Embeddings from the export's weights, or from a random-init encoder of its (or ``model:``'s) sizes."""
    from volta3d.config import to_kwargs
    from volta3d.models.export import build_from_export, read_encoder_meta
    from volta3d.runtime import resolve_device

    provenance = None
    if export and not random_init:
        (encoder, summariser), source = build_from_export(export), "pretrained"
        provenance = read_encoder_meta(export).get("provenance")
    else:
        (encoder, summariser), source = random_init_encoder(to_kwargs(cfg.model), export), "random-init"
    emb = extract_embeddings(encoder, summariser, dataset, batch_size=cfg.probe.batch_size,
                             device=resolve_device(cfg.device), progress=progress,
                             tokens="tokens" in cfg.probe.features)  # fmt: skip
    meta = {
        "encoder": str(export) if export else export,
        "init": source,
        "architecture": encoder.architecture,
        "features": [k for k in ("cls", "mean", "tokens") if k in emb],
        # the export's pretraining record travels with the features: a probe relates it to its subjects
        # (transductive or not) even after the export folder has moved
        "encoder_provenance": provenance,
    }
    return emb, meta


def embed_folder(
    cfg: Any,
    data: str | Path,
    output: str | Path,
    *,
    encoder: str | Path | None,
    random_init: bool,
    raw_grid: int | None,
    progress: bool,
) -> Path:
    """``volta3d embed``: one embedding per scan of the preprocessed folder ``data``, saved to ``output``
    (.npz). ``raw_grid``: the raw-volume floor on that grid instead of an encoder."""
    from volta3d.runtime import get_logger, seed_everything, setup_logging

    setup_logging(None)
    seed_everything(cfg.seed)
    dataset = VolumeDataset(data)
    if raw_grid is not None:
        emb = extract_raw_embeddings(dataset, raw_grid, batch_size=cfg.probe.batch_size, progress=progress)
        meta: dict[str, Any] = {"encoder": None, "init": "raw-volume", "grid": raw_grid, "features": ["raw"]}
    else:
        emb, meta = _encoder_embeddings(cfg, dataset, encoder, random_init, progress)
    bad = [k for k in meta["features"] if not np.isfinite(emb[k]).all()]
    if bad:  # a broken encoder must not leave NaN features for a probe to choke on later
        raise InputError(
            f"non-finite '{bad[0]}' embeddings from {encoder or 'the random-init encoder'} on {data}; "
            "the encoder weights hold NaN/Inf or the volumes do"
        )
    meta = {**meta, "seed": cfg.seed, "data": str(data)}
    path = save_embeddings(output, emb, meta)
    get_logger().info(f"wrote {len(emb['subject_id'])} embeddings ({', '.join(meta['features'])}) to {path}")
    return path
