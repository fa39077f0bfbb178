"""Configuration: one commented default file, optional override files, then a CLI dotlist.

Everything is merged onto ``configs/default.yaml`` in OmegaConf struct mode, so a misspelt key in
an override file or on the command line is an error that names the key, never a silent no-op.
Modules never see the config object: builders turn sections into keyword arguments.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from volta3d import layout
from volta3d.config_rules import ConfigValueError, validate_config
from volta3d.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
# A YAML tag (`!!python/object ...`, `!x`) starts a node: the value, a flow item or a mapping value.
YAML_TAG = re.compile(r"(?:^|[\[\{,]|:\s)\s*!")


class ConfigError(InputError):
    """A configuration problem that names the offending file or key."""


def config_path(name_or_path: str | Path) -> Path:
    """Resolve ``tiny-cpu`` / ``tiny-cpu.yaml`` to the bundled file, or return an existing file (a folder
    that happens to be called ``demo`` is not a config)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = CONFIG_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if bundled.exists():
        return bundled
    raise ConfigError(
        f"config file not found: {name_or_path} (bundled configs: {', '.join(bundled_configs())})"
    )


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _merge_strict(base: DictConfig, other: DictConfig | dict, source: str) -> DictConfig:
    try:
        # base is struct: unknown keys raise; merging onto a DictConfig gives a DictConfig
        return cast(DictConfig, OmegaConf.merge(base, other))
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = getattr(err, "full_key", None) or str(err).splitlines()[0]
        raise ConfigError(f"unknown config key '{key}' in {source}") from None


def load_config(files: Iterable[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge default.yaml <- each file in order <- ``key=value`` overrides; return a read-only config.

    A file may name a base with a top-level ``defaults: [other]`` list (bundled names or paths),
    merged before it, so ``paper.yaml`` and ``tiny-cpu.yaml`` only list what they change.
    """
    defaults = cast(DictConfig, OmegaConf.load(DEFAULT_CONFIG))  # default.yaml is a mapping
    cfg = defaults.copy()
    OmegaConf.set_struct(cfg, True)
    for f in files:
        cfg = _merge_file(cfg, config_path(f), seen=set())
    for item in overrides:
        cfg = _merge_strict(cfg, _parse_override(item), f"command-line override '{item}'")
    try:
        validate_config(cfg, defaults)
    except ConfigValueError as err:
        raise ConfigError(str(err)) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _parse_override(item: str) -> DictConfig:
    """One ``key=value`` as a config. A YAML tag is refused unparsed (a value is data, never an object
    to construct) and a value YAML cannot parse is one line naming the override."""
    _, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    if YAML_TAG.search(value):
        raise ConfigError(f"command-line override '{item}': YAML tags (!...) are not allowed in a value")
    try:
        return OmegaConf.from_dotlist([item])
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(
            f"cannot parse command-line override '{item}': {' '.join(str(err).split())}"
        ) from None


def _merge_file(cfg: DictConfig, path: Path, seen: set[Path]) -> DictConfig:
    if path in seen:
        raise ConfigError(f"config file includes itself through 'defaults': {path}")
    seen.add(path)
    try:
        data = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry a multi-line message; keep the first line
        raise ConfigError(f"cannot parse config file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    bases = data.pop("defaults", [])
    for base in bases:
        cfg = _merge_file(cfg, config_path(base), seen)
    return _merge_strict(cfg, data, str(path))


def save_config(cfg: DictConfig, out_dir: str | Path) -> Path:
    """Write the resolved config next to a run's outputs."""
    out = Path(out_dir) / layout.CONFIG
    out.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out, resolve=True)
    return out


def to_kwargs(section: DictConfig) -> dict[str, Any]:
    """Plain-Python copy of a config section, for builders that pass keyword arguments on."""
    return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
