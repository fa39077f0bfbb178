"""Config values: a wrong type, range or choice is a one-line error naming the key, before any work."""

from __future__ import annotations

import pytest

from volta3d.cli import main
from volta3d.config import ConfigError, bundled_configs, load_config, to_kwargs


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=abc", "optim.lr='abc' must be a finite number"),
    ("seed=abc", "seed='abc' must be a finite number"),
    ("device=tpu", "device='tpu' must be auto, cpu, cuda or cuda:N"),
    ("head.out_dim=0", "head.out_dim=0 must be an integer >= 1"),
    ("train.log_every=0", "train.log_every=0 must be an integer >= 1"),
    ("optim.lr=-1", "optim.lr=-1 must be > 0"),
    ("optim.momentum_teacher=2", "optim.momentum_teacher=2 must be in [0, 1]"),
    ("train.precision=fp8", "train.precision='fp8' must be one of auto, fp32, bf16"),
    ("classify.epochs=0", "classify.epochs=0 must be an integer >= 1"),
    ("optim.batch_size=2.5", "optim.batch_size=2.5 must be an integer >= 1"),
    ("train.deterministic=maybe", "train.deterministic='maybe' must be true or false"),
    ("preprocess.size=64", "preprocess.size=64 must be a list"),
    ("loss.centering=sk", "loss.centering='sk' must be one of ema, sinkhorn"),
    ("optim.lr=.nan", "optim.lr=nan must be a finite number"),
])  # fmt: skip
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert expected in str(err.value) and len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    "override",
    [
        "optim.warmup_epochs=0.3",
        "device=cuda:1",
        "optim.lr=1e-3",
        "seed=7",
        "eval.data=prep/ixi",
        "classify.img_size=64",
        "masking.ratio=0",
    ],
)
def test_sensible_values_pass(override):
    load_config(overrides=[override])


@pytest.mark.parametrize("name", bundled_configs())
def test_every_bundled_config_is_valid(name):
    files = [name] if name in ("tiny-cpu", "paper", "default") else ["tiny-cpu", name]
    load_config(files)


def test_cli_reports_a_bad_value_in_one_line(tmp_path, capsys):
    code = main(["pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "optim.lr=-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "optim.lr=-1 must be > 0" in err[0]


def test_global_crop_size_follows_the_model_img_size():
    cfg = load_config(overrides=["model.img_size=32"])
    assert cfg.views.global_size == 32 and to_kwargs(cfg.views)["global_size"] == 32
    assert load_config(["tiny-cpu"]).views.global_size == 64
