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

from volta3d import layout
from volta3d.data.bundled import write_bundled_manifests
from volta3d.errors import InputError, InputFileNotFound
from volta3d.runtime import atomic_write, get_logger, setup_logging

# --quick: a smoke run of every stage on a few scans (about 1.5 minutes on 2 cores).
QUICK_SUBJECTS = {"ixi": 30, "msd": 30}
QUICK_OVERRIDES = {
    "pretrain": ["optim.epochs=1", "train.max_steps=8", "eval.n_splits=3"],
    "classify": [
        "classify.epochs=1",
        "classify.n_splits=3",
        "classify.fractions=[1.0]",
        "classify.lp_epochs=0",
    ],
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
Flag = str | Path | bool | list[str] | None
CONFIGS = ["tiny-cpu", "demo"]
# Fine-tuning settings chosen per model and label by benchmarks/finetune_study.py on the selection subjects (never
# reported here), three candidates per model, 3 seeds, best mean of the primary metric (docs/evaluation.md, "The fine-tuning
# study"); demo.yaml's classify settings (today's: lr 1e-4, no warm-up, no drop path) won for ViT-scratch sex
# and stay for the Swin baseline, which the study did not tune.
VOLTA3D_FT = ["classify.layer_decay=0.75", "classify.lr=3e-4", "classify.head_lr_scale=10", "classify.lp_epochs=2",
              "classify.warmup_epochs=1", "classify.drop_path=0.1"]  # fmt: skip
SCRATCH_AGE_FT = ["classify.lr=3e-4", "classify.warmup_epochs=1", "classify.drop_path=0.1"]
# SFCN convolves every voxel: on 32^3 resamples of the 64^3 cache (4 mm voxels, finer than the ViT's 32 mm tokens)
SFCN_DEMO = ["classify.img_size=32", "classify.lr=1e-3", "classify.warmup_epochs=1"]


@dataclass
class _Planner:
    """The demo's folders, and each stage's ``volta3d`` command line run through ``run_command``."""

    out: Path
    quick: bool
    workers: int
    run_command: RunCommand

    def __post_init__(self) -> None:
        self.ixi, self.msd = self.out / "prep" / "ixi", self.out / "prep" / "msd"
        # `volta3d select`: the online probe sees only the selection subjects; every reported IXI result the others
        self.selection = self.out / "selection"
        self.ixi_select, self.ixi_eval = (
            self.selection / layout.SELECTION_CSV,
            self.selection / layout.EVALUATION_CSV,
        )
        self.enc = self.out / "pretrain"
        self.sex_splits = self.out / "classify-sex" / "vit-scratch" / layout.SPLITS
        self.age_splits = self.out / "probe-age" / "random-init" / layout.SPLITS
        self.seg_splits = self.out / "segment" / "unet-scratch" / layout.SPLITS

    def quick_overrides(self, kind: str) -> list[str]:
        return QUICK_OVERRIDES[kind] if self.quick else []

    def command(
        self, *words: str | Path, overrides: list[str] | None = None, **flags: Any
    ) -> Callable[[], int]:
        """``volta3d WORDS --flag value ... OVERRIDES``; each flag a ``Flag``: a list repeats the flag, True
        is a bare flag, None and False leave it out."""
        argv = [str(w) for w in words]
        for name, value in flags.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value not in (None, False):
                argv += [a for v in (value if isinstance(value, list) else [value]) for a in (flag, str(v))]
        argv += overrides or []

        def run() -> int:
            get_logger().info("$ volta3d %s", " ".join(argv))
            return self.run_command(argv)

        return run


def plan(out: Path, shared: Path, *, quick: bool, workers: int, run_command: RunCommand) -> list[Stage]:
    """The demo's stages, in order, with the ``volta3d`` command lines they run through ``run_command``."""
    p = _Planner(out, quick, workers, run_command)
    return [*_data_stages(p, shared), *_pretrain_and_classify_stages(p), *_probe_stages(p), *_brain_age_stages(p),
            *_segment_stages(p),
            Stage("report", p.command("report", out, output=out / "report", title="volta3d demo: VolTA-3D on the "
                                      "bundled IXI and MSD scans" + (" (quick)" if quick else "")), [], 20)]  # fmt: skip


def _data_stages(p: _Planner, shared: Path) -> list[Stage]:
    """The bundled manifests (the quick demo keeps the first scans), then both preprocessing runs."""
    man = p.out / "manifests"

    def manifests() -> int:
        for name, path in write_bundled_manifests(shared, man).items():
            table = pd.read_csv(path)
            (table.head(QUICK_SUBJECTS[name]) if p.quick else table).to_csv(
                man / f"{name}-demo.csv", index=False
            )
        return 0

    common = {"workers": str(p.workers), "no_progress": True}
    ixi_settings = ["preprocess.size=[64,64,64]", "preprocess.crop=foreground", "preprocess.resize=true"]
    return [
        Stage("manifests", manifests, expected_s=1),
        Stage("preprocess-ixi", p.command("preprocess", man / layout.DEMO_IXI_MANIFEST, output=p.ixi, **common,
                                          overrides=ixi_settings), ["manifests"], 80),
        Stage("preprocess-msd", p.command("preprocess", man / layout.DEMO_MSD_MANIFEST, output=p.msd, **common,
                                          overrides=["preprocess.size=[48,64,48]"]), ["manifests"], 5),
        # quick: half of 30 subjects, so age has more than 10 values and is probed as a number
        Stage("select", p.command("select", p.ixi, label="sex", output=p.selection, fraction="0.5" if p.quick else None),
              ["preprocess-ixi"], 1),
    ]  # fmt: skip


def _pretrain_and_classify_stages(p: _Planner) -> list[Stage]:
    """Pretraining on every volume, with the online probe (sex, age) of the teacher and the student on the
    selection subjects only; then sex classification from VolTA-3D against a ViT and a Swin from scratch, on
    the ViT-scratch run's folds of the other IXI subjects (pretrained on without their labels: transductive,
    as the report says)."""
    pretrain = p.command("pretrain", config=CONFIGS, data=[str(p.ixi), str(p.msd)], output=p.enc, no_progress=True,
                         eval_data=p.ixi_select, eval_label=["sex", "age"],
                         overrides=[f"train.num_workers={p.workers}", *p.quick_overrides("pretrain")])  # fmt: skip

    def classify(model: str, output: Path, *extra: str, **flags: Flag) -> Callable[[], int]:
        return p.command("finetune", "classify", config=CONFIGS, data=p.ixi_eval, label="sex", model=model, output=output,
                         no_progress=True, **flags, overrides=[*extra, *p.quick_overrides("classify")])  # fmt: skip

    runs = p.out / "classify-sex"
    return [
        Stage("pretrain", pretrain, ["preprocess-ixi", "preprocess-msd", "select"], 330),
        Stage("classify-sex-vit-scratch", classify("vit", p.sex_splits.parent), ["select"], 45),
        Stage("classify-sex-volta3d", classify("vit", runs / "volta3d", *VOLTA3D_FT, encoder=p.enc, splits=p.sex_splits),
              ["pretrain", "classify-sex-vit-scratch"], 45),
        Stage("classify-sex-swin-scratch", classify("swin", runs / "swin-scratch", splits=p.sex_splits),
              ["classify-sex-vit-scratch"], 100),
    ]  # fmt: skip


def _brain_age_stages(p: _Planner) -> list[Stage]:
    """Brain age fine-tuned (``volta3d finetune regress``): VolTA-3D, the same ViT from scratch and an
    SFCN-style CNN from scratch (Peng et al., 2021), on the age probes' folds, where the ridge on the raw
    volume is the floor."""

    def regress(model: str, output: Path, *extra: str, **flags: Flag) -> Callable[[], int]:
        return p.command("finetune", "regress", config=CONFIGS, data=p.ixi_eval, label="age", model=model,
                         output=output, splits=p.age_splits, no_progress=True, **flags,
                         overrides=[*extra, *p.quick_overrides("classify")])  # fmt: skip

    runs, needs = p.out / "brain-age", ["probe-age-random-init"]
    return [
        Stage("brain-age-vit-scratch", regress("vit", runs / "vit-scratch", *SCRATCH_AGE_FT), needs, 45),
        Stage("brain-age-volta3d", regress("vit", runs / "volta3d", *VOLTA3D_FT, encoder=p.enc), [*needs, "pretrain"],
              45),
        Stage("brain-age-sfcn-scratch", regress("sfcn", runs / "sfcn-scratch", *SFCN_DEMO), needs, 45),
    ]  # fmt: skip


def _probe_stages(p: _Planner) -> list[Stage]:
    """Frozen-feature probes of the pretrained and of a random-init encoder, and of the raw volume
    (z-scored, average-pooled to 16^3: the floor), on the same folds; the sex probes' training fractions
    give the reduced-data curve. The random-init age probe makes the age folds."""
    sources: dict[str, dict[str, Any]] = {"random-init": {"random_init": True}, "volta3d": {"encoder": p.enc},
                                           "raw-volume": {"raw_volume": True}}  # fmt: skip
    stages = []
    for init, source in sources.items():
        emb = p.out / "embeddings" / f"{init}.npz"
        embed = p.command("embed", config=CONFIGS, **source, data=p.ixi_eval, output=emb, no_progress=True)
        stages.append(Stage(f"embed-{init}", embed, ["pretrain"] if init == "volta3d" else ["select"], 3))
        for label in ("sex", "age"):
            needs = [f"embed-{init}", "classify-sex-vit-scratch" if label == "sex" else "embed-random-init"]
            if label == "age" and init != "random-init":
                needs.append("probe-age-random-init")
            splits = p.sex_splits if label == "sex" else (p.age_splits if init != "random-init" else None)
            probe = p.command("probe", config=CONFIGS, embeddings=emb, data=p.ixi_eval, label=label, splits=splits,
                              output=p.out / f"probe-{label}" / init, overrides=p.quick_overrides("probe"))  # fmt: skip
            stages.append(Stage(f"probe-{label}-{init}", probe, needs, 3))
    return stages


def _segment_stages(p: _Planner) -> list[Stage]:
    """Hippocampus segmentation: a 3D U-Net from scratch (it makes the hold-out split), UNETR from
    scratch and UNETR from the VolTA-3D encoder on the same split."""

    def segment(model: str, output: Path, **flags: Flag) -> Callable[[], int]:
        return p.command("finetune", "segment", config=CONFIGS, data=p.msd, model=model, output=output,
                         no_progress=True, **flags, overrides=p.quick_overrides("segment"))  # fmt: skip

    runs = p.out / "segment"
    return [
        Stage("segment-unet-scratch", segment("unet", p.seg_splits.parent), ["preprocess-msd"], 70),
        Stage("segment-unetr-scratch", segment("unetr", runs / "unetr-scratch", splits=p.seg_splits),
              ["segment-unet-scratch"], 150),
        Stage("segment-unetr-volta3d", segment("unetr", runs / "unetr-volta3d", encoder=p.enc, splits=p.seg_splits),
              ["pretrain", "segment-unet-scratch"], 150),
    ]  # fmt: skip


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
    log = setup_logging(out, layout.DEMO_LOG)
    path = out / layout.STAGES
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
        code, seconds = _run_stage(stage, out)
        ran_expected += stage.expected_s
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
             len(stages), total / 60, out / "report" / layout.REPORT_HTML)  # fmt: skip
    if failed:
        log.error("not done: %s (see %s)", ", ".join(failed), path)
    return 1 if failed else 0


def _run_stage(stage: Stage, out: Path) -> tuple[int, float]:
    """Run one stage; return its exit code (1 for an exception, which is logged: the independent stages go
    on) and its seconds."""
    t0 = time.perf_counter()
    try:
        code = stage.run()
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        get_logger().error("stage %s failed: %s", stage.name, reason)
        code = 1
    setup_logging(out, layout.DEMO_LOG)  # the command logged into its own folder; back to the demo's log
    return code, time.perf_counter() - t0


def _data_counts(out: Path) -> dict[str, int]:
    counts = {}
    for name in ("ixi", "msd"):
        for kind in ("manifest", "rejected"):
            f = out / "prep" / name / f"{kind}.csv"
            if f.exists():
                counts[f"{name}_{'accepted' if kind == 'manifest' else 'rejected'}"] = len(pd.read_csv(f))
    return counts
