"""`volta3d preprocess` on the command line: outputs, overrides, shards, one-line errors (exit 2)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from volta3d.cli import main

from .scan_factory import head_like, write_nifti


def test_cli_run_writes_everything(tmp_path):
    for i in range(3):
        write_nifti(tmp_path / f"in/s{i}.nii.gz", head_like(seed=i))
    out = tmp_path / "out"
    assert (
        main(
            [
                "preprocess",
                "-o",
                str(out),
                "--no-progress",
                str(tmp_path / "in"),
                "preprocess.size=[12,12,12]",
            ]
        )
        == 0
    )
    assert {"manifest.csv", "rejected.csv", "config.yaml", "preprocess.log"} <= {
        p.name for p in out.iterdir()
    }
    assert "- 12" in (out / "config.yaml").read_text()
    m = pd.read_csv(out / "manifest.csv")
    assert np.load(out / m.path[0]).shape == (1, 12, 12, 12)


def test_cli_shards_then_merge(tmp_path):
    for i in range(4):
        write_nifti(tmp_path / f"in/s{i}.nii.gz", head_like(shape=(10, 10, 10), seed=i))
    out = str(tmp_path / "out")
    for shard in ("0/2", "1/2"):
        assert (
            main(["preprocess", "-o", out, "--shard", shard, str(tmp_path / "in"), "preprocess.size=[8,8,8]"])
            == 0
        )
    assert main(["preprocess", "-o", out, "--merge"]) == 0
    assert len(pd.read_csv(tmp_path / "out/manifest.csv")) == 4


def _one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    return err


def test_cli_errors(tmp_path, capsys):
    err = _one_line_error(capsys, ["preprocess", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    assert err.startswith("volta3d preprocess: error: input not found:") and "missing" in err
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, ["preprocess", str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    assert "no scans found in" in err and "empty" in err
    (tmp_path / "m.csv").write_text("file,age\na.nii,3\n")
    err = _one_line_error(capsys, ["preprocess", str(tmp_path / "m.csv"), "-o", str(tmp_path / "o")])
    assert "has no 'path' column (columns: file, age)" in err
    err = _one_line_error(
        capsys, ["preprocess", "-o", str(tmp_path / "o"), str(tmp_path / "m.csv"), "preprocess.sise=[8,8,8]"]
    )
    assert "unknown config key 'preprocess.sise'" in err
    err = _one_line_error(
        capsys, ["preprocess", "--bundled", "ixi", "--shared-data", str(tmp_path), "-o", str(tmp_path / "o")]
    )
    assert "bundled data not found" in err
