"""The VolTA-3D recipe study: every remedy for representation collapse, trained for the same budget.

Each arm is one ``volta3d pretrain`` run on the bundled scans (tiny-cpu + demo, the same schedule of
``--epochs`` epochs, 2 by default, the online probe on the IXI sex and age labels) that differs from the current recipe
by the overrides listed in ARMS. The table compares what each arm learns, not its total loss: the
alignment losses against log K, the teacher's entropy gap, the cross-volume cosine of the CLS-style
embeddings, effective ranks, the collapse alarm, and the online probe of the teacher against the
initial weights and the raw volume. Arms already finished are read back, not re-run.

    python benchmarks/recipe_study.py                       # after `bash scripts/demo.sh` (or its prep stage)
    python benchmarks/recipe_study.py --arms current koleo --epochs 2 --output runs/recipe-study
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd

# The recipe before the study (what tiny-cpu.yaml said then), restored on top of today's tiny-cpu + demo,
# so every single-remedy arm below changes one thing against it.
BEFORE = ["loss.koleo_weight=0.0", "views.flip_axes=[0,1,2]", "loss.teacher_patch_temp=0.07",
          "loss.warmup_teacher_patch_temp=0.04"]  # fmt: skip
TEMP_001 = ["loss.teacher_patch_temp=0.01", "loss.warmup_teacher_patch_temp=0.01"]
# arm -> (config files on top of tiny-cpu + demo, overrides)
ARMS: dict[str, tuple[list[str], list[str]]] = {
    "current": ([], BEFORE),
    "koleo": ([], [*BEFORE, "loss.koleo_weight=0.1"]),
    "sinkhorn-k256": ([], [*BEFORE, "loss.centering=sinkhorn", "head.out_dim=256"]),
    "lr-sqrt-warmup1": ([], [*BEFORE, "optim.lr=4e-3", "optim.lr_scaling=sqrt", "optim.warmup_epochs=1"]),
    "momentum-0.9995": ([], [*BEFORE, "optim.momentum_teacher=0.9995"]),
    "flip-lr-only": ([], [*BEFORE, "views.flip_axes=[0]"]),
    "one-temp-0.01": ([], [*BEFORE, *TEMP_001]),
    "gmml-random-blocks": ([], [*BEFORE, "masking.block_shape=random"]),
    "k256": ([], [*BEFORE, "head.out_dim=256"]),
    # combinations of the remedies that helped alone; "combo" won and is today's tiny-cpu recipe
    "combo": ([], []),
    "combo-k256": ([], ["head.out_dim=256"]),
    "combo-koleo0.5": ([], ["loss.koleo_weight=0.5"]),
    "combo-sinkhorn": ([], ["loss.centering=sinkhorn", "head.out_dim=256"]),
    "baseline-mae": (["baseline-mae"], []),
    "baseline-dino": (["baseline-dino"], []),
    "baseline-ibot": (["baseline-ibot"], []),
}


def run_arm(name: str, out: Path, prep: Path, epochs: int, extra: list[str]) -> None:
    configs, overrides = ARMS[name]
    volta3d = Path(sys.executable).with_name("volta3d")  # the command installed beside this interpreter
    argv = [str(volta3d), "pretrain", "--config", "tiny-cpu", "--config", "demo"]
    for c in configs:
        argv += ["--config", c]
    argv += ["--data", str(prep / "ixi"), "--data", str(prep / "msd"), "--output", str(out / name), "--no-progress",
             "--eval-data", str(prep / "ixi"), "--eval-label", "sex", "--eval-label", "age",
             f"optim.epochs={epochs}", *overrides, *extra]  # fmt: skip
    print("$", " ".join(argv[1:]), flush=True)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def _trend(metrics: pd.DataFrame, key: str) -> str:
    if key not in metrics or metrics[key].isna().all():
        return "-"
    values = metrics[key].dropna()
    return f"{values.head(10).mean():.2f} -> {values.tail(10).mean():.2f}"


def _last(metrics: pd.DataFrame, key: str, digits: int = 2) -> str:
    if key not in metrics or metrics[key].isna().all():
        return "-"
    return f"{metrics[key].dropna().tail(10).mean():.{digits}f}"


def _probe(online: pd.DataFrame, label: str, features: tuple[str, ...], sources: tuple[str, ...]) -> str:
    """Best of the linear and kNN probes on ``features`` (the same optimistic choice for every arm) of
    the final teacher, the initial weights and, for the pooled features, the raw volume."""
    rows = online[(online["label"] == label) & online["feature"].isin([*features, "raw"])]
    if rows.empty:
        return "-"
    lower = rows["metric"].iloc[0] == "mae"
    final = rows[(rows["source"] != "teacher") | (rows["step"] == rows["step"].max())]
    best = final.groupby("source")["value"].min() if lower else final.groupby("source")["value"].max()
    return " / ".join(f"{best.get(s, math.nan):.3f}" for s in sources)


POOLED, TOKENS = ("cls", "mean"), ("tokens",)


def summarise(out: Path, names: list[str]) -> pd.DataFrame:
    table = []
    for name in names:
        run = out / name
        metrics = pd.read_csv(run / "metrics.csv").apply(pd.to_numeric, errors="coerce")
        online = pd.read_csv(run / "online_eval.csv")
        alarm = metrics.loc[metrics["collapse_alarm"] == 1, "step"]
        table.append({
            "arm": name, "log K": f"{metrics['log_k'].iloc[0]:.2f}",
            "L_global": _trend(metrics, "loss_global"), "L_local": _trend(metrics, "loss_local"),
            "L_rec": _trend(metrics, "loss_rec"), "CLS gap": _last(metrics, "teacher_entropy_gap"),
            "patch gap": _last(metrics, "teacher_patch_entropy_gap"),
            "student cos": _last(metrics, "student_cls_cosine", 3), "teacher cos": _last(metrics, "teacher_cls_cosine", 3),
            "CLS rank": _last(metrics, "cls_rank", 1), "patch rank": _last(metrics, "patch_rank", 1),
            "alarm": f"step {int(alarm.iloc[0])}" if len(alarm) else "no",
            "sex AUROC t/i/r": _probe(online, "sex", POOLED, ("teacher", "init", "raw")),
            "age MAE t/i/r": _probe(online, "age", POOLED, ("teacher", "init", "raw")),
            "sex AUROC tokens t/i": _probe(online, "sex", TOKENS, ("teacher", "init")),
            "age MAE tokens t/i": _probe(online, "age", TOKENS, ("teacher", "init")),
        })  # fmt: skip
    return pd.DataFrame(table)


def markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--arms", nargs="*", default=list(ARMS), choices=list(ARMS), help="arms to run (default: all)"
    )
    p.add_argument("--epochs", type=int, default=2, help="epochs per arm, the whole schedule (2 = 172 steps)")
    p.add_argument(
        "--prep", type=Path, default=Path("runs/demo/prep"), help="folder with the ixi/ and msd/ caches"
    )
    p.add_argument("--output", type=Path, default=Path("runs/recipe-study"))
    p.add_argument("overrides", nargs="*", help="extra overrides applied to every arm (e.g. eval.every=43)")
    args = p.parse_args()
    for name in args.arms:
        if not (args.output / name / "online_eval.csv").exists() or not _finished(args.output / name):
            run_arm(name, args.output, args.prep, args.epochs, args.overrides)
    table = summarise(args.output, args.arms)
    print(markdown(table))
    table.to_csv(args.output / "summary.csv", index=False)
    return 0


def _finished(run: Path) -> bool:
    return "finished at step" in (run / "log.txt").read_text()


if __name__ == "__main__":
    raise SystemExit(main())
