"""``pretrain --init``: start VolTA-3D's student and teacher from an encoder export, volta3d's own or an
imported one, so a public encoder can be adapted to a user's own unlabelled scans (continued,
domain-adaptive pretraining: Gururangan et al., "Don't Stop Pretraining", ACL 2020).

The encoder (the GMML decoder included) and, when the export has one, the CLS-style summariser come from
the export; the projection heads and the centers start fresh, as DINO's do; the teacher starts equal to
the student. The ``model:`` sizes come from the export (``init_overrides``), except ``model.img_size``,
the training crop: the position embedding is resampled to it. The export's record of what it was
pretrained on is carried into the run's own (``inherit_provenance``): downstream runs then count the
subjects both pretrainings saw, and say when part of that data (an imported encoder's) is unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from volta3d.engine.meta_arch import VolTA3D
from volta3d.models.export import (
    EncoderLoadError,
    build_from_export,
    encoder_kwargs_from_meta,
    export_paths,
    read_encoder_meta,
)
from volta3d.models.imports import cube_edge
from volta3d.runtime import file_sha256

# what the weights' shapes or the encoder's function depend on: the export decides them
ENCODER_KEYS = ("patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads", "in_channels", "qkv_bias",
                "deconv_chns", "input_norm")  # fmt: skip
UNKNOWN_INIT_DATA = {"pretraining_data": "unknown: the init export records none"}


def init_overrides(export: str | Path) -> list[str]:
    """``key=value`` config overrides that give ``model:`` the export's architecture (and its summariser's)
    and set ``train.init``; they go last, so the export's sizes win over a config file's."""
    meta = read_encoder_meta(export)
    kwargs = encoder_kwargs_from_meta(meta)
    out = [
        f"model.{k}={str(kwargs[k]).lower() if isinstance(kwargs[k], bool) else kwargs[k]}"
        for k in ENCODER_KEYS
    ]
    summariser = meta.get("summariser")
    if summariser:
        out += [
            f"model.summariser.heads={summariser['num_heads']}",
            f"model.summariser.mlp_ratio={summariser['mlp_ratio']}",
        ]
    return [*out, f"train.init={Path(export).resolve()}"]


def _check_fits(model: VolTA3D, arch: dict[str, Any], export: str | Path) -> None:
    ours = model.student.encoder.architecture
    differ = [f"{k} {arch[k]!r} (model.{k}: {ours[k]!r})" for k in ENCODER_KEYS if arch[k] != ours[k]]
    if differ:
        raise EncoderLoadError(f"--init {export} does not fit the model: the export has " + ", ".join(differ))


def load_init_weights(model: VolTA3D, export: str | Path) -> None:
    """Copy the export's encoder (and summariser, when it has one) into the student, then the student
    into the teacher; the position embedding is resampled to the model's ``img_size``."""
    student = model.student
    encoder, summariser = build_from_export(export, img_size=cube_edge(student.encoder))
    _check_fits(model, encoder.architecture, export)
    student.encoder.load_state_dict(encoder.state_dict(), strict=True)
    if summariser is not None:
        if summariser.architecture != student.summariser.architecture:
            raise EncoderLoadError(
                f"--init {export}: its summariser {summariser.architecture} is not the model's "
                f"{student.summariser.architecture}"
            )
        student.summariser.load_state_dict(summariser.state_dict(), strict=True)
    model.teacher.load_state_dict(student.state_dict())  # DINO: the teacher starts equal to the student


def inherit_provenance(run: dict[str, Any], init_meta: dict[str, Any]) -> dict[str, Any]:
    """The run's pretraining record joined with the init export's: subject ids, volume hashes and
    preprocessing of both, and the imported encoder's record (``external``) when its data is unknown."""
    merged = dict(run)
    before = init_meta.get("provenance")
    if not before:
        merged["external"] = UNKNOWN_INIT_DATA
        return merged
    for key in ("subject_ids", "volume_sha256"):
        merged[key] = sorted(set(run.get(key, [])) | set(before.get(key, [])))
    merged["preprocessing"] = [*run.get("preprocessing", []), *before.get("preprocessing", [])]
    if before.get("external"):
        merged["external"] = before["external"]
    return merged


def init_record(export: str | Path, init_meta: dict[str, Any]) -> dict[str, Any]:
    """What the run started from, for ``encoder.json`` and ``pretrain_data.json``."""
    return {
        "encoder": str(Path(export).resolve()),
        "weights_sha256": file_sha256(export_paths(export)[0]),
        "architecture": encoder_kwargs_from_meta(init_meta),
        "training": init_meta.get("training"),
        "summariser": "export" if init_meta.get("summariser") else "fresh",
        "heads": "fresh",
    }


def start_from_export(
    export: str | Path, model: VolTA3D | None, data_record: dict[str, Any], logger: Any
) -> dict[str, Any]:
    """``pretrain --init``: load the export into ``model`` (None: a resumed run, whose checkpoint holds its
    weights) and return ``data_record`` with the init recorded in its provenance."""
    meta = read_encoder_meta(export)
    if model is not None:
        load_init_weights(model, export)
        logger.info("student and teacher start from %s; projection heads fresh", export)
    record = dict(data_record)
    if "provenance" in record:  # the main process's record
        record["provenance"] = {
            **inherit_provenance(record["provenance"], meta),
            "init": init_record(export, meta),
        }
    return record
