"""A rerun into a fine-tuning folder resumes only the same run: another encoder, label or setting is refused
in one line naming the first difference, before anything in the folder is overwritten."""

from __future__ import annotations

import json

import pytest
import torch

from volta3d.cli import main
from volta3d.models.encoder import build_encoder
from volta3d.models.export import save_encoder_export

from ..config_kwargs import section_kwargs
from .conftest import TINY_OVERRIDES

FAST = [
    *TINY_OVERRIDES,
    "classify.epochs=1",
    "classify.n_splits=2",
    "classify.batch_size=4",
    "classify.pooling=mean",
]


def _classify(data, out, *extra):
    return main(["finetune", "classify", "--data", str(data), "--label", "diagnosis", "--output", str(out),
                 "--no-progress", *FAST, *extra])  # fmt: skip


def _export(path, seed):
    torch.manual_seed(seed)
    encoder = build_encoder(
        **section_kwargs(
            "model",
            img_size=32,
            patch_size=16,
            hidden_size=48,
            mlp_dim=96,
            num_layers=2,
            num_heads=4,
        )
    )
    save_encoder_export(path, encoder, None)
    return path


def test_same_run_resumes_and_a_changed_one_is_refused(blob_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _classify(blob_data, out) == 0
    first = (out / "results.json").read_text()
    assert _classify(blob_data, out) == 0  # the same command: every fold resumed
    assert "finished in an earlier run, skipped" in (out / "log.txt").read_text()
    config = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert _classify(blob_data, out, "classify.lr=0.01") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "classify.lr=0.0001, but this run has 0.01" in err[0] and "new --output" in err[0]
    )
    assert (out / "config.yaml").read_text() == config  # nothing overwritten by the refused run
    assert json.loads((out / "results.json").read_text()) == json.loads(first)


def test_another_encoder_is_refused(blob_data, tmp_path, capsys):
    a, b = _export(tmp_path / "enc_a", 0), _export(tmp_path / "enc_b", 1)
    out = tmp_path / "run"
    assert _classify(blob_data, out, "--encoder", str(a)) == 0
    capsys.readouterr()
    assert _classify(blob_data, out, "--encoder", str(b)) == 2
    assert "run.encoder_sha256=" in capsys.readouterr().err


def test_folds_without_a_fingerprint_are_refused(tmp_path):
    from argparse import Namespace

    from volta3d.config import load_config
    from volta3d.downstream.fingerprint import check_fingerprint, run_fingerprint

    out = tmp_path / "old"
    (out / "folds").mkdir(parents=True)
    (out / "folds" / "fraction1.00_fold0.json").write_text("{}")
    args = Namespace(task="classify", model="vit", label="sex", fractions=None, like=None, encoder=None,
                     data=str(tmp_path), test_data=None, splits=None)  # fmt: skip
    with pytest.raises(ValueError, match="recorded no fingerprint.json"):
        check_fingerprint(out, run_fingerprint(args, load_config()))
