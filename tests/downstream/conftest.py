from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from volta3d.config import load_config, to_kwargs  # noqa: E402

from .synthetic import write_blob_dataset  # noqa: E402

# tiny ViT (img 32, patch 16, hidden 48, 2 layers) for every CLI test
TINY_OVERRIDES = [
    "model.img_size=32",
    "model.patch_size=16",
    "model.hidden_size=48",
    "model.mlp_dim=96",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.summariser.heads=4",
    "model.deconv_chns=8",
    "device=cpu",
]


def config_section(name: str, **changes) -> dict:
    """A section of the default configuration (default.yaml), with ``changes`` over it: the arguments
    of the library's run functions, as the commands build them."""
    return {**to_kwargs(load_config()[name]), **changes}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the CI machine has 2 cores shared with other jobs


@pytest.fixture(scope="session")
def blob_data(tmp_path_factory) -> Path:
    return write_blob_dataset(tmp_path_factory.mktemp("blob"), n_subjects=24)
