"""Shared fixtures: every engine test runs on NumPy, and on CuPy when a GPU is present."""
from pathlib import Path

import pytest

import tinytensor as tt

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.skipif(
    not tt.cupy_available(), reason="CuPy with a GPU is not available"))]


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    return request.param


@pytest.fixture
def xp(backend_name):
    return tt.backend.get_xp(backend_name)


@pytest.fixture(autouse=True)
def _seed():
    tt.manual_seed(0)
