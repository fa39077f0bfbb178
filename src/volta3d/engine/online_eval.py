"""Online evaluation while pretraining: frozen-feature probes of the teacher and the student on a small
labelled set (best a saved selection split: ``volta3d select``).

Every ``eval.every`` steps the teacher and the student embed the labelled volumes (``eval.features``: CLS-style
summary, mean patch token and/or the token grid, exactly as ``volta3d embed`` does) and linear / kNN probes are cross-validated on fixed,
subject-grouped folds (exactly as ``volta3d probe`` does). The same probes of the initial weights and
of the raw volume (z-scored, average-pooled to ``raw_grid``^3) are logged once as references: a
representation that does not beat the raw pixels has learnt nothing a linear model could not read
off the volume. Choose checkpoints and recipes by this curve, never by the downstream test folds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from volta3d import layout
from volta3d.config import to_kwargs
from volta3d.data.dataset import VolumeDataset, read_manifest
from volta3d.engine.meta_arch import Student
from volta3d.errors import InputError
from volta3d.models.encoder import VolTAEncoder
from volta3d.models.summariser import CLSSummariser
from volta3d.protocol.embeddings import embedding_rows, extract_embeddings, extract_raw_embeddings
from volta3d.protocol.labels import LabelSet, label_kfold_splits, prepare_labels
from volta3d.protocol.probes import PROBE_SETTINGS, run_probe
from volta3d.protocol.splits import load_splits, save_splits
from volta3d.runtime import MetricsCSV

PROBES = ("linear", "knn")


@dataclass
class ProbeTask:
    """One label to probe: targets, the dataset rows they belong to, and the fixed folds."""

    labels: LabelSet
    rows: np.ndarray  # index into the embeddings (dataset order) of each labels.table row
    splits: dict[str, Any]


class OnlineProbe:
    """Builds the labelled set and its folds once; ``evaluate`` returns long-format metric rows. The
    keyword arguments are the ``eval:`` and ``probe:`` config values (``online_evaluation`` passes them)."""

    def __init__(
        self, data: str | Path, labels: Sequence[str], splits_dir: Path, *, n_splits: int, raw_grid: int,
        max_volumes: int, seed: int, batch_size: int, probe_kwargs: Mapping[str, Any], features: Sequence[str],
    ) -> None:  # fmt: skip
        if not labels:
            raise InputError(
                "eval.labels is empty: name at least one manifest column to probe (--eval-label)"
            )
        table = read_manifest(data)
        if max_volumes > 0:
            table = table.head(max_volumes)
        self.dataset = VolumeDataset(table.reset_index(drop=True))
        self.batch_size, self.raw_grid, self.seed = batch_size, raw_grid, seed
        self.probe_kwargs = dict(probe_kwargs)
        self.features = [f for f in features if f in ("cls", "mean", "tokens")]
        self.tasks = {name: self._task(name, splits_dir, n_splits) for name in labels}

    def _task(self, label: str, splits_dir: Path, n_splits: int) -> ProbeTask:
        labels = prepare_labels(self.dataset.table, label)
        rows = embedding_rows(
            self.dataset.table["path"].tolist(), labels.table["path"].tolist(), "the online set"
        )
        path = splits_dir / f"{label}.json"
        if path.exists():  # a resumed run keeps its folds
            splits = load_splits(path)
        else:
            splits = label_kfold_splits(labels, n_splits, self.seed)
            save_splits(splits, path)
        return ProbeTask(labels, rows, splits)

    @torch.no_grad()
    def evaluate(
        self,
        step: int,
        source: str,
        encoder: VolTAEncoder,
        summariser: CLSSummariser | None,
        device: torch.device,
    ) -> list[dict[str, Any]]:
        """Probe an encoder's frozen features (restores its train/eval mode afterwards)."""
        modes = [(m, m.training) for m in (encoder, summariser) if m is not None]
        emb = extract_embeddings(encoder, summariser, self.dataset, self.batch_size, device, progress=False,
                                 tokens="tokens" in self.features)  # fmt: skip
        for module, was_training in modes:
            module.train(was_training)
        return self._probe_all(step, source, {k: emb[k] for k in self.features if k in emb})

    def evaluate_raw(self) -> list[dict[str, Any]]:
        """The raw-volume floor (step 0)."""
        emb = extract_raw_embeddings(self.dataset, self.raw_grid, self.batch_size, progress=False)
        return self._probe_all(0, "raw", {"raw": emb["raw"]})

    def _probe_all(self, step: int, source: str, features: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        out = []
        for label, task in self.tasks.items():
            for feature, values in features.items():
                for probe in PROBES:
                    # each fold's whole training side (no reduced-data curve online)
                    results, _ = run_probe(values[task.rows], task.labels, task.splits, probe, feature_name=feature,
                                           encoder=None, seed=self.seed, fractions=(1.0,),
                                           **self.probe_kwargs)  # fmt: skip
                    metric = results["primary_metric"]
                    out.append({"step": step, "label": label, "source": source, "feature": feature, "probe": probe,
                                "metric": metric, "value": results["aggregate"][metric]["mean"]})  # fmt: skip
        return out


def summarise_online(rows: Sequence[Mapping[str, Any]]) -> str:
    """One log line: the best probe per label and source, e.g. ``sex auroc teacher 0.91 / init 0.85 / raw 0.97``."""
    frame = pd.DataFrame(rows)
    parts = []
    for (label, metric), group in frame.groupby(["label", "metric"], sort=False):
        best = (
            group.groupby("source")["value"].min()
            if metric == "mae"
            else group.groupby("source")["value"].max()
        )
        parts.append(f"{label} {metric} " + " / ".join(f"{s} {v:.3f}" for s, v in best.items()))
    return "; ".join(parts)


class OnlineEvaluation:
    """Runs the online probe during training and appends its rows to online_eval.csv."""

    def __init__(self, probe: OnlineProbe, csv: MetricsCSV, logger: Any) -> None:
        self.probe, self.csv, self.logger = probe, csv, logger
        self.references = [
            {**r, "value": float(r["value"])} for r in csv.read() if r["source"] in ("init", "raw")
        ]

    def start(self, teacher: Student, device: torch.device) -> None:
        """Step 0 of a fresh run: the initial weights and the raw volume, the two references."""
        with torch.random.fork_rng(devices=[]):  # evaluating must not change the training's random stream
            rows = self.probe.evaluate(0, "init", teacher.encoder, teacher.summariser, device)
            rows += self.probe.evaluate_raw()
        for r in rows:
            self.csv.write(r)
        self.references = rows
        self.logger.info("online probe at step 0: %s", summarise_online(rows))

    def run(self, step: int, networks: Mapping[str, Student], device: torch.device) -> None:
        """Probe each network (``{"teacher": ..., "student": ...}``: the student shows what the EMA lags)."""
        rows = []
        with torch.random.fork_rng(devices=[]):
            for source, net in networks.items():
                rows += self.probe.evaluate(step, source, net.encoder, net.summariser, device)
        for r in rows:
            self.csv.write(r)
        self.logger.info("online probe at step %d: %s", step, summarise_online(rows + self.references))


def online_evaluation(
    cfg: DictConfig, out: Path, step: int, teacher: Student, device: torch.device, logger: Any
) -> OnlineEvaluation | None:
    """The run's online evaluation from the ``eval:`` and ``probe:`` sections (None without ``eval.data``);
    a fresh run (step 0) logs the two references first, a resumed one reads them back."""
    if not cfg.eval.data:
        return None
    pc = cfg.probe
    probe = OnlineProbe(
        cfg.eval.data, list(cfg.eval.labels), out / "online_eval_splits", n_splits=cfg.eval.n_splits,
        raw_grid=cfg.eval.raw_grid, max_volumes=cfg.eval.max_volumes, seed=cfg.seed, batch_size=pc.batch_size,
        probe_kwargs={k: v for k, v in to_kwargs(pc).items() if k in PROBE_SETTINGS},
        features=list(cfg.eval.features),
    )  # fmt: skip
    evaluation = OnlineEvaluation(probe, MetricsCSV(out / layout.ONLINE_EVAL, keep_until_step=step), logger)
    if step == 0:
        evaluation.start(teacher, device)
    return evaluation
