"""The runs a report is built from: discovery of results.json files, model names, initialisations,
tasks and which runs are compared with which.

Runs are grouped by task = (task, kind, label) as recorded in results.json. Within a task the
reference is the VolTA-3D-initialised model (an encoder export that is neither a random-init nor a
raw-volume embedding) unless a name is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from volta3d import layout
from volta3d.errors import InputError, InputFileNotFound
from volta3d.protocol.results import load_run
from volta3d.runtime import flatten_dict

PRETRAIN_FILES = (layout.METRICS, layout.CONFIG)
LOWER_IS_BETTER = ("mae", "hd95")
COMPARE_METRICS = {
    "binary": ["auroc", "balanced_accuracy_youden"], "multiclass": ["auroc", "balanced_accuracy"],
    "regression": ["mae", "r2"], "segmentation": ["dice", "hd95"],
}  # fmt: skip
RAW_INIT = "raw-volume"  # `volta3d embed --raw-volume`: no network, the pooled volume itself
BASELINE_INITS = ("random-init", RAW_INIT)  # embedding initialisations that are baselines, never VolTA-3D


@dataclass
class Run:
    """One downstream results file (``load_run`` dictionary, with ``predictions`` and ``dir``)."""

    name: str
    results: dict[str, Any]

    @property
    def dir(self) -> Path:
        return Path(self.results["dir"])

    @property
    def kind(self) -> str:
        return str(self.results.get("kind", "?"))

    @property
    def pretrained(self) -> bool:
        """Initialised from a VolTA-3D encoder export (a random-init embedding of one, or the raw
        volume, does not count)."""
        return bool(self.results.get("encoder")) and self.results.get("embedding_init") not in BASELINE_INITS

    @property
    def task_key(self) -> tuple[str, str, str]:
        r = self.results
        return str(r.get("task", "?")), self.kind, str(r.get("label", "?"))

    @property
    def primary(self) -> str:
        return str(self.results.get("primary_metric") or COMPARE_METRICS.get(self.kind, ["auroc"])[0])


@dataclass
class ReportInputs:
    """Everything one report is built from: the downstream runs, and the pretraining run folder and
    demo ``stages.json`` when there are any."""

    runs: list[Run]
    pretrain: Path | None = None
    stages: Path | None = None


def _raw_grid(results: Mapping[str, Any]) -> str:
    grid = results.get("embedding_grid")
    return f"{grid}^3" if grid else "pooled"


def default_name(results: Mapping[str, Any]) -> str:
    """``vit-pretrained``, ``unet-scratch``; probes add the embedding's initialisation."""
    name = str(results.get("model", "model"))
    if results.get("embedding_init") == RAW_INIT:
        return f"{name} (raw volume {_raw_grid(results)})"
    return f"{name} ({results['embedding_init']})" if results.get("embedding_init") else name


IMPORTED = "imported encoder"


def encoder_source(run: Run) -> str:
    """Whose encoder a pretrained run starts from: ``VolTA-3D``, or ``imported encoder`` for an export of
    ``volta3d import-encoder`` (pretraining unknown to volta3d). Pretraining continued from an import
    (``pretrain --init``) is VolTA-3D: its own data is known."""
    provenance = run.results.get("encoder_provenance") or {}
    return IMPORTED if provenance.get("external") and not provenance.get("known") else "VolTA-3D"


def initialisation(run: Run) -> str:
    """What the model's weights (or features) start from, in the tables' words."""
    init = run.results.get("embedding_init")
    if init == RAW_INIT:
        return f"raw volume ({_raw_grid(run.results)})"
    if run.pretrained:
        return encoder_source(run)
    return "random init" if init else "scratch"


def is_probe(run: Run) -> bool:
    return str(run.results.get("model", "")).startswith("probe-")


def probe_kind(run: Run) -> str:
    """``probe-linear-raw`` -> ``probe-linear``: the probe without the feature it was fitted on."""
    model = str(run.results.get("model", ""))
    return model.rsplit("-", 1)[0] if is_probe(run) else model


def variant(run: Run) -> str:
    """What tells apart runs of one initialisation in a figure: a probe's feature (cls, mean, raw),
    else the architecture (vit, swin, unetr)."""
    model = str(run.results.get("model", ""))
    return model.rsplit("-", 1)[-1] if is_probe(run) else model.split("-", 1)[0]


def comparable_group(run: Run) -> str:
    """The figure panel a run belongs to: probes of one kind share a panel (linear with linear),
    fine-tuned models of a task share one."""
    if is_probe(run):
        kind = probe_kind(run).removeprefix("probe-")
        return f"{'kNN' if kind == 'knn' else kind} probe"
    return "fine-tuned models"


def short_name(run: Run) -> str:
    """A name for the headline: probes as ``linear cls`` (+ the baseline's initialisation), other
    models by their name."""
    if not is_probe(run):
        return run.name
    kind, feature = probe_kind(run).removeprefix("probe-"), variant(run)
    if run.results.get("embedding_init") == RAW_INIT:
        return f"{kind}, raw volume {_raw_grid(run.results)}"
    return f"{kind} {feature}" if run.pretrained else f"{kind} {feature}, {initialisation(run)}"


def unique_names(runs: list[Run]) -> list[Run]:
    """Two runs of one task with the same name (e.g. two pretraining configs) get their folder appended."""
    by_task: dict[tuple, list[Run]] = {}
    for r in runs:
        by_task.setdefault((r.task_key, r.name), []).append(r)
    for group in by_task.values():
        if len(group) > 1:
            for r in group:
                r.name = f"{r.name} [{r.dir.parent.name}/{r.dir.name}]"
    return runs


def discover_inputs(paths: Sequence[str | Path]) -> ReportInputs:
    """Find results.json files, pretraining folders and stages.json under each path (a file or a folder,
    searched recursively)."""
    results: dict[Path, None] = {}
    pretrain: list[Path] = []
    stages: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise InputFileNotFound(f"report input not found: {p}")
        if p.is_file():
            if p.name == layout.STAGES:
                stages.append(p)
            elif p.suffix == ".json":
                results[p.resolve()] = None
            else:
                raise InputError(f"report input {p} is neither a results.json, a stages.json nor a folder")
            continue
        results.update((f.resolve(), None) for f in sorted(p.rglob(layout.RESULTS)))
        pretrain += [
            m.parent for m in sorted(p.rglob(PRETRAIN_FILES[0])) if (m.parent / PRETRAIN_FILES[1]).exists()
        ]
        stages += sorted(p.rglob(layout.STAGES), key=lambda s: len(s.parts))
    if not (results or pretrain or stages):
        raise InputError(f"no {layout.RESULTS}, pretraining run (metrics.csv + config.yaml) or {layout.STAGES} found in "
                         + ", ".join(str(p) for p in paths))  # fmt: skip
    runs = []
    for f in results:
        r = load_run(f)
        runs.append(Run(default_name(r), r))
    return ReportInputs(unique_names(runs), pretrain[0] if pretrain else None, stages[0] if stages else None)


def named_inputs(runs: Mapping[str, Sequence[str | Path]]) -> list[Run]:
    """``{model name: [results.json or run folder, ...]}`` (one file per task) -> runs."""
    out = [Run(name, load_run(p)) for name, files in runs.items() for p in files]
    seen: dict[tuple, Path] = {}
    for r in out:
        key = (r.task_key, r.name)
        if key in seen:
            raise InputError(
                f"model '{r.name}' has two results for task {'/'.join(r.task_key)}: {seen[key]} and {r.dir}"
            )
        seen[key] = r.dir
    return out


def task_title(key: tuple[str, str, str]) -> str:
    task, kind, label = key
    if kind == "segmentation":
        return "segmentation" if label in ("label_path", "?") else f"segmentation of {label}"
    how = {"classify": "fine-tuning", "probe": "frozen-feature probes"}.get(task, task)
    return f"{label} ({kind}, {how})"


def better_when_lower(metric: str) -> bool:
    return metric.startswith(LOWER_IS_BETTER)


def pair_runs(group: list[Run], reference: str | None) -> tuple[list[Run], list[tuple[Run, Run]]]:
    """References of a task and the (reference, other) pairs to compare. A baseline meets the
    reference with the same underlying model (e.g. the same probe on random-init features), else
    the first reference by name. The raw-volume floor has no feature of its own to match, so it
    meets every reference fitted with the same probe (each learned feature must clear it)."""
    refs = [r for r in group if r.name == reference] if reference else []
    if not refs:
        refs = sorted((r for r in group if r.pretrained), key=lambda r: r.name)
    if not refs:
        return [], []
    pairs = []
    for other in sorted((r for r in group if r not in refs), key=lambda r: r.name):
        if other.results.get("embedding_init") == RAW_INIT and not reference:
            same = [r for r in refs if probe_kind(r) == probe_kind(other)]
            pairs += [(r, other) for r in same or refs[:1]]
            continue
        same = [r for r in refs if r.results.get("model") == other.results.get("model")]
        pairs.append(((same or refs)[0], other))
    return refs, pairs


def test_subjects(run: Run) -> set[str]:
    """The run's test subjects: from its splits, else from its predictions."""
    folds = run.results.get("splits", {}).get("folds", [])
    subjects = {str(s) for f in folds for s in f.get("test", [])}
    pred = run.results.get("predictions")
    if not subjects and pred is not None and "subject_id" in pred.columns:
        subjects = set(pred["subject_id"].astype(str))
    return subjects


def top_predictions(run: Run) -> pd.DataFrame | None:
    """Out-of-fold predictions at the largest training fraction (the full-data model)."""
    pred = run.results.get("predictions")
    if pred is None or pred.empty:
        return None
    if "fraction" in pred.columns:
        pred = pred[pred["fraction"] == pred["fraction"].max()]
    return pred


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists joined with commas, as the settings tables show them."""
    return {
        k: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
        for k, v in flatten_dict(d, prefix).items()
    }


def read_config(path: Path) -> dict[str, Any]:
    """A run's resolved config.yaml as a dictionary (empty when the file is absent)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]
