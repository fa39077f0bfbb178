"""`volta3d bench` in CI-sized form (tiny model, one step) so the benchmark cannot rot."""

import json

from volta3d.cli import main

from .conftest import TINY_OVERRIDES


def test_bench_prints_the_table(tmp_path, capsys, volume_folder):
    out = tmp_path / "bench.json"
    # the tiny-cpu recipe (KoLeo on), whose straightforward batch-1 step must drop the batch-level term
    args = ["bench", "--config", "tiny-cpu", "--steps", "1", "--warmup", "0", "--matmul-size", "256", "--json",
            str(out), "--data", str(volume_folder), "--pipeline-volumes", "2", *TINY_OVERRIDES,
            "preprocess.size=[32,32,32]"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    for needle in (
        "matmul rate",
        "volta3d",
        "straightforward",
        "speed-up over the straightforward step",
        "reference (MONAI, per volume, workers)",
        "batched: loader only (views on a GPU)",
        "end to end",
    ):
        assert needle in text
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["volta3d", "straightforward"]
    for r in report["results"]:
        assert r["seconds_per_step"] > 0 and r["flops_per_step"] > 0 and r["peak_memory_gb"] > 0
    # the FLOP count of one step does not depend on how the batch is split or on fused attention
    fast, naive = report["results"]
    assert abs(fast["flops_per_step"] - naive["flops_per_step"]) / fast["flops_per_step"] < 0.05
    pipeline = report["pipeline"]
    assert pipeline["views_per_volume"] == 4  # 2 global + views.n_local=2
    for key in (
        "reference_seconds",
        "batched_seconds",
        "draw_seconds",
        "load_seconds",
        "end_to_end_seconds_per_step",
    ):
        assert pipeline[key] > 0, key


def test_cores_needed_is_cpu_time_over_step_time():
    from volta3d.engine.pipeline_benchmark import cores_needed

    assert cores_needed(0.5, 8, 0.04) == 100.0  # 0.5 CPU-s per volume x 8 volumes, every 40 ms
