"""Shared fixtures: every engine test runs on NumPy, and on CuPy (real with a GPU, else the stand-in);
text to train on comes from ``textgen`` (generated) or the local Tiny Shakespeare copy."""
import importlib.util
import os
from pathlib import Path

import pytest

import cupy_standin
import tinytensor as tt
from textgen import make_text


def _cupy_for_the_tests():
    """The "cupy" backend runs on real CuPy where it imports and sees a GPU, else on the strict
    stand-in (tests/cupy_standin.py), so every backend-parametrized test runs everywhere.
    TINYTENSOR_CUPY_STANDIN=off skips the cupy variants without a GPU (as before the stand-in);
    =on uses the stand-in even beside a real CuPy (e.g. to count host syncs on a GPU machine).
    Done at import, not in a fixture: BACKENDS below is decided when this module loads."""
    choice = os.environ.get("TINYTENSOR_CUPY_STANDIN", "auto")
    if choice == "off" or (choice != "on" and importlib.util.find_spec("cupy") is not None
                           and tt.cupy_available()):
        return
    cupy_standin.install()
    tt.backend._cupy = None  # the next get_xp("cupy") imports the stand-in


_cupy_for_the_tests()

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.skipif(
    not tt.cupy_available(), reason="CuPy with a GPU is not available (and TINYTENSOR_CUPY_STANDIN=off)"))]


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    return request.param


@pytest.fixture
def xp(backend_name):
    return tt.backend.get_xp(backend_name)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny arrays: on a 2-core machine shared with other work, two BLAS
    (and torch) threads make them many times slower, and the results do not change."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    try:
        import torch
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    if torch is not None:
        torch.set_num_threads(torch_threads)


@pytest.fixture(autouse=True)
def _seed():
    tt.manual_seed(0)


@pytest.fixture
def corpus_file(tmp_path):
    """``make_text()`` (about 16 KB of play-like lines) in ``tmp_path / "corpus.txt"``."""
    path = tmp_path / "corpus.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture
def tiny_shakespeare():
    """The path of the local Tiny Shakespeare copy (../shared/data); skips the test without one."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"no local Tiny Shakespeare copy at {SHAKESPEARE}")
    return SHAKESPEARE
