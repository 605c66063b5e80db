"""Train a GPT: ``python -m gpt.train [--preset NAME] [--key value ...]``.

>>> main(["--preset", "tiny", "--max-iters", "20", "--out-dir", "/tmp/tiny"])  # doctest: +SKIP

Writes to ``--out-dir``: ``ckpt.safetensors`` (last), ``ckpt_best.safetensors``
(best val loss), ``metrics.jsonl`` and ``loss.png``. Ctrl-C or SIGTERM saves and exits.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: a Ctrl-C while NumPy loads exits cleanly
    from gpt.signals import exit_quietly_on_signals
    exit_quietly_on_signals()

import sys

import tinytensor as tt

from . import config as C
from .checkpoint import CheckpointError
from .data import DataError
from .distributed import connect_ranks, fail
from .resources import ResourceError
from .rundir import RunDir, RunDirError
from .sft import SFTError
from .signals import EXIT_INTERRUPTED, StopRequest
from .tokenizer import TokenizerError
from .config import UsageError
from .pretrained import init_config, open_pretrained
from .trainer import LossNotFiniteError, Trainer, TrainingError, check_resumable, resume_config

EXIT_USAGE = 2


# -- the program --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    cfg, overrides = C.from_args(argv, description="Train a GPT on Tiny Shakespeare or your own text, with tinytensor.")
    tt.backend.keep_freed_memory()  # this process trains: keep NumPy's temporaries mapped (see backend)
    stop, comm = StopRequest(), None
    try:
        with stop.installed():
            comm = connect_ranks(cfg)  # one process unless mpiexec started several (gpt/distributed.py)
            if not comm.is_root:  # rank 0 resolves the run and owns the out-dir; the others follow it
                cfg, run, resumed, has_init = comm.bcast_object(None)
                init = open_pretrained(cfg.init_from) if has_init else None  # (its tokenizer; rank 0's weights)
                if cfg.backend == "numpy":
                    tt.kernels.warm_up()
                return Trainer(cfg, run, resumed, init, comm).run(stop)
            run, init = RunDir(cfg.out_dir), None
            if cfg.resume:
                check_resumable(run)
            elif cfg.init_from is not None:  # before the out-dir exists: a bad model leaves nothing behind
                cfg, init = init_config(cfg, overrides)
            with run.locked():
                resumed = None
                if cfg.resume:
                    cfg, resumed = resume_config(cfg, overrides, run)
                else:
                    run.check_fresh(cfg.overwrite)
                comm.bcast_object((cfg, run, resumed, init is not None))
                if cfg.backend == "numpy":
                    tt.kernels.warm_up()  # the CPU kernels load (or compile, once) before the clock starts
                return Trainer(cfg, run, resumed, init, comm).run(stop)
    except (UsageError, RunDirError, ResourceError) as exc:
        return fail(comm, f"error: {exc}", EXIT_USAGE)
    except (DataError, SFTError, CheckpointError, TrainingError, TokenizerError, tt.BackendError) as exc:
        return fail(comm, f"error: {exc}", 1, all_ranks=isinstance(exc, LossNotFiniteError))
    except OSError as exc:  # disk full, --out-dir not writable, ...: save_checkpoint keeps the old file
        return fail(comm, f"error: {exc}; the last checkpoint written (if any) is intact", 1)
    except KeyboardInterrupt:
        return fail(comm, "interrupted: the last checkpoint written (if any) is intact; continue with --resume",
                    EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
