"""Fixtures shared across test folders."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The bundled real scans (../shared/data next to the repository); skip when absent."""
    if not (SHARED_DATA / "ixi_t1_2mm").is_dir():
        pytest.skip(f"bundled real data not found at {SHARED_DATA} (see README: Data licences)")
    return SHARED_DATA
