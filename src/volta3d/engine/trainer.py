"""The VolTA-3D pretraining run: data, model, schedules, and one readable train loop with commented phases.

Exact resume: the data order of epoch ``e`` depends only on ``(seed, e)``, every view's
randomness only on ``(seed, epoch, index)``, and schedules only on the optimiser step, so a
checkpoint (model, teacher, centers, optimiser, step) is the whole state. Re-running the same
command continues from ``checkpoints/last.pt`` and reaches the same weights bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from volta3d import layout
from volta3d.config import save_config, to_kwargs
from volta3d.config_rules import validate_pretrain_config
from volta3d.data.batched_views import PretrainVolumesDataset, build_views, collate_volumes, move_batch
from volta3d.data.content import content_hashes, describe_change
from volta3d.data.dataset import VolumeDataset, read_manifest
from volta3d.data.integrity import refuse_repeated_volumes
from volta3d.engine.checkpoint import load_checkpoint, save_checkpoint
from volta3d.engine.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from volta3d.engine.health import HealthTracker
from volta3d.engine.init_weights import start_from_export
from volta3d.engine.loss_terms import LOSS_COLUMNS, TERM_COLUMNS
from volta3d.engine.meta_arch import VolTA3D, build_volta3d
from volta3d.engine.online_eval import online_evaluation
from volta3d.engine.optim import (
    apply_schedule_values,
    build_optimizer,
    cancel_gradients,
    clip_gradients_per_tensor,
)
from volta3d.engine.sampler import ResumableSampler
from volta3d.engine.schedules import Schedules, build_schedules, scaled_lr
from volta3d.errors import InputError
from volta3d.models.export import save_encoder_export
from volta3d.models.provenance import pretraining_provenance
from volta3d.runtime import (
    MetricsCSV,
    atomic_write,
    flatten_dict,
    resolve_device,
    seed_everything,
    setup_logging,
)

CHECKPOINT = Path(layout.CHECKPOINTS) / layout.LAST_CHECKPOINT
METRIC_COLUMNS = [
    "step", "epoch", "loss", *TERM_COLUMNS, "log_k", "lr", "weight_decay",
    "momentum", "teacher_init_share", "teacher_temp", "teacher_patch_temp",
    "view_global_overlap", "view_local_in_global",
    "teacher_entropy", "teacher_marginal_entropy", "teacher_entropy_gap",
    "teacher_patch_entropy", "teacher_patch_marginal_entropy", "teacher_patch_entropy_gap",
    "student_cls_cosine", "teacher_cls_cosine", "cls_rank", "patch_rank",
    "cls_rank_max", "patch_rank_max", "teacher_view_agreement", "student_cls_spread", "teacher_cls_spread",
    "collapse_alarm",
    "center_norm", "patch_center_norm", "grad_norm", "seconds_per_step",
]  # fmt: skip
LOGGED_PREFIXES = ("loss", "teacher_", "student_", "view_", *TERM_COLUMNS)
VIEW_COLUMNS = ("view_global_overlap", "view_local_in_global")  # how much the views share (batched_views)
# Keys that may change between a run and its resume: they do not alter the optimisation.
RESUME_FREE_KEYS = ("train.num_workers", "train.log_every", "train.checkpoint_every", "train.max_steps",
                    "train.tensorboard", "device", "optim.batch_size", "optim.accum_steps", "train.collapse_patience",
                    "train.collapse_max_cosine", "train.rank_buffer")  # fmt: skip
# what is evaluated, how often, and the downstream sections (read by other commands) do not alter the
# optimisation: a config that gained a downstream key since the checkpoint still resumes
RESUME_FREE_PREFIXES = ("eval.", "classify.", "segment.", "probe.")


class NonFiniteLossError(RuntimeError):
    """Training diverged; the last good checkpoint is left untouched."""


def pretrain(
    cfg: DictConfig, data: str | Path | Sequence[str | Path], output: str | Path, *, progress: bool = True
) -> Path:
    """Run (or resume) VolTA-3D pretraining on one or more preprocessed folders; returns the run folder."""
    out = Path(output)
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
    logger = setup_logging(out if dist_info.is_main else None, verbose=dist_info.is_main)
    validate_pretrain_config(cfg)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed)
    run = _prepare_run(cfg, data, out, device, dist_info, logger)
    _train(run, progress)
    if dist_info.is_main:  # the last step was checkpointed and exported inside the loop
        _check_export(run)
        logger.info("finished at step %d; encoder export in %s", run.step, out / layout.ENCODER_WEIGHTS)
    barrier()
    return out


@dataclass
class _Run:
    """The parts of one pretraining run that live from its start to its end."""

    cfg: DictConfig
    out: Path
    device: torch.device
    dist_info: DistInfo
    logger: Any
    dataset: PretrainVolumesDataset
    sampler: ResumableSampler
    loader: DataLoader
    model: VolTA3D
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    data_record: dict[str, Any]
    steps_per_epoch: int
    effective_batch: int
    step: int
    last_step: int


def _prepare_run(
    cfg: DictConfig, data: str | Path | Sequence[str | Path], out: Path, device: torch.device, dist_info: DistInfo,
    logger: Any,
) -> _Run:  # fmt: skip
    """Data, model, optimiser and schedules, resumed from ``out``'s checkpoint when there is one."""
    folders = [data] if isinstance(data, (str, Path)) else list(data)
    # Labels play no part in pretraining: keep only what every manifest has.
    manifest = pd.concat([read_manifest(d)[["subject_id", "path"]] for d in folders], ignore_index=True)
    data_record = _data_record(folders, manifest)
    if dist_info.is_main:  # the export records what pretraining saw (downstream runs compare with it)
        data_record["provenance"] = pretraining_provenance(folders, manifest)
    dataset, sampler, loader = build_pretrain_loader(cfg, manifest, dist_info, device)
    accum = cfg.optim.accum_steps
    steps_per_epoch = sampler.batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise InputError(
            f"{len(dataset)} volumes give no optimiser step per epoch with optim.batch_size={cfg.optim.batch_size}, "
            f"optim.accum_steps={accum} and {dist_info.world_size} process(es)"
        )
    effective_batch = cfg.optim.batch_size * accum * dist_info.world_size
    model = build_volta3d(to_kwargs(cfg.model), to_kwargs(cfg.head), to_kwargs(cfg.loss)).to(device)
    optimizer = build_optimizer(model.student, cfg.optim.betas)
    schedules = _schedules(cfg, steps_per_epoch, effective_batch)
    step = _maybe_resume(out / CHECKPOINT, cfg, model, optimizer, effective_batch, data_record, logger)
    if cfg.train.init:  # pretrain --init: the export's weights start a fresh run; a resumed one has its own
        data_record = start_from_export(cfg.train.init, model if step == 0 else None, data_record, logger)
    last_step = (
        schedules.total_steps if cfg.train.max_steps <= 0 else min(cfg.train.max_steps, schedules.total_steps)
    )
    if dist_info.is_main:
        save_config(cfg, out)
        atomic_write(
            out / layout.PRETRAIN_DATA, lambda f: f.write((json.dumps(data_record, indent=1) + "\n").encode())
        )
        logger.info(
            "pretraining on %d volumes: %d epochs x %d steps, effective batch %d (%d x %d accumulation x %d ranks), "
            "lr %.3g, device %s", len(dataset), cfg.optim.epochs, steps_per_epoch, effective_batch,
            cfg.optim.batch_size, accum, dist_info.world_size, schedules.lr.max(), device,
        )  # fmt: skip
    return _Run(cfg, out, device, dist_info, logger, dataset, sampler, loader, model,
                _wrap_student(model, device, dist_info), optimizer, schedules, data_record, steps_per_epoch,
                effective_batch, step, last_step)  # fmt: skip


class _Records:
    """Where each step's values go: metrics.csv, TensorBoard, the health tracker, the online probe and
    the progress bar (or, without it, a log line with the ETA about every 5 % of the run)."""

    def __init__(self, run: _Run, progress: bool) -> None:
        cfg, main = run.cfg, run.dist_info.is_main
        self.run = run
        self.metrics = MetricsCSV(run.out / layout.METRICS, keep_until_step=run.step) if main else None
        self.board = _tensorboard(run.out) if (main and cfg.train.tensorboard) else None
        self.health = HealthTracker(run.model.log_k, run.logger,
                                    **{k: cfg.train[k] for k in ("rank_buffer", "collapse_patience",
                                                                 "collapse_max_cosine")})  # fmt: skip
        self.online = (
            online_evaluation(cfg, run.out, run.step, run.model.teacher, run.device, run.logger)
            if main
            else None
        )
        self.bar = tqdm(total=run.last_step, initial=run.step, desc="pretrain", unit="step",
                        disable=not (progress and main))  # fmt: skip
        self.log_every = max(1, (run.last_step - run.step) // 20) if (main and not progress) else 0
        self.first_step, self.t_start = run.step, time.perf_counter()

    def step_done(self, row: dict[str, Any], embeddings: dict[str, torch.Tensor]) -> None:
        run, step = self.run, self.run.step
        self.health.observe(step, row, embeddings)
        if self.online is not None and (step % run.cfg.eval.every == 0 or step == run.last_step):
            self.online.run(step, {"teacher": run.model.teacher, "student": run.model.student}, run.device)
        losses = {k: f"{row[k]:.3g}" for k in ("loss", *LOSS_COLUMNS) if k in row}
        self.bar.update(1)
        self.bar.set_postfix(losses)
        if self.log_every and (step - self.first_step) % self.log_every == 0:
            per_step = (time.perf_counter() - self.t_start) / (step - self.first_step)
            run.logger.info("step %d/%d %s, ETA %.0f s", step, run.last_step,
                            " ".join(f"{k} {v}" for k, v in losses.items()), per_step * (run.last_step - step))  # fmt: skip
        if self.metrics is not None and (step % run.cfg.train.log_every == 0 or step == run.last_step):
            self.metrics.write({k: row.get(k, "") for k in METRIC_COLUMNS})
            if self.board is not None:
                for k in METRIC_COLUMNS[2:]:
                    if k in row:
                        self.board.add_scalar(k, row[k], step)

    def close(self) -> None:
        self.bar.close()
        if self.board is not None:
            self.board.close()


def _train(run: _Run, progress: bool) -> None:
    """The epochs from the run's step to its last: step, record, checkpoint (also at each epoch end)."""
    cfg, records, settings = run.cfg, _Records(run, progress), StepSettings.from_config(run.cfg, run.device)
    run.model.train()
    while run.step < run.last_step:
        epoch, first_batch = divmod(run.step, run.steps_per_epoch)
        run.sampler.set_epoch(epoch, start_batch=first_batch * settings.accum_steps)
        run.dataset.set_epoch(epoch)
        batches = iter(run.loader)
        while run.step < run.last_step and run.step // run.steps_per_epoch == epoch:
            t0 = time.perf_counter()
            try:
                row, embeddings = train_step(run.model, run.student, run.optimizer, run.schedules, run.step, batches,
                                             run.device, run.dist_info, run.dataset.views, settings)  # fmt: skip
            except NonFiniteLossError as err:
                run.logger.error("%s", err)  # into log.txt too, beside the run's other records
                raise
            run.step += 1
            row.update(
                step=run.step,
                epoch=epoch,
                seconds_per_step=time.perf_counter() - t0,
                **run.model.center_norms(),
            )
            records.step_done(row, embeddings)
            if (
                run.step % cfg.train.checkpoint_every == 0
                or run.step % run.steps_per_epoch == 0
                or run.step == run.last_step
            ):
                _save(
                    run.out,
                    run.model,
                    run.optimizer,
                    run.step,
                    cfg,
                    run.effective_batch,
                    run.data_record,
                    run.dist_info,
                    float(run.schedules.teacher_init_share[run.step - 1]),
                )
        if run.step % run.steps_per_epoch == 0 and run.dist_info.is_main:
            run.logger.info("epoch %d/%d done (step %d/%d): loss %.4f", epoch + 1, cfg.optim.epochs, run.step,
                            run.schedules.total_steps, row["loss"])  # fmt: skip
        del batches
    records.close()


@dataclass(frozen=True)
class StepSettings:
    """What one optimiser step reads from the config: micro-batches, precision, gradient clipping."""

    accum_steps: int
    use_bf16: bool
    clip_grad: float

    @classmethod
    def from_config(cls, cfg: DictConfig, device: torch.device) -> StepSettings:
        precision = cfg.train.precision
        bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        return cls(int(cfg.optim.accum_steps), bf16, float(cfg.optim.clip_grad))


def train_step(
    model: VolTA3D,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedules: Schedules,
    step: int,
    batches: Iterator[Mapping[str, torch.Tensor]],
    device: torch.device,
    dist_info: DistInfo,
    make_views: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]],
    settings: StepSettings,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One optimiser step over ``settings.accum_steps`` micro-batches; ``make_views`` turns each
    micro-batch, once on ``device``, into the views the model consumes (``BatchedMultiCrop``).

    Returns the step's logged values and the teacher embeddings of its last micro-batch (for the
    rolling effective rank)."""
    # 1. schedule values for this optimiser step
    apply_schedule_values(optimizer, float(schedules.lr[step]), float(schedules.weight_decay[step]))
    teacher_temp, patch_temp = float(schedules.teacher_temp[step]), float(schedules.teacher_patch_temp[step])

    # 2. forward / backward over the micro-batches
    logged, center_stats, embeddings = _accumulate_gradients(
        model, student, batches, make_views, settings, device, step, (teacher_temp, patch_temp)
    )

    if dist_info.world_size > 1:  # log the mean over ranks, i.e. over the whole effective batch
        values = torch.tensor(list(logged.values()), dtype=torch.float64, device=device)
        all_reduce_sum(values)
        logged = dict(zip(logged, (values / dist_info.world_size).tolist(), strict=True))

    # 3. DINO's last-layer freeze, per-tensor clipping, optimiser step
    if schedules.freeze_last_layer[step]:
        cancel_gradients(model.student.last_layer_parameters())
    grad_norm = clip_gradients_per_tensor(model.student.parameters(), settings.clip_grad)
    if not torch.isfinite(grad_norm):
        raise NonFiniteLossError(
            f"non-finite gradient norm at optimiser step {step}; the last good checkpoint is kept"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    # 4. teacher EMA and both centers: once per optimiser step, from the whole effective batch
    model.update_teacher(float(schedules.momentum[step]))
    model.update_centers({k: (s, c) for k, (s, c) in center_stats.items()})
    logged.update(
        lr=float(schedules.lr[step]), weight_decay=float(schedules.weight_decay[step]),
        momentum=float(schedules.momentum[step]), teacher_init_share=float(schedules.teacher_init_share[step]),
        teacher_temp=teacher_temp, teacher_patch_temp=patch_temp,
        grad_norm=float(grad_norm), log_k=model.log_k,
    )  # fmt: skip
    return logged, embeddings


def _accumulate_gradients(
    model: VolTA3D, student: torch.nn.Module, batches: Iterator[Mapping[str, torch.Tensor]],
    make_views: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]], settings: StepSettings,
    device: torch.device, step: int, temps: tuple[float, float],
) -> tuple[dict[str, float], dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:  # fmt: skip
    """Forward and backward of each micro-batch, the loss scaled by 1/accum, DDP syncing only on the last.

    Returns the logged values (mean over micro-batches), the summed center statistics, and the teacher
    embeddings of the last micro-batch."""
    accum = settings.accum_steps
    logged: dict[str, float] = {}
    center_stats: dict[str, list[torch.Tensor]] = {}
    for micro in range(accum):
        batch = make_views(move_batch(next(batches), device))
        ddp = student if isinstance(student, DistributedDataParallel) else None
        with contextlib.nullcontext() if ddp is None or micro == accum - 1 else ddp.no_sync():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.use_bf16):
                out = model.compute_losses(batch, *temps, student=student)
            if not torch.isfinite(out["loss"]):
                parts = ", ".join(
                    f"{k}={float(v.detach()):.4g}" for k, v in out.items() if k.startswith("loss_")
                )
                raise NonFiniteLossError(
                    f"non-finite loss at optimiser step {step} ({parts}); stopped without saving, the last good "
                    "checkpoint is kept. A resume must keep the settings: to change them (a lower optim.lr or "
                    "loss.teacher_temp, or train.precision=fp32) start a new --output folder"
                )
            (out["loss"] / accum).backward()
        for name, (sum_, count) in out["center_stats"].items():
            acc = center_stats.setdefault(name, [torch.zeros_like(sum_), torch.zeros((), device=sum_.device)])
            acc[0] += sum_
            acc[1] += count
        for k, v in [*out.items(), *((k, batch[k]) for k in VIEW_COLUMNS)]:
            if k.startswith(LOGGED_PREFIXES):
                logged[k] = logged.get(k, 0.0) + float(v.detach()) / accum
    return logged, center_stats, out["embeddings"]


def build_pretrain_loader(
    cfg: DictConfig, manifest: pd.DataFrame, dist_info: DistInfo, device: torch.device
) -> tuple[PretrainVolumesDataset, ResumableSampler, DataLoader]:
    """The DataLoader of pretraining: it reads cached volumes and draws each crop's parameters; the views
    themselves are built on ``device`` by ``dataset.views`` inside the step (``volta3d.data.batched_views``)."""
    views = build_views(to_kwargs(cfg.views), to_kwargs(cfg.masking), patch_size=cfg.model.patch_size)
    dataset = PretrainVolumesDataset(VolumeDataset(manifest), views, base_seed=cfg.seed)
    sampler = ResumableSampler(
        len(dataset),
        cfg.optim.batch_size,
        seed=cfg.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    loader = DataLoader(
        dataset, batch_size=cfg.optim.batch_size, sampler=sampler, num_workers=cfg.train.num_workers,
        collate_fn=collate_volumes, pin_memory=device.type == "cuda", drop_last=True,
    )  # fmt: skip
    return dataset, sampler, loader


def _schedules(cfg: DictConfig, steps_per_epoch: int, effective_batch: int) -> Schedules:
    o, lo = cfg.optim, cfg.loss
    return build_schedules(
        steps_per_epoch=steps_per_epoch, epochs=o.epochs, lr=scaled_lr(o.lr, effective_batch, o.lr_scaling),
        min_lr=o.min_lr, warmup_epochs=o.warmup_epochs, weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end, momentum_teacher=o.momentum_teacher,
        momentum_teacher_end=o.momentum_teacher_end, teacher_max_init_share=o.teacher_max_init_share,
        teacher_temp=lo.teacher_temp,
        warmup_teacher_temp=lo.warmup_teacher_temp, warmup_teacher_temp_epochs=lo.warmup_teacher_temp_epochs,
        teacher_patch_temp=lo.teacher_patch_temp, warmup_teacher_patch_temp=lo.warmup_teacher_patch_temp,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs, max_steps=cfg.train.max_steps,
    )  # fmt: skip


def _data_record(folders: Sequence[str | Path], manifest: pd.DataFrame) -> dict[str, Any]:
    """What the run pretrains on (pretrain_data.json): the report reads it to tell whether downstream test
    subjects were in the pretraining set; the hash of ids and paths, and each volume's content hash
    (``volumes``, see ``volta3d.data.content``), guard a resume against other data or data changed in place."""
    refuse_repeated_volumes(manifest, folders)
    ids, paths = manifest["subject_id"].astype(str).tolist(), manifest["path"].astype(str).tolist()
    digest = hashlib.sha256(
        "\n".join(f"{i}\t{p}" for i, p in zip(ids, paths, strict=True)).encode()
    ).hexdigest()
    return {"folders": [str(Path(f).resolve()) for f in folders], "n_volumes": len(ids), "sha256": digest,
            "subject_ids": ids, "volumes": content_hashes(paths)}  # fmt: skip


def _maybe_resume(
    path: Path, cfg: DictConfig, model: VolTA3D, optimizer: torch.optim.Optimizer, effective_batch: int,
    data_record: Mapping[str, Any], logger: Any,
) -> int:  # fmt: skip
    if not path.exists():
        return 0
    state = load_checkpoint(path)
    then_data = state.get("data_sha256")
    if then_data is not None and then_data != data_record["sha256"]:
        raise InputError(
            f"{path} was trained on other volumes than --data now gives ({data_record['n_volumes']} volumes from "
            f"{', '.join(data_record['folders'])}); use a new --output folder to pretrain on other data"
        )
    change = describe_change(state.get("data_volumes"), data_record["volumes"])
    if change:  # e.g. a --data folder preprocessed again in place, with other settings
        raise InputError(f"{path} was trained on other data: {change} since; use a new --output folder to "
                         "pretrain on the data as it is now")  # fmt: skip
    now, then = flatten_dict(to_kwargs(cfg)), flatten_dict(state["config"])
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k) and k not in RESUME_FREE_KEYS
                     and not k.startswith(RESUME_FREE_PREFIXES))  # fmt: skip
    if changed:
        k = changed[0]
        raise InputError(
            f"{path} was written with {k}={then.get(k)!r} but the config now says {now.get(k)!r}; "
            "use a new --output folder to change the method's settings"
        )
    if state["effective_batch"] != effective_batch:
        raise InputError(
            f"{path} was trained with an effective batch of {state['effective_batch']}, now {effective_batch}: "
            "keep optim.batch_size x optim.accum_steps x processes the same to resume"
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as err:  # a checkpoint of another model, or a damaged one
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path} does not fit this model ({reason}); use a new --output folder") from None
    torch.set_rng_state(state["rng"])
    logger.info("resumed from %s at optimiser step %d", path, state["step"])
    return int(state["step"])


def _save(
    out: Path, model: VolTA3D, optimizer: torch.optim.Optimizer, step: int, cfg: DictConfig, effective_batch: int,
    data_record: Mapping[str, Any], dist_info: DistInfo, teacher_init_share: float,
) -> None:  # fmt: skip
    if not dist_info.is_main:
        return
    save_checkpoint(
        out / CHECKPOINT,
        {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "effective_batch": effective_batch, "config": OmegaConf.to_container(cfg, resolve=True),
            "rng": torch.get_rng_state(), "data_sha256": data_record["sha256"],
            "data_volumes": data_record["volumes"],
        },
    )  # fmt: skip
    _export(out, model, step, data_record, teacher_init_share)


def _export(
    out: Path, model: VolTA3D, step: int, data_record: Mapping[str, Any], teacher_init_share: float
) -> None:
    # DINO evaluates the teacher: it is the better encoder, so it is the one exported.
    training = {"step": step, "teacher_init_share": teacher_init_share}
    save_encoder_export(
        out, model.teacher.encoder, model.teacher.summariser, data_record.get("provenance"), training
    )


def _check_export(run: _Run) -> None:
    """The export must be the last checkpoint's: a run killed while exporting leaves an earlier step's
    (each file is replaced atomically, encoder.json last, so its step dates both), which a re-run that
    finds the training finished would otherwise keep. Such an export is written again from the checkpoint."""
    try:
        step = json.loads((run.out / layout.ENCODER_META).read_text())["training"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        step = None
    if run.step == 0 or (step == run.step and (run.out / layout.ENCODER_WEIGHTS).is_file()):
        return
    run.logger.warning("the encoder export is from step %s, not the checkpoint's step %d (interrupted while "
                       "exporting?): exporting it again", step, run.step)  # fmt: skip
    share = float(run.schedules.teacher_init_share[run.step - 1])
    _export(run.out, run.model, run.step, run.data_record, share)


def _wrap_student(model: VolTA3D, device: torch.device, dist_info: DistInfo) -> torch.nn.Module:
    if dist_info.world_size <= 1:
        return model.student
    # A loss weight of 0 idles a branch (summariser, patch head, decoder): DDP must then look for
    # parameters without gradients. MONAI's unused norm_cross_attn is frozen in the encoder already.
    idle_branch = any(w <= 0 for w in model.weights.values())
    return DistributedDataParallel(
        model.student,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=idle_branch,
    )


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


__all__ = [
    "NonFiniteLossError",
    "StepSettings",
    "build_pretrain_loader",
    "pretrain",
    "train_step",
]
