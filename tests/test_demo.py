"""The demo's stage runner (resume, failures, dependencies) and one quick end-to-end run on real scans."""

import json

import pytest

from volta3d import demo
from volta3d.cli import main


def _fake_plan(calls, fail=()):
    def stage(name, needs=()):
        def run():
            calls.append(name)
            return 1 if name in fail else 0

        return demo.Stage(name, run, list(needs), expected_s=1)

    return lambda out, shared, quick, workers, run_command: [
        stage("a"),
        stage("b", ["a"]),
        stage("c", ["b"]),
        stage("d", ["a"]),
    ]


@pytest.fixture
def fake_shared(tmp_path):
    for name in ("ixi_t1_2mm", "msd_task04_hippocampus"):
        (tmp_path / "shared" / name).mkdir(parents=True)
    return tmp_path / "shared"


def test_failed_stage_skips_its_dependants_and_rerun_resumes(monkeypatch, fake_shared, tmp_path):
    calls = []
    monkeypatch.setattr(demo, "plan", _fake_plan(calls, fail={"b"}))
    assert demo.run_demo(tmp_path / "out", fake_shared, run_command=main) == 1
    assert calls == ["a", "b", "d"]  # c needs the failed b; d does not
    stages = {s["name"]: s for s in json.loads((tmp_path / "out" / "stages.json").read_text())["stages"]}
    assert {n: s["status"] for n, s in stages.items()} == {
        "a": "done",
        "b": "failed",
        "c": "skipped",
        "d": "done",
    }
    assert stages["c"]["reason"] == "needs b"

    calls.clear()
    monkeypatch.setattr(demo, "plan", _fake_plan(calls))
    assert demo.run_demo(tmp_path / "out", fake_shared, run_command=main) == 0
    assert calls == ["b", "c"]  # finished stages are not redone


def test_quick_and_full_runs_do_not_share_a_folder(monkeypatch, fake_shared, tmp_path):
    monkeypatch.setattr(demo, "plan", _fake_plan([]))
    demo.run_demo(tmp_path / "out", fake_shared, run_command=main, quick=True)
    with pytest.raises(ValueError, match="holds a quick demo"):
        demo.run_demo(tmp_path / "out", fake_shared, run_command=main, quick=False)


def test_missing_bundled_data_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo", "--shared-data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bundled data not found" in err[0]


@pytest.mark.realdata
def test_quick_demo_end_to_end(shared_data, tmp_path):
    """Every stage on 30 IXI + 30 MSD scans: preprocess, pretrain, classify, probes, segment, report."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--shared-data", str(shared_data)]) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert [s["status"] for s in stages["stages"]] == ["done"] * len(
        demo.plan(out, shared_data, quick=True, workers=2, run_command=main)
    )
    assert stages["data"] == {"ixi_accepted": 30, "ixi_rejected": 0, "msd_accepted": 30, "msd_rejected": 0}
    html = (out / "report" / "report.html").read_text()
    for section in ("Headline", "ROC curves", "Reduced-data curves", "Segmentation", "Pretraining"):
        assert section in html
    for run in (
        "classify-sex/volta3d",
        "classify-sex/swin-scratch",
        "probe-sex/volta3d/linear_cls",
        "segment/unetr-volta3d",
    ):
        assert (out / run / "results.json").is_file(), run
