"""Hostile corpus, part B of issue 23: every size a user can set is refused before it is allocated,
and inputs that raised tracebacks get one line naming the file, column or key. Each case builds its
own tiny input; a command is run through ``volta3d.cli.main`` and must exit 2 with one error line
and no traceback (or give the correct result). Memory limits are shown to act before allocation by
returning at once, under a small tracemalloc peak, on inputs that declare gigabytes."""

from __future__ import annotations

import gzip
import importlib
import json
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from volta3d.cli import main
from volta3d.config import load_config
from volta3d.data.dataset import VolumeDataset
from volta3d.data.io import ScanError, read_volume
from volta3d.data.pipeline import PreprocessSettings
from volta3d.downstream.classifier import build_classifier
from volta3d.downstream.saved import check_record_fits_weights, save_fold_model
from volta3d.engine.schedules import MAX_RUN_STEPS
from volta3d.engine.trainer import _schedules
from volta3d.errors import InputError

from .config_kwargs import kwargs_for, section
from .data.scan_factory import head_like, write_nifti
from .downstream.synthetic import write_blob_dataset, write_sphere_segmentation

MAX_VOXELS = section("preprocess")["max_voxels"]  # the voxel limit scans are read under

# a ViT small enough to build in milliseconds on 16^3 volumes
TINY = ["model.img_size=16", "model.patch_size=8", "model.hidden_size=16", "model.mlp_dim=32",
        "model.num_layers=2", "model.num_heads=2", "model.summariser.heads=2", "model.deconv_chns=4",
        "views.local_size=8", "views.n_local=2", "head.out_dim=16", "head.hidden_dim=16",
        "head.bottleneck_dim=8", "optim.batch_size=4", "train.num_workers=0", "train.tensorboard=false",
        "device=cpu"]  # fmt: skip


def _refused(capsys, argv: list[str], *named: str) -> str:
    """Run a command that must refuse: exit 2, no traceback, one error line naming ``named``."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"volta3d {argv[0]}: error: "), err
    for text in named:
        assert text in line, line
    return line


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    """8 subjects of 24^3 volumes, with label columns that cannot fill 2 folds."""
    root = write_blob_dataset(tmp_path_factory.mktemp("blobs"), n_subjects=8, size=24)
    table = pd.read_csv(root / "manifest.csv")
    table["one_member"] = ["a"] * 7 + ["b"]
    table["with_inf"] = [20.0, 30, 40, np.inf, 50, 60, 70, 80]
    table["mostly_empty"] = [20.0] + [np.nan] * 6 + [30.0]
    table.to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture(scope="module")
def raw_embeddings(blobs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "raw.npz"
    assert main(["embed", "--raw-volume", "--raw-grid", "2", "--data", str(blobs), "--output", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    return out


def _copy_manifest(src: Path, dst: Path) -> Path:
    """A folder whose manifest points at ``src``'s volumes, so a case can edit its own copies."""
    dst.mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(src / "manifest.csv")
    for name in table["path"]:
        (dst / name).write_bytes((src / name).read_bytes())
    table.to_csv(dst / "manifest.csv", index=False)
    return dst


# ---------------------------------------------------------------- sizes, refused before allocation


def test_an_output_cube_over_max_voxels_is_refused_before_any_scan_is_read(tmp_path, capsys):
    for i in range(2):
        write_nifti(tmp_path / f"in/s{i}.nii.gz", head_like(seed=i))
    line = _refused(capsys, ["preprocess", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                             "preprocess.size=[640,640,640]"], "preprocess.size", "preprocess.max_voxels")  # fmt: skip
    assert "262,144,000 voxels" in line
    assert not (tmp_path / "out").exists()  # refused with the config, before the output or any scan
    with pytest.raises(InputError, match="over preprocess.max_voxels=1,000"):
        PreprocessSettings(
            **kwargs_for(PreprocessSettings, "preprocess", size=(16, 16, 16), max_voxels=1000)
        )  # the library path, too


def test_a_raw_grid_finer_than_the_volume_is_refused_before_pooling(blobs, tmp_path, capsys):
    start = time.perf_counter()
    _refused(capsys, ["embed", "--raw-volume", "--raw-grid", "1000", "--data", str(blobs), "--output",
                      str(tmp_path / "r.npz"), "--no-progress"], "raw-volume grid 1000", "24 voxels", "--raw-grid")  # fmt: skip
    assert time.perf_counter() - start < 20  # 16 volumes of 1000^3 would be 64 GB
    assert not (tmp_path / "r.npz").exists()


def test_schedules_hold_the_steps_that_run_not_the_epochs():
    start = time.perf_counter()
    cfg = load_config(overrides=["optim.epochs=20000000", "train.max_steps=1"])
    s = _schedules(cfg, steps_per_epoch=2, effective_batch=4)
    assert time.perf_counter() - start < 5  # 4.9 GB of schedules before
    assert s.total_steps == 40_000_000 and len(s.lr) == len(s.momentum) == len(s.freeze_last_layer) == 1
    whole = _schedules(load_config(overrides=["optim.epochs=3"]), steps_per_epoch=2, effective_batch=4)
    part = _schedules(load_config(overrides=["optim.epochs=3", "train.max_steps=4"]), 2, 4)
    for name in ("lr", "weight_decay", "momentum", "teacher_temp", "teacher_patch_temp", "freeze_last_layer"):
        np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[:4])  # same values, fewer


def test_a_run_over_the_step_limit_is_refused_and_a_huge_warmup_is_truncated():
    with pytest.raises(InputError, match=f"optim.epochs=20000000 x 2 .* over the limit of {MAX_RUN_STEPS:,}"):
        _schedules(load_config(overrides=["optim.epochs=20000000"]), steps_per_epoch=2, effective_batch=4)
    start = time.perf_counter()
    cfg = load_config(overrides=["optim.warmup_epochs=1e9", "optim.lr_scaling=none", "train.max_steps=3"])
    s = _schedules(cfg, steps_per_epoch=2, effective_batch=4)
    assert time.perf_counter() - start < 5  # a 16 GB warm-up ramp before
    # the documented truncation: a warm-up longer than the run ramps for the whole run
    np.testing.assert_allclose(s.lr, [5e-4 * i / 2e9 for i in range(3)])


def _saved_classifier(run: Path) -> Path:
    """One saved fold model, as ``finetune`` writes it (no training: the weights' shapes are what count)."""
    encoder = {"img_size": 16, "patch_size": 8, "hidden_size": 16, "mlp_dim": 32, "num_layers": 2,
               "num_heads": 2, "in_channels": 1, "qkv_bias": False, "deconv_chns": 4, "dropout": 0.0,
               "input_norm": "zscore"}  # fmt: skip
    build = {"model": "vit", "num_outputs": 2, "encoder_kwargs": encoder,
             "summariser_kwargs": {"num_heads": 2, "mlp_ratio": 4.0}, "pooling": "cls", "img_size": None,
             "swin_kwargs": None, "sfcn_kwargs": None}  # fmt: skip
    net = build_classifier("vit", 2, encoder_kwargs=encoder, summariser_kwargs=build["summariser_kwargs"],
                           pooling="cls", img_size=None)  # fmt: skip
    meta = {
        "task": "classify",
        "kind": "binary",
        "classes": ["a", "b"],
        "fold": 0,
        "fraction": 1.0,
        "build": build,
    }
    return save_fold_model(run, "fold0", net, meta) / "model.json"


@pytest.mark.parametrize(
    "change, named",
    [({"hidden_size": 2048, "mlp_dim": 8192, "num_heads": 16}, "(16,) in the weights, (2048,) in the record"),
     ({"num_layers": 100000}, "declares num_layers=100000 but")],
    ids=["width", "depth"],
)  # fmt: skip
def test_model_json_sizes_are_checked_against_the_weights_before_building(tmp_path, capsys, change, named):
    record = _saved_classifier(tmp_path / "run")
    meta = json.loads(record.read_text())
    check_record_fits_weights(
        record.parent, meta
    )  # the record as saved fits (and torch's meta device is warm)
    meta["build"]["encoder_kwargs"].update(change)
    record.write_text(json.dumps(meta))
    scan = write_nifti(tmp_path / "scan.nii.gz", head_like())
    importlib.import_module("volta3d.downstream.predict")  # imported before memory and time are counted
    tracemalloc.start()
    start = time.perf_counter()
    try:
        line = _refused(capsys, ["predict", str(tmp_path / "run"), str(scan), "--output", str(tmp_path / "p"),
                                 "--device", "cpu", "--no-progress"], "model.json", "model.safetensors", named)  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 10 and peak < 50e6  # 3.1 GB before
    assert "more)" in line or "num_layers" in line  # the message is whole, not cut at its first line


def _header_only(path: Path, shape, dtype, compress: bool) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    data = header.binaryblock + b"\0" * 4 + b"\0" * 1500  # about 2 KB, no voxels
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize(
    "name, shape, dtype, reason",
    [("f64.nii", (512,) * 3, np.float64, "512 x 512 x 512 float64 voxels = 1,073,741,824 bytes, over the limit"),
     ("f64.nii.gz", (512,) * 3, np.float64, "over the limit of 536,870,912 (preprocess.max_voxels x 4 bytes)"),
     ("f32.nii.gz", (256,) * 3, np.float32, "more than 1032 times the"),
     ("f32.nii", (300,) * 3, np.float32, "declares 108,000,000 bytes, the file holds 1,852")],
)  # fmt: skip
def test_a_header_declaring_more_than_the_file_or_the_limit_is_refused_before_reading(
    tmp_path, name, shape, dtype, reason
):
    path = _header_only(tmp_path / name, shape, dtype, compress=name.endswith(".gz"))
    tracemalloc.start()
    try:
        with pytest.raises(ScanError, match=f"{name}.*{reason}".replace("(", r"\(").replace(")", r"\)")):
            read_volume(path, MAX_VOXELS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6  # 1.5 GB allocated before the rejection


def test_a_real_gzip_scan_of_many_zeros_still_reads(tmp_path):
    raw = nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)).to_bytes()
    (tmp_path / "zeros.nii.gz").write_bytes(gzip.compress(raw, compresslevel=9))  # ~950-fold
    assert read_volume(tmp_path / "zeros.nii.gz", MAX_VOXELS)[0].shape == (1, 64, 64, 64)


# ---------------------------------------------------------------- tracebacks that became one line


def _overwrite_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10:60] = b"(" * 50  # numpy parses the header as a literal: tokenize.TokenError
    path.write_bytes(bytes(data))


def test_an_overwritten_npy_header_is_recomputed_by_preprocess_and_named_by_pretrain(tmp_path, capsys):
    for i in range(4):
        write_nifti(tmp_path / f"in/s{i}.nii.gz", head_like(seed=i))
    command = [
        "preprocess",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "prep"),
        "preprocess.size=[16,16,16]",
    ]
    assert main([*command, "--no-progress"]) == 0
    volume = sorted((tmp_path / "prep/volumes").glob("*.npy"))[0]
    _overwrite_header(volume)
    capsys.readouterr()
    assert main([*command, "--no-progress"]) == 0  # a bad cache entry: redone, not a traceback
    assert "4 accepted, 0 rejected (1 computed, 3 cached)" in capsys.readouterr().err
    assert np.load(volume).shape == (1, 16, 16, 16)
    _overwrite_header(volume)
    _refused(capsys, ["pretrain", "--data", str(tmp_path / "prep"), "--output", str(tmp_path / "run"),
                      "train.max_steps=1", "--no-progress", *TINY], str(volume), "header does not parse")  # fmt: skip


def test_a_nan_in_a_cached_volume_names_the_volume(blobs, tmp_path, capsys):
    data = _copy_manifest(blobs, tmp_path / "data")
    bad = data / "sub03_0.npy"
    volume = np.load(bad)
    volume[0, 2, 2, 2] = np.nan
    np.save(bad, volume)
    _refused(capsys, ["embed", "--raw-volume", "--data", str(data), "--output", str(tmp_path / "e.npz"),
                      "--no-progress"], str(bad), "subject sub03", "NaN or Inf")  # fmt: skip
    with pytest.raises(InputError, match="sub03_0.npy .* holds NaN or Inf voxels"):
        VolumeDataset(data)[3]  # the loader every training reads through


def test_a_cached_volume_of_another_rank_is_named(blobs, tmp_path, capsys):
    data = _copy_manifest(blobs, tmp_path / "data")
    np.save(data / "sub02_0.npy", np.load(data / "sub02_0.npy")[0])  # (D, H, W): no channel axis
    _refused(capsys, ["embed", "--raw-volume", "--data", str(data), "--output", str(tmp_path / "e.npz"),
                      "--no-progress"], "sub02_0.npy", "(24, 24, 24)")  # fmt: skip


@pytest.mark.parametrize(
    "label, named",
    [("one_member", "class 'b' has 1 subject(s), fewer than the 2 folds"),
     ("with_inf", "has the value inf for subject sub03"),
     ("mostly_empty", "(6 of 8 rows have no value)")],
)  # fmt: skip
def test_labels_that_cannot_fill_the_folds_are_refused_before_probing(
    blobs, raw_embeddings, tmp_path, capsys, label, named
):
    _refused(capsys, ["probe", "--embeddings", str(raw_embeddings), "--data", str(blobs), "--label", label,
                      "--output", str(tmp_path / "p"), "probe.n_splits=2"], f"label column '{label}'", named)  # fmt: skip


def test_labels_are_checked_before_finetuning_and_pretraining(blobs, tmp_path, capsys):
    start = time.perf_counter()
    _refused(capsys, ["finetune", "classify", "--data", str(blobs), "--output", str(tmp_path / "ft"), "--label",
                      "with_inf", "classify.n_splits=2", "--no-progress", *TINY], "'with_inf'", "inf")  # fmt: skip
    _refused(capsys, ["finetune", "classify", "--data", str(blobs), "--output", str(tmp_path / "ft2"), "--label",
                      "age", "classify.task=regression", "classify.n_splits=9", "--no-progress", *TINY],
             "label column 'age' has values for 8 subjects, fewer than the 9 folds")  # fmt: skip
    _refused(capsys, ["pretrain", "--data", str(blobs), "--output", str(tmp_path / "pt"), "--eval-data", str(blobs),
                      "--eval-label", "one_member", "eval.n_splits=2", "--no-progress", *TINY], "class 'b'")  # fmt: skip
    assert time.perf_counter() - start < 60  # refused before any epoch (27 s of training before the error)


def test_a_truncated_mask_is_named_before_segmentation(tmp_path, capsys):
    data = write_sphere_segmentation(tmp_path / "seg", n_subjects=4, size=24)
    mask = data / "lab02.npy"
    mask.write_bytes(mask.read_bytes()[:-1000])
    _refused(capsys, ["finetune", "segment", "--data", str(data), "--output", str(tmp_path / "s"),
                      "segment.model=unet", "segment.crop_size=16", "--no-progress", *TINY], str(mask))  # fmt: skip


@pytest.mark.parametrize("model", ["unet", "unetr"])
def test_a_crop_that_the_network_stride_does_not_divide_is_refused(tmp_path, capsys, model):
    data = write_sphere_segmentation(tmp_path / "seg", n_subjects=4, size=24)
    _refused(capsys, ["finetune", "segment", "--data", str(data), "--output", str(tmp_path / "s"),
                      f"segment.model={model}", "segment.crop_size=33", "--no-progress", *TINY, "model.num_layers=3"],
             "segment.crop_size (33) must be a multiple of")  # fmt: skip


def test_a_10007_character_path_is_rejected_and_the_batch_goes_on(tmp_path, capsys):
    good = [write_nifti(tmp_path / f"in/s{i}.nii.gz", head_like(seed=i)) for i in range(2)]
    fill = 10_007 - len(str(tmp_path)) - len("/s.nii.gz")
    long = str(tmp_path) + "/a" * (fill // 2) + "b" * (fill % 2) + "/s.nii.gz"
    assert len(long) == 10_007
    pd.DataFrame({"path": [str(good[0]), long, str(good[1])], "subject_id": ["s0", "s_long", "s1"]}).to_csv(
        tmp_path / "list.csv", index=False
    )
    assert main(["preprocess", str(tmp_path / "list.csv"), "--output", str(tmp_path / "out"),
                 "preprocess.size=[16,16,16]", "--no-progress"]) == 0  # fmt: skip
    assert "Traceback" not in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "out/manifest.csv")["subject_id"].tolist() == ["s0", "s1"]
    rejected = pd.read_csv(tmp_path / "out/rejected.csv")
    assert rejected["reason"].tolist() == ["cannot open a path of 10,007 characters: File name too long"]


def test_a_ragged_row_is_named_in_an_input_csv_and_in_a_manifest(blobs, tmp_path, capsys):
    scan = write_nifti(tmp_path / "s0.nii.gz", head_like())
    (tmp_path / "list.csv").write_text(f"path,subject_id,sex\n{scan},s0,F\n{scan},s1,M,extra\n")
    _refused(capsys, ["preprocess", str(tmp_path / "list.csv"), "--output", str(tmp_path / "out")],
             "list.csv: line 3 has 4 fields, the header 3")  # fmt: skip
    data = _copy_manifest(blobs, tmp_path / "data")
    lines = (data / "manifest.csv").read_text().splitlines()
    lines[1] += ",surplus"  # pandas would read a longer first row as an index column: labels shift
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    _refused(capsys, ["embed", "--raw-volume", "--data", str(data), "--output", str(tmp_path / "e.npz")],
             "manifest.csv: line 2 has")  # fmt: skip


@pytest.mark.parametrize(
    "override, named",
    [("preprocess=5", "config key 'preprocess' is a section"),
     ("optim.betas=[0.9]", "optim.betas=[0.9] must be 2 numbers in [0, 1)"),
     ("optim.lr=1e300", "optim.lr=1e+300 must be <= 10"),
     ("optim.lr=[1", "cannot parse command-line override 'optim.lr=[1'"),
     ("optim.lr=${nope}", "config value optim.lr cannot be resolved")],
)  # fmt: skip
def test_bad_overrides_are_one_line(tmp_path, capsys, override, named):
    _refused(capsys, ["pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "o"), override], named)


def test_a_yaml_tag_in_an_override_is_refused_and_never_executed(tmp_path, capsys):
    marker = tmp_path / "executed"
    override = f"optim.lr=!!python/object/apply:os.system ['touch {marker}']"
    _refused(capsys, ["pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "o"), override],
             "YAML tags (!...) are not allowed")  # fmt: skip
    assert not marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_predict_on_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    _saved_classifier(tmp_path / "run")
    scan = write_nifti(tmp_path / "scan.nii.gz", head_like())
    _refused(capsys, ["predict", str(tmp_path / "run"), str(scan), "--output", str(tmp_path / "p"), "--device",
                      "cuda"], "device 'cuda'", "no CUDA GPU")  # fmt: skip


@pytest.mark.parametrize(
    "flag, value", [("--steps", "0"), ("--matmul-size", "100000"), ("--pipeline-volumes", "0")]
)
def test_bench_counts_are_checked(capsys, flag, value):
    _refused(capsys, ["bench", flag, value], f"{flag} must be")
