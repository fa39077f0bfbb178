"""Arguments that several commands share."""

from __future__ import annotations

import argparse

from volta3d.config import bundled_configs


def add_config_arguments(p: argparse.ArgumentParser, example: str) -> None:
    """``--config FILE`` (repeatable) and the positional ``key=value`` overrides, both passed to
    ``volta3d.config.load_config``; ``example`` is an override shown in the help."""
    p.add_argument(
        "--config", action="append", default=[], metavar="FILE",
        help=f"override file(s) merged onto configs/default.yaml in order; bundled: {', '.join(bundled_configs())}",
    )  # fmt: skip
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"config overrides, e.g. {example} (the key must exist in default.yaml)",
    )
