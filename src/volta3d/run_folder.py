"""An output folder belongs to one run at a time, and to one kind of command.

Two runs writing one folder interleave their metrics, checkpoints and configs and both exit 0, so
every command that writes a run folder or a cache claims it first: an exclusive ``flock`` on
``FOLDER/.volta3d.lock``, which records the holder (pid, host, command, start time) for the message
a second run gets. The kernel releases the lock when the holding process dies, so a killed run never
blocks its own resume, and the file is removed when a run ends. What is covered:

- a second claim of the folder, or of a folder inside one another process holds (the demo's stage
  folders), is refused in one line naming the holder;
- claims are reentrant per process: the demo runs its stages in-process inside its own claim;
- ``preprocess --shard i/n`` runs share the folder (each claims only its shard) and exclude a full
  run or ``--merge`` there, which claim the folder whole;
- torchrun's ranks other than 0 claim nothing: rank 0 holds the folder for the whole run (if it is
  refused, torchrun stops the other ranks of that run);
- a folder that holds another command's run (``probe --output`` at a pretraining folder) is refused
  before anything there is overwritten;
- forked workers (DataLoader, preprocessing pool) drop their copy of the lock, so it never outlives
  the run that took it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext, suppress
from pathlib import Path

from volta3d import layout
from volta3d.errors import InputError
from volta3d.runtime import get_logger

RETRY_SECONDS = 0.25  # a probe of an ancestor's lock, or a holder removing its file, lasts microseconds

_held: dict[Path, list[int]] = {}  # lock file -> [fd, depth] for the claims of this process


def _forget_after_fork() -> None:
    """A forked child closes its copies of the locks: they must die with the run, not with its workers."""
    for fd, _ in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _secondary_rank() -> bool:
    """A torchrun rank other than 0: rank 0 holds the folder for the whole run."""
    rank = os.environ.get("RANK", "0")
    return rank.isdigit() and int(rank) != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _holder(lock: Path) -> str:
    """The holder's record, read after it wrote it (it writes right after taking the lock)."""
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        try:
            info = json.loads(lock.read_text())
            return (
                f"volta3d {info['command']} (pid {info['pid']} on {info['host']}, started {info['started']})"
            )
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "another process"
            time.sleep(0.02)


def _open(lock: Path) -> int | None:
    """The lock file opened (created if absent); None when its folder was just removed by a run that
    created it and ended with it empty (the folder is made again)."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return None
    except OSError as err:
        raise InputError(f"cannot write in output folder {lock.parent}: {err.strerror}") from None


def _try_lock(lock: Path, mode: int) -> int | None:
    """An fd holding ``mode`` on ``lock`` (created if absent), or None while another process holds it.
    Retries briefly, and again when the file was removed by a holder that was ending meanwhile."""
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        fd = _open(lock)
        if fd is None:
            continue
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if not isinstance(err, BlockingIOError):
                raise
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)
            continue
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)


def _write_holder(fd: int, command: str) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


@contextmanager
def _lock(lock: Path, command: str, what: str, shared: bool = False) -> Iterator[None]:
    """Hold ``lock`` (exclusive, or shared by shard runs) for the block; reentrant in this process."""
    if lock in _held:
        _held[lock][1] += 1
        try:
            yield
        finally:
            _held[lock][1] -= 1
        return
    try:
        fd = _try_lock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    except OSError as err:  # a file system without locks: run, but say that nothing guards the folder
        get_logger().warning(
            "cannot lock %s (%s): concurrent runs there are not detected", lock, err.strerror
        )
        yield
        return
    if fd is None:
        raise InputError(
            f"{what} is in use by {_holder(lock)}; wait for that run to end or choose another output"
        )
    _write_holder(fd, command)  # shard runs share the file: the message then names one of them
    _held[lock] = [fd, 1]
    try:
        yield
    finally:
        del _held[lock]
        _release(lock, fd)


def _release(lock: Path, fd: int) -> None:
    """Remove the file while still holding it exclusively (a process that opened it meanwhile sees it
    is gone and starts over); the last of several shard runs upgrades its shared hold first."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.unlink(missing_ok=True)
    except OSError:  # other shard runs still hold it: the last one removes it
        pass
    os.close(fd)


def _refuse_held_ancestor(folder: Path) -> None:
    """Refuse a folder inside one another process holds (e.g. a stage folder of a running demo)."""
    for parent in folder.parents:
        lock = parent / layout.LOCK
        if lock in _held or not lock.is_file():
            continue
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{folder} lies inside {parent}, which is in use by {_holder(lock)}; wait for that run to end "
                "or choose another output"
            ) from None
        except OSError:
            pass
        finally:
            os.close(fd)


def _refuse_foreign_run(folder: Path, command: str) -> None:
    """Refuse a folder that holds another command's run: this one would overwrite its files."""
    for other, names in layout.SIGNATURES.items():
        found = [n for n in names if (folder / n).exists()]
        if other != command and found:
            raise InputError(
                f"{folder} holds a `volta3d {other}` run ({found[0]}); `volta3d {command}` would overwrite its "
                "files there: choose another output folder"
            )


@contextmanager
def claim_output(folder: str | Path, command: str, shard: tuple[int, int] | None = None) -> Iterator[Path]:
    """Hold ``folder`` (created) for ``command`` during the block; yields it. A folder this call
    created and the run left empty is removed again (a refused or failed start leaves nothing)."""
    path = Path(folder).resolve()
    if _secondary_rank():
        yield path
        return
    if path.exists() and not path.is_dir():
        raise InputError(f"output {path} exists and is not a folder")
    _refuse_foreign_run(path, command)
    _refuse_held_ancestor(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with ExitStack() as stack:
            stack.enter_context(_lock(path / layout.LOCK, command, str(path), shared=shard is not None))
            if shard is not None:
                tag = f"shard {shard[0]}/{shard[1]} of {path}"
                stack.enter_context(
                    _lock(path / f".volta3d.shard-{shard[0]}-of-{shard[1]}.lock", command, tag)
                )
            yield path
    finally:
        with suppress(OSError):  # not empty, or gone: another run has it now
            if created and not any(path.iterdir()):
                path.rmdir()


@contextmanager
def claim_output_file(file: str | Path, command: str) -> Iterator[Path]:
    """Hold one output file (``embed``'s .npz) during the block: a lock beside it, in its folder."""
    path = Path(file).resolve()
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give the file to write, e.g. {path / 'embeddings.npz'}")
    _refuse_held_ancestor(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path.parent / f".{path.name}{layout.LOCK}", command, str(path)):
        yield path


def _shard(text: object) -> tuple[int, int] | None:
    """``--shard i/n`` as ``(i, n)``; anything else claims the folder whole (the command refuses it)."""
    parts = str(text).split("/") if text else []
    if len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1]):
        return int(parts[0]), int(parts[1])
    return None


def claim_command_output(args: argparse.Namespace) -> AbstractContextManager[object]:
    """The claim a parsed command line asks for with ``set_defaults(claims="folder" | "file")``: its
    ``--output`` folder (``preprocess --shard``: its shard of it) or file; nothing for other commands."""
    kind, output = getattr(args, "claims", None), getattr(args, "output", None)
    if kind is None or output is None:
        return nullcontext()
    if kind == "file":
        return claim_output_file(output, args.command)
    return claim_output(output, args.command, shard=_shard(getattr(args, "shard", None)))


__all__ = ["claim_command_output", "claim_output", "claim_output_file"]
