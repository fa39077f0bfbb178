"""The ``volta3d`` command prints bad input (``InputError``) as one line with exit status 2; any other
exception is a bug and reaches the caller with its traceback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import volta3d.commands.compare as compare
from volta3d.cli import main
from volta3d.data.dataset import load_volume
from volta3d.errors import InputError, InputFileNotFound, MissingInputError


def _command_raising(exc: BaseException):
    def run(args):
        raise exc

    return run


@pytest.mark.parametrize("bug", [KeyError("x"), ValueError("a bad value from the code"), FileNotFoundError("f"),
                                 TypeError("t")])  # fmt: skip
def test_a_programming_error_keeps_its_traceback(monkeypatch, capsys, bug):
    monkeypatch.setattr(compare, "run", _command_raising(bug))
    with pytest.raises(type(bug)) as raised:
        main(["compare", "a", "b"])
    assert raised.value is bug and raised.value.__traceback__ is not None
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("err", [InputError("give either INPUT or --bundled, not both"),
                                 MissingInputError("manifest has no column 'dx'"),
                                 InputFileNotFound("input not found: /nowhere")])  # fmt: skip
def test_bad_input_is_one_line_and_status_2(monkeypatch, capsys, err):
    monkeypatch.setattr(compare, "run", _command_raising(err))
    assert main(["compare", "a", "b"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"volta3d compare: error: {err.args[0]}"]


def test_input_errors_are_the_built_in_types_callers_catch():
    assert isinstance(MissingInputError("k"), KeyError) and str(MissingInputError("no column")) == "no column"
    assert isinstance(InputFileNotFound("f"), FileNotFoundError) and isinstance(InputError("v"), ValueError)


class _Volumes(Dataset):
    def __init__(self, path: str) -> None:
        self.path = path

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(load_volume(self.path, f"s{i}"))


def test_bad_input_met_in_a_dataloader_worker_is_still_one_line(monkeypatch, capsys, tmp_path):
    """torch re-raises a worker's exception with the same type, its message the worker's traceback:
    the command still prints the original message alone."""
    volume = tmp_path / "s0.npy"
    np.save(volume, np.zeros((1, 8, 8, 8), np.float16))
    volume.write_bytes(volume.read_bytes()[:90])  # truncated

    def run(args):
        for _ in DataLoader(_Volumes(str(volume)), num_workers=1):
            pass

    monkeypatch.setattr(compare, "run", run)
    assert main(["compare", "a", "b"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"volta3d compare: error: cannot read cached volume {volume} (subject s"
    )
    assert err[0].endswith("re-run volta3d preprocess")
