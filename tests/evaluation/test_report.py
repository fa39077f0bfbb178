"""``volta3d report`` on tiny fake runs written here: two binary classifiers on the same 3-fold
splits (one with a reduced-data curve), two segmentation runs (one with saved predictions over
real .npy volumes and masks), a pretraining metrics.csv + config.yaml and a stages.json."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from volta3d.cli import main
from volta3d.evaluation.report import Run, build_report, headline_sentence, pair_runs

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
N_BOOT = 100
SUBJECTS = [f"s{i:02d}" for i in range(24)]
SPLITS = {"method": "stratified_group_kfold", "n_splits": 3, "seed": 0,
          "folds": [{"test": SUBJECTS[k * 8:(k + 1) * 8],
                     "train": [s for s in SUBJECTS if s not in SUBJECTS[k * 8:(k + 1) * 8]]} for k in range(3)]}


def _agg(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "n": len(v)}


def _aggregate(folds: list[dict]) -> dict:
    return {m: _agg([f["metrics"][m] for f in folds]) for m in folds[0]["metrics"]}


def write_classifier(run: Path, *, pretrained: bool, noise: float, seed: int, fractions=(1.0,), splits=SPLITS) -> Path:
    """A binary classification run: scores = class +- noise, metrics computed from them per fold."""
    rng = np.random.default_rng(seed)
    rows, per_fraction = [], {}
    for frac in fractions:
        folds = []
        for k, fold in enumerate(splits["folds"]):
            y = np.array([int(s[1:]) % 2 for s in fold["test"]])
            score = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, noise / frac, len(y)), 0, 1)
            folds.append({"fold": k, "fraction": frac, "n_train": 16, "n_test": 8, "metrics": {
                "auroc": float(roc_auc_score(y, score)),
                "balanced_accuracy": float(np.mean([((score >= 0.5) == y)[y == c].mean() for c in (0, 1)])),
                "youden_threshold": 0.5}})
            rows += [{"subject_id": s, "fold": k, "fraction": frac, "y_true": int(t), "label": "FM"[t],
                      "score": float(p), "prediction": "FM"[int(p >= 0.5)]} for s, t, p in zip(fold["test"], y, score, strict=True)]
        per_fraction[frac] = folds
    top = max(per_fraction)
    results = {"task": "classify", "kind": "binary", "label": "sex", "classes": ["F", "M"],
               "model": f"vit-{'pretrained' if pretrained else 'scratch'}",
               "encoder": "/runs/pretrain" if pretrained else None, "seed": 0, "primary_metric": "auroc",
               "config": {"classify": {"epochs": 3, "lr": 1e-4, "batch_size": 2, "mode": "full"}},
               "splits": splits, "folds": per_fraction[top], "aggregate": _aggregate(per_fraction[top])}
    if len(per_fraction) > 1:
        results["fractions"] = {f"{f:g}": {"folds": v, "aggregate": _aggregate(v)} for f, v in per_fraction.items()}
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    pd.DataFrame(rows).to_csv(run / "predictions.csv", index=False)
    return run


def _ball(size: int, centre, radius: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


def write_segmenter(run: Path, data: Path, *, pretrained: bool, dice: list[float], save_predictions: bool) -> Path:
    """A hold-out segmentation run over 3 test subjects; with ``save_predictions`` the predicted
    masks (a shifted ball) are saved with predictions/index.csv, as ``run_segmentation`` does."""
    test = ["s00", "s01", "s02"]
    splits = {"method": "holdout", "n_splits": 1, "folds": [{"test": test, "train": SUBJECTS[3:]}]}
    rows, index = [], []
    for i, (s, d) in enumerate(zip(test, dice, strict=True)):
        rows.append({"subject_id": s, "dice_label1": d, "hd95_label1": 2.0 + i, "dice_mean": d, "hd95_mean": 2.0 + i, "fold": 0})
        if save_predictions:
            img, lab = data / f"img_{s}.npy", data / f"lab_{s}.npy"
            if not img.exists():
                data.mkdir(parents=True, exist_ok=True)
                ball = _ball(24, (12, 11, 10 + i), 4)
                np.save(img, (0.3 + 0.5 * ball[None]).astype(np.float16))  # (1, D, H, W) in [0, 1]
                np.save(lab, ball[None].astype(np.uint8))
            (run / "predictions").mkdir(parents=True, exist_ok=True)
            np.save(run / "predictions" / f"{s}.npy", _ball(24, (13, 11, 10 + i), 4).astype(np.uint8))
            index.append({"subject_id": s, "fold": 0, "image": str(img), "label": str(lab), "prediction": f"{s}.npy"})
    metrics = {"dice": float(np.mean(dice)), "hd95": 3.0, "dice_label1": float(np.mean(dice)), "hd95_label1": 3.0}
    results = {"task": "segment", "kind": "segmentation", "label": "label_path", "classes": [0, 1],
               "model": f"{'unetr-pretrained' if pretrained else 'unet-scratch'}",
               "encoder": "/runs/pretrain" if pretrained else None, "seed": 0, "primary_metric": "dice",
               "config": {"segment": {"epochs": 2, "crop_size": 16}}, "splits": splits,
               "folds": [{"fold": 0, "n_test": 3, "metrics": metrics}],
               "aggregate": {m: {"mean": v, "sd": None, "n": 1} for m, v in metrics.items()}}
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps(results))
    pd.DataFrame(rows).to_csv(run / "predictions.csv", index=False)
    if index:
        pd.DataFrame(index).to_csv(run / "predictions" / "index.csv", index=False)
    return run


def write_pretraining(run: Path) -> Path:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\nmodel:\n  img_size: 32\n  hidden_size: 48\nhead:\n  out_dim: 64\n"
                                     "optim:\n  epochs: 2\n  lr: 0.0005\n")
    steps = np.arange(1, 21)
    pd.DataFrame({"step": steps, "epoch": steps // 10, "loss": 30 / steps, "loss_global": 4.0 - 0.05 * steps,
                  "loss_local": 4.1 - 0.04 * steps, "loss_rec": 20 / steps, "lr": 5e-4 * np.minimum(1, steps / 5),
                  "teacher_entropy": 3.5 - 0.05 * steps, "teacher_marginal_entropy": np.full(20, 4.0),
                  "teacher_patch_entropy": 3.6 - 0.04 * steps, "grad_norm": 1.0 / np.sqrt(steps),
                  "seconds_per_step": np.full(20, 0.2)}).to_csv(run / "metrics.csv", index=False)
    return run


@pytest.fixture
def demo(tmp_path) -> Path:
    """A demo-like folder: runs/, pretrain/ and stages.json."""
    root = tmp_path / "demo"
    write_classifier(root / "runs" / "sex_volta", pretrained=True, noise=0.15, seed=1, fractions=(0.5, 1.0))
    write_classifier(root / "runs" / "sex_scratch", pretrained=False, noise=0.6, seed=2)
    write_segmenter(root / "runs" / "seg_volta", root / "data", pretrained=True, dice=[0.6, 0.8, 0.7], save_predictions=True)
    write_segmenter(root / "runs" / "seg_scratch", root / "data", pretrained=False, dice=[0.5, 0.6, 0.4], save_predictions=False)
    write_pretraining(root / "pretrain")
    (root / "stages.json").write_text(json.dumps({
        "stages": [{"name": "preprocess", "status": "done", "seconds": 12.0},
                   {"name": "pretrain", "status": "done", "seconds": 3725.4}],
        "settings": {"device": "cpu", "subjects": 24}, "data": {"scans": {"pretraining": 20, "labelled": 24}}}))
    return root


def md_tables(md: str) -> dict[str, pd.DataFrame]:
    """Markdown tables of summary.md by caption."""
    tables, lines = {}, md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("**") and i + 2 < len(lines) and lines[i + 2].startswith("| "):
            j = i + 2
            header = [c.strip() for c in lines[j].strip("|").split(" | ")]
            body = []
            for row in lines[j + 2:]:
                if not row.startswith("| "):
                    break
                body.append([c.strip() for c in row.strip()[2:-2].split(" | ")])
            tables[line.strip("*")] = pd.DataFrame(body, columns=header)
    return tables


def sections(html: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([a-z]+)"[^>]*>(.*?)</section>', html, flags=re.S))


def test_every_section_present_and_images_embedded(demo, tmp_path):
    out = build_report(demo, tmp_path / "report", n_boot=N_BOOT)
    html = out.read_text()
    secs = sections(html)
    assert list(secs) == ["headline", "results", "roc", "fractions", "segmentation", "pretraining", "settings"]
    assert not any("Omitted" in body for body in secs.values())
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 4  # ROC, reduced-data curve, one overlay (only seg_volta saved predictions), pretraining
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in html and "https://" not in html and "<script" not in html and "<link" not in html
    assert sorted(p.name for p in (tmp_path / "report" / "figures").glob("*.png")) == [
        "fractions_sex-binary-fine-tuning.png", "overlay_unetr-pretrained.png",
        "pretraining.png", "roc_sex-binary-fine-tuning.png"]
    assert "1:02:05" in html and "1:02:17" in html  # 3725.4 s and the 3737.4 s total


def test_tables_match_results_files(demo, tmp_path):
    build_report(demo, tmp_path / "report", n_boot=N_BOOT)
    tables = md_tables((tmp_path / "report" / "summary.md").read_text())
    cls = tables["sex (binary, fine-tuning): metrics over folds"].set_index("model")
    for name, run in (("vit-pretrained", "sex_volta"), ("vit-scratch", "sex_scratch")):
        agg = json.loads((demo / "runs" / run / "results.json").read_text())["aggregate"]
        assert cls.at[name, "AUROC"] == f"{agg['auroc']['mean']:.3f} ± {agg['auroc']['sd']:.3f}"
        assert cls.at[name, "bal. acc."] == f"{agg['balanced_accuracy']['mean']:.3f} ± {agg['balanced_accuracy']['sd']:.3f}"
        assert cls.at[name, "folds"] == "3"
    assert cls.at["vit-pretrained", "initialisation"] == "VolTA-3D" and cls.at["vit-scratch", "initialisation"] == "scratch"

    # paired difference over folds, recomputed from the per-fold metrics of the two files
    folds = {r: [f["metrics"]["auroc"] for f in json.loads((demo / "runs" / r / "results.json").read_text())["folds"]]
             for r in ("sex_volta", "sex_scratch")}
    cmp = tables["sex (binary, fine-tuning): paired comparisons"]
    row = cmp[(cmp["metric"] == "AUROC") & (cmp["paired over"] == "folds (3)")].iloc[0]
    assert row["reference"] == "vit-pretrained" and row["compared with"] == "vit-scratch"
    assert row["difference"] == f"{np.mean(np.subtract(folds['sex_volta'], folds['sex_scratch'])):+.3f}"
    pooled = cmp[cmp["metric"] == "AUROC (pooled)"].iloc[0]
    preds = {r: pd.read_csv(demo / "runs" / r / "predictions.csv") for r in ("sex_volta", "sex_scratch")}
    top = preds["sex_volta"][preds["sex_volta"]["fraction"] == 1.0]
    assert pooled["reference value"] == f"{roc_auc_score(top['y_true'], top['score']):.3f}"
    assert pooled["test"] == "DeLong" and pooled["paired over"] == "subjects (24)"

    curve = tables["sex (binary, fine-tuning): reduced-data curve"]
    half = json.loads((demo / "runs" / "sex_volta" / "results.json").read_text())["fractions"]["0.5"]["aggregate"]["auroc"]
    assert curve[curve["training fraction"] == "0.5"]["AUROC"].item() == f"{half['mean']:.3f} ± {half['sd']:.3f}"

    seg = tables["Per structure: mean ± SD over folds (each fold: mean over its test subjects)"].set_index("model")
    assert seg.at["unetr-pretrained", "Dice"] == "0.700" and seg.at["unet-scratch", "Dice"] == "0.500"
    assert seg.at["unetr-pretrained", "structure"] == "label 1"
    seg_cmp = tables["segmentation: paired comparisons"]
    per_subject = seg_cmp[seg_cmp["metric"] == "Dice (per subject)"].iloc[0]
    assert per_subject["difference"] == "+0.200" and per_subject["paired over"] == "subjects (3)"
    stages = tables["Wall time per stage"].set_index("stage")
    assert stages.at["pretrain", "wall time (h:mm:ss)"] == "1:02:05"
    assert tables["Data counts (stages.json)"].set_index("item").at["scans.labelled", "value"] == "24"
    pre = tables["First and last logged values"].set_index("quantity")
    assert pre.at["loss", "step 1"] == "30" and pre.at["loss", "step 20"] == "1.5" and pre.at["lr", "step 1"] == "0.0001"


def _headline(out: Path) -> str:
    return re.sub(r"<[^>]+>", "", sections(out.read_text())["headline"])


def test_headline_follows_the_numbers(demo, tmp_path):
    text = _headline(build_report(demo, tmp_path / "a", n_boot=N_BOOT))
    assert "Sex (binary, fine-tuning): the VolTA-3D-initialised model (vit-pretrained) beat vit-scratch: AUROC" in text
    assert "Segmentation: the VolTA-3D-initialised model (unetr-pretrained) beat unet-scratch: Dice 0.700 vs 0.500" in text
    assert "Pretraining did not help" not in text

    # swap: the noisy classifier and the worse segmenter are now the pretrained ones
    for run, pretrained in (("sex_volta", False), ("sex_scratch", True)):
        shutil.rmtree(demo / "runs" / run)
        write_classifier(demo / "runs" / run, pretrained=pretrained, noise=0.15 if run == "sex_volta" else 0.6,
                         seed=1 if run == "sex_volta" else 2)
    for run, pretrained, dice in (("seg_volta", False, [0.6, 0.8, 0.7]), ("seg_scratch", True, [0.5, 0.6, 0.4])):
        shutil.rmtree(demo / "runs" / run)
        write_segmenter(demo / "runs" / run, demo / "data", pretrained=pretrained, dice=dice, save_predictions=False)
    text = _headline(build_report(demo, tmp_path / "b", n_boot=N_BOOT))
    assert "the VolTA-3D-initialised model (vit-pretrained) did not beat vit-scratch: AUROC" in text
    assert ("the VolTA-3D-initialised model (unetr-pretrained) did not beat unet-scratch: Dice 0.500 vs 0.700, "
            "difference -0.200") in text
    assert text.count("Pretraining did not help here.") == 2
    # the separable classifier (AUROC 1 vs ~0.7 over 24 subjects) wins by a margin the CI resolves
    assert "vit-scratch is significantly better (the CI excludes 0)" in text


def test_missing_optional_inputs_omit_only_their_section(demo, tmp_path):
    shutil.rmtree(demo / "pretrain")
    (demo / "stages.json").unlink()
    shutil.rmtree(demo / "runs" / "seg_volta")
    shutil.rmtree(demo / "runs" / "seg_scratch")
    secs = sections(build_report(demo, tmp_path / "report", n_boot=N_BOOT).read_text())
    assert "Omitted: no pretraining run folder" in secs["pretraining"]
    assert "Omitted: no segmentation run among the inputs" in secs["segmentation"]
    assert "Wall time per stage omitted: no stages.json" in secs["settings"]
    for kept in ("headline", "results", "roc", "fractions"):
        assert "Omitted" not in secs[kept]
    assert "<img" in secs["roc"] and "<img" in secs["fractions"] and "Software" in secs["settings"]


def test_runs_on_other_folds_are_shown_not_comparable(demo, tmp_path):
    other = {**SPLITS, "folds": [SPLITS["folds"][1], SPLITS["folds"][0], SPLITS["folds"][2]]}
    run = write_classifier(tmp_path / "swin", pretrained=False, noise=0.3, seed=3, splits=other)
    res = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**res, "model": "swin-scratch"}))
    out = build_report({"VolTA": [demo / "runs" / "sex_volta"], "Swin": [run]}, tmp_path / "report", n_boot=N_BOOT)
    tables = md_tables((tmp_path / "report" / "summary.md").read_text())
    cmp = tables["sex (binary, fine-tuning): paired comparisons"]
    assert cmp["metric"].item().startswith("not comparable: runs") and "same folds" in cmp["metric"].item()
    assert "the VolTA-3D-initialised model (VolTA) could not be compared with Swin (not comparable:" in _headline(out)


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


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"headless browser check needs {CHROMIUM} (apt-get install chromium)")
def test_report_opens_in_a_headless_browser(demo, tmp_path):
    out = build_report(demo, tmp_path / "report", n_boot=N_BOOT)
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_report.py"), str(out), "--screenshot", str(shot)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 images loaded" in proc.stdout and shot.read_bytes()[:4] == b"\x89PNG"


def _fold_cmp(mean_a: float, mean_b: float, low: float, high: float, metric: str) -> dict:
    return {"fold_level": {metric: {"mean_a": mean_a, "mean_b": mean_b, "estimate": mean_a - mean_b, "ci_low": low,
                                    "ci_high": high, "wilcoxon_p": 0.06, "n": 5}}, "subject_level": {}, "delong": None}


def test_headline_reads_lower_mae_as_better_and_pairs_probes_by_model():
    ref = Run("vit-pretrained", {"model": "vit-pretrained", "encoder": "/enc", "kind": "regression", "primary_metric": "mae"})
    other = Run("vit-scratch", {"model": "vit-scratch", "encoder": None, "kind": "regression", "primary_metric": "mae"})
    won = headline_sentence("age (regression, fine-tuning)", ref, other, _fold_cmp(4.0, 5.0, -1.5, -0.5, "mae"))
    assert "vit-pretrained) beat vit-scratch: MAE 4.000 vs 5.000, difference -1.000" in won and "significant (the CI" in won
    lost = headline_sentence("age (regression, fine-tuning)", ref, other, _fold_cmp(5.0, 4.0, -0.2, 2.0, "mae"))
    assert "did not beat vit-scratch" in lost and "not significant (the CI includes 0)" in lost
    assert lost.endswith("Pretraining did not help here.")  # 5 folds: no small-sample caveat

    probes = [Run(f"probe-{p}-cls ({init})", {"model": f"probe-{p}-cls", "encoder": "/enc", "embedding_init": init})
              for p in ("knn", "linear") for init in ("pretrained", "random-init")]
    refs, pairs = pair_runs(probes, None)
    assert [r.name for r in refs] == ["probe-knn-cls (pretrained)", "probe-linear-cls (pretrained)"]
    assert [(a.results["model"], b.name) for a, b in pairs] == [
        ("probe-knn-cls", "probe-knn-cls (random-init)"), ("probe-linear-cls", "probe-linear-cls (random-init)")]
