"""``volta3d demo``: the README's path of a scan, on the bundled real scans, as one resumable run.

The demo is a plan of stages, each an ordinary ``volta3d`` command line (so it exercises exactly
what a user runs), plus the one step that has no command: writing the bundled CSV manifests. Each
stage's outcome and wall time go to ``OUT/stages.json`` as soon as it ends; a re-run skips the
stages recorded as done, and every command resumes its own partial work (cached scans, the
pretraining checkpoint, finished folds). A failed stage is recorded and the stages that do not
depend on it still run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from volta3d.data.bundled import write_bundled_manifests
from volta3d.errors import InputError, InputFileNotFound
from volta3d.runtime import atomic_write, get_logger, setup_logging

STAGES_NAME = "stages.json"
# --quick: a smoke run of every stage on a few scans (about 1.5 minutes on 2 cores).
QUICK_SUBJECTS = {"ixi": 30, "msd": 30}
QUICK_OVERRIDES = {
    "pretrain": ["optim.epochs=1", "train.max_steps=8", "eval.n_splits=3"],
    "classify": ["classify.epochs=1", "classify.n_splits=3"],
    "probe": ["probe.n_splits=3"],
    "segment": ["segment.epochs=1", "segment.val_every=1"],
}


@dataclass
class Stage:
    """One named step of the demo: the callable that runs it (a ``volta3d`` command line), the stages
    it needs to have finished first, and its expected time, which the demo's ETA is planned from."""

    name: str
    run: Callable[[], int]
    needs: list[str] = field(default_factory=list)
    expected_s: float = 60.0  # seconds this stage took in a full demo on a 2-core CPU: the ETA's plan


RunCommand = Callable[[list[str]], int]  # a `volta3d` command line -> its exit code (``volta3d.cli.main``)


def plan(out: Path, shared: Path, *, quick: bool, workers: int, run_command: RunCommand) -> list[Stage]:
    """The demo's stages, in order, with the ``volta3d`` command lines they run through ``run_command``."""

    def _command(argv: list[str]) -> Callable[[], int]:
        def run() -> int:
            get_logger().info("$ volta3d %s", " ".join(argv))
            return run_command(argv)

        return run

    cfg = ["--config", "tiny-cpu", "--config", "demo"]
    prep, man = out / "prep", out / "manifests"
    quick_o = QUICK_OVERRIDES if quick else {k: [] for k in QUICK_OVERRIDES}
    np_ = ["--no-progress"]

    def manifests() -> int:
        paths = write_bundled_manifests(shared, man)
        for name, path in paths.items():
            table = pd.read_csv(path)
            if quick:
                table = table.head(QUICK_SUBJECTS[name])
            table.to_csv(man / f"{name}-demo.csv", index=False)
        return 0

    ixi, msd = prep / "ixi", prep / "msd"
    sex_splits = out / "classify-sex" / "vit-scratch" / "splits.json"
    age_splits = out / "probe-age" / "random-init" / "splits.json"
    seg_splits = out / "segment" / "unet-scratch" / "splits.json"
    enc = str(out / "pretrain")
    stages = [
        Stage("manifests", manifests, expected_s=1),
        Stage(
            "preprocess-ixi",
            _command(
                [
                    "preprocess",
                    str(man / "ixi-demo.csv"),
                    "--output",
                    str(ixi),
                    "--workers",
                    str(workers),
                    *np_,
                    "preprocess.size=[64,64,64]",
                    "preprocess.crop=foreground",
                    "preprocess.resize=true",
                ]
            ),
            ["manifests"],
            80,
        ),
        Stage(
            "preprocess-msd",
            _command(
                [
                    "preprocess",
                    str(man / "msd-demo.csv"),
                    "--output",
                    str(msd),
                    "--workers",
                    str(workers),
                    *np_,
                    "preprocess.size=[48,64,48]",
                ]
            ),
            ["manifests"],
            5,
        ),
        Stage(
            "pretrain",
            _command(
                [
                    "pretrain",
                    *cfg,
                    "--data",
                    str(ixi),
                    "--data",
                    str(msd),
                    "--output",
                    enc,
                    *np_,
                    # the online probe (sex, age) of the teacher on the IXI scans it pretrains on: labels unused
                    # by pretraining, read only to watch what it learns (transductive, as the report says)
                    "--eval-data",
                    str(ixi),
                    "--eval-label",
                    "sex",
                    "--eval-label",
                    "age",
                    f"train.num_workers={workers}",
                    *quick_o["pretrain"],
                ]
            ),
            ["preprocess-ixi", "preprocess-msd"],
            330,
        ),
        Stage(
            "classify-sex-vit-scratch",
            _command(
                [
                    "finetune",
                    "classify",
                    *cfg,
                    "--data",
                    str(ixi),
                    "--label",
                    "sex",
                    "--model",
                    "vit",
                    "--output",
                    str(sex_splits.parent),
                    *np_,
                    *quick_o["classify"],
                ]
            ),
            ["preprocess-ixi"],
            100,
        ),
        Stage(
            "classify-sex-volta3d",
            _command(
                [
                    "finetune",
                    "classify",
                    *cfg,
                    "--data",
                    str(ixi),
                    "--label",
                    "sex",
                    "--model",
                    "vit",
                    "--encoder",
                    enc,
                    "--splits",
                    str(sex_splits),
                    "--output",
                    str(out / "classify-sex" / "volta3d"),
                    *np_,
                    *quick_o["classify"],
                ]
            ),
            ["pretrain", "classify-sex-vit-scratch"],
            100,
        ),
        Stage(
            "classify-sex-swin-scratch",
            _command(
                [
                    "finetune",
                    "classify",
                    *cfg,
                    "--data",
                    str(ixi),
                    "--label",
                    "sex",
                    "--model",
                    "swin",
                    "--splits",
                    str(sex_splits),
                    "--output",
                    str(out / "classify-sex" / "swin-scratch"),
                    *np_,
                    *quick_o["classify"],
                ]
            ),
            ["classify-sex-vit-scratch"],
            230,
        ),
    ]
    # Frozen-feature probes of the pretrained and of a random-init encoder, and of the raw volume
    # (z-scored, average-pooled to 16^3: the floor), on the same folds; the sex probes' training
    # fractions give the reduced-data curve. The random-init age probe makes the folds.
    sources = {"random-init": [*cfg, "--random-init"], "volta3d": [*cfg, "--encoder", enc],
               "raw-volume": [*cfg, "--raw-volume"]}  # fmt: skip
    for init, source in sources.items():
        emb = out / "embeddings" / f"{init}.npz"
        stages.append(
            Stage(
                f"embed-{init}",
                _command(["embed", *source, "--data", str(ixi), "--output", str(emb), *np_]),
                ["pretrain"] if init == "volta3d" else ["preprocess-ixi"],
                3,
            )
        )
        for label in ("sex", "age"):
            needs = [f"embed-{init}", "classify-sex-vit-scratch" if label == "sex" else "embed-random-init"]
            if label == "age" and init != "random-init":
                needs.append("probe-age-random-init")
            splits = sex_splits if label == "sex" else (age_splits if init != "random-init" else None)
            stages.append(
                Stage(
                    f"probe-{label}-{init}",
                    _command(
                        [
                            "probe",
                            *cfg,
                            "--embeddings",
                            str(emb),
                            "--data",
                            str(ixi),
                            "--label",
                            label,
                            *(["--splits", str(splits)] if splits else []),
                            "--output",
                            str(out / f"probe-{label}" / init),
                            *quick_o["probe"],
                        ]
                    ),
                    needs,
                    3,
                )
            )
    stages += [
        Stage(
            "segment-unet-scratch",
            _command(
                [
                    "finetune",
                    "segment",
                    *cfg,
                    "--data",
                    str(msd),
                    "--model",
                    "unet",
                    "--output",
                    str(seg_splits.parent),
                    *np_,
                    *quick_o["segment"],
                ]
            ),
            ["preprocess-msd"],
            70,
        ),
        Stage(
            "segment-unetr-scratch",
            _command(
                [
                    "finetune",
                    "segment",
                    *cfg,
                    "--data",
                    str(msd),
                    "--model",
                    "unetr",
                    "--splits",
                    str(seg_splits),
                    "--output",
                    str(out / "segment" / "unetr-scratch"),
                    *np_,
                    *quick_o["segment"],
                ]
            ),
            ["segment-unet-scratch"],
            150,
        ),
        Stage(
            "segment-unetr-volta3d",
            _command(
                [
                    "finetune",
                    "segment",
                    *cfg,
                    "--data",
                    str(msd),
                    "--model",
                    "unetr",
                    "--encoder",
                    enc,
                    "--splits",
                    str(seg_splits),
                    "--output",
                    str(out / "segment" / "unetr-volta3d"),
                    *np_,
                    *quick_o["segment"],
                ]
            ),
            ["pretrain", "segment-unet-scratch"],
            150,
        ),
        Stage(
            "report",
            _command(
                [
                    "report",
                    str(out),
                    "--output",
                    str(out / "report"),
                    "--title",
                    "volta3d demo: VolTA-3D on the bundled IXI and MSD scans" + (" (quick)" if quick else ""),
                ]
            ),
            [],
            20,
        ),
    ]
    return stages


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(state, indent=2) + "\n").encode()))


def run_demo(
    out: str | Path, shared: str | Path, *, run_command: RunCommand, quick: bool = False, workers: int = 2
) -> int:
    """Run (or resume) every stage, each a command line given to ``run_command`` (the ``volta3d``
    entry point a user types); return 0 when all succeeded, 1 otherwise."""
    out, shared = Path(out), Path(shared)
    if not (shared / "ixi_t1_2mm").is_dir() or not (shared / "msd_task04_hippocampus").is_dir():
        raise InputFileNotFound(
            f"bundled data not found in {shared} (expected ixi_t1_2mm/ and msd_task04_hippocampus/)"
        )
    out.mkdir(parents=True, exist_ok=True)
    log = setup_logging(out, "demo.log")
    path = out / STAGES_NAME
    state = _load(path)
    if state and state.get("settings", {}).get("quick") != quick:
        raise InputError(
            f"{out} holds a {'quick' if state['settings']['quick'] else 'full'} demo; use another --output"
        )
    done = {s["name"]: s for s in state.get("stages", [])}
    stages = plan(out, shared, quick=quick, workers=workers, run_command=run_command)
    state["settings"] = {"quick": quick, "workers": workers, "shared_data": str(shared.resolve()),
                         "configs": "tiny-cpu + demo", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}  # fmt: skip
    status: dict[str, str] = {}
    ran_expected, t_start = 0.0, time.perf_counter()  # planned seconds of the stages run in this invocation
    for k, stage in enumerate(stages, 1):
        record = done.get(stage.name)
        if record and record["status"] == "done":
            status[stage.name] = "done"
            log.info("stage %d/%d %s: done in an earlier run, skipped", k, len(stages), stage.name)
            continue
        blocked = [n for n in stage.needs if status.get(n) != "done"]
        if blocked:
            status[stage.name] = "skipped"
            done[stage.name] = {"name": stage.name, "status": "skipped", "seconds": 0.0,
                                "reason": f"needs {', '.join(blocked)}"}  # fmt: skip
            log.warning(
                "stage %d/%d %s: skipped, it needs %s", k, len(stages), stage.name, ", ".join(blocked)
            )
            continue
        # the plan's remaining seconds, scaled by how fast this machine has been once there is enough to judge
        pace = (time.perf_counter() - t_start) / ran_expected if ran_expected >= 60 else 1.0
        eta = sum(s.expected_s for s in stages[k - 1 :] if status.get(s.name) != "done") * pace
        log.info("stage %d/%d %s (demo ETA %.0f min)", k, len(stages), stage.name, eta / 60)
        t0 = time.perf_counter()
        try:
            code = stage.run()
        except Exception as err:  # a failed stage is recorded; the independent ones go on
            log.error(
                "stage %s failed: %s",
                stage.name,
                str(err).splitlines()[0] if str(err) else type(err).__name__,
            )
            code = 1
        seconds = time.perf_counter() - t0
        ran_expected += stage.expected_s
        setup_logging(out, "demo.log")  # the command logged into its own folder; back to the demo's log
        status[stage.name] = "done" if code == 0 else "failed"
        done[stage.name] = {"name": stage.name, "status": status[stage.name], "seconds": round(seconds, 1)}
        state["stages"] = [done[s.name] for s in stages if s.name in done]
        state["data"] = _data_counts(out)
        _save(path, state)
        log.info("stage %d/%d %s: %s in %.0f s", k, len(stages), stage.name, status[stage.name], seconds)
    state["stages"] = [done[s.name] for s in stages if s.name in done]
    _save(path, state)
    total = sum(s["seconds"] for s in state["stages"])
    failed = [n for n, s in status.items() if s != "done"]
    log.info("demo finished: %d/%d stages done, %.1f min of stage time; report: %s", len(stages) - len(failed),
             len(stages), total / 60, out / "report" / "report.html")  # fmt: skip
    if failed:
        log.error("not done: %s (see %s)", ", ".join(failed), path)
    return 1 if failed else 0


def _data_counts(out: Path) -> dict[str, int]:
    counts = {}
    for name in ("ixi", "msd"):
        for kind in ("manifest", "rejected"):
            f = out / "prep" / name / f"{kind}.csv"
            if f.exists():
                counts[f"{name}_{'accepted' if kind == 'manifest' else 'rejected'}"] = len(pd.read_csv(f))
    return counts
