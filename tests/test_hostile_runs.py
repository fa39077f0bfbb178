"""Hostile runs (issue 23, part A): two runs in one folder, data changed in place under a resume, a
stale export, leakage and comparisons that make no sense. Each case builds its tiny input and checks
its outcome: refused in one line, warned in one line, or the correct result."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from volta3d import layout
from volta3d.cli import main
from volta3d.data.content import content_hashes, describe_change, volume_sha256
from volta3d.data.dataset import VolumeDataset, read_manifest
from volta3d.engine.checkpoint import load_checkpoint
from volta3d.errors import InputError
from volta3d.models.encoder import build_encoder
from volta3d.run_folder import claim_output
from volta3d.runtime import LOGGER_NAME, MetricsCSV, file_sha256

from .config_kwargs import section_kwargs
from .engine.conftest import TINY_OVERRIDES, write_volume_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The records of volta3d's logger (it does not propagate once a command has set it up)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The one line a refused command printed (and nothing else on stderr names an error)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith(f"volta3d {command}: error: "), err
    return err[0]


def _pretrain_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(data), "--output", str(out), "--no-progress", *TINY_OVERRIDES, *extra]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# ---------------------------------------------------------------- an output folder belongs to one run


def test_a_second_pretrain_into_a_busy_folder_is_refused_and_the_first_completes(tmp_path):
    data, out = write_volume_folder(tmp_path / "prep"), tmp_path / "run"
    cli = [sys.executable, "-m", "volta3d.cli"]
    first = subprocess.Popen([*cli, *_pretrain_argv(data, out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    try:
        _wait_for(out / layout.LOCK, first)
        second = subprocess.run([*cli, *_pretrain_argv(data, out, "optim.lr=2e-3")],
                                capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-2000:]
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert lines[0].startswith(
        f"volta3d pretrain: error: {out.resolve()} is in use by volta3d pretrain (pid {first.pid}"
    )
    # the first run's outputs are whole and its own: every step once, its settings, its export
    assert [int(r["step"]) for r in MetricsCSV(out / "metrics.csv").read()] == list(range(1, 5))
    assert load_checkpoint(out / "checkpoints/last.pt")["step"] == 4
    assert json.loads((out / "encoder.json").read_text())["training"]["step"] == 4
    assert "lr: 0.001" in (out / "config.yaml").read_text()
    assert not (out / layout.LOCK).exists()


HOLD = "import sys, time\nfrom volta3d.run_folder import claim_output\nwith claim_output(sys.argv[1], 'pretrain'):\n    time.sleep(600)\n"  # fmt: skip


def test_a_killed_run_never_blocks_its_resume(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stderr=subprocess.PIPE, text=True, env=ENV
    )
    try:
        _wait_for(out / layout.LOCK, holder)
        time.sleep(0.3)  # the holder writes its record right after taking the lock
        with pytest.raises(
            InputError, match=rf"in use by volta3d pretrain \(pid {holder.pid} on .*, started "
        ):
            claim_output(out, "pretrain").__enter__()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    with claim_output(out, "pretrain"):  # the kernel released the dead holder's lock
        assert (out / layout.LOCK).exists()
    assert not (out / layout.LOCK).exists()


def test_claims_nest_in_one_process_but_not_across_processes(tmp_path):
    parent = tmp_path / "demo"
    with (
        claim_output(parent, "demo"),
        claim_output(parent / "pretrain", "pretrain"),
        claim_output(parent, "demo"),
    ):
        child = subprocess.run([sys.executable, "-c", HOLD.replace("600", "0"), str(parent / "probe")],
                               capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
        assert (
            child.returncode == 1
            and f"lies inside {parent.resolve()}, which is in use by volta3d demo" in child.stderr
        )
    assert not any(p.name == layout.LOCK for p in parent.rglob("*"))


def test_the_demo_runs_its_stages_inside_its_own_claim(monkeypatch, tmp_path):
    from volta3d import demo

    for name in ("ixi_t1_2mm", "msd_task04_hippocampus"):
        (tmp_path / "shared" / name).mkdir(parents=True)
    data, out = _labelled(tmp_path), tmp_path / "demo"

    def plan(
        out: Path, shared: Path, quick: bool, workers: int, run_command: demo.RunCommand
    ) -> list[demo.Stage]:
        argv = ["select", str(data), "--label", "sex", "--output", str(out / "selection")]
        return [demo.Stage("select", lambda: run_command(argv), [], expected_s=1)]

    monkeypatch.setattr(demo, "plan", plan)
    assert main(["demo", "--output", str(out), "--shared-data", str(tmp_path / "shared")]) == 0
    assert json.loads((out / "stages.json").read_text())["stages"][0]["status"] == "done"
    assert (out / "selection/selection.csv").is_file() and not any(
        p.name == layout.LOCK for p in out.rglob("*")
    )


def test_preprocess_shards_share_a_folder_that_a_whole_run_cannot_take(tmp_path):
    out = tmp_path / "prep"
    shard = HOLD.replace("'pretrain')", "'preprocess', shard=(0, 2))")
    holder = subprocess.Popen(
        [sys.executable, "-c", shard, str(out)], stderr=subprocess.PIPE, text=True, env=ENV
    )
    try:
        _wait_for(out / ".volta3d.shard-0-of-2.lock", holder)
        with claim_output(out, "preprocess", shard=(1, 2)):
            pass
        with pytest.raises(InputError, match="shard 0/2 of .* is in use by volta3d preprocess"):
            claim_output(out, "preprocess", shard=(0, 2)).__enter__()
        with pytest.raises(InputError, match="is in use by volta3d preprocess"):
            claim_output(out, "preprocess").__enter__()
    finally:
        holder.kill()


def test_probe_into_a_pretraining_folder_is_refused_before_its_config_is_replaced(tmp_path, capsys):
    run = tmp_path / "pretrain"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    argv = ["probe", "--embeddings", "e.npz", "--data", "d", "--label", "sex", "--output", str(run)]
    assert main(argv) == 2
    assert "holds a `volta3d pretrain` run (checkpoints)" in _error_line(capsys, "probe")
    assert (run / "config.yaml").read_text() == "seed: 0\n" and not (run / layout.LOCK).exists()


def test_embed_output_naming_a_folder_is_refused(tmp_path, capsys):
    (tmp_path / "emb").mkdir()
    assert main(["embed", "--data", str(tmp_path), "--output", str(tmp_path / "emb")]) == 2
    assert "is a folder; give the file to write" in _error_line(capsys, "embed")


# ---------------------------------------------------------------- resume notices changed data


def test_a_stale_export_is_redone_and_data_changed_in_place_is_refused(tmp_path, capsys):
    data, out = write_volume_folder(tmp_path / "prep"), tmp_path / "run"
    assert main(_pretrain_argv(data, out, "train.max_steps=2")) == 0
    exported = (out / "encoder.safetensors").read_bytes()
    # a kill while the final export was written leaves the previous step's export behind
    meta = json.loads((out / "encoder.json").read_text())
    (out / "encoder.json").write_text(json.dumps({**meta, "training": {**meta["training"], "step": 1}}))
    (out / "encoder.safetensors").write_bytes(b"an earlier step's weights")
    assert main(_pretrain_argv(data, out, "train.max_steps=2")) == 0
    assert "export is from step 1, not the checkpoint's step 2" in capsys.readouterr().err
    assert (out / "encoder.safetensors").read_bytes() == exported
    assert json.loads((out / "encoder.json").read_text())["training"]["step"] == 2
    # the folder preprocessed again in place: same manifest, other volumes
    np.save(data / "s1.npy", np.load(data / "s1.npy")[:, ::-1].copy())
    assert main(_pretrain_argv(data, out, "train.max_steps=3")) == 2
    line = _error_line(capsys, "pretrain")
    assert f"was trained on other data: {(data / 's1.npy').resolve()} changed (content hash) since" in line
    assert load_checkpoint(out / "checkpoints/last.pt")["step"] == 2


def test_preprocessing_records_content_hashes_that_change_when_preprocessed_again(tmp_path):
    from volta3d.data.preprocess import preprocess_dataset

    from .data.scan_factory import head_like, write_nifti

    for i in range(2):
        write_nifti(tmp_path / f"in/s{i}.nii.gz", head_like(seed=i))
    out = tmp_path / "prep"
    preprocess_dataset(tmp_path / "in", out, section_kwargs("preprocess", size=[16, 16, 16]), progress=False)
    paths = read_manifest(out)["path"]
    record = json.loads(next((out / "records").glob("*.json")).read_text())
    assert record["sha256"][record["path"]] == file_sha256(out / record["path"])
    before = content_hashes(paths)
    assert before == {p: file_sha256(p) for p in paths}
    preprocess_dataset(tmp_path / "in", out, section_kwargs("preprocess", size=[12, 12, 12]), progress=False)
    change = describe_change(before, content_hashes(paths))
    assert change is not None and change.endswith("changed (content hash) and 1 more volume(s) differ")


def test_finetune_fingerprint_covers_volumes_and_a_file_path_encoder(tmp_path):
    from argparse import Namespace

    import torch

    from volta3d.config import load_config
    from volta3d.downstream.fingerprint import check_fingerprint, run_fingerprint
    from volta3d.models.export import save_encoder_export

    data, out = write_volume_folder(tmp_path / "prep"), tmp_path / "run"
    torch.manual_seed(0)
    save_encoder_export(tmp_path / "enc", build_encoder(**section_kwargs("model", img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)), None)  # fmt: skip
    args = Namespace(task="classify", model="vit", label="sex", fractions=None, like=None, data=str(data),
                     encoder=str(tmp_path / "enc/encoder.safetensors"), test_data=None, splits=None)  # fmt: skip
    cfg = load_config()
    now = run_fingerprint(args, cfg)
    assert now["run.encoder_sha256"] == file_sha256(tmp_path / "enc/encoder.safetensors")
    check_fingerprint(out, now)
    (out / "folds").mkdir()
    (out / "folds/fold0.json").write_text("{}")
    np.save(data / "s2.npy", np.zeros((1, 32, 32, 32), np.float16))
    with pytest.raises(
        InputError, match=r"holds folds made on other data: --data s2.npy changed \(content hash\)"
    ):
        check_fingerprint(out, run_fingerprint(args, cfg))
    # a fingerprint written before volumes were hashed still resumes
    old = {k: v for k, v in now.items() if not k.startswith("volumes.")}
    (out / "fingerprint.json").write_text(json.dumps(old))
    check_fingerprint(out, run_fingerprint(args, cfg))


# ---------------------------------------------------------------- leakage and nonsense


def _labelled(tmp_path: Path, n: int = 6) -> Path:
    data = write_volume_folder(tmp_path / "prep", n=n, size=16)
    table = pd.read_csv(data / "manifest.csv")
    table["sex"] = ["F", "M"] * (n // 2)
    table.to_csv(data / "manifest.csv", index=False)
    return data


def _splits(path: Path, *tests: list[str], subjects: list[str]) -> Path:
    folds = [{"train": sorted(set(subjects) - set(t)), "test": t} for t in tests]
    path.write_text(json.dumps({"method": "given", "n_splits": len(folds), "folds": folds}))
    return path


def _finetune(data: Path, out: Path, *extra: str) -> int:
    return main(["finetune", "classify", "--data", str(data), "--label", "sex", "--output", str(out),
                 "--no-progress", *extra])  # fmt: skip


def test_one_scan_under_two_subject_ids_across_a_fold_is_refused(tmp_path, capsys):
    data = _labelled(tmp_path)
    shutil.copy(data / "s0.npy", data / "s3.npy")  # s3 is s0's scan under another id
    ids = [f"s{i}" for i in range(6)]
    splits = _splits(tmp_path / "splits.json", ["s0", "s1", "s2"], ["s3", "s4", "s5"], subjects=ids)
    assert _finetune(data, tmp_path / "run", "--splits", str(splits)) == 2
    line = _error_line(capsys, "finetune")
    assert (
        f"{data.resolve() / 's0.npy'} (subject s0) and {data.resolve() / 's3.npy'} (subject s3) are the same volume"
        in line
    )
    assert "fold 0 trains on subject s3 and tests on s0: the test scan leaks into training" in line


def test_an_external_test_set_holding_the_training_scans_is_refused(tmp_path, capsys):
    data = _labelled(tmp_path)
    assert _finetune(data, tmp_path / "run", "--test-data", str(data)) == 2
    line = _error_line(capsys, "finetune")
    assert (
        "(subject external:s0) and" in line and "fold 0 trains on subject s0 and tests on external:s0" in line
    )


def test_the_same_scan_kept_on_one_side_and_conflicting_labels_are_warned(tmp_path, logged):
    from volta3d.protocol.labels import prepare_labels
    from volta3d.protocol.leakage import check_run_rows

    data = _labelled(tmp_path)
    shutil.copy(data / "s0.npy", data / "s3.npy")
    table = read_manifest(data)
    table.loc[table["subject_id"] == "s5", "subject_id"] = "s4"  # s4: F and M
    folds = {"folds": [{"train": ["s0", "s3", "s1"], "test": ["s2", "s4"]},
                       {"train": ["s2", "s4"], "test": ["s0", "s3", "s1"]}]}  # fmt: skip
    check_run_rows(table, folds, prepare_labels(table, "sex"))
    warned = [r.getMessage() for r in logged.records]
    assert any("(subject s0) and" in w and "no fold separates them" in w for w in warned)
    assert any("1 subject(s) have different 'sex' labels on their scans (e.g. s4: F, M)" in w for w in warned)


def test_a_path_listed_twice_and_the_same_data_folder_twice_are_refused(tmp_path, capsys):
    data = write_volume_folder(tmp_path / "prep")
    assert main(_pretrain_argv(data, tmp_path / "run", "--data", str(data))) == 2
    assert f"--data {data} is given twice" in _error_line(capsys, "pretrain")
    table = pd.read_csv(data / "manifest.csv")
    pd.concat([table, table.iloc[[1]]]).to_csv(data / "manifest.csv", index=False)
    with pytest.raises(InputError, match=r"lists s1.npy twice \(lines 3 and 6\); each scan must appear once"):
        read_manifest(data)


@pytest.mark.parametrize(
    ("tests", "message"),
    [
        ((["s0", "s1", "s2"], ["s0", "s1", "s2"]), "folds 0 and 1 test the same subjects"),
        ((["s0", "s1", "s2"], ["s2", "s3", "s4"]), "subject s2 is tested in folds 0 and 1"),
    ],
)
def test_repeated_or_overlapping_test_folds_are_refused(tmp_path, capsys, tests, message):
    data = _labelled(tmp_path)
    splits = _splits(tmp_path / "splits.json", *tests, subjects=[f"s{i}" for i in range(6)])
    assert _finetune(data, tmp_path / "run", "--splits", str(splits)) == 2
    assert f"{message}; each subject belongs to one test fold" in _error_line(capsys, "finetune")


def test_subjects_no_fold_tests_are_warned(tmp_path, logged):
    from volta3d.protocol.leakage import check_run_rows

    table = read_manifest(_labelled(tmp_path))
    folds = {"folds": [{"train": ["s2", "s3", "s4", "s5"], "test": ["s0"]},
                       {"train": ["s0", "s2", "s3", "s4", "s5"], "test": ["s1"]}]}  # fmt: skip
    check_run_rows(table, folds)
    assert "4 of 6 subjects are never tested by the 2 folds of the split (e.g. s2)" in logged.text


def _results(path: Path, splits: dict, *, label: str = "sex", kind: str = "binary", seed: int = 0) -> Path:
    """A finished run's results.json and predictions.csv (one row per test subject)."""
    from volta3d.protocol.results import save_run

    rng = np.random.default_rng(seed)
    rows, folds = [], []
    for k, fold in enumerate(splits["folds"]):
        truth = np.array([int(s[1:]) % 2 for s in fold["test"]])
        guess = np.where(rng.random(len(truth)) < 0.7, truth, 1 - truth)
        folds.append(
            {"fold": k, "metrics": {"auroc": 0.5 + 0.1 * seed, "accuracy": float(np.mean(guess == truth))}}
        )
        rows += [{"subject_id": s, "fold": k, "y_true": int(t), "label": "FM"[t], "score": float(g),
                  "prediction": "FM"[g]} for s, t, g in zip(fold["test"], truth, guess, strict=True)]  # fmt: skip
    results = {
        "label": label,
        "kind": kind,
        "model": f"m{seed}",
        "splits": splits,
        "folds": folds,
        "aggregate": {},
    }
    save_run(path, results, pd.DataFrame(rows))
    return path


def test_compare_refuses_other_labels_or_tasks_and_a_nonsense_n_boot(tmp_path, capsys):
    subjects = [f"s{i:02d}" for i in range(20)]
    splits = {
        "folds": [
            {"train": subjects[10:], "test": subjects[:10]},
            {"train": subjects[:10], "test": subjects[10:]},
        ]
    }
    a = _results(tmp_path / "a", splits)
    for name, kw, what in (("age", {"label": "age"}, "labels ('sex' vs 'age')"),
                           ("reg", {"kind": "regression"}, "kinds of task ('binary' vs 'regression')")):  # fmt: skip
        assert main(["compare", str(a), str(_results(tmp_path / name, splits, **kw))]) == 2
        assert f"predict different {what}; a paired difference between them means nothing" in _error_line(
            capsys, "compare"
        )
    for n_boot in ("-5", "0", "200000000"):
        assert main(["compare", str(a), str(a), "--n-boot", n_boot]) == 2
        assert f"--n-boot) must be between 1 and 100000, got {n_boot}" in _error_line(capsys, "compare")


def test_one_fold_compares_per_subject_not_with_a_zero_width_ci(tmp_path):
    from volta3d.evaluation.comparison import compare_results, format_comparison

    subjects = [f"s{i:02d}" for i in range(30)]
    external = {"folds": [{"train": subjects[:10], "test": subjects[10:]}]}
    cmp = compare_results(_results(tmp_path / "a", external, seed=1), _results(tmp_path / "b", external, seed=2),
                          n_boot=200)  # fmt: skip
    fold = cmp["fold_level"]["auroc"]
    assert fold["n"] == 1 and np.isnan(fold["ci_low"]) and np.isnan(fold["wilcoxon_p"])
    correct = cmp["subject_level"]["correct"]
    assert correct["n"] == 20 and correct["ci_low"] < correct["ci_high"]
    assert correct["estimate"] == pytest.approx(cmp["fold_level"]["accuracy"]["estimate"])
    text = format_comparison(cmp)
    assert "per fold (1 fold: no CI or test over folds; the paired evidence is per subject)" in text
    assert "[+0.000, +0.000]" not in text and "per subject (bootstrap over subjects)" in text


# ---------------------------------------------------------------- smaller ones


def test_predict_refuses_a_fold_without_its_model_json(tmp_path, capsys):
    from volta3d import layout
    from volta3d.downstream.saved import MODEL_FORMAT

    models = tmp_path / "run/models"
    for k in (0, 1):
        (models / f"fold{k}").mkdir(parents=True)
        (models / f"fold{k}" / layout.MODEL_WEIGHTS).write_bytes(b"")
    (models / "fold0" / layout.MODEL_META).write_text(
        json.dumps({"format": MODEL_FORMAT, "format_version": 1, "fold": 0})
    )
    assert main(["predict", str(tmp_path / "run"), "scan.nii.gz", "--output", str(tmp_path / "pred")]) == 2
    assert f"saved model incomplete: {models / 'fold1' / layout.MODEL_META}" in _error_line(capsys, "predict")
    shutil.rmtree(models / "fold1")  # the whole fold folder gone: the run's splits.json still has 2 folds
    (tmp_path / "run/splits.json").write_text(json.dumps({"folds": [{}, {}]}))
    assert main(["predict", str(tmp_path / "run"), "scan.nii.gz", "--output", str(tmp_path / "pred")]) == 2
    assert "holds no model for fold 1 (an unfinished finetune run?" in _error_line(capsys, "predict")


def test_mask_labels_with_a_gap_are_refused(tmp_path):
    from volta3d.downstream.train_segment import check_mask_classes

    mask = np.zeros((1, 8, 8, 8), np.uint8)
    mask[0, 2:4, 2:4, 2:4] = 3
    np.save(tmp_path / "m.npy", mask)
    with pytest.raises(
        InputError, match=r"mask .*m.npy has label 3 but no mask has label 1: labels must be contiguous"
    ):
        check_mask_classes([str(tmp_path / "m.npy")], None)


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        (
            np.zeros((1, 12, 16, 16), np.float16),
            r"has shape \(1, 12, 16, 16\), the other volumes of its folder \(1, 16, 16, 16\)",
        ),
        (np.zeros((1, 16, 16, 16), np.int16), "has dtype int16"),
        (np.zeros((1, 16, 16, 16), np.complex64), "has dtype complex64"),
        (np.zeros((16, 16, 16), np.float32), r"has shape \(16, 16, 16\), not \(channels, D, H, W\)"),
    ],
)
def test_a_foreign_cached_volume_is_refused_naming_it(tmp_path, volume, message):
    data = write_volume_folder(tmp_path / "prep", size=16)
    np.save(data / "s2.npy", volume)
    with pytest.raises(InputError, match=rf"cached volume {data.resolve() / 's2.npy'} {message}"):
        VolumeDataset(data)


def test_content_hashes_read_the_record_not_the_volume(tmp_path, monkeypatch):
    from volta3d.data import content

    folder = tmp_path / "prep"
    (folder / "volumes").mkdir(parents=True)
    (folder / "records").mkdir()
    np.save(folder / "volumes/a.npy", np.zeros((1, 4, 4, 4), np.float16))
    size = (folder / "volumes/a.npy").stat().st_size
    record = {"sizes": {"volumes/a.npy": size}, "sha256": {"volumes/a.npy": "recorded"}}
    (folder / "records/a.json").write_text(json.dumps(record))
    monkeypatch.setattr(content, "file_sha256", lambda p: pytest.fail(f"read {p}"))
    assert volume_sha256(folder / "volumes/a.npy") == "recorded"
    record["sizes"]["volumes/a.npy"] = size + 1  # the file no longer has its recorded size: read it
    (folder / "records/a.json").write_text(json.dumps(record))
    monkeypatch.undo()
    assert volume_sha256(folder / "volumes/a.npy") == file_sha256(folder / "volumes/a.npy")
