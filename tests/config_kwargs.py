"""Keyword arguments from ``default.yaml`` for tests that build the library's objects directly.

Config-backed arguments take no default in the code (``default.yaml`` is their one source), so a test
takes them from the YAML and states only the values it is about::

    ViewSettings(**section_kwargs("views", global_size=16, local_size=8))
    GMMLMasker(**kwargs_for(GMMLMasker, "masking", "model", ratio=0.5, patch_size=8))
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from functools import cache
from typing import Any

from volta3d.config import load_config, to_kwargs
from volta3d.models.encoder import VolTAEncoder, build_encoder

# a test-sized encoder: 32^3 input, 2^3 tokens of 16^3, width 16, one block
TINY_ENCODER = {
    "img_size": 32,
    "patch_size": 16,
    "hidden_size": 16,
    "mlp_dim": 32,
    "num_layers": 1,
    "num_heads": 2,
}


@cache
def _defaults() -> dict[str, Any]:
    return to_kwargs(load_config())


def section(name: str) -> dict[str, Any]:
    """A section of the default configuration (dotted for a subsection: ``classify.sfcn``), as a copy."""
    node: Any = _defaults()
    for part in name.split("."):
        node = node[part]
    return copy.deepcopy(node)


def section_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Every key of the section, with ``overrides`` over them (each must be a key of the section)."""
    values = section(name)
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise KeyError(f"not keys of {name}: {', '.join(unknown)}")
    return {**values, **overrides}


def kwargs_for(target: Callable[..., Any], *sections: str, **overrides: Any) -> dict[str, Any]:
    """The keyword-only arguments without a default of ``target`` that ``sections`` hold (the first
    section holding a key gives it), with ``overrides`` over them."""
    wanted = {
        name
        for name, p in inspect.signature(target).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    }
    values: dict[str, Any] = {}
    for name in sections:
        values.update({k: v for k, v in section(name).items() if k in wanted and k not in values})
    return {**values, **overrides}


def tiny_encoder(**overrides: Any) -> VolTAEncoder:
    """The library's encoder (``build_encoder`` over the ``model:`` section) at ``TINY_ENCODER``'s size,
    with ``overrides`` over it."""
    return build_encoder(**section_kwargs("model", **{**TINY_ENCODER, **overrides}))
