"""Value checks for a merged configuration: a wrong type, an out-of-range number or an unknown choice
is a one-line ``ConfigError`` naming the key, raised before any work starts.

Types come from ``default.yaml`` itself (a key whose default is a number takes a number, a boolean
takes a boolean, a list a list; ``null`` defaults take anything), so a new key is type-checked
without being listed here. Ranges and choices are listed for the keys where a wrong value would
otherwise run and give nonsense (``optim.lr=-1``, ``train.precision=fp8``) or fail deep inside a
run (``train.log_every=0``). A section replaced by a value (``preprocess=5``) and sizes that would
allocate more than a limit (the preprocessing cube against ``preprocess.max_voxels``) are refused
here too, before any scan is read. Checks across keys that only pretraining reads (crop sides against
the patch, reconstruction without masking, ...) are ``validate_pretrain_config``, which ``pretrain`` and
``bench`` call. Modules take the names they implement from ``CHOICES`` and do not check a config again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from volta3d.downstream.networks import network_names
from volta3d.engine.loss_terms import LOSS_TERMS, WEIGHT_KEYS
from volta3d.errors import InputError
from volta3d.runtime import flatten_dict

POSITIVE = ("optim.lr", "classify.lr", "segment.lr", "loss.student_temp", "loss.teacher_temp",
            "loss.warmup_teacher_temp", "loss.teacher_patch_temp", "loss.warmup_teacher_patch_temp",
            "preprocess.spacing", "model.summariser.mlp_ratio")  # fmt: skip
NON_NEGATIVE = ("optim.min_lr", "optim.weight_decay", "optim.weight_decay_end", "optim.clip_grad",
                "optim.warmup_epochs", "optim.freeze_last_layer_epochs", *WEIGHT_KEYS, "loss.warmup_teacher_temp_epochs", "classify.weight_decay",
                "segment.weight_decay", "views.noise_std", "views.bias_field_coeff",
                "views.intensity_scale", "views.intensity_shift", "model.dropout", "train.max_steps",
                "eval.max_volumes", "train.num_workers", "classify.num_workers", "segment.num_workers",
                "classify.unfreeze_last")  # fmt: skip
UNIT_INTERVAL = ("optim.momentum_teacher", "optim.momentum_teacher_end", "loss.center_momentum", "masking.ratio",
                 "views.flip_prob", "views.gamma_prob", "views.contrast_prob", "views.noise_prob",
                 "views.bias_field_prob", "train.collapse_max_cosine", "segment.pos_fraction", "segment.val_fraction",
                 "segment.holdout_fraction", "segment.sw_overlap", "classify.sfcn.dropout")  # fmt: skip
AT_LEAST = {  # integer counts and their smallest sensible value
    "seed": 0, "optim.epochs": 1, "optim.batch_size": 1, "optim.accum_steps": 1, "head.out_dim": 1,
    "head.hidden_dim": 1, "head.bottleneck_dim": 1, "head.nlayers": 1, "model.img_size": 1, "model.patch_size": 1,
    "model.hidden_size": 1, "model.mlp_dim": 1, "model.num_layers": 1, "model.num_heads": 1, "model.in_channels": 1,
    "model.summariser.heads": 1, "views.global_size": 1, "views.local_size": 1, "views.n_local": 0,
    "masking.block_size": 1, "loss.sinkhorn_iterations": 1, "train.log_every": 1, "train.checkpoint_every": 1,
    "train.collapse_patience": 1, "train.rank_buffer": 2, "eval.every": 1, "eval.n_splits": 2, "eval.raw_grid": 1,
    "classify.epochs": 1, "classify.batch_size": 1, "classify.n_splits": 2, "segment.epochs": 1,
    "segment.batch_size": 1, "segment.samples_per_volume": 1, "segment.val_every": 1, "segment.n_splits": 2,
    "segment.sw_batch_size": 1, "segment.crop_size": 1, "classify.swin.feature_size": 1, "classify.swin.window": 1,
    "classify.swin.patch_size": 1, "probe.batch_size": 1, "probe.knn_k": 1, "probe.n_splits": 2,
    "preprocess.max_voxels": 1, "probe.inner_folds": 2,
}  # fmt: skip
# non-empty lists of numbers > 0
POSITIVE_LISTS = ("probe.logreg_cs", "probe.ridge_alphas", "classify.sfcn.channels")
# AdamW moves every weight by about lr per step: a base rate above 10 diverges at once (1e300 overflows)
AT_MOST = {"optim.lr": 10.0, "classify.lr": 10.0, "segment.lr": 10.0}
FIXED_LISTS: dict[str, tuple[int, str, Callable[[Any], bool]]] = {  # length, what each element is, its test
    "optim.betas": (2, "numbers in [0, 1), e.g. [0.9, 0.999]", lambda v: _is_number(v) and 0 <= v < 1),
    "preprocess.size": (3, "integers >= 1, e.g. [96, 96, 96]", lambda v: _is_count(v)),
}
CHOICES = {
    "train.precision": ("auto", "fp32", "bf16"), "loss.centering": ("ema", "sinkhorn"),
    "loss.local_tokens": ("all", "masked"), "masking.fill": ("noise", "zeros"), "masking.block_shape": ("cube", "random"),
    "optim.lr_scaling": ("linear", "sqrt", "none"), "model.input_norm": ("zscore", "none"),
    "preprocess.intensity": ("minmax", "percentile"), "preprocess.crop": ("center", "foreground"),
    "preprocess.dtype": ("float16", "float32"), "classify.model": network_names("classify"),
    "classify.task": ("auto", "classification", "regression"), "classify.pooling": ("cls", "mean"),
    "classify.mode": ("frozen", "partial", "full"), "classify.regression_loss": ("mse", "l1"),
    "segment.model": network_names("segment"), "segment.split": ("holdout", "kfold"),
}  # fmt: skip
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ConfigValueError(InputError):
    """A config value of the wrong type or out of range (a ``ConfigError`` is raised from it)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _type_error(key: str, default: Any, value: Any) -> str | None:
    if default is None:
        return None  # a null default (an optional value) accepts anything
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if _is_number(default):
        return None if _is_number(value) else "must be a finite number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be a string"
    if isinstance(default, list):
        return None if isinstance(value, list) else "must be a list, e.g. [a, b]"
    return None


def _range_error(key: str, value: Any) -> str | None:
    if key in AT_LEAST and (not isinstance(value, int) or isinstance(value, bool) or value < AT_LEAST[key]):
        return f"must be an integer >= {AT_LEAST[key]}"
    if key in POSITIVE and not value > 0:
        return "must be > 0"
    if key in NON_NEGATIVE and not value >= 0:
        return "must be >= 0"
    if key in UNIT_INTERVAL and not 0 <= value <= 1:
        return "must be in [0, 1]"
    if key in AT_MOST and value > AT_MOST[key]:
        return f"must be <= {AT_MOST[key]:g}"
    if key in POSITIVE_LISTS and not (value and all(_is_number(v) and v > 0 for v in value)):
        return "must be a non-empty list of numbers > 0"
    if key in FIXED_LISTS:
        length, what, ok = FIXED_LISTS[key]
        if len(value) != length or not all(ok(v) for v in value):
            return f"must be {length} {what}"
    if key in CHOICES and value not in CHOICES[key]:
        return f"must be one of {', '.join(CHOICES[key])}"
    if key == "device" and not DEVICE.match(str(value)):
        return "must be auto, cpu, cuda or cuda:N"
    return None


def cube_error(size: Sequence[int], max_voxels: int) -> str | None:
    """The preprocessing output cube against the voxel limit: refused before any scan is read, since
    every scan would be resampled into it (640^3 float32 is 1 GB a scan)."""
    voxels = math.prod(int(n) for n in size)
    if voxels <= max_voxels:
        return None
    return (
        f"config value preprocess.size={[int(n) for n in size]} makes {voxels:,} voxels a scan, over "
        f"preprocess.max_voxels={max_voxels:,}"
    )


def _section_error(cfg: Any, defaults: Any, prefix: str = "") -> str | None:
    """A section replaced by a value (``preprocess=5``) or a value by a section (``optim.lr={a: 1}``),
    found on the unresolved config (resolving interpolations would fail on it first)."""
    for key, default in defaults.items():
        name, value = f"{prefix}{key}", cfg.get(key)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                keys = ", ".join(default)
                return f"config key '{name}' is a section ({keys}); set its keys, e.g. {name}.{next(iter(default))}=..."
            problem = _section_error(value, default, f"{name}.")
            if problem:
                return problem
        elif default is not None and isinstance(value, dict):
            return f"config value {name}={value!r} must be a single value, not a section"
    return None


def _flat(cfg: DictConfig, resolve: bool = True) -> dict[str, Any]:
    # a DictConfig converts to a dict (to_container is annotated for any config node)
    return flatten_dict(cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=resolve)))


def validate_config(cfg: DictConfig, defaults: DictConfig) -> None:
    """Raise ``ConfigValueError`` naming the first key whose value has the wrong type or range."""
    problem = _section_error(OmegaConf.to_container(cfg), OmegaConf.to_container(defaults))
    if problem:
        raise ConfigValueError(problem)
    try:
        values = _flat(cfg)
    except OmegaConfBaseException as err:  # an interpolation (${...}) naming no key
        key = getattr(err, "full_key", None) or "?"
        raise ConfigValueError(f"config value {key} cannot be resolved: {str(err).splitlines()[0]}") from None
    base = _flat(defaults)
    for key, value in values.items():
        problem = _type_error(key, base.get(key), value) or (
            _range_error(key, value) if value is not None else None
        )
        if problem:
            raise ConfigValueError(f"config value {key}={value!r} {problem}")
    problem = cube_error(values["preprocess.size"], values["preprocess.max_voxels"])
    if problem:
        raise ConfigValueError(problem)


def loss_weights_error(loss: Mapping[str, Any]) -> str | None:
    """The ``loss:`` section with every loss term switched off: nothing would train (KoLeo, a regulariser,
    is not a loss of its own)."""
    weights = [t.weight for t in LOSS_TERMS if t.kind != "regulariser"]
    if all(loss[w] <= 0 for w in weights):
        return f"every loss weight is 0 ({', '.join(f'loss.{w}' for w in weights)})"
    return None


def pretrain_error(cfg: DictConfig) -> str | None:
    """Pretraining settings that only fail together (crop sides against the patch, ...), or None. Every
    loss weight at 0 is ``loss_weights_error``, which ``build_volta3d`` checks."""
    if cfg.loss.rec_weight > 0 and cfg.masking.ratio <= 0:
        return "loss.rec_weight > 0 needs GMML masking: set masking.ratio > 0 (or loss.rec_weight=0)"
    if cfg.views.global_size != cfg.model.img_size:
        return f"views.global_size ({cfg.views.global_size}) must equal model.img_size ({cfg.model.img_size})"
    for key in ("global_size", "local_size"):
        if cfg.views[key] % cfg.model.patch_size:
            return f"views.{key} ({cfg.views[key]}) must be a multiple of model.patch_size ({cfg.model.patch_size})"
    if cfg.loss.koleo_weight > 0 and cfg.optim.batch_size < 2:
        return "loss.koleo_weight > 0 needs optim.batch_size >= 2 (KoLeo compares volumes within a batch)"
    return None


def validate_pretrain_config(cfg: DictConfig) -> None:
    """Raise ``ConfigValueError`` (one line) for the first of ``pretrain_error``'s problems; ``pretrain`` and
    ``bench`` call it before any work, other commands do not read these sections."""
    problem = pretrain_error(cfg)
    if problem:
        raise ConfigValueError(problem)
