"""Run-time helpers every command shares: seeding, device choice, logging and metrics files."""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import random
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from volta3d import layout
from volta3d.errors import InputError, InputFileNotFound

if TYPE_CHECKING:  # torch is imported where it is used: `volta3d --help` must not pay for it
    import torch

LOGGER_NAME = "volta3d"


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: nested config-like mappings as dotted keys."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        flat.update(flatten_dict(v, key + ".") if isinstance(v, Mapping) else {key: v})
    return flat


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Random transforms take their own seeded state."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; an explicit ``cuda`` without a GPU is an error, not a fallback."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise InputError(f"device '{name}' is not auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{name}' requested but no CUDA GPU is available (use --device cpu or auto)")
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= visible:
        raise InputError(f"device '{name}' requested but only {visible} CUDA GPU(s) are visible")
    return device


def _current_umask() -> int:
    """The process umask, read from /proc where possible: ``os.umask`` can only read it by setting
    it, which briefly exposes other threads' new files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path, pid: int) -> str:
    return f".{path.name}.{socket.gethostname()}.{pid}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files of ``path`` left by writers on this host that were killed mid-write
    (their process is gone), so a kill during a checkpoint write does not leave its size on disk for ever.
    Temporaries of live writers, or written on other hosts sharing the folder, are left alone."""
    host_prefix = f".{path.name}.{socket.gethostname()}."
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        rest = tmp.name[len(host_prefix) :] if tmp.name.startswith(host_prefix) else ""
        pid = rest.split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write through a temporary file in the same folder, fsync, then rename: readers never see half
    a file, and a crash leaves the previous version intact. ``write`` gets a binary file handle.

    The file gets the mode a plain ``open`` would (0666 less the umask; ``mkstemp`` alone gives 0600),
    and temporaries of earlier writers that were killed are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path, os.getpid()), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_csv_rows(path: str | Path, sep: str = ",") -> None:
    """Every row of a CSV as wide as its header: pandas reads a longer first row as an index column and
    a shorter row as missing trailing values, so a ragged row would shift labels silently. Blank lines
    are allowed; the error names the file and the line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=sep)
            header = next(reader, [])
            for row in reader:
                if row and len(row) != len(header):
                    raise InputError(
                        f"cannot parse {path}: line {reader.line_num} has {len(row)} fields, the header {len(header)}; "
                        "quote values that hold the separator"
                    )
    except (csv.Error, UnicodeDecodeError) as err:  # csv.Error names the line itself
        raise InputError(f"cannot parse {path}: {' '.join(str(err).split())}") from None


def read_json_file(path: str | Path, default_name: str, what: str) -> tuple[Path, Any]:
    """Read a JSON file given as itself or as the folder holding ``default_name``; a missing file or
    invalid JSON is a one-line error naming the file (``what``: e.g. "results", "splits")."""
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if not p.exists():
        raise InputFileNotFound(f"{what} file not found: {p}")
    try:
        return p, json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{what} file {p} is not valid JSON: {err.msg}") from None


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(
    run_dir: str | Path | None = None, filename: str = layout.LOG, verbose: bool = True
) -> logging.Logger:
    """Log to stderr and, when ``run_dir`` is given, append to ``run_dir/filename`` (kept across resumes)."""
    logger = get_logger()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.addHandler(console)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(run_dir) / filename)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


class MetricsCSV:
    """Append-only CSV of metric rows. On resume, rows past ``keep_until_step`` are dropped so a
    restarted run never leaves duplicate or orphaned steps behind."""

    def __init__(self, path: str | Path, keep_until_step: int | None = None, step_key: str = "step"):
        self.path = Path(path)
        self.step_key = step_key
        self._fields: list[str] | None = None
        if self.path.exists():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                self._fields = list(reader.fieldnames or [])
            if keep_until_step is not None:
                rows = [r for r in rows if int(float(r[step_key])) <= keep_until_step]
                self._rewrite(rows)

    def _rewrite(self, rows: list[dict]) -> None:
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=self._fields or [])
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.path, lambda f: f.write(text.getvalue().encode()))

    def write(self, row: Mapping[str, float | int | str]) -> None:
        if self._fields is None:
            self._fields = list(row)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=self._fields).writeheader()
        unknown = set(row) - set(self._fields)
        if unknown:
            raise KeyError(f"metrics row has columns not in {self.path.name}: {sorted(unknown)}")
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._fields).writerow(dict(row))

    def read(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))
