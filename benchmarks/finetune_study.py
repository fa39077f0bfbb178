"""The fine-tuning recipe study: each model's fine-tuning settings chosen on the saved selection split, with
the same number of candidates (the same selection budget) for the pretrained ViT and its scratch baselines.

Every candidate is ``volta3d finetune classify`` (tiny-cpu + demo, the demo's epochs) on the subjects of
``volta3d select``'s selection.csv only (the demo never reports on them), on one set of folds made once,
over several seeds (model initialisation and data order); the pretrained ViT starts from an encoder
pretrained with the demo's recipe (``--encoder``, e.g. the scaling script's 1x run). The rule fixed in
advance: per (model, label), the candidate with the best mean over seeds of the primary metric (sex:
AUROC, age: MAE) is chosen; the table shows every candidate's mean +- sd over seeds and its paired
difference from the model's first candidate (``before``: today's settings; SFCN, new: its lowest rate), paired by (seed, fold), with a
bootstrap 95 % CI.

    python benchmarks/finetune_study.py --encoder runs/scaling/x1/chosen/seed-0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from recipe_study import ci_text, publish, volta3d

from volta3d.evaluation.statistics import paired_difference

BEFORE = ["classify.layer_decay=1.0", "classify.head_lr_scale=1.0", "classify.warmup_epochs=0",
          "classify.drop_path=0.0", "classify.lp_epochs=0", "classify.lr=1e-4"]  # fmt: skip
RECIPE = ["classify.warmup_epochs=1", "classify.drop_path=0.1"]
SFCN = ["classify.warmup_epochs=1", "classify.img_size=32"]
# model -> candidate -> overrides; every model gets the same number of candidates
CANDIDATES: dict[str, dict[str, list[str]]] = {
    "volta3d": {
        "before": BEFORE,
        "llrd-lr3e-4": [*RECIPE, "classify.layer_decay=0.75", "classify.lr=3e-4"],
        "llrd-lr3e-4-head10-lpft": [
            *RECIPE,
            "classify.layer_decay=0.75",
            "classify.lr=3e-4",
            "classify.head_lr_scale=10",
            "classify.lp_epochs=2",
        ],  # fmt: skip
    },
    "vit-scratch": {
        "before": BEFORE,
        "lr3e-4": [*RECIPE, "classify.lr=3e-4"],
        "lr1e-3": [*RECIPE, "classify.lr=1e-3"],
    },
    "sfcn": {  # on 32^3 resamples of the 64^3 cache, as in the demo (demo.py)
        "lr3e-4": ["classify.lr=3e-4", *SFCN],
        "lr1e-3": ["classify.lr=1e-3", *SFCN],
        "lr3e-3": ["classify.lr=3e-3", *SFCN],
    },
}
METRICS = {"sex": ("auroc", max), "age": ("mae", min)}
MODEL_LABELS = {"volta3d": ["sex", "age"], "vit-scratch": ["sex", "age"], "sfcn": ["age"]}


def finetune(
    model: str, label: str, overrides: list[str], seed: int, run: Path, args: argparse.Namespace
) -> None:
    if (run / "results.json").exists():
        return
    flags = ["--model", "sfcn" if model == "sfcn" else "vit"]
    flags += ["--encoder", str(args.encoder)] if model == "volta3d" else []
    flags += (
        ["--splits", str(args.output / f"splits-{label}.json")]
        if (args.output / f"splits-{label}.json").exists()
        else []
    )
    volta3d("finetune", "classify", "--config", "tiny-cpu", "--config", "demo", "--data", str(args.selection),
            "--label", label, "--output", str(run), "--no-progress", *flags, f"seed={seed}", "classify.fractions=[1.0]",
            *overrides)  # fmt: skip
    splits = args.output / f"splits-{label}.json"
    if not splits.exists():  # the first run's folds are every later run's
        splits.write_text((run / "splits.json").read_text())


def fold_values(run: Path, label: str) -> np.ndarray:
    results = json.loads((run / "results.json").read_text())
    return np.array([f["metrics"][METRICS[label][0]] for f in results["folds"]], dtype=float)


def summarise(out: Path, models: list[str], seeds: list[int]) -> pd.DataFrame:
    rows = []
    for model in models:
        first = next(iter(CANDIDATES[model]))
        for label in MODEL_LABELS[model]:
            metric, best = METRICS[label]
            digits = 3 if metric == "auroc" else 2
            ref = np.concatenate(
                [fold_values(out / model / label / first / f"seed-{s}", label) for s in seeds]
            )
            means = {}
            for name in CANDIDATES[model]:
                values = [fold_values(out / model / label / name / f"seed-{s}", label) for s in seeds]
                per_seed = [v.mean() for v in values]
                means[name] = float(np.mean(per_seed))
                rows.append({"model": model, "label": label, "candidate": name,
                             metric: f"{np.mean(per_seed):.{digits}f} +- {np.std(per_seed, ddof=1):.{digits}f}",
                             "- first": ci_text(paired_difference(np.concatenate(values), ref), digits)})  # fmt: skip
            chosen = best(means, key=means.__getitem__)
            for row in rows:
                if row["model"] == model and row["label"] == label:
                    row["chosen"] = "yes" if row["candidate"] == chosen else ""
    return pd.DataFrame(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", type=Path, required=True, help="an export pretrained with the demo's recipe")
    p.add_argument("--selection", type=Path, default=Path("runs/study/selection/selection.csv"))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--models", nargs="*", default=list(MODEL_LABELS), choices=list(MODEL_LABELS))
    p.add_argument("--output", type=Path, default=Path("runs/finetune-study"))
    args = p.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        for label in MODEL_LABELS[model]:
            for name, overrides in CANDIDATES[model].items():
                for seed in args.seeds:
                    finetune(
                        model,
                        label,
                        overrides,
                        seed,
                        args.output / model / label / name / f"seed-{seed}",
                        args,
                    )
    publish(summarise(args.output, args.models, args.seeds), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
