"""2 ranks x batch b (torchrun, gloo on CPU) must train like 1 process x batch 2b."""

import os
import subprocess
import sys

import pytest
import torch

from volta3d.engine.checkpoint import load_checkpoint
from volta3d.runtime import MetricsCSV

from .conftest import TINY_OVERRIDES, write_volume_folder


def _pretrain(args, nproc, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [
        *(launcher if nproc > 1 else [sys.executable]),
        "-m",
        "volta3d.cli",
        "pretrain",
        "--no-progress",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ranks_match_one_process_with_double_batch(tmp_path):
    data = write_volume_folder(tmp_path / "prep", n=8)
    common = [o for o in TINY_OVERRIDES if not o.startswith("optim.batch_size")] + ["train.max_steps=3"]
    _pretrain(
        ["--data", str(data), "--output", str(tmp_path / "one"), *common, "optim.batch_size=4"], 1, tmp_path
    )
    _pretrain(
        ["--data", str(data), "--output", str(tmp_path / "two"), *common, "optim.batch_size=2"], 2, tmp_path
    )

    one = load_checkpoint(tmp_path / "one/checkpoints/last.pt")
    two = load_checkpoint(tmp_path / "two/checkpoints/last.pt")
    assert one["step"] == two["step"] == 3 and one["effective_batch"] == two["effective_batch"] == 4
    for name in ("global_center.center", "patch_center.center"):
        torch.testing.assert_close(two["model"][name], one["model"][name], rtol=1e-5, atol=1e-6)
    for name, a in one["model"].items():
        b = two["model"][name]
        if name.endswith("summariser.attn.in_proj_bias"):
            # The key-projection bias has an exactly-zero gradient (softmax ignores a shift), so its
            # gradient is rounding noise that AdamW normalises into lr-sized steps: compare q and v only.
            e = a.shape[0] // 3
            a, b = torch.cat([a[:e], a[2 * e :]]), torch.cat([b[:e], b[2 * e :]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)

    rows_one = MetricsCSV(tmp_path / "one/metrics.csv").read()
    rows_two = MetricsCSV(tmp_path / "two/metrics.csv").read()  # rank 0 logs the mean over ranks
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        for key in ("loss", "loss_global", "loss_local", "loss_rec", "center_norm"):
            assert float(r2[key]) == pytest.approx(float(r1[key]), rel=1e-5), key

    # a run started on 2 ranks resumes in 1 process with the same global batch (2 x 2 == 1 x 4)
    _pretrain(["--data", str(data), "--output", str(tmp_path / "two"), *common[:-1], "train.max_steps=4",
               "optim.batch_size=4"], 1, tmp_path)  # fmt: skip
    assert load_checkpoint(tmp_path / "two/checkpoints/last.pt")["step"] == 4
    assert [int(r["step"]) for r in MetricsCSV(tmp_path / "two/metrics.csv").read()] == [1, 2, 3, 4]
