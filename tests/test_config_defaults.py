"""One source for every config value: a keyword argument fed from a ``default.yaml`` key takes no default
in the code (the YAML is the default), and no default anywhere in the package repeats a YAML value under
the key's name unless it is listed below as not coming from the config."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import volta3d
from volta3d.config import load_config, to_kwargs
from volta3d.data.io import read_dicom_series, read_nifti, read_volume
from volta3d.data.masking import GMMLMasker
from volta3d.data.pipeline import PreprocessSettings
from volta3d.data.sources import find_scans
from volta3d.data.views import ViewSettings
from volta3d.downstream.classifier import SwinClassifier, ViTClassifier, swin_kwargs
from volta3d.downstream.recipe import FinetuneRecipe
from volta3d.downstream.segmenter import AnyPatchUNETR, build_unet, build_unetr
from volta3d.downstream.sfcn import SFCN, sfcn_kwargs
from volta3d.engine.health import CollapseMonitor, HealthTracker, RollingRank
from volta3d.engine.meta_arch import VolTA3D
from volta3d.engine.online_eval import OnlineProbe
from volta3d.engine.optim import build_optimizer
from volta3d.engine.schedules import build_schedules
from volta3d.losses.centering import Center, sinkhorn_knopp_probs
from volta3d.models.encoder import VolTAEncoder
from volta3d.models.heads import ProjectionHead, build_heads
from volta3d.models.summariser import CLSSummariser, summariser_kwargs
from volta3d.protocol.embeddings import extract_embeddings, extract_raw_embeddings
from volta3d.protocol.probes import make_probe, run_probe
from volta3d.protocol.splits import make_kfold_splits

CONFIG = to_kwargs(load_config())  # default.yaml, interpolations resolved


def section(name: str) -> dict[str, Any]:
    node: Any = CONFIG
    for part in name.split("."):
        node = node[part]
    return node


@dataclass(frozen=True)
class Fed:
    """``target`` takes the keys of ``sections`` as the keyword arguments of the same names (the first
    section holding a name gives it), and the keys in ``renamed`` (argument -> dotted key) under other
    names."""

    target: Callable[..., Any]
    sections: tuple[str, ...]
    renamed: dict[str, str] = field(default_factory=dict)

    def config_arguments(self) -> dict[str, str]:
        """Argument -> the dotted config key it takes."""
        params = inspect.signature(self.target).parameters
        keys: dict[str, str] = {}
        for name in self.sections:
            for key, value in section(name).items():
                if not isinstance(value, dict) and key in params:
                    keys.setdefault(key, f"{name}.{key}")
        return {**keys, **self.renamed}


# every public constructor, builder and function that receives config values as keyword arguments
FED = [
    Fed(ViewSettings, ("views",)),
    Fed(GMMLMasker, ("masking", "model")),  # model.patch_size
    Fed(VolTAEncoder, ("model",)),
    Fed(CLSSummariser, ("model.summariser",), {"num_heads": "model.summariser.heads"}),
    Fed(summariser_kwargs, ("model.summariser",)),
    Fed(ProjectionHead, ("head",)),
    Fed(build_heads, ("head",)),
    Fed(VolTA3D, ("loss",), {"out_dim": "head.out_dim"}),
    Fed(Center, (), {"momentum": "loss.center_momentum"}),
    Fed(sinkhorn_knopp_probs, (), {"n_iterations": "loss.sinkhorn_iterations"}),
    Fed(build_schedules, ("optim", "loss", "train")),
    Fed(build_optimizer, ("optim",)),
    Fed(HealthTracker, ("train",)),
    Fed(RollingRank, (), {"capacity": "train.rank_buffer"}),
    Fed(
        CollapseMonitor,
        (),
        {"patience": "train.collapse_patience", "max_cosine": "train.collapse_max_cosine"},
    ),
    Fed(OnlineProbe, ("eval", "probe")),
    Fed(make_probe, ("probe",)),
    Fed(run_probe, ("probe",)),
    Fed(extract_embeddings, ("probe",)),
    Fed(extract_raw_embeddings, ("probe",), {"grid": "eval.raw_grid"}),
    Fed(make_kfold_splits, ("classify",)),
    Fed(PreprocessSettings, ("preprocess",)),
    Fed(read_volume, ("preprocess",)),
    Fed(read_nifti, ("preprocess",)),
    Fed(read_dicom_series, ("preprocess",)),
    Fed(find_scans, ("preprocess",)),
    Fed(ViTClassifier, ("classify",)),
    Fed(
        SwinClassifier,
        ("classify.swin",),
        {"num_heads": "classify.swin.heads", "window_size": "classify.swin.window"},
    ),
    Fed(swin_kwargs, ("classify.swin",)),
    Fed(SFCN, ("classify.sfcn",)),
    Fed(sfcn_kwargs, ("classify.sfcn",)),
    Fed(FinetuneRecipe, ("classify",)),
    Fed(build_unetr, ("model", "segment")),
    Fed(AnyPatchUNETR, ("model", "segment")),
    Fed(build_unet, (), {"num_res_units": "segment.unet_res_units"}),
]
# (target, argument) of a listed target that shares a key's name but is not fed from that key
NOT_FED = {
    (build_unetr, "dropout"): "UNETR's own dropout, 0; model.dropout is the pretraining encoder's",
}
# Defaults elsewhere in the package equal to a YAML value of the same name, and why they are not config values
NOT_CONFIG = {
    "volta3d.downstream.segmenter.build_unetr(dropout)": NOT_FED[(build_unetr, "dropout")],
    "volta3d.downstream.segmenter.build_unet(dropout)": "the U-Net baseline's dropout, 0; not model.dropout",
    "volta3d.downstream.classifier.SwinClassifier(in_channels)": "the Swin baseline's input channels, not model:",
    "volta3d.downstream.classifier.SwinClassifier(dropout)": "the Swin baseline's dropout, 0; not model.dropout",
    "volta3d.downstream.sfcn.SFCN(in_channels)": "the SFCN baseline's input channels, not model:",
    "volta3d.models.imports.importer.ImportOptions(in_channels)": "an import-encoder option, not a config key",
    "volta3d.models.imports.importer.ImportOptions(input_norm)": "an import-encoder option, not a config key",
    "volta3d.models.imports.monai_keys.map_monai(in_channels)": "a checkpoint's channels, read by import-encoder",
    "volta3d.models.export.build_from_export(fused_attention)": "an export is rebuilt with fused attention; "
    "model.fused_attention is a pretraining run's",
    "volta3d.protocol.labels.prepare_labels(task)": "online evaluation and model selection infer the task "
    "('auto'); classify.task is passed where it applies",
}


def _id(fed: Fed) -> str:
    return fed.target.__qualname__


@pytest.mark.parametrize("fed", FED, ids=_id)
def test_config_fed_arguments_take_no_default(fed):
    params = inspect.signature(fed.target).parameters
    defaulted = {
        f"{name}={params[name].default!r} (config {key})"
        for name, key in fed.config_arguments().items()
        if params[name].default is not inspect.Parameter.empty and (fed.target, name) not in NOT_FED
    }
    assert not defaulted, f"{_id(fed)}: default.yaml is the one source of {sorted(defaulted)}"


@pytest.mark.parametrize("fed", FED, ids=_id)
def test_each_listed_target_takes_config_values(fed):
    """A renamed or removed argument, or a section that no longer feeds the target, fails here instead of
    leaving an entry that checks nothing."""
    params = inspect.signature(fed.target).parameters
    arguments = fed.config_arguments()
    assert set(arguments) - {name for target, name in NOT_FED if target is fed.target}, _id(fed)
    assert set(fed.renamed) <= set(params), (_id(fed), sorted(set(fed.renamed) - set(params)))
    for key in fed.renamed.values():
        parent, _, leaf = key.rpartition(".")
        assert leaf in section(parent), key


def _yaml_values() -> dict[str, list[Any]]:
    """Every key of a section (at any depth) -> its values; top-level scalars (seed, device) are no section."""
    found: dict[str, list[Any]] = {}

    def walk(node: dict[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value)
            else:
                found.setdefault(key, []).append(value)

    walk({k: v for k, v in CONFIG.items() if isinstance(v, dict)})
    return found


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:  # a null default is "unset", not a value
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a default that cannot be compared is no YAML value
        return False


def _signatures() -> Iterator[tuple[str, inspect.Signature]]:
    """Module-level functions and classes of every volta3d module, with their signatures."""
    root = Path(volta3d.__file__).parent
    for path in sorted(root.rglob("*.py")):  # every module, also in folders without an __init__.py
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isfunction(obj) or (inspect.isclass(obj) and "__init__" in vars(obj))):
                continue  # a class's inherited constructor is checked where it is written (MONAI's: not ours)
            try:
                yield f"{module.__name__}.{name}", inspect.signature(obj)
            except (TypeError, ValueError):  # a class without an inspectable constructor
                continue


def test_no_default_repeats_a_yaml_value():
    values = _yaml_values()
    repeated = {
        f"{where}({name})": param.default
        for where, signature in _signatures()
        for name, param in signature.parameters.items()
        if name in values
        and param.default is not inspect.Parameter.empty
        and any(_same(param.default, v) for v in values[name])
    }
    unexplained = {k: v for k, v in repeated.items() if k not in NOT_CONFIG}
    assert not unexplained, f"defaults that repeat default.yaml (take them from the config): {unexplained}"
    stale = sorted(set(NOT_CONFIG) - set(repeated))
    assert not stale, f"NOT_CONFIG entries that no longer match a default: {stale}"
