"""The package's architecture, read from the source: which layer may import which, and one home for
the run-folder layout's file names."""

import ast
from pathlib import Path

import pytest

from volta3d import layout

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "volta3d"
# package -> the volta3d packages it must never import (anywhere in a module, lazily or not)
FORBIDDEN = {
    "data": ("models", "losses", "protocol", "engine", "downstream", "evaluation", "commands"),
    "losses": ("protocol", "engine", "downstream", "evaluation", "commands"),
    "models": ("protocol", "engine", "downstream", "evaluation", "commands"),
    "protocol": ("engine", "downstream", "evaluation", "commands"),
    "engine": ("downstream", "evaluation", "commands"),
    "downstream": ("evaluation", "commands"),
    "evaluation": ("commands",),
}


def _modules(package: str) -> list[Path]:
    return sorted((PACKAGE / package).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Every ``volta3d.<package>`` a module imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("volta3d.")}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package):
    wrong = {
        f"{p.relative_to(PACKAGE)} imports volta3d.{bad}"
        for p in _modules(package)
        for bad in _imported(p) & set(FORBIDDEN[package])
    }
    assert not wrong, sorted(wrong)


def test_the_checker_sees_a_lazy_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from volta3d.downstream.saved import save_fold_model\n")
    assert "downstream" in _imported(module)


def test_layout_file_names_are_spelled_only_in_layout():
    names = layout.file_names()
    assert {"metrics.csv", "config.yaml", "encoder.safetensors", "stages.json"} <= names
    spelled = {
        f"{p.relative_to(PACKAGE)}:{node.lineno} {node.value!r}"
        for p in PACKAGE.rglob("*.py")
        if p.name != "layout.py"
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Constant) and node.value in names
    }
    assert not spelled, sorted(spelled)


def test_every_loss_term_has_a_weight_and_a_metrics_column():
    from volta3d.config import load_config
    from volta3d.engine.loss_terms import LOSS_TERMS
    from volta3d.engine.trainer import METRIC_COLUMNS

    loss = load_config().loss
    for term in LOSS_TERMS:
        assert term.weight in loss, term
        assert term.column in METRIC_COLUMNS, term


def test_every_network_resolves_and_is_an_allowed_config_value():
    from volta3d.config_rules import CHOICES
    from volta3d.downstream.networks import NETWORKS, network_builder, network_names

    for name, entry in NETWORKS.items():
        assert callable(network_builder(entry.task, name, None))
    assert CHOICES["classify.model"] == network_names("classify") == ("vit", "swin", "sfcn")
    assert CHOICES["segment.model"] == network_names("segment") == ("unetr", "unet")


def test_a_network_refuses_an_encoder_it_cannot_start_from_and_an_unknown_name():
    from volta3d.downstream.networks import network_builder
    from volta3d.errors import InputError

    with pytest.raises(
        InputError, match="--encoder applies to UNETR; the 3D U-Net baseline is trained from scratch"
    ):
        network_builder("segment", "unet", "enc")
    with pytest.raises(InputError, match=r"unknown classify model 'unet' \(choose vit, swin, sfcn\)"):
        network_builder("classify", "unet", None)
