"""Atomic writes (checkpoints and every other file): no temporary left by a killed writer, and the
file mode follows the umask like any other file the run writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from volta3d.engine.checkpoint import load_checkpoint, save_checkpoint
from volta3d.runtime import atomic_write


def test_a_writer_killed_mid_checkpoint_leaves_no_temporary_after_the_next_save(tmp_path):
    target = tmp_path / "last.pt"
    code = textwrap.dedent(
        f"""
        import os
        from volta3d.runtime import atomic_write
        def die(f):
            f.write(b"x" * 100000)
            f.flush()
            os._exit(9)  # as kill -9 mid-write
        atomic_write({str(target)!r}, die)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the killed writer's temporary
    save_checkpoint(target, {"step": 3, "w": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(target)["step"] == 3


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    target = tmp_path / "file.json"
    atomic_write(target, lambda f: f.write(b"old"))
    live = tmp_path / f".file.json.{socket.gethostname()}.{os.getpid()}.abcd.tmp"
    live.write_bytes(b"in progress")
    atomic_write(target, lambda f: f.write(b"new"))
    assert live.exists() and target.read_bytes() == b"new"


def test_atomically_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.json", lambda f: f.write(b"{}"))
        os.umask(0o077)
        private = atomic_write(tmp_path / "b.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert private.stat().st_mode & 0o777 == 0o600


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_malicious_checkpoint_is_called_untrusted_without_torchs_retry_advice(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"format": "volta3d-pretrain-checkpoint", "version": 1, "x": _RunsCode()}, path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} is not trusted") and "posix.system" in message
    assert "weights_only" not in message and "\n" not in message


def test_a_zero_byte_checkpoint_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"cannot read checkpoint .*last.pt \(truncated or corrupt\?\): EOFError"
    ):
        load_checkpoint(path)
