"""The ``volta3d`` command: a thin dispatcher. Each subcommand lives in ``volta3d.commands.<name>``
and exposes ``add_parser(subparsers)``, which registers its options and sets ``func``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from volta3d import __version__
from volta3d.errors import InputError
from volta3d.run_folder import claim_command_output

# Order is the order shown by `volta3d --help`.
COMMANDS = [
    "demo",
    "preprocess",
    "select",
    "pretrain",
    "bench",
    "import-encoder",
    "finetune",
    "predict",
    "embed",
    "probe",
    "compare",
    "report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="volta3d",
        description="Self-supervised learning on 3D brain MRI (VolTA-3D): preprocess scans, pretrain, "
        "transfer and evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"volta3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"volta3d.commands.{name.replace('-', '_')}").add_parser(sub)
    return parser


def _one_line(err: InputError) -> str:
    """The message of ``err``; for an error a DataLoader worker raised (torch re-raises it with the
    same type, its message the worker's traceback) the original message, its last line."""
    msg = str(err)
    if "\nOriginal Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        _, sep, original = last.partition(": ")
        msg = original if sep else last
    return msg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse reads positionals in one run, so `INPUT --output OUT key=value` would leave the
    # trailing overrides unparsed: collect them here for commands that take overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    args.entry_point = main  # for commands that run other command lines (the demo), without importing the CLI
    try:
        with claim_command_output(args):  # an output folder belongs to one run at a time
            return int(args.func(args) or 0)
    except InputError as err:
        # Bad input: one line naming the file or field, no traceback (VOLTA3D_DEBUG=1 shows it). Any
        # other exception is a bug and keeps its traceback.
        if os.environ.get("VOLTA3D_DEBUG"):
            raise
        print(f"volta3d {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"volta3d {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
