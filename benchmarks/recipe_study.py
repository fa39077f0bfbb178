"""The VolTA-3D recipe study, chosen without peeking: every arm over several seeds, judged on a saved
selection split by one probe fixed in advance, with paired CIs.

Each arm is ``volta3d pretrain`` on the bundled scans (tiny-cpu + demo, ``--epochs`` epochs, 2 by default
= 172 steps on IXI + MSD) that differs from today's recipe (``chosen``) by the overrides in ARMS. Every
arm and seed is then judged the same way, on the subjects of ``volta3d select``'s selection.csv only
(never on the subjects the demo reports on):

* the probe fixed in advance: logistic regression (sex, AUROC) and ridge (age, MAE) on the teacher's
  CLS-style summary, regularisation chosen by inner CV on each training fold (``probe.logreg_cs``,
  ``probe.ridge_alphas``), on folds made once for the study; the raw volume pooled to 16^3 gets the same
  probe on the same folds (the floor);
* beside it, never used to rank arms: the same linear probe on the mean patch token and on the flattened
  token grid (``summary-mean.csv``, ``summary-tokens.csv``), and the ``random-init`` reference (the
  chosen arm's architecture untrained, one initialisation per seed, judged whenever ``chosen`` runs);
* representation health from metrics.csv (last 10 steps): L_global / log K, entropy gaps, spread, ranks,
  the alarm, the views' overlap and the teacher's remaining share of its initial weights.

Differences (arm - raw floor, arm - random init, arm - ``chosen``) are paired by (seed, fold), with a bootstrap 95 % CI over
those pairs (``volta3d.evaluation.statistics.paired_difference``). Runs already finished are read back.

    .venv/bin/volta3d select runs/study/prep/ixi --label sex --output runs/study/selection
    python benchmarks/recipe_study.py --prep runs/study/prep --selection runs/study/selection/selection.csv
    python benchmarks/recipe_study.py --arms chosen --epochs 16 --output runs/scaling/x2   # the budget curve
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from volta3d.evaluation.statistics import paired_difference

EDGES_BEFORE = [
    "views.global_edge_scale=[0.737,1.0]",
    "views.local_edge_scale=[0.368,0.737]",
]  # volume 0.4-1 / 0.05-0.4
TEMPS = ("teacher_temp", "warmup_teacher_temp", "teacher_patch_temp", "warmup_teacher_patch_temp")
EMA = ["loss.centering=ema", "head.out_dim=1024"]  # the recipe before this study: DINO's EMA center, K 1024
# arm -> (config files on top of tiny-cpu + demo, overrides, pretrain on MSD too)
ARMS: dict[str, tuple[list[str], list[str], bool]] = {
    "chosen": ([], [], True),
    "ema-centering": ([], EMA, True),
    "ema-centering-dino-momentum": ([], [*EMA, "optim.teacher_max_init_share=1.0"], True),
    "ema-centering-views-before": ([], [*EMA, *EDGES_BEFORE], True),
    "ema-centering-koleo-0.5": ([], [*EMA, "loss.koleo_weight=0.5"], True),
    "ema-centering-temp-0.04": ([], [*EMA, *(f"loss.{k}=0.04" for k in TEMPS)], True),
    "dino-momentum": ([], ["optim.teacher_max_init_share=1.0"], True),
    "views-before": ([], EDGES_BEFORE, True),
    "views-dino": ([], ["views.global_edge_scale=[0.63,1.0]", "views.local_edge_scale=[0.22,0.63]"], True),
    "views-wide": ([], ["views.global_edge_scale=[0.5,1.0]", "views.local_edge_scale=[0.25,0.5]"], True),
    "bias-0.15": ([], ["views.bias_field_coeff=0.15"], True),
    "ixi-only": ([], [], False),
    "patch-8": ([], ["model.patch_size=8"], True),
    "no-koleo": ([], ["loss.koleo_weight=0.0"], True),
    "baseline-mae": (["baseline-mae"], [], True),
    "baseline-dino": (["baseline-dino"], [], True),
    "baseline-ibot": (["baseline-ibot"], [], True),
}
LABELS = {"sex": "auroc", "age": "mae"}
PRIMARY = "cls"  # the feature of the probe fixed in advance (linear, CLS-style summary)
SECONDARY = ("mean", "tokens")  # reported beside it, never used to rank arms
RANDOM = "random-init"  # reference: the chosen arm's architecture, untrained, one init per seed


def volta3d(*argv: str) -> None:
    command = [str(Path(sys.executable).with_name("volta3d")), *argv]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def pretrain(arm: str, seed: int, run: Path, prep: Path, epochs: int, extra: list[str]) -> None:
    configs, overrides, with_msd = ARMS[arm]
    if _finished(run):
        return
    data = ["--data", str(prep / "ixi"), *(["--data", str(prep / "msd")] if with_msd else [])]
    argv = [
        "pretrain",
        "--config",
        "tiny-cpu",
        "--config",
        "demo",
        *[a for c in configs for a in ("--config", c)],
    ]
    volta3d(*argv, *data, "--output", str(run), "--no-progress", f"optim.epochs={epochs}", f"seed={seed}",
            "train.tensorboard=false", *overrides, *extra)  # fmt: skip


def probe(
    embeddings: Path, selection: Path, label: str, splits: Path | None, out: Path, features: str
) -> None:
    if not (out / "summary.json").exists():
        volta3d("probe", "--config", "tiny-cpu", "--config", "demo", "--embeddings", str(embeddings), "--data",
                str(selection), "--label", label, "--output", str(out), *(["--splits", str(splits)] if splits else []),
                "probe.fractions=[1.0]", f"probe.features=[{features}]")  # fmt: skip


def probe_dir(run: Path, label: str, feature: str) -> Path:
    """Where a feature's probe lives: the primary's and the floor's in probe-<label>, the secondary ones
    in probe-<label>-secondary (added later, so earlier runs keep their folders)."""
    return run / f"probe-{label}" if feature in (PRIMARY, "raw") else run / f"probe-{label}-secondary"


def judge(selection: Path, out: Path, floor: Path | None, flags: list[str]) -> None:
    """Embed on the selection subjects with ``flags`` (an export, a random init or the raw volumes) and
    probe every label on the floor's folds (the floor itself makes them), the primary feature first."""
    emb = out / "embeddings.npz"
    if not emb.exists():
        volta3d("embed", "--config", "tiny-cpu", "--config", "demo", *flags, "--data", str(selection), "--output",
                str(emb), "--no-progress")  # fmt: skip
    groups: list[tuple[str, ...]] = [("raw",)] if floor is None else [(PRIMARY,), SECONDARY]
    for label in LABELS:
        splits = floor / f"probe-{label}" / "splits.json" if floor is not None else None
        for group in groups:
            probe(emb, selection, label, splits, probe_dir(out, label, group[0]), ",".join(group))


def fold_values(run: Path, label: str, feature: str) -> np.ndarray:
    """Per-fold metric of the linear probe on ``feature``."""
    results = json.loads((probe_dir(run, label, feature) / f"linear_{feature}" / "results.json").read_text())
    return np.array([f["metrics"][LABELS[label]] for f in results["folds"]], dtype=float)


def _finished(run: Path) -> bool:
    log = run / "log.txt"
    return log.exists() and "finished at step" in log.read_text()


def health(run: Path) -> dict[str, float]:
    """Last-10-step means of the health columns (NaN where a column is absent)."""
    metrics = pd.read_csv(run / "metrics.csv").apply(pd.to_numeric, errors="coerce")
    tail = metrics.tail(10).mean(numeric_only=True)
    columns = ["teacher_entropy_gap", "teacher_patch_entropy_gap", "teacher_cls_spread", "cls_rank", "patch_rank",
               "view_global_overlap", "view_local_in_global"]  # fmt: skip
    out = {c: float(tail.get(c, np.nan)) for c in columns}
    out["L_global/logK"] = float(tail.get("loss_global", np.nan) / metrics["log_k"].iloc[0])
    out["init share"] = (
        float(metrics["teacher_init_share"].iloc[-1]) if "teacher_init_share" in metrics else np.nan
    )
    out["alarm"] = float(metrics["collapse_alarm"].max())
    out["s/step"] = float(metrics["seconds_per_step"].median())
    out["pretrain s"] = float(metrics["seconds_per_step"].sum())
    return out


def ci_text(d: dict[str, float], digits: int) -> str:
    return f"{d['estimate']:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]"


def pooled(out: Path, arm: str, seeds: list[int], label: str, feature: str) -> list[np.ndarray]:
    return [fold_values(out / arm / f"seed-{s}", label, feature) for s in seeds]


def judged(arm_dir: Path, seeds: list[int], feature: str) -> bool:
    """Whether every seed of an arm has the linear probe on ``feature`` for every label."""
    return all((probe_dir(arm_dir / f"seed-{s}", label, feature) / f"linear_{feature}" / "results.json").exists()
               for s in seeds for label in LABELS)  # fmt: skip


def score_row(
    out: Path, arm: str, seeds: list[int], feature: str, references: dict[str, dict[str, np.ndarray]]
) -> dict:
    """Mean +- sd over seeds of each label's metric, and its paired CI against every reference but itself."""
    row: dict[str, object] = {"arm": arm, "feature": feature, "seeds": len(seeds)}
    for label, metric in LABELS.items():
        digits = 3 if metric == "auroc" else 2
        values = pooled(out, arm, seeds, label, feature)
        per_seed = [v.mean() for v in values]
        # no standard deviation of a single seed
        spread = f" +- {np.std(per_seed, ddof=1):.{digits}f}" if len(per_seed) > 1 else ""
        row[f"{label} {metric}"] = f"{np.mean(per_seed):.{digits}f}{spread}"
        for name, reference in references.items():
            if name != arm:
                row[f"{label} - {name}"] = ci_text(
                    paired_difference(np.concatenate(values).tolist(), list(reference[label])), digits
                )
    return row


def summarise(out: Path, arms: list[str], seeds: list[int], feature: str = PRIMARY) -> pd.DataFrame:
    """One row per arm (and the random init, where judged): the linear probe on ``feature`` against the raw
    floor, the random init and ``chosen`` (paired by seed and fold); representation health for the primary."""
    references = {
        "raw": {label: np.tile(fold_values(out / "raw-floor", label, "raw"), len(seeds)) for label in LABELS}
    }
    for name in [a for a in ("chosen", RANDOM) if judged(out / a, seeds, feature)]:
        references[name] = {
            label: np.concatenate(pooled(out, name, seeds, label, feature)) for label in LABELS
        }
    rows = []
    for arm in [*arms, *([RANDOM] if RANDOM in references else [])]:
        row = score_row(out, arm, seeds, feature, references)
        if feature == PRIMARY and arm != RANDOM:
            seed_health = pd.DataFrame([health(out / arm / f"seed-{s}") for s in seeds]).mean()
            row.update({k: round(float(v), 3) for k, v in seed_health.items()})
        rows.append(row)
    table = pd.DataFrame(rows)
    keys = ["arm", "feature", "seeds"]
    scores = [c for label in LABELS for c in table.columns if c.startswith(f"{label} ")]
    return table[[*keys, *scores, *[c for c in table.columns if c not in {*keys, *scores}]]]


def markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join("–" if pd.isna(v) else str(v) for v in row) + " |"
              for row in table.itertuples(index=False)]  # fmt: skip
    return "\n".join(lines)


def publish(table: pd.DataFrame, out: Path, name: str) -> None:
    """Print a table of the study (Markdown) and keep it as ``out/name``."""
    print(f"\n{name}:\n{markdown(table)}")
    table.to_csv(out / name, index=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--arms", nargs="*", default=list(ARMS), choices=list(ARMS), help="arms to run (default: all)"
    )
    p.add_argument(
        "--seeds", nargs="*", type=int, default=[0, 1, 2], help="pretraining seeds per arm (0 1 2)"
    )
    p.add_argument("--epochs", type=int, default=2, help="epochs per arm, the whole schedule (2 = 172 steps)")
    p.add_argument(
        "--prep", type=Path, default=Path("runs/study/prep"), help="folder with the ixi/ and msd/ caches"
    )
    p.add_argument("--selection", type=Path, default=Path("runs/study/selection/selection.csv"),
                   help="selection.csv of `volta3d select` (the only labelled subjects the study sees)")  # fmt: skip
    p.add_argument("--output", type=Path, default=Path("runs/recipe-study"))
    p.add_argument("overrides", nargs="*", help="extra overrides applied to every arm")
    args = p.parse_args()
    floor = args.output / "raw-floor"
    judge(args.selection, floor, None, ["--raw-volume"])
    for arm in args.arms:
        for seed in args.seeds:
            run = args.output / arm / f"seed-{seed}"
            pretrain(arm, seed, run, args.prep, args.epochs, args.overrides)
            judge(args.selection, run, floor, ["--encoder", str(run)])
            if arm == "chosen":
                judge(args.selection, args.output / RANDOM / f"seed-{seed}", floor,
                      ["--encoder", str(run), "--random-init", f"seed={seed}"])  # fmt: skip
    publish(summarise(args.output, args.arms, args.seeds), args.output, "summary.csv")
    for feature in SECONDARY:
        publish(summarise(args.output, args.arms, args.seeds, feature), args.output, f"summary-{feature}.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
