import json

import pytest
import torch

from volta3d.cli import main
from volta3d.config import load_config
from volta3d.engine.checkpoint import load_checkpoint
from volta3d.engine.meta_arch import VolTA3D
from volta3d.engine.trainer import NonFiniteLossError, pretrain
from volta3d.runtime import MetricsCSV


def _run(overrides, data, out, *extra):
    cfg = load_config(overrides=overrides + ["train.deterministic=true", *extra])
    return pretrain(cfg, data, out, progress=False)


def test_exact_resume_is_bitwise(tiny_overrides, volume_folder, tmp_path):
    straight = _run(tiny_overrides, volume_folder, tmp_path / "straight", "train.max_steps=4")
    resumed = tmp_path / "resumed"
    _run(tiny_overrides, volume_folder, resumed, "train.max_steps=2")
    assert load_checkpoint(resumed / "checkpoints/last.pt")["step"] == 2
    _run(tiny_overrides, volume_folder, resumed, "train.max_steps=4")  # same command, continues

    a = load_checkpoint(straight / "checkpoints/last.pt")
    b = load_checkpoint(resumed / "checkpoints/last.pt")
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the resumed run's metrics have one row per step, none duplicated
    steps = [int(r["step"]) for r in MetricsCSV(resumed / "metrics.csv").read()]
    assert steps == [1, 2, 3, 4]
    straight_rows = MetricsCSV(straight / "metrics.csv").read()
    resumed_rows = MetricsCSV(resumed / "metrics.csv").read()
    assert [r["loss"] for r in straight_rows] == [r["loss"] for r in resumed_rows]


def test_run_writes_its_outputs(tiny_overrides, volume_folder, tmp_path):
    out = _run(tiny_overrides, volume_folder, tmp_path / "run", "train.max_steps=2")
    for name in (
        "config.yaml",
        "log.txt",
        "metrics.csv",
        "checkpoints/last.pt",
        "encoder.safetensors",
        "encoder.json",
    ):
        assert (out / name).is_file(), name
    rows = MetricsCSV(out / "metrics.csv").read()
    assert len(rows) == 2
    for key in ("loss_global", "loss_local", "loss_rec", "teacher_entropy", "center_norm", "lr", "momentum"):
        assert rows[-1][key] != "", key
    assert float(rows[0]["lr"]) == 0.0  # warm-up starts at 0
    # the teacher's remaining share of its initial weights: the product of the momenta so far, also in encoder.json
    momenta = [float(r["momentum"]) for r in rows]
    assert float(rows[-1]["teacher_init_share"]) == pytest.approx(momenta[0] * momenta[1])
    export = json.loads((out / "encoder.json").read_text())["training"]
    assert export == {"step": 2, "teacher_init_share": pytest.approx(float(rows[-1]["teacher_init_share"]))}
    for key in ("view_global_overlap", "view_local_in_global"):
        assert 0.0 <= float(rows[-1][key]) <= 1.0, key
    assert "non-finite" not in (out / "log.txt").read_text()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tiny_overrides, volume_folder, tmp_path, monkeypatch
):
    real = VolTA3D.compute_losses
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(VolTA3D, "compute_losses", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="non-finite loss at optimiser step 2"):
        _run(tiny_overrides, volume_folder, out)
    state = load_checkpoint(out / "checkpoints/last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_refuses_changed_method_settings(tiny_overrides, volume_folder, tmp_path):
    out = _run(tiny_overrides, volume_folder, tmp_path / "run", "train.max_steps=1")
    with pytest.raises(ValueError, match="loss.rec_weight"):
        _run(tiny_overrides, volume_folder, out, "train.max_steps=2", "loss.rec_weight=1.0")


def test_resume_ignores_downstream_sections(tiny_overrides, volume_folder, tmp_path):
    """classify / segment / probe keys are read by other commands: a config that changed (or gained) one
    since the checkpoint still resumes the pretraining."""
    out = _run(tiny_overrides, volume_folder, tmp_path / "run", "train.max_steps=1")
    _run(tiny_overrides, volume_folder, out, "train.max_steps=2", "classify.lr=0.5", "probe.n_splits=3")
    assert load_checkpoint(out / "checkpoints/last.pt")["step"] == 2


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = main(["pretrain", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "manifest not found" in err
    code = main(["pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "optim.epoch=3"])
    assert code == 2 and "unknown config key 'optim.epoch'" in capsys.readouterr().err


def test_pretrains_on_several_folders_of_other_cube_sizes(tiny_overrides, volume_folder, tmp_path):
    """Folders preprocessed to other cubes (as the demo's IXI 64^3 and MSD 48 x 64 x 48) pretrain
    together: a batch may hold volumes of different sizes, with DataLoader workers too."""
    from .conftest import write_volume_folder

    other = write_volume_folder(tmp_path / "other", n=4, size=24, seed=3)
    overrides = tiny_overrides + ["train.max_steps=3", "train.num_workers=2"]
    out = pretrain(load_config(overrides=overrides), [volume_folder, other], tmp_path / "run", progress=False)
    assert "pretraining on 8 volumes" in (out / "log.txt").read_text()


def test_collapse_alarm_fires_on_a_collapsing_configuration(tiny_overrides, volume_folder, tmp_path):
    """Without sharpening (teacher temperature 1 on cosine logits) DINO's teacher is uniform: the alarm must fire."""
    out = _run(tiny_overrides, volume_folder, tmp_path / "run", "train.max_steps=4", "train.collapse_patience=2",
               "loss.teacher_temp=1.0", "loss.warmup_teacher_temp=1.0")  # fmt: skip
    rows = MetricsCSV(out / "metrics.csv").read()
    assert [int(r["collapse_alarm"]) for r in rows] == [0, 1, 1, 1]
    assert "collapse alarm at step 2: uniform" in (out / "log.txt").read_text()
    for key in (
        "teacher_entropy_gap",
        "teacher_patch_entropy_gap",
        "student_cls_cosine",
        "teacher_cls_cosine",
        "cls_rank",
        "patch_rank",
        "log_k",
    ):
        assert rows[-1][key] != "", key


def test_resume_refuses_other_data(tiny_overrides, volume_folder, tmp_path):
    from .conftest import write_volume_folder

    out = _run(tiny_overrides, volume_folder, tmp_path / "run", "train.max_steps=1")
    other = write_volume_folder(tmp_path / "other", n=4, seed=9)
    with pytest.raises(ValueError, match="trained on other volumes"):
        _run(tiny_overrides, other, out, "train.max_steps=2")


def test_koleo_and_sinkhorn_options_train(tiny_overrides, volume_folder, tmp_path):
    out = _run(tiny_overrides, volume_folder, tmp_path / "run", "train.max_steps=2", "loss.koleo_weight=0.1",
               "loss.centering=sinkhorn")  # fmt: skip
    rows = MetricsCSV(out / "metrics.csv").read()
    assert (
        float(rows[-1]["koleo"]) > 0 and float(rows[-1]["center_norm"]) == 0.0
    )  # Sinkhorn leaves the center unused
    with pytest.raises(ValueError, match="koleo_weight > 0 needs optim.batch_size >= 2"):
        _run(tiny_overrides, volume_folder, tmp_path / "b1", "train.max_steps=1", "loss.koleo_weight=0.1",
             "optim.batch_size=1")  # fmt: skip


def test_non_finite_loss_is_one_line_in_the_cli_and_in_the_log(tiny_overrides, volume_folder, tmp_path, monkeypatch,
                                                                capsys):  # fmt: skip
    real = VolTA3D.compute_losses

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(VolTA3D, "compute_losses", poisoned)
    out = tmp_path / "nan"
    code = main(
        ["pretrain", "--data", str(volume_folder), "--output", str(out), "--no-progress", *tiny_overrides]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "non-finite loss at optimiser step 0" in err[-1] and "new --output folder" in err[-1]
    assert "non-finite loss at optimiser step 0" in (out / "log.txt").read_text()


def test_a_checkpoint_with_other_shapes_is_a_one_line_error(tiny_overrides, volume_folder, tmp_path):
    out = _run(tiny_overrides, volume_folder, tmp_path / "run", "train.max_steps=1")
    path = out / "checkpoints/last.pt"
    state = load_checkpoint(path)
    key = next(k for k in state["model"] if k.endswith("patch_embedding.position_embeddings"))
    state["model"][key] = torch.zeros(1, 3, 3)
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not fit this model") as err:
        _run(tiny_overrides, volume_folder, out, "train.max_steps=2")
    assert len(str(err.value).splitlines()) == 1


def test_a_truncated_cached_volume_is_one_line_from_the_loader_workers(tiny_overrides, volume_folder, tmp_path,
                                                                        capsys):  # fmt: skip
    bad = volume_folder / "s1.npy"
    bad.write_bytes(bad.read_bytes()[:90])
    code = main(["pretrain", "--data", str(volume_folder), "--output", str(tmp_path / "o"), "--no-progress",
                 *tiny_overrides, "train.num_workers=2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [err.strip().splitlines()[-1]]
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"volta3d pretrain: error: cannot read cached volume {bad} (subject s1)")
    )
