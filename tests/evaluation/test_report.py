"""``volta3d report`` on tiny fake runs written here: two binary classifiers on the same 3-fold
splits (one with a reduced-data curve), two segmentation runs (one with saved predictions over
real .npy volumes and masks), a pretraining metrics.csv + config.yaml and a stages.json; the
``study`` fixture adds frozen-feature probes (sex and age; VolTA-3D, random-init and raw-volume
features) so that the headline holds both groups and a lower-is-better metric."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from tests.evaluation.browser import CHROMIUM, FIRST_SCREEN_IDS, HEIGHT, WIDTH, first_screen
from volta3d.cli import main
from volta3d.evaluation import report_plots
from volta3d.evaluation.comparison import compare_results
from volta3d.evaluation.report import Run, build_report, pair_runs
from volta3d.evaluation.report_headline import headline_reference, paired_evidence, verdict

REPO = Path(__file__).resolve().parents[2]
N_BOOT = 100
SUBJECTS = [f"s{i:02d}" for i in range(24)]
SPLITS = {
    "method": "stratified_group_kfold",
    "n_splits": 3,
    "seed": 0,
    "folds": [
        {
            "test": SUBJECTS[k * 8 : (k + 1) * 8],
            "train": [s for s in SUBJECTS if s not in SUBJECTS[k * 8 : (k + 1) * 8]],
        }
        for k in range(3)
    ],
}


def _agg(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "n": len(v)}


def _aggregate(folds: list[dict]) -> dict:
    return {m: _agg([f["metrics"][m] for f in folds]) for m in folds[0]["metrics"]}


def write_classifier(
    run: Path, *, pretrained: bool, noise: float, seed: int, fractions=(1.0,), splits=SPLITS
) -> Path:
    """A binary classification run: scores = class +- noise, metrics computed from them per fold."""
    rng = np.random.default_rng(seed)
    rows, per_fraction = [], {}
    for frac in fractions:
        folds = []
        for k, fold in enumerate(splits["folds"]):
            y = np.array([int(s[1:]) % 2 for s in fold["test"]])
            score = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, noise / frac, len(y)), 0, 1)
            folds.append(
                {
                    "fold": k,
                    "fraction": frac,
                    "n_train": 16,
                    "n_test": 8,
                    "metrics": {
                        "auroc": float(roc_auc_score(y, score)),
                        "balanced_accuracy": float(
                            np.mean([((score >= 0.5) == y)[y == c].mean() for c in (0, 1)])
                        ),
                        "youden_threshold": 0.5,
                    },
                }
            )
            rows += [
                {
                    "subject_id": s,
                    "fold": k,
                    "fraction": frac,
                    "y_true": int(t),
                    "label": "FM"[t],
                    "score": float(p),
                    "prediction": "FM"[int(p >= 0.5)],
                }
                for s, t, p in zip(fold["test"], y, score, strict=True)
            ]
        per_fraction[frac] = folds
    top = max(per_fraction)
    results = {
        "task": "classify",
        "kind": "binary",
        "label": "sex",
        "classes": ["F", "M"],
        "model": f"vit-{'pretrained' if pretrained else 'scratch'}",
        "encoder": "/runs/pretrain" if pretrained else None,
        "seed": 0,
        "primary_metric": "auroc",
        "config": {"classify": {"epochs": 3, "lr": 1e-4, "batch_size": 2, "mode": "full"}},
        "splits": splits,
        "folds": per_fraction[top],
        "aggregate": _aggregate(per_fraction[top]),
    }
    if len(per_fraction) > 1:
        results["fractions"] = {
            f"{f:g}": {"folds": v, "aggregate": _aggregate(v)} for f, v in per_fraction.items()
        }
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    pd.DataFrame(rows).to_csv(run / "predictions.csv", index=False)
    return run


def _ball(size: int, center, radius: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1)
    return np.linalg.norm(grid - np.asarray(center), axis=-1) <= radius


def write_segmenter(
    run: Path, data: Path, *, pretrained: bool, dice: list[float], save_predictions: bool
) -> Path:
    """A hold-out segmentation run over 3 test subjects; with ``save_predictions`` the predicted
    masks (a shifted ball) are saved with predictions/index.csv, as ``run_segmentation`` does."""
    test = ["s00", "s01", "s02"]
    splits = {"method": "holdout", "n_splits": 1, "folds": [{"test": test, "train": SUBJECTS[3:]}]}
    rows, index = [], []
    for i, (s, d) in enumerate(zip(test, dice, strict=True)):
        rows.append(
            {
                "subject_id": s,
                "dice_label1": d,
                "hd95_label1": 2.0 + i,
                "dice_mean": d,
                "hd95_mean": 2.0 + i,
                "fold": 0,
            }
        )
        if save_predictions:
            img, lab = data / f"img_{s}.npy", data / f"lab_{s}.npy"
            if not img.exists():
                data.mkdir(parents=True, exist_ok=True)
                ball = _ball(24, (12, 11, 10 + i), 4)
                np.save(img, (0.3 + 0.5 * ball[None]).astype(np.float16))  # (1, D, H, W) in [0, 1]
                np.save(lab, ball[None].astype(np.uint8))
            (run / "predictions").mkdir(parents=True, exist_ok=True)
            np.save(run / "predictions" / f"{s}.npy", _ball(24, (13, 11, 10 + i), 4).astype(np.uint8))
            index.append(
                {"subject_id": s, "fold": 0, "image": str(img), "label": str(lab), "prediction": f"{s}.npy"}
            )
    metrics = {
        "dice": float(np.mean(dice)),
        "hd95": 3.0,
        "dice_label1": float(np.mean(dice)),
        "hd95_label1": 3.0,
    }
    results = {
        "task": "segment",
        "kind": "segmentation",
        "label": "label_path",
        "classes": [0, 1],
        "model": f"{'unetr-pretrained' if pretrained else 'unet-scratch'}",
        "encoder": "/runs/pretrain" if pretrained else None,
        "seed": 0,
        "primary_metric": "dice",
        "config": {"segment": {"epochs": 2, "crop_size": 16}},
        "splits": splits,
        "folds": [{"fold": 0, "n_test": 3, "metrics": metrics}],
        "aggregate": {m: {"mean": v, "sd": None, "n": 1} for m, v in metrics.items()},
    }
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps(results))
    pd.DataFrame(rows).to_csv(run / "predictions.csv", index=False)
    if index:
        pd.DataFrame(index).to_csv(run / "predictions" / "index.csv", index=False)
    return run


def write_pretraining(run: Path) -> Path:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        "seed: 0\nmodel:\n  img_size: 32\n  hidden_size: 48\nhead:\n  out_dim: 64\n"
        "optim:\n  epochs: 2\n  lr: 0.0005\n"
    )
    steps = np.arange(1, 21)
    pd.DataFrame(
        {
            "step": steps,
            "epoch": steps // 10,
            "loss": 30 / steps,
            "loss_global": 4.0 - 0.05 * steps,
            "loss_local": 4.1 - 0.04 * steps,
            "loss_rec": 20 / steps,
            "lr": 5e-4 * np.minimum(1, steps / 5),
            "teacher_entropy": 3.5 - 0.05 * steps,
            "teacher_marginal_entropy": np.full(20, 4.0),
            "teacher_patch_entropy": 3.6 - 0.04 * steps,
            "grad_norm": 1.0 / np.sqrt(steps),
            "seconds_per_step": np.full(20, 0.2),
        }
    ).to_csv(run / "metrics.csv", index=False)
    return run


@pytest.fixture
def demo(tmp_path) -> Path:
    """A demo-like folder: runs/, pretrain/ and stages.json."""
    root = tmp_path / "demo"
    write_classifier(root / "runs" / "sex_volta", pretrained=True, noise=0.15, seed=1, fractions=(0.5, 1.0))
    write_classifier(root / "runs" / "sex_scratch", pretrained=False, noise=0.6, seed=2)
    write_segmenter(
        root / "runs" / "seg_volta",
        root / "data",
        pretrained=True,
        dice=[0.6, 0.8, 0.7],
        save_predictions=True,
    )
    write_segmenter(
        root / "runs" / "seg_scratch",
        root / "data",
        pretrained=False,
        dice=[0.5, 0.6, 0.4],
        save_predictions=False,
    )
    write_pretraining(root / "pretrain")
    (root / "stages.json").write_text(
        json.dumps(
            {
                "stages": [
                    {"name": "preprocess", "status": "done", "seconds": 12.0},
                    {"name": "pretrain", "status": "done", "seconds": 3725.4},
                ],
                "settings": {"device": "cpu", "subjects": 24},
                "data": {"scans": {"pretraining": 20, "labelled": 24}},
            }
        )
    )
    return root


def _as_probe(run: Path, probe: str, feature: str, init: str) -> Path:
    """Turn a run written by ``write_*`` into a frozen-feature probe of ``init`` features, as
    `volta3d probe` records it."""
    res = json.loads((run / "results.json").read_text())
    res.update(
        task="probe",
        model=f"probe-{probe}-{feature}",
        embedding_init=init,
        encoder=None if init == "raw-volume" else "/runs/pretrain/encoder.safetensors",
    )
    if init == "raw-volume":
        res["embedding_grid"] = 16
    (run / "results.json").write_text(json.dumps(res))
    return run


def write_regressor(run: Path, *, errors: list[float]) -> Path:
    """An age regression run whose fold k predicts every subject exactly ``errors[k]`` years off
    (alternately over and under), so its MAE on fold k is ``errors[k]``."""
    folds = []
    for k, fold in enumerate(SPLITS["folds"]):
        y = np.array([20.0 + 2 * int(s[1:]) for s in fold["test"]])
        pred = y + errors[k] * np.where(np.arange(len(y)) % 2 == 0, 1.0, -1.0)
        r2 = 1 - np.sum((pred - y) ** 2) / np.sum((y - y.mean()) ** 2)
        folds.append(
            {
                "fold": k,
                "n_train": 16,
                "n_test": 8,
                "metrics": {"mae": float(np.mean(np.abs(pred - y))), "r2": float(r2)},
            }
        )
    results = {
        "task": "probe",
        "kind": "regression",
        "label": "age",
        "model": "probe-linear-cls",
        "encoder": None,
        "seed": 0,
        "primary_metric": "mae",
        "config": {"probe": {"ridge_alphas": [1.0]}},
        "splits": SPLITS,
        "folds": folds,
        "aggregate": _aggregate(folds),
    }
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    return run


AGE_ERRORS = {"pretrained": [2.0, 2.2, 2.1], "random-init": [5.0, 5.5, 4.8], "raw-volume": [2.1, 2.0, 2.3]}


@pytest.fixture
def study(demo) -> Path:
    """``demo`` plus sex probes (linear and kNN; cls and mean of VolTA-3D, cls of a random-init
    encoder, the raw volume) with reduced-data curves, and linear age probes."""
    probes = demo / "runs" / "probes"
    for i, (probe, feature, init, noise) in enumerate([
            ("linear", "cls", "pretrained", 0.12), ("knn", "cls", "pretrained", 0.2), ("linear", "mean", "pretrained", 0.15),
            ("linear", "cls", "random-init", 0.5), ("knn", "cls", "random-init", 0.5),
            ("linear", "raw", "raw-volume", 0.3), ("knn", "raw", "raw-volume", 0.3)]):  # fmt: skip
        run = write_classifier(
            probes / f"sex-{probe}-{feature}-{init}",
            pretrained=False,
            noise=noise,
            seed=10 + i,
            fractions=(0.5, 1.0),
        )
        _as_probe(run, probe, feature, init)
    for init, errors in AGE_ERRORS.items():
        _as_probe(
            write_regressor(probes / f"age-{init}", errors=errors),
            "linear",
            "raw" if init == "raw-volume" else "cls",
            init,
        )
    return demo


def md_tables(md: str) -> dict[str, pd.DataFrame]:
    """Markdown tables of summary.md by caption."""
    tables, lines = {}, md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("**") and i + 2 < len(lines) and lines[i + 2].startswith("| "):
            j = i + 2
            header = [c.strip() for c in lines[j].strip("|").split(" | ")]
            body = []
            for row in lines[j + 2 :]:
                if not row.startswith("| "):
                    break
                body.append([c.strip() for c in row.strip()[2:-2].split(" | ")])
            tables[line.strip("*")] = pd.DataFrame(body, columns=header)
    return tables


def sections(html: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([a-z0-9-]+)"[^>]*>(.*?)</section>', html, flags=re.S))


HEADLINE = "VolTA-3D against each baseline on the task's primary metric (↑ higher, ↓ lower is better)"


def headline_table(out_dir: Path) -> pd.DataFrame:
    return md_tables((out_dir / "summary.md").read_text())[HEADLINE]


def html_table(html: str, element_id: str) -> list[list[str]]:
    """Header and body cells of the HTML table with ``element_id``, unescaped."""
    import html as html_lib

    table = re.search(rf'<table id="{element_id}">(.*?)</table>', html, flags=re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)
    return [[html_lib.unescape(c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)] for row in rows]


def _text(fragment: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment)).strip()


def test_every_section_present_and_images_embedded(demo, tmp_path):
    out = build_report(demo, tmp_path / "report", n_boot=N_BOOT)
    html = out.read_text()
    secs = sections(html)
    assert list(secs) == [
        "headline",
        "pretraining",
        "task-sex-binary-fine-tuning",
        "task-segmentation",
        "settings",
    ]
    assert not any("Omitted" in body for body in secs.values())
    srcs = re.findall(r'src="([^"]*)"', html)
    assert (
        len(srcs) == 5
    )  # forest plot, ROC, reduced-data curve, one overlay (only seg_volta saved), pretraining
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in html and "https://" not in html and "<script" not in html and "<link" not in html
    assert sorted(p.name for p in (tmp_path / "report" / "figures").glob("*.png")) == [
        "forest.png",
        "fractions_sex-binary-fine-tuning.png",
        "overlay_unetr-pretrained.png",
        "pretraining.png",
        "roc_sex-binary-fine-tuning.png",
    ]
    assert "1:02:05" in html and "1:02:17" in html  # 3725.4 s and the 3737.4 s total
    # the headline comes first, its forest plot inside it; the pretraining health right below it
    assert (
        html.index('id="headline-table"')
        < html.index('id="forest-plot"')
        < html.index('<section id="pretraining"')
    )


def test_tables_match_results_files(demo, tmp_path):
    build_report(demo, tmp_path / "report", n_boot=N_BOOT)
    tables = md_tables((tmp_path / "report" / "summary.md").read_text())
    cls = tables["sex (binary, fine-tuning): metrics over folds"].set_index("model")
    for name, run in (("vit-pretrained", "sex_volta"), ("vit-scratch", "sex_scratch")):
        agg = json.loads((demo / "runs" / run / "results.json").read_text())["aggregate"]
        assert cls.at[name, "AUROC"] == f"{agg['auroc']['mean']:.3f} ± {agg['auroc']['sd']:.3f}"
        assert (
            cls.at[name, "bal. acc."]
            == f"{agg['balanced_accuracy']['mean']:.3f} ± {agg['balanced_accuracy']['sd']:.3f}"
        )
        assert cls.at[name, "folds"] == "3"
    assert (
        cls.at["vit-pretrained", "initialisation"] == "VolTA-3D"
        and cls.at["vit-scratch", "initialisation"] == "scratch"
    )

    # paired difference over folds, recomputed from the per-fold metrics of the two files
    folds = {
        r: [
            f["metrics"]["auroc"]
            for f in json.loads((demo / "runs" / r / "results.json").read_text())["folds"]
        ]
        for r in ("sex_volta", "sex_scratch")
    }
    cmp = tables["sex (binary, fine-tuning): paired comparisons"]
    row = cmp[(cmp["metric"] == "AUROC") & (cmp["paired over"] == "folds (3)")].iloc[0]
    assert row["reference"] == "vit-pretrained" and row["compared with"] == "vit-scratch"
    assert row["difference"] == f"{np.mean(np.subtract(folds['sex_volta'], folds['sex_scratch'])):+.3f}"
    pooled = cmp[cmp["metric"] == "AUROC (pooled)"].iloc[0]
    preds = {r: pd.read_csv(demo / "runs" / r / "predictions.csv") for r in ("sex_volta", "sex_scratch")}
    top = preds["sex_volta"][preds["sex_volta"]["fraction"] == 1.0]
    assert pooled["reference value"] == f"{roc_auc_score(top['y_true'], top['score']):.3f}"
    assert pooled["test"] == "DeLong" and pooled["paired over"] == "subjects (24)"

    # the reduced-data curve's shaded band: the 95 % t interval of the mean over the fraction's folds
    curve = tables["sex (binary, fine-tuning): reduced-data curve"]
    half = json.loads((demo / "runs" / "sex_volta" / "results.json").read_text())["fractions"]["0.5"]
    values = np.array([f["metrics"]["auroc"] for f in half["folds"]])
    row = curve[curve["training fraction"] == "0.5"].iloc[0]
    assert row["AUROC"] == f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
    margin = stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3)
    assert row["95 % CI of the mean"] == f"[{values.mean() - margin:.3f}, {values.mean() + margin:.3f}]"

    seg = tables["Per structure: mean ± SD over folds (each fold: mean over its test subjects)"].set_index(
        "model"
    )
    assert seg.at["unetr-pretrained", "Dice"] == "0.700" and seg.at["unet-scratch", "Dice"] == "0.500"
    assert seg.at["unetr-pretrained", "structure"] == "label 1"
    seg_cmp = tables["segmentation: paired comparisons"]
    per_subject = seg_cmp[seg_cmp["metric"] == "Dice (per subject)"].iloc[0]
    assert per_subject["difference"] == "+0.200" and per_subject["paired over"] == "subjects (3)"
    stages = tables["Wall time per stage"].set_index("stage")
    assert stages.at["pretrain", "wall time (h:mm:ss)"] == "1:02:05"
    assert tables["Data counts (stages.json)"].set_index("item").at["scans.labelled", "value"] == "24"
    pre = tables["First and last logged values"].set_index("quantity")
    assert (
        pre.at["loss", "step 1"] == "30"
        and pre.at["loss", "step 20"] == "1.5"
        and pre.at["lr", "step 1"] == "0.0001"
    )


# ----------------------------------------------------------------------------- headline


def test_verdict_reads_the_ci_and_the_metric_direction():
    higher, lower = False, True  # AUROC / Dice; MAE / HD95
    assert verdict(0.01, 0.05, higher) == "better" and verdict(-0.05, -0.01, higher) == "worse"
    assert verdict(-1.5, -0.5, lower) == "better" and verdict(0.5, 1.5, lower) == "worse"
    for low, high in ((-0.01, 0.02), (0.0, 0.3), (-0.3, 0.0), (0.0, 0.0)):  # the CI includes (or touches) 0
        assert verdict(low, high, higher) == verdict(low, high, lower) == "no difference", (low, high)
    assert verdict(math.nan, math.nan, higher) == "not tested"


def test_paired_evidence_over_folds_else_subjects_and_never_a_ci_from_one_pair():
    def pair(n: int, estimate: float) -> dict:
        return {"estimate": estimate, "ci_low": estimate, "ci_high": estimate, "wilcoxon_p": 0.5, "n": n}

    both = {"fold_level": {"dice": pair(3, 0.1)}, "subject_level": {"dice_mean": pair(40, 0.2)}}
    assert paired_evidence(both, "dice")["unit"] == "folds" and paired_evidence(both, "dice")["diff"] == 0.1
    holdout = {"fold_level": {"dice": pair(1, 0.1)}, "subject_level": {"dice_mean": pair(40, 0.2)}}
    assert paired_evidence(holdout, "dice") == {
        "diff": 0.2,
        "low": 0.2,
        "high": 0.2,
        "p": 0.5,
        "n": 40,
        "unit": "subjects",
    }
    single = paired_evidence({"fold_level": {"auroc": pair(1, 0.05)}, "subject_level": {}}, "auroc")
    assert (
        single["diff"] == 0.05 and math.isnan(single["low"]) and math.isnan(single["p"])
    )  # CI = the point: no test
    assert verdict(single["low"], single["high"], False) == "not tested"
    assert paired_evidence({"fold_level": {}, "subject_level": {}}, "auroc") is None


def test_headline_reference_is_the_linear_cls_probe_fixed_in_advance():
    def probe(p: str, f: str, init: str = "pretrained") -> Run:
        return Run(
            f"probe-{p}-{f} ({init})", {"model": f"probe-{p}-{f}", "encoder": "/enc", "embedding_init": init}
        )

    group = [
        probe("knn", "cls"),
        probe("linear", "mean"),
        probe("linear", "cls"),
        probe("linear", "cls", "random-init"),
    ]
    assert headline_reference(group).name == "probe-linear-cls (pretrained)"
    assert (
        headline_reference(group[:2]).name == "probe-linear-mean (pretrained)"
    )  # no linear cls: another linear one
    assert headline_reference(group[:1]).name == "probe-knn-cls (pretrained)"
    assert headline_reference(group, "probe-knn-cls (pretrained)").name == "probe-knn-cls (pretrained)"
    assert headline_reference(group[3:]) is None  # random-init features are a baseline, never the reference
    tuned = [
        Run(n, {"model": n, "encoder": e}) for n, e in (("vit-scratch", None), ("vit-pretrained", "/enc"))
    ]
    assert headline_reference(tuned).name == "vit-pretrained"


def test_headline_reference_gives_way_when_it_has_no_baseline(study, tmp_path):
    for run in (
        "sex-linear-cls-random-init",
        "sex-linear-raw-raw-volume",
    ):  # linear cls and mean lose their baselines
        shutil.rmtree(study / "runs" / "probes" / run)
    build_report(study, tmp_path / "report", n_boot=N_BOOT)
    table = headline_table(tmp_path / "report")
    probes = table[(table["group"] == "frozen probes") & (table["task"] == "sex")]
    assert probes[["VolTA-3D model", "baseline"]].to_numpy().tolist() == [
        ["knn cls", "knn cls, random init"],
        ["knn cls", "knn, raw volume 16^3"],
    ]


STUDY_ROWS = [  # group, task, VolTA-3D model, baseline, and the two run folders (under runs/)
    ("fine-tuning", "sex", "vit-pretrained", "vit-scratch", "sex_volta", "sex_scratch"),
    ("fine-tuning", "segmentation", "unetr-pretrained", "unet-scratch", "seg_volta", "seg_scratch"),
    ("frozen probes", "sex", "linear cls", "linear cls, random init", "probes/sex-linear-cls-pretrained",
     "probes/sex-linear-cls-random-init"),
    ("frozen probes", "sex", "linear cls", "linear, raw volume 16^3", "probes/sex-linear-cls-pretrained",
     "probes/sex-linear-raw-raw-volume"),
    ("frozen probes", "age", "linear cls", "linear cls, random init", "probes/age-pretrained", "probes/age-random-init"),
    ("frozen probes", "age", "linear cls", "linear, raw volume 16^3", "probes/age-pretrained", "probes/age-raw-volume"),
]  # fmt: skip
DIFF = "VolTA-3D − baseline"


def _expected_difference(a: Path, b: Path, metric: str) -> tuple[str, dict, str]:
    """The difference (recomputed from the files), the paired comparison holding its CI and p, and
    what it is paired over."""
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    cmp = compare_results(a, b, n_boot=N_BOOT, seed=0)
    if len(ra["folds"]) > 1:
        va, vb = ([f["metrics"][metric] for f in r["folds"]] for r in (ra, rb))
        diff, ev, over = np.mean(np.subtract(va, vb)), cmp["fold_level"][metric], f"{len(va)} folds"
    else:  # a one-fold hold-out: paired over its subjects
        pa, pb = (pd.read_csv(d / "predictions.csv") for d in (a, b))
        diff, ev = (
            np.mean(pa[f"{metric}_mean"] - pb[f"{metric}_mean"]),
            cmp["subject_level"][f"{metric}_mean"],
        )
        over = f"{len(pa)} subjects"
    return f"{diff:+.3f}", ev, over


def test_every_headline_number_equals_its_source(study, tmp_path):
    html = build_report(study, tmp_path / "report", n_boot=N_BOOT).read_text()
    table = headline_table(tmp_path / "report")
    assert [tuple(r) for r in table[["group", "task", "VolTA-3D model", "baseline"]].to_numpy()] == [
        r[:4] for r in STUDY_ROWS
    ]  # fine-tuning first, then frozen probes; one VolTA-3D reference per task
    for row, (*_, a, b) in zip(table.to_dict("records"), STUDY_ROWS, strict=True):
        ra, rb = (json.loads((study / "runs" / d / "results.json").read_text()) for d in (a, b))
        metric = ra["primary_metric"]
        assert row["metric"] == {"auroc": "AUROC ↑", "dice": "Dice ↑", "mae": "MAE ↓"}[metric]
        assert row["VolTA-3D"] == f"{ra['aggregate'][metric]['mean']:.3f}", row
        assert row["baseline value"] == f"{rb['aggregate'][metric]['mean']:.3f}", row
        diff, ev, over = _expected_difference(study / "runs" / a, study / "runs" / b, metric)
        assert (row[DIFF], row["paired over"]) == (diff, over), row
        assert (
            row["95 % CI"] == f"[{ev['ci_low']:+.3f}, {ev['ci_high']:+.3f}]"
            and row["p"] == f"{ev['wilcoxon_p']:.3g}"
        )
        assert row["verdict"] == verdict(ev["ci_low"], ev["ci_high"], metric == "mae"), row
    age = table[table["task"] == "age"].set_index("baseline")
    assert age.at["linear cls, random init", DIFF] == "-3.000"  # MAE 2.1 vs 5.1: lower, so better
    assert age.at["linear cls, random init", "verdict"] == "better"
    assert (
        age.at["linear, raw volume 16^3", "verdict"] == "no difference"
    )  # fold differences -0.1, +0.2, -0.2
    # report.html holds the same table, cell for cell
    assert html_table(html, "headline-table") == [list(table.columns), *table.to_numpy().tolist()]


def test_headline_sentence_and_notes_follow_the_verdicts(study, tmp_path):
    out = build_report(study, tmp_path / "report", n_boot=N_BOOT)
    table = headline_table(tmp_path / "report")
    text = _text(sections(out.read_text())["headline"])
    counts = table["verdict"].value_counts()
    assert (
        f"Of {len(table)} paired comparisons, VolTA-3D is better than the baseline in {counts.get('better', 0)}"
        in text
    )
    assert f"worse than the baseline in {counts.get('worse', 0)}" in text
    assert f"and not distinguishable from it in {counts.get('no difference', 0)}." in text
    assert (
        "age probe vs linear cls, random init"
        in text.split("better than the baseline in")[1].split("worse")[0]
    )
    assert "Indicative at best (fewer than 5 folds or 20 subjects)" in text  # 3 folds, 3 subjects
    assert "The smallest two-sided Wilcoxon p that few folds allow is 0.25 with 3 folds" in text


def test_headline_verdict_flips_with_the_numbers(study, tmp_path):
    probes = study / "runs" / "probes"
    for init, errors in (
        ("pretrained", AGE_ERRORS["random-init"]),
        ("random-init", AGE_ERRORS["pretrained"]),
    ):
        shutil.rmtree(probes / f"age-{init}")
        _as_probe(write_regressor(probes / f"age-{init}", errors=errors), "linear", "cls", init)
    build_report(study, tmp_path / "swapped", n_boot=N_BOOT)
    row = (
        headline_table(tmp_path / "swapped")
        .set_index(["task", "baseline"])
        .loc[("age", "linear cls, random init")]
    )
    assert (row[DIFF], row["verdict"]) == ("+3.000", "worse")  # a higher MAE is worse, whatever the sign says

    shutil.rmtree(probes / "age-random-init")
    _as_probe(
        write_regressor(probes / "age-random-init", errors=AGE_ERRORS["random-init"]),
        "linear",
        "cls",
        "random-init",
    )
    build_report(study, tmp_path / "same", n_boot=N_BOOT)
    row = (
        headline_table(tmp_path / "same")
        .set_index(["task", "baseline"])
        .loc[("age", "linear cls, random init")]
    )
    assert (row[DIFF], row["95 % CI"], row["verdict"]) == ("+0.000", "[+0.000, +0.000]", "no difference")


def test_headline_follows_the_numbers(demo, tmp_path):
    build_report(demo, tmp_path / "a", n_boot=N_BOOT)
    table = headline_table(tmp_path / "a").set_index("task")
    assert table.at["segmentation", DIFF] == "+0.200" and table.at["segmentation", "verdict"] == "better"
    assert table.at["segmentation", "paired over"] == "3 subjects"  # a one-fold hold-out: paired per subject

    # swap: the noisy classifier and the worse segmenter are now the pretrained ones
    for run, pretrained in (("sex_volta", False), ("sex_scratch", True)):
        shutil.rmtree(demo / "runs" / run)
        write_classifier(
            demo / "runs" / run,
            pretrained=pretrained,
            noise=0.15 if run == "sex_volta" else 0.6,
            seed=1 if run == "sex_volta" else 2,
        )
    for run, pretrained, dice in (
        ("seg_volta", False, [0.6, 0.8, 0.7]),
        ("seg_scratch", True, [0.5, 0.6, 0.4]),
    ):
        shutil.rmtree(demo / "runs" / run)
        write_segmenter(
            demo / "runs" / run, demo / "data", pretrained=pretrained, dice=dice, save_predictions=False
        )
    out = build_report(demo, tmp_path / "b", n_boot=N_BOOT)
    table = headline_table(tmp_path / "b").set_index("task")
    assert table.at["segmentation", DIFF] == "-0.200" and table.at["segmentation", "verdict"] == "worse"
    assert table.at["sex", DIFF].startswith("-")  # the separable classifier is now the baseline
    assert "worse than the baseline in" in _text(sections(out.read_text())["headline"])


def test_long_tables_fold_and_figures_group_comparable_models(study, tmp_path, monkeypatch):
    drawn: dict[str, dict] = {}
    for name in ("roc_figure", "fraction_figure"):
        original = getattr(report_plots, name)

        def record(panels, *args, _original=original, _name=name, **kwargs):
            drawn.setdefault(_name, {})[args[-2] if _name == "fraction_figure" else args[0]] = panels
            return _original(panels, *args, **kwargs)

        monkeypatch.setattr(report_plots, name, record)
    html = build_report(study, tmp_path / "report", n_boot=N_BOOT).read_text()
    probes = sections(html)["task-sex-binary-frozen-feature-probes"]
    folded = re.findall(r"<details><summary>([^<]*)</summary>", probes)
    assert folded == [
        "sex (binary, frozen-feature probes): reduced-data curve (14 rows)"
    ]  # 7 models x 2 fractions
    assert "sex (binary, frozen-feature probes): metrics over folds</p>" in probes  # 7 rows: shown as is

    for figure in ("roc_figure", "fraction_figure"):
        panels = drawn[figure]["sex (binary, frozen-feature probes)"]
        assert list(panels) == ["kNN probe", "linear probe"], figure
        dash_of: dict[str, str] = {}
        for name, lines in panels.items():
            traces = [line[0] for line in lines]
            assert all(t.label.startswith(f"probe-{name.split()[0].lower()}-") for t in traces)
            assert len({(t.colour, t.dash) for t in traces}) == len(traces)  # no two curves drawn alike
            for t in traces:
                init = (
                    "raw volume"
                    if "raw volume" in t.label
                    else "random init"
                    if "random" in t.label
                    else "VolTA-3D"
                )
                assert t.colour == report_plots.SOURCE_COLOURS[init]
                assert (
                    dash_of.setdefault(t.label.split("-")[2].split()[0], t.dash) == t.dash
                )  # one dash per feature
        assert set(drawn[figure]) == {"sex (binary, fine-tuning)", "sex (binary, frozen-feature probes)"}
        assert list(drawn[figure]["sex (binary, fine-tuning)"]) == ["fine-tuned models"]


def test_missing_optional_inputs_omit_only_their_section(demo, tmp_path):
    shutil.rmtree(demo / "pretrain")
    (demo / "stages.json").unlink()
    shutil.rmtree(demo / "runs" / "seg_volta")
    shutil.rmtree(demo / "runs" / "seg_scratch")
    secs = sections(build_report(demo, tmp_path / "report", n_boot=N_BOOT).read_text())
    assert list(secs) == ["headline", "pretraining", "task-sex-binary-fine-tuning", "settings"]
    assert "Omitted: no pretraining run folder" in secs["pretraining"]
    assert "Wall time per stage omitted: no stages.json" in secs["settings"]
    assert "Provenance: no pretraining run folder among the inputs" in secs["headline"]
    for kept in ("headline", "task-sex-binary-fine-tuning"):
        assert "Omitted" not in secs[kept]
    task = secs["task-sex-binary-fine-tuning"]
    assert task.count("<img") == 2 and "ROC curves" in task and "Reduced-data curves" in task
    assert "Software" in secs["settings"]


def test_runs_on_other_folds_are_shown_not_comparable(demo, tmp_path):
    other = {**SPLITS, "folds": [SPLITS["folds"][1], SPLITS["folds"][0], SPLITS["folds"][2]]}
    run = write_classifier(tmp_path / "swin", pretrained=False, noise=0.3, seed=3, splits=other)
    res = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**res, "model": "swin-scratch"}))
    out = build_report(
        {"VolTA": [demo / "runs" / "sex_volta"], "Swin": [run]}, tmp_path / "report", n_boot=N_BOOT
    )
    tables = md_tables((tmp_path / "report" / "summary.md").read_text())
    cmp = tables["sex (binary, fine-tuning): paired comparisons"]
    assert cmp["metric"].item().startswith("not comparable: runs") and "same folds" in cmp["metric"].item()
    row = tables[HEADLINE].iloc[0]
    assert (row["baseline"], row[DIFF], row["95 % CI"], row["verdict"]) == (
        "Swin",
        "—",
        "—",
        "not comparable",
    )
    volta = json.loads((demo / "runs" / "sex_volta" / "results.json").read_text())["aggregate"]["auroc"][
        "mean"
    ]
    assert (row["VolTA-3D model"], row["VolTA-3D"]) == ("VolTA", f"{volta:.3f}")
    assert row["baseline value"] == f"{res['aggregate']['auroc']['mean']:.3f}"
    assert "sex fine-tuned vs Swin: not comparable (runs" in _text(sections(out.read_text())["headline"])


def test_report_command_and_bad_reference(demo, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(demo), "--output", str(out), "--n-boot", "50", "--title", "Demo run"]) == 0
    assert "<title>Demo run</title>" in (out / "report.html").read_text()
    assert (out / "summary.md").read_text().startswith("# Demo run")
    assert main(["report", str(demo), "--output", str(out), "--reference", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("volta3d report: error: --reference 'nope' names no model (models: unet-scratch,")
    assert main(["report", str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert "report input not found" in capsys.readouterr().err


def test_reference_override_compares_against_the_named_model(demo, tmp_path):
    build_report(demo, tmp_path / "report", n_boot=N_BOOT, reference="vit-scratch")
    tables = md_tables((tmp_path / "report" / "summary.md").read_text())
    cmp = tables["sex (binary, fine-tuning): paired comparisons"]
    assert set(cmp["reference"]) == {"vit-scratch"} and set(cmp["compared with"]) == {"vit-pretrained"}
    assert cmp[cmp["paired over"] == "folds (3)"]["difference"].str.startswith("-").all()
    head = tables[
        "reference against each baseline on the task's primary metric (↑ higher, ↓ lower is better)"
    ]
    row = head[head["task"] == "sex"].iloc[0]  # a named scratch model is no longer called VolTA-3D
    assert (row["reference model"], row["baseline"]) == ("vit-scratch", "vit-pretrained")
    assert row["reference − baseline"].startswith("-")


def test_provenance_line_names_data_wall_time_and_hardware(demo, tmp_path):
    (demo / "pretrain" / "log.txt").write_text(
        "2026-01-01 10:00:00 INFO pretraining on 20 volumes: 2 epochs x 10 steps, effective batch 4 (4 x 1 "
        "accumulation x 2 ranks), lr 0.0005, device cuda\n"
    )
    stages = json.loads((demo / "stages.json").read_text())
    (demo / "stages.json").write_text(json.dumps({**stages, "settings": {"machine": "x86_64, 16 CPUs"}}))
    html = build_report(demo, tmp_path / "a", n_boot=N_BOOT).read_text()
    line = re.search(r'<p class="provenance" id="provenance">([^<]*)</p>', html).group(1)
    assert line == (
        f"Pretraining data not recorded (no pretrain_data.json in {demo / 'pretrain'}). Pretraining took "
        "1:02:05 (wall time) on 2 x cuda (x86_64, 16 CPUs)."
    )

    (demo / "stages.json").unlink()  # no stage time: the logged step times (20 x 0.2 s), and no machine
    (demo / "pretrain" / "log.txt").unlink()
    html = build_report(demo, tmp_path / "b", n_boot=N_BOOT).read_text()
    assert (
        "Pretraining took about 0:00:04 (sum of the logged step times) on an unrecorded device (config: auto)."
        in html
    )


# ----------------------------------------------------------------------------- in a browser


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"headless browser check needs {CHROMIUM} (apt-get install chromium)"
)
def test_report_opens_in_a_headless_browser(demo, tmp_path):
    out = build_report(demo, tmp_path / "report", n_boot=N_BOOT)
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_report.py"), str(out), "--screenshot", str(shot)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 images loaded" in proc.stdout and shot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"first-screen check needs {CHROMIUM} (apt-get install chromium)"
)
def test_headline_table_and_forest_plot_are_on_the_first_screen(study, tmp_path):
    _health_demo(study, alarm_steps=(17,))  # the alarm box at the page top must not push them below the fold
    out = build_report(study, tmp_path / "report", n_boot=N_BOOT)
    shot = tmp_path / "first_screen.png"
    boxes = first_screen(out, shot)
    for element in FIRST_SCREEN_IDS:
        box = boxes[element]
        assert box is not None, f"{element} is not in the page"
        assert 0 <= box["top"] < box["bottom"] <= HEIGHT, (
            f"{element} is not within the first {HEIGHT} px: {box}"
        )
        assert box["left"] >= 0 and box["right"] <= WIDTH, f"{element} does not fit {WIDTH} px across: {box}"
    assert boxes["provenance"]["bottom"] <= boxes["headline-table"]["top"]
    assert boxes["headline-table"]["bottom"] <= boxes["forest-plot"]["top"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pair_runs_pairs_probes_by_model():
    probes = [
        Run(f"probe-{p}-cls ({init})", {"model": f"probe-{p}-cls", "encoder": "/enc", "embedding_init": init})
        for p in ("knn", "linear")
        for init in ("pretrained", "random-init")
    ]
    refs, pairs = pair_runs(probes, None)
    assert [r.name for r in refs] == ["probe-knn-cls (pretrained)", "probe-linear-cls (pretrained)"]
    assert [(a.results["model"], b.name) for a, b in pairs] == [
        ("probe-knn-cls", "probe-knn-cls (random-init)"),
        ("probe-linear-cls", "probe-linear-cls (random-init)"),
    ]


# ----------------------------------------------------------------------------- pretraining health

HEALTH_COLUMNS = [
    "teacher_entropy_gap",
    "teacher_patch_entropy_gap",
    "student_cls_cosine",
    "teacher_cls_cosine",
    "cls_rank",
    "patch_rank",
]


def write_health_pretraining(run: Path, *, alarm_steps=(), subject_ids=None, online=True) -> pd.DataFrame:
    """A pretraining folder in the newer format: metrics.csv with the health columns (ranks logged on
    every 3rd step only, empty strings elsewhere), online_eval.csv and pretrain_data.json."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\nhead:\n  out_dim: 32\n")  # log_k column (K = 64) must win
    rng = np.random.default_rng(5)
    steps = np.arange(1, 26)
    table = pd.DataFrame(
        {
            "step": steps,
            "loss": 9 / steps,
            "log_k": np.log(64.0),
            "loss_global": 4.6 - 0.05 * steps,  # ends below log 64 = 4.159
            "loss_local": 4.3 + 0.01 * steps,  # ends above it
            **{c: rng.uniform(0.1, 3.0, len(steps)) for c in HEALTH_COLUMNS},
            "koleo": rng.normal(0, 1, len(steps)),
            "collapse_alarm": np.isin(steps, alarm_steps).astype(int),
        }
    )
    for c in ("cls_rank", "patch_rank"):
        table[c] = table[c].where(steps % 3 == 0)  # NaN -> written as an empty string
    table.to_csv(run / "metrics.csv", index=False)
    if online:
        rows = [
            {
                "step": s,
                "source": "teacher",
                "feature": f,
                "probe": p,
                "metric": m,
                "label": lab,
                "value": v0 + 0.01 * s,
            }
            for s in (0, 10, 20)
            for f in ("cls", "mean")
            for p in ("linear", "knn")
            for lab, m, v0 in (("sex", "auroc", 0.6), ("age", "mae", 12.0))
        ]
        rows += [
            {"step": 0, "source": src, "feature": f, "probe": p, "metric": m, "label": lab, "value": v}
            for src, feats, v in (("init", ("cls", "mean"), 0.55), ("raw", ("raw",), 0.58))
            for f in feats
            for p in ("linear", "knn")
            for lab, m in (("sex", "auroc"), ("age", "mae"))
        ]
        pd.DataFrame(rows).to_csv(run / "online_eval.csv", index=False)
    ids = SUBJECTS if subject_ids is None else subject_ids
    (run / "pretrain_data.json").write_text(
        json.dumps(
            {"folders": ["/data/prep/ixi", "/data/prep/msd"], "n_volumes": 345, "subject_ids": list(ids)}
        )
    )
    return pd.read_csv(run / "metrics.csv")


def _health_demo(demo: Path, **kwargs) -> pd.DataFrame:
    shutil.rmtree(demo / "pretrain")
    return write_health_pretraining(demo / "pretrain", **kwargs)


def test_health_table_numbers_are_the_window_means(demo, tmp_path):
    metrics = _health_demo(demo)
    out = build_report(demo, tmp_path / "report", n_boot=N_BOOT)
    md = (tmp_path / "report" / "summary.md").read_text()
    caption = next(c for c in md_tables(md) if c.startswith("Pretraining health"))
    table = md_tables(md)[caption].set_index("quantity")
    assert list(table.index) == ["loss_global", "loss_local", *HEALTH_COLUMNS]
    for col in table.index:
        logged = metrics[col].dropna().to_numpy()  # ranks: only every 3rd step
        assert table.at[col, "mean, first 10 logged steps"] == f"{logged[:10].mean():.4g}", col
        assert table.at[col, "mean, last 10 logged steps"] == f"{logged[-10:].mean():.4g}", col
    assert len(metrics["cls_rank"].dropna()) == 8  # fewer than 10 logged: both windows are all of them
    assert table.at["loss_global", "log K"] == f"{np.log(64):.4g}" and table.at["cls_rank", "log K"] == "—"
    assert table.at["loss_global", "verdict / reading"] == "below log K"
    assert table.at["loss_local", "verdict / reading"] == "at or above log K"
    last_global = metrics["loss_global"].to_numpy()[-10:].mean()
    assert (
        f"Pretraining health: loss_global ended below log K ({last_global:.4g} vs 4.159); loss_local ended "
        f"at or above log K"
    ) in md and "no collapse alarm fired." in md
    html = out.read_text()
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 7  # + health curves, online probes
    figures = {p.name for p in (tmp_path / "report" / "figures").glob("*.png")}
    assert {"pretraining_health.png", "online_probe.png"} <= figures

    online = md_tables(md)["Online probes: the teacher at its first and last evaluation"]
    row = online[(online["label"] == "age") & (online["probe"] == "knn") & (online["feature"] == "cls")].iloc[
        0
    ]
    assert (
        row["metric"] == "MAE"
        and row["teacher, first"] == "12.000"
        and row["teacher, last"] == "12.200 (step 20)"
    )
    assert row["initial weights"] == "0.550" and row["raw volume"] == "0.580"
    assert len(online) == 8  # 2 labels x 2 probes x 2 features


def test_collapse_alarm_box_appears_iff_an_alarm_fired(demo, tmp_path):
    _health_demo(demo)
    quiet = build_report(demo, tmp_path / "quiet", n_boot=N_BOOT).read_text()
    assert 'class="alert"' not in quiet and "Warning" not in (tmp_path / "quiet" / "summary.md").read_text()

    _health_demo(demo, alarm_steps=(17, 18, 24))
    html = build_report(demo, tmp_path / "alarm", n_boot=N_BOOT).read_text()
    boxes = re.findall(r'<div class="alert" role="alert">([^<]*)</div>', html)
    assert len(boxes) == 2 and boxes[0] == boxes[1]  # top of the page and the Pretraining section
    assert "fired first at step 17 (3 logged step(s) in all)" in boxes[0]
    assert html.index('class="alert"') < html.index("<nav>")
    assert html.index('class="alert"') < html.index(
        '<section id="headline"'
    )  # above the first screen's table
    assert 'class="alert"' in sections(html)["pretraining"]
    md = (tmp_path / "alarm" / "summary.md").read_text()
    assert md.splitlines()[4].startswith(
        "> **Warning.** Collapse alarm: the pretraining health check fired first at step 17"
    )
    assert "the collapse alarm fired first at step 17 (3 logged step(s) in all)." in md


def test_provenance_transductive_or_external(demo, tmp_path):
    cases = {
        "all": (
            SUBJECTS + ["extra1"],
            "Transductive: the downstream test subjects were in the unlabelled "
            "pretraining set, labels unused (all 24 test subjects).",
        ),
        "none": (
            [f"x{i}" for i in range(30)],
            "External: none of the 24 downstream test subjects was in the pretraining set.",
        ),
        # the segmentation runs test s00-s02 only: those in, the classifiers' other 21 out
        "some": (
            ["s00", "s01", "s02"],
            "Partly transductive: some downstream test subjects were in the unlabelled "
            "pretraining set, labels unused (sex (binary, fine-tuning): 3 of 24; "
            "segmentation: 3 of 3); the others are external.",
        ),
    }
    for name, (ids, sentence) in cases.items():
        _health_demo(demo, subject_ids=ids, online=False)
        build_report(demo, tmp_path / name, n_boot=N_BOOT)
        md = (tmp_path / name / "summary.md").read_text()
        assert "Pretrained on 345 volumes from ixi, msd. " + sentence in md, name
        assert "Online-probe curve not shown: no online_eval.csv in" in md


def test_old_metrics_without_health_columns_still_render(demo, tmp_path):
    out = build_report(demo, tmp_path / "report", n_boot=N_BOOT)  # the fixture's metrics.csv predates them
    secs = sections(out.read_text())
    assert "<img" in secs["pretraining"] and 'class="alert"' not in out.read_text()
    md = (tmp_path / "report" / "summary.md").read_text()
    table = md_tables(md)[next(c for c in md_tables(md) if c.startswith("Pretraining health"))].set_index(
        "quantity"
    )
    assert list(table.index) == ["loss_global", "loss_local"]
    steps = np.arange(1, 21)
    assert table.at["loss_global", "mean, last 10 logged steps"] == f"{(4.0 - 0.05 * steps[-10:]).mean():.4g}"
    assert table.at["loss_global", "log K"] == f"{np.log(64):.4g}"  # from head.out_dim: no log_k column
    assert "no collapse alarm was logged by this run." in md
    assert "Pretraining data not recorded (no pretrain_data.json in" in md
    assert not (tmp_path / "report" / "figures" / "pretraining_health.png").exists()


def test_bad_online_eval_is_a_note_naming_the_file(demo, tmp_path):
    _health_demo(demo, online=False)
    (demo / "pretrain" / "online_eval.csv").write_text("step,source,value\n0,init,0.5\n")
    build_report(demo, tmp_path / "report", n_boot=N_BOOT)
    md = (tmp_path / "report" / "summary.md").read_text()
    assert (
        f"Online-probe curve not shown: {demo / 'pretrain' / 'online_eval.csv'} has no feature, probe, metric column(s)."
        in md
    )


def _mark_encoder(demo: Path, provenance: dict) -> None:
    """Give every pretrained run of the demo fixture the encoder record of ``provenance``."""
    for results in (demo / "runs").glob("*/results.json"):
        record = json.loads(results.read_text())
        if record.get("encoder"):
            results.write_text(json.dumps({**record, "encoder_provenance": provenance}))


def test_imported_encoder_is_named_as_such_not_volta3d(demo, tmp_path):
    _mark_encoder(demo, {"known": False, "external": True})
    build_report(demo, tmp_path / "imported", n_boot=N_BOOT)
    md = (tmp_path / "imported" / "summary.md").read_text()
    assert HEADLINE.replace("VolTA-3D", "imported encoder") in md and HEADLINE not in md
    models = md_tables(md)[next(c for c in md_tables(md) if c.startswith("sex (binary, fine-tuning)"))]
    assert (
        dict(zip(models["model"], models["initialisation"], strict=True))["vit-pretrained"]
        == "imported encoder"
    )
    # pretraining continued from an import (its own data known) is VolTA-3D
    _mark_encoder(demo, {"known": True, "external": True, "transductive": False})
    build_report(demo, tmp_path / "continued", n_boot=N_BOOT)
    assert HEADLINE in (tmp_path / "continued" / "summary.md").read_text()
