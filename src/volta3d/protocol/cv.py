"""The cross-validation loop every downstream task shares, and the ``results.json`` layout it writes.

A run is a list of :class:`Fold` work items, one per (fold, training fraction) of a splits file
(paper II-C: subject-grouped k-fold CV or hold-out; III-B: nested training fractions). For each,
:func:`run_folds` skips a fold that an earlier run finished (``folds/<key>.json``), seeds Python,
NumPy and torch with the fold's seed, calls the task's ``fit_fold(fold) -> payload`` and saves the
payload; :class:`RunResults` then assembles ``results.json``. A task supplies only ``fit_fold``.

A fold payload holds ``fold``, ``n_train``, ``n_test``, ``metrics`` ({name: value}), ``predictions``
(one dict per test scan, the rows of ``predictions.csv``) and task-specific counts (classification:
``fraction``, ``n_threshold``, ``threshold_subjects``, ``final_loss``, ``standardisation``;
segmentation: ``n_val``, ``best_epoch``).

``results.json`` (:meth:`RunResults.to_dict`):

- ``task`` (classify | segment | probe), ``kind`` (binary | multiclass | regression | segmentation),
  ``label``, ``classes``, ``model`` (e.g. ``vit-pretrained``), ``encoder`` (export folder or null),
  ``seed``, ``primary_metric`` (auroc | mae | dice), ``config`` (the resolved configuration),
  ``splits`` (the folds' subjects);
- ``folds``: the payloads of the largest training fraction without their ``predictions``, by fold;
  ``aggregate``: mean / SD / n of each metric over them;
- ``fractions`` (a reduced-data curve only): ``{"0.2": {"folds", "aggregate"}, ...}``;
- the task's own keys (``extra``): ``architecture`` (the sizes that must match for a fair comparison;
  ``compare`` warns when they differ) and ``test`` ({"external": bool, "data": the --test-data folder
  or null}); classification and probes ``dropped_rows``; classification ``mode`` (the training mode
  applied; scratch baselines always train fully), ``positive_class`` and ``youden_fit`` (binary: where
  the Youden threshold was fitted); segmentation ``flip_label_pairs``; probes (added by
  ``volta3d probe``) ``embedding_init``, ``encoder_provenance``, ``embedding_grid``.

``predictions.csv`` holds every payload's ``predictions`` rows (classification: y_true, score(s),
prediction; binary: ``score`` is the probability of ``positive_class``; segmentation: per-structure
Dice / HD95). The other files of a run folder are listed in :mod:`volta3d.protocol.results`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from volta3d.protocol.labels import LabelSet
from volta3d.protocol.metrics import aggregate
from volta3d.protocol.results import FoldStore, save_run
from volta3d.protocol.splits import fold_row_indices, nested_subsets
from volta3d.runtime import get_logger, seed_everything


@dataclass(frozen=True)
class Fold:
    """One unit of work: the rows a fold trains on (``train``, at ``fraction`` of its training side)
    and tests on, the seed it runs with and the ``key`` its finished payload is stored under."""

    key: str
    index: int
    fraction: float
    train: np.ndarray
    test: np.ndarray
    seed: int


FitFold = Callable[[Fold], dict[str, Any]]


def plan_folds(
    splits: dict[str, Any],
    subjects: Sequence[str] | np.ndarray,
    *,
    seed: int,
    fractions: Sequence[float] | None = None,
    strata: np.ndarray | None = None,
) -> list[Fold]:
    """The work items of ``splits`` over manifest rows with these ``subjects``: one per fold (key
    ``fold<k>``) or, with ``fractions``, one per fold and nested stratified fraction of its training
    side (key ``fraction<f>_fold<k>``, paper III-B); fold ``k`` runs with seed ``seed + k``."""
    ids = np.asarray([str(s) for s in subjects])
    plan = []
    for k, (train_all, test) in enumerate(fold_row_indices(splits, ids.tolist())):
        if fractions is None:
            plan.append(Fold(f"fold{k}", k, 1.0, train_all, test, seed + k))
            continue
        subsets = nested_subsets(
            ids[train_all], None if strata is None else strata[train_all], fractions, seed=seed + k
        )
        for frac, chosen in subsets.items():
            train = train_all[np.isin(ids[train_all], chosen)]
            plan.append(Fold(f"fraction{frac:.2f}_fold{k}", k, frac, train, test, seed + k))
    return plan


def run_folds(
    plan: Sequence[Fold], fit_fold: FitFold, *, out_dir: str | Path | None = None, reseed: bool = True
) -> dict[float, list[dict[str, Any]]]:
    """Run ``fit_fold`` on every fold of ``plan``; return the payloads by training fraction.

    With ``out_dir``, a fold finished by an earlier run is read back from ``folds/<key>.json``
    instead of being redone, and each new payload is saved there as soon as it exists, so an
    interrupted run resumes. ``reseed`` seeds every library with the fold's seed first, so a fold's
    result does not depend on which folds ran before it in this process (the probes, which run
    inside pretraining's online evaluation, pass False to leave the training RNG alone).
    """
    log = get_logger()
    store = FoldStore(out_dir) if out_dir is not None else None
    per_fraction: dict[float, list[dict[str, Any]]] = {}
    for fold in plan:
        if store is not None and store.has(fold.key):
            log.info(f"{fold.key}: finished in an earlier run, skipped")
            payload = store.load(fold.key)
        else:
            if reseed:
                seed_everything(fold.seed)
            payload = fit_fold(fold)
            if store is not None:
                store.save(fold.key, payload)
        per_fraction.setdefault(fold.fraction, []).append(payload)
    return per_fraction


def _summary(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """``folds`` (by fold, without predictions) and their ``aggregate``: one block of results.json."""
    folds = sorted(folds, key=lambda f: f["fold"])
    slim = [{k: v for k, v in f.items() if k != "predictions"} for f in folds]
    return {"folds": slim, "aggregate": aggregate([f["metrics"] for f in folds])}


@dataclass
class RunResults:
    """A run's ``results.json`` (layout in this module's docstring) and ``predictions.csv``."""

    task: str
    kind: str
    label: str
    classes: list[Any]
    model: str
    encoder: str | Path | None
    seed: int
    primary_metric: str
    config: dict[str, Any] | None
    splits: dict[str, Any]
    per_fraction: dict[float, list[dict[str, Any]]]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The results dictionary; the top level describes the largest training fraction."""
        results: dict[str, Any] = {
            "task": self.task, "kind": self.kind, "label": self.label, "classes": self.classes,
            "model": self.model, "encoder": str(self.encoder) if self.encoder else None, "seed": self.seed,
            "primary_metric": self.primary_metric, "config": self.config or {}, "splits": self.splits,
            **_summary(self.per_fraction[max(self.per_fraction)]),
        }  # fmt: skip
        if len(self.per_fraction) > 1:
            results["fractions"] = {f"{f:g}": _summary(v) for f, v in sorted(self.per_fraction.items())}
        return {**results, **self.extra}

    def predictions(self) -> pd.DataFrame:
        """Every fold's prediction rows, in the order the folds ran."""
        return pd.DataFrame(
            [r for folds in self.per_fraction.values() for f in folds for r in f["predictions"]]
        )

    def save(self, out_dir: str | Path) -> dict[str, Any]:
        """Write results.json and predictions.csv into ``out_dir``; return the results dictionary."""
        results = self.to_dict()
        save_run(out_dir, results, self.predictions())
        return results


def label_results(
    labels: LabelSet,
    per_fraction: dict[float, list[dict[str, Any]]],
    *,
    task: str,
    model: str,
    encoder: str | Path | None,
    seed: int,
    config: dict[str, Any] | None,
    splits: dict[str, Any],
    **extra: Any,
) -> RunResults:
    """The results of a run that predicts a manifest label column (classification or a probe)."""
    return RunResults(
        task=task,
        kind=labels.kind,
        label=labels.column,
        classes=labels.classes,
        model=model,
        encoder=encoder,
        seed=seed,
        primary_metric="mae" if labels.kind == "regression" else "auroc",
        config=config,
        splits=splits,
        per_fraction=per_fraction,
        extra={"dropped_rows": labels.dropped, **extra},
    )
