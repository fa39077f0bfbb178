"""Numbers behind the report's pretraining-health panel, read from a pretraining run folder.

A pretraining run can look fine on its loss curve and still have collapsed: a teacher whose
output is uniform, or the same for every volume, gives a smooth, flat loss. What tells the cases
apart is logged per step in ``metrics.csv``: the alignment losses against log K (the
cross-entropy against a uniform teacher is at least log K), the entropy gaps (the information the
per-volume targets carry about the volume: 0 when the output ignores it, at most log B for B volumes
per micro-batch), the mean pairwise cosine of different volumes' embeddings (1 when all look alike)
and their centred spread (0 when all look alike), the RankMe effective ranks beside their ceilings
and a ``collapse_alarm`` flag (``volta3d.engine.health``). Beside it, ``online_eval.csv`` holds
probes of the teacher during training and ``pretrain_data.json`` which subjects were pretrained on.
Every function here tolerates a run that predates these files or columns: it returns None or skips
the row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from volta3d import layout
from volta3d.engine.loss_terms import ALIGNMENT_LOSSES

ONLINE_COLUMNS = ("step", "source", "feature", "probe", "metric", "value")
HEALTH_WINDOW = 10  # logged steps averaged at each end: one noisy step should not decide a verdict
# column -> what a collapsed run shows, for the table's reading column
HEALTH_READINGS = {
    "teacher_entropy_gap": "0 = CLS targets independent of the volume (collapse); at most log B",
    "teacher_patch_entropy_gap": "0 = every patch token gets the same target (collapse)",
    "teacher_view_agreement": "share of volumes whose views share a top prototype (1 also if collapsed)",
    "student_cls_cosine": "1 = every volume embedded alike (collapse)",
    "teacher_cls_cosine": "1 = every volume embedded alike (collapse)",
    "student_cls_spread": "0 = every volume embedded alike (collapse); about 1 = isotropic",
    "teacher_cls_spread": "0 = every volume embedded alike (collapse); about 1 = isotropic",
    "cls_rank": "1 = a single direction used (collapse); at most cls_rank_max",
    "patch_rank": "1 = a single direction used (collapse); at most patch_rank_max",
    "cls_rank_max": "ceiling of cls_rank: min(rows in the buffer, embedding dim)",
    "patch_rank_max": "ceiling of patch_rank: min(rows in the buffer, embedding dim)",
}  # old runs' metrics.csv lack some of these columns: their rows are skipped


@dataclass
class HealthRow:
    """One row of the report's pretraining-health table: a logged quantity averaged over the first and
    the last logged steps, and, for the alignment losses, log K to read the final value against."""

    quantity: str
    first: float
    last: float
    log_k: float | None = None  # set for the alignment losses only

    @property
    def verdict(self) -> str:
        """A loss below log K proves the teacher's targets are not uniform; at or above, they may be."""
        if self.log_k is None or not math.isfinite(self.last):
            return ""
        return "below log K" if self.last < self.log_k else "at or above log K"


def window_means(values: pd.Series, n: int = HEALTH_WINDOW) -> tuple[float, float]:
    """Means of the first and last ``n`` logged (non-empty) values; NaN when none is logged."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return math.nan, math.nan
    return float(v.head(n).mean()), float(v.tail(n).mean())


def log_k(metrics: pd.DataFrame, out_dim: Any = None) -> float | None:
    """log K from the logged ``log_k`` column, else from the config's ``head.out_dim``."""
    if "log_k" in metrics.columns and metrics["log_k"].notna().any():
        return float(metrics["log_k"].dropna().iloc[-1])
    return math.log(float(out_dim)) if out_dim else None


def health_rows(metrics: pd.DataFrame, logk: float | None) -> list[HealthRow]:
    """The alignment losses (with log K) and every logged health quantity, in a fixed order."""
    rows = []
    for col in (*ALIGNMENT_LOSSES, *HEALTH_READINGS):
        if col in metrics.columns and metrics[col].notna().any():
            first, last = window_means(metrics[col])
            rows.append(HealthRow(col, first, last, logk if col in ALIGNMENT_LOSSES else None))
    return rows


def first_alarm(metrics: pd.DataFrame) -> tuple[int, int] | None:
    """(step at which ``collapse_alarm`` first read 1, number of logged rows with it set), or None."""
    if "collapse_alarm" not in metrics.columns:
        return None
    fired = metrics[pd.to_numeric(metrics["collapse_alarm"], errors="coerce") == 1]
    return (int(fired["step"].min()), len(fired)) if len(fired) else None


def health_sentence(rows: list[HealthRow], alarm: tuple[int, int] | None, alarm_logged: bool) -> str:
    """One plain sentence: where each alignment loss ended against log K, and the alarm."""
    losses = [r for r in rows if r.verdict]
    parts = [f"{r.quantity} ended {r.verdict} ({r.last:.4g} vs {r.log_k:.4g})" for r in losses]
    if not parts:
        parts = ["no alignment loss with a known log K was logged"]
    if alarm:
        tail = f"the collapse alarm fired first at step {alarm[0]} ({alarm[1]} logged step(s) in all)"
    else:
        tail = "no collapse alarm fired" if alarm_logged else "no collapse alarm was logged by this run"
    return f"Pretraining health: {'; '.join(parts)}; {tail}."


def read_online_eval(pretrain: Path) -> pd.DataFrame | str | None:
    """``online_eval.csv`` with a ``label`` column (``""`` when the file has none) and numeric
    step / value; None when absent, or a one-line reason when it cannot be used."""
    path = pretrain / layout.ONLINE_EVAL
    if not path.is_file():
        return None
    table = pd.read_csv(
        path, dtype={"source": str, "feature": str, "probe": str, "metric": str, "label": str}
    )
    missing = [c for c in ONLINE_COLUMNS if c not in table.columns]
    if missing:
        return f"{path} has no {', '.join(missing)} column(s)"
    table["label"] = table["label"].fillna("") if "label" in table.columns else ""
    for col in ("step", "value"):
        table[col] = pd.to_numeric(table[col], errors="coerce")
    table = table.dropna(subset=["step", "value"])
    return table if len(table) else f"{path} holds no numeric step / value rows"


def online_summary(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (label, metric, probe, feature) of the teacher: its first and last value, and the
    init reference of the same feature and probe and the raw-volume floor of the same probe."""

    def ref(source: str, label: str, metric: str, probe: str, feature: str | None) -> float | None:
        rows = table[
            (table["source"] == source)
            & (table["label"] == label)
            & (table["metric"] == metric)
            & (table["probe"] == probe)
        ]
        if feature is not None:
            rows = rows[rows["feature"] == feature]
        return float(rows.sort_values("step")["value"].iloc[0]) if len(rows) else None

    out = []
    teacher = table[table["source"] == "teacher"].sort_values("step")
    for (label, metric, probe, feature), rows in teacher.groupby(
        ["label", "metric", "probe", "feature"], sort=True
    ):
        out.append({"label": label, "metric": metric, "probe": probe, "feature": feature,
                    "first": float(rows["value"].iloc[0]), "last": float(rows["value"].iloc[-1]),
                    "last_step": int(rows["step"].iloc[-1]), "init": ref("init", label, metric, probe, feature),
                    "raw": ref("raw", label, metric, probe, None)})  # fmt: skip
    return out


def read_pretrain_data(pretrain: Path) -> dict[str, Any] | str | None:
    """``pretrain_data.json``; None when absent, or a one-line reason when it cannot be used."""
    path = pretrain / layout.PRETRAIN_DATA
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return f"{path} is not valid JSON ({err.msg}, line {err.lineno})"
    if not isinstance(info, dict):
        return f"{path} does not hold a JSON object"
    return info


def provenance_sentence(info: Mapping[str, Any], tested: Mapping[str, Collection[str]]) -> str:
    """How many volumes were pretrained on and whether the downstream test subjects (``tested``:
    task -> subject ids) were among them: transductive (in the unlabelled pretraining set) or external."""
    folders = [Path(str(f)).name for f in info.get("folders") or []]
    n = info.get("n_volumes")
    lead = f"Pretrained on {n if n is not None else 'an unrecorded number of'} volumes"
    lead += f" from {', '.join(folders)}." if folders else "."
    subjects = {task: set(map(str, s)) for task, s in tested.items() if s}
    if not subjects:
        return f"{lead} No downstream test subjects to check against the pretraining subjects."
    if not isinstance(info.get("subject_ids"), list):
        return (
            f"{lead} The pretraining subject ids were not recorded, so transductive or external is unknown."
        )
    seen = set(map(str, info["subject_ids"]))
    union = set().union(*subjects.values())
    inside, total = len(union & seen), len(union)
    if inside == total:
        return (
            f"{lead} Transductive: the downstream test subjects were in the unlabelled pretraining set, "
            f"labels unused (all {total} test subjects)."
        )
    if inside == 0:
        return f"{lead} External: none of the {total} downstream test subjects was in the pretraining set."
    each = "; ".join(f"{task}: {len(s & seen)} of {len(s)}" for task, s in subjects.items())
    return (
        f"{lead} Partly transductive: some downstream test subjects were in the unlabelled pretraining set, "
        f"labels unused ({each}); the others are external."
    )
