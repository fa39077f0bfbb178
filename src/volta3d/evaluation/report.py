"""One self-contained HTML report of a volta3d run, plus the same tables in Markdown.

Inputs: any number of downstream ``results.json`` files (fine-tuning, probes, segmentation), an
optional pretraining run folder (``metrics.csv`` + ``config.yaml``; read with its optional
``online_eval.csv``, ``pretrain_data.json`` and ``log.txt``) and an optional ``stages.json``
(``{"stages": [{"name", "status", "seconds"}], "settings": {...}, "data": {...}}``). Runs are grouped
by task; within a task every model is compared with the VolTA-3D-initialised one (``report_runs``).

The page answers the reader's question first: the first screen holds the headline table, its
sentence, the forest plot and the provenance line (``report_headline``). Below it come the
pretraining health (a collapse alarm is also boxed at the page top; ``report_pretrain``), one
section per task (tables, with the long ones folded; ROC curves and reduced-data curves with one
panel per group of comparable models; segmentation overlays; ``report_tasks``) and the settings,
data counts, versions and stage times (here, with the input resolution and the page assembly).

Outputs in ``out_dir``: ``report.html`` (every figure embedded as a base64 PNG, inline CSS, no
script, no external URL), ``figures/*.png`` and ``summary.md`` (``report_doc`` renders both).
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from volta3d import layout
from volta3d.engine.loss_terms import LOSS_COLUMNS, LOSS_TERMS
from volta3d.errors import InputError, InputFileNotFound
from volta3d.evaluation.comparison import compare_results
from volta3d.evaluation.report_doc import (
    Note,
    Section,
    Table,
    fmt_hms,
    render_html,
    render_markdown,
)
from volta3d.evaluation.report_headline import headline_rows, headline_section, provenance_line
from volta3d.evaluation.report_pretrain import pretraining_section
from volta3d.evaluation.report_runs import (
    PRETRAIN_FILES,
    ReportInputs,
    Run,
    default_name,
    discover_inputs,
    encoder_source,
    flatten,
    initialisation,
    named_inputs,
    pair_runs,
    read_config,
    task_title,
    test_subjects,
)
from volta3d.evaluation.report_tasks import task_sections

__all__ = [
    "Run",
    "build_report",
    "default_name",
    "initialisation",
    "pair_runs",
]  # what other modules import here

PRETRAIN_HIGHLIGHTS = [
    "seed", "model.img_size", "model.patch_size", "model.hidden_size", "model.num_layers", "model.num_heads",
    "head.out_dim", "views.global_size", "views.local_size", "views.n_local", "masking.ratio",
    *(f"loss.{t.weight}" for t in LOSS_TERMS if t.column in LOSS_COLUMNS), "loss.teacher_temp", "optim.epochs",
    "optim.batch_size", "optim.accum_steps", "optim.lr", "optim.warmup_epochs", "optim.momentum_teacher",
    "train.max_steps", "train.precision", "device",
]  # fmt: skip
DOWNSTREAM_SETTINGS = {
    "classify": ["mode", "pooling", "epochs", "batch_size", "lr", "img_size"],
    "segment": ["epochs", "batch_size", "lr", "crop_size", "feature_size", "split"],
    "probe": ["logreg_cs", "knn_k", "ridge_alphas", "inner_folds"],
}
SOFTWARE = ["torch", "monai", "volta3d", "numpy", "scikit-learn", "scipy", "pandas", "matplotlib"]


# ----------------------------------------------------------------------------- settings


def _versions() -> list[list[str]]:
    rows = [["python", platform.python_version()]]
    for pkg in SOFTWARE:
        try:
            rows.append([pkg, metadata.version(pkg)])
        except metadata.PackageNotFoundError:
            rows.append([pkg, "not installed"])
    return rows


def _downstream_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        task = r.task_key[0]
        conf = r.results.get("config", {}).get(task, {})
        settings = ", ".join(f"{k}={conf[k]}" for k in DOWNSTREAM_SETTINGS.get(task, []) if k in conf)
        rows.append([r.name, task_title(r.task_key), f"{r.results.get('splits', {}).get('method', '?')} "
                     f"({len(r.results['folds'])})", str(len(test_subjects(r))), settings or "—"])  # fmt: skip
    return rows


def settings_section(runs: list[Run], pretrain: Path | None, info: Mapping[str, Any]) -> Section:
    """Configuration highlights, downstream settings, stages.json's settings, data counts and stage
    times, and the software versions."""
    sec = Section("Run settings, data and software", "settings")
    if pretrain is not None:
        cfg = flatten(read_config(pretrain / layout.CONFIG))
        rows = [[k, str(cfg[k])] for k in PRETRAIN_HIGHLIGHTS if k in cfg]
        sec.blocks.append(
            Table(
                ["setting", "value"],
                rows,
                f"Pretraining configuration highlights ({pretrain / layout.CONFIG})",
            )
        )
    if runs:
        sec.blocks.append(
            Table(
                ["model", "task", "split (folds)", "test subjects", "settings"],
                _downstream_rows(runs),
                "Downstream runs",
            )
        )
    for key, caption in (("settings", "Demo settings (stages.json)"), ("data", "Data counts (stages.json)")):
        if isinstance(info.get(key), Mapping) and info[key]:
            sec.blocks.append(
                Table(["item", "value"], [[k, str(v)] for k, v in flatten(info[key]).items()], caption)
            )
    stages = [s for s in info.get("stages", []) if isinstance(s, Mapping)]
    if stages:
        total = sum(s.get("seconds") or 0 for s in stages)
        rows = [
            [str(s.get("name", "?")), str(s.get("status", "?")), fmt_hms(s.get("seconds"))] for s in stages
        ]
        sec.blocks.append(
            Table(
                ["stage", "status", "wall time (h:mm:ss)"],
                [*rows, ["total", "", fmt_hms(total)]],
                "Wall time per stage",
            )
        )
    else:
        sec.blocks.append(Note("Wall time per stage omitted: no stages.json among the inputs."))
    sec.blocks.append(
        Table(["package", "version"], _versions(), "Software (the environment that built this report)")
    )
    return sec


# ----------------------------------------------------------------------------- entry point


def _reference_words(runs: Sequence[Run], reference: str | None) -> str:
    """How the headline names the reference: ``VolTA-3D`` or ``imported encoder`` when every reference run
    (``--reference``'s, by default the pretrained ones) starts from such an encoder; ``pretrained
    encoder`` for a mix of both, ``reference`` for a scratch model chosen as reference."""
    chosen = [r for r in runs if r.name == reference] if reference else [r for r in runs if r.pretrained]
    if not all(r.pretrained for r in chosen):
        return "reference"
    sources = {encoder_source(r) for r in chosen}
    return "pretrained encoder" if len(sources) > 1 else (sources.pop() if sources else "VolTA-3D")


def _resolve_inputs(
    runs: Mapping[str, Sequence[str | Path]] | Sequence[str | Path] | str | Path,
    pretrain: str | Path | None,
    stages: str | Path | None,
    reference: str | None,
) -> ReportInputs:
    """Discovered or named runs, with an explicit pretraining folder / stages.json overriding discovery."""
    if isinstance(runs, Mapping):
        inputs = ReportInputs(named_inputs(runs))
    else:
        inputs = discover_inputs([runs] if isinstance(runs, (str, Path)) else list(runs))
    if pretrain is not None:
        if not all((Path(pretrain) / f).is_file() for f in PRETRAIN_FILES):
            raise InputFileNotFound(f"pretraining folder {pretrain} needs {' and '.join(PRETRAIN_FILES)}")
        inputs.pretrain = Path(pretrain)
    if stages is not None:
        if not Path(stages).is_file():
            raise InputFileNotFound(f"stages file not found: {stages}")
        inputs.stages = Path(stages)
    if reference is not None and reference not in {r.name for r in inputs.runs}:
        raise InputError(
            f"--reference '{reference}' names no model (models: {', '.join(sorted({r.name for r in inputs.runs}))})"
        )
    return inputs


def _compare(
    tasks: dict[tuple, list[Run]], reference: str | None, n_boot: int, seed: int
) -> dict[tuple, list[tuple]]:
    """Per task, (reference, other, compare_results dictionary or the reason they are not comparable)."""
    comparisons: dict[tuple, list[tuple]] = {}
    for key, group in tasks.items():
        for ref, other in pair_runs(group, reference)[1]:
            try:
                cmp: dict[str, Any] | str = compare_results(
                    ref.results, other.results, n_boot=n_boot, seed=seed
                )
            except ValueError as err:
                cmp = str(err)
            comparisons.setdefault(key, []).append((ref, other, cmp))
    return comparisons


def _fresh_figures(out: Path) -> Path:
    fig_dir = out / layout.REPORT_FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):  # figures of an earlier report of other runs must not linger
        old.unlink()
    return fig_dir


def build_report(
    runs: Mapping[str, Sequence[str | Path]] | Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    *,
    title: str = "volta3d run report",
    reference: str | None = None,
    pretrain: str | Path | None = None,
    stages: str | Path | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> Path:
    """Write ``report.html``, ``figures/`` and ``summary.md`` into ``out_dir``; return the HTML path.

    ``runs``: ``{model name: [results.json or run folder, ...]}``, or paths (files or folders) in which
    results.json files, a pretraining folder and stages.json are discovered. ``pretrain`` / ``stages``
    override what discovery finds. ``reference``: the model name every other model of a task is
    compared with (default: the VolTA-3D-initialised model)."""
    inputs = _resolve_inputs(runs, pretrain, stages, reference)
    out = Path(out_dir)
    fig_dir = _fresh_figures(out)
    tasks: dict[tuple, list[Run]] = {}
    for r in inputs.runs:
        tasks.setdefault(r.task_key, []).append(r)
    tasks = {k: sorted(v, key=lambda r: (not r.pretrained, r.name)) for k, v in sorted(tasks.items())}
    comparisons = _compare(tasks, reference, n_boot, seed)
    info: dict[str, Any] = json.loads(inputs.stages.read_text()) if inputs.stages else {}
    all_runs = [r for group in tasks.values() for r in group]
    who = _reference_words(inputs.runs, reference)
    sections = [
        headline_section(
            headline_rows(tasks, comparisons, reference),
            provenance_line(inputs.pretrain, all_runs, info),
            fig_dir,
            who,
        ),
        pretraining_section(inputs.pretrain, fig_dir),
        *task_sections(tasks, comparisons, fig_dir),
        settings_section(all_runs, inputs.pretrain, info),
    ]
    generated = (
        f"Generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by volta3d report from "
        f"{len(inputs.runs)} results file(s); bootstrap: {n_boot} resamples, seed {seed}."
    )
    (out / layout.REPORT_SUMMARY).write_text(render_markdown(title, sections, generated, out))
    path = out / layout.REPORT_HTML
    path.write_text(render_html(title, sections, generated))
    return path
