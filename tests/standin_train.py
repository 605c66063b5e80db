"""``python tests/standin_train.py ARGS`` = ``python -m gpt.train ARGS`` on the CuPy stand-in (and
its NCCL), for the data-parallel tests that start ranks with mpiexec (each a fresh process)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cupy_standin  # noqa: E402

cupy_standin.install()

from gpt.train import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
