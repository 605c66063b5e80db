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
from .resources import ResourceError
from .rundir import RunDir, RunDirError
from .sft import SFTError
from .signals import EXIT_INTERRUPTED, StopRequest
from .tokenizer import TokenizerError
from .config import UsageError
from .pretrained import init_config
from .trainer import Trainer, TrainingError, check_resumable, resume_config

EXIT_USAGE = 2


# -- the program --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    cfg, overrides = C.from_args(argv, description="Train a GPT on Tiny Shakespeare or your own text, with tinytensor.")
    tt.backend.keep_freed_memory()  # this process trains: keep NumPy's temporaries mapped (see backend)
    stop = StopRequest()
    try:
        with stop.installed():
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
                return Trainer(cfg, run, resumed, init).run(stop)
    except (UsageError, RunDirError, ResourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, SFTError, CheckpointError, TrainingError, TokenizerError, tt.BackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, --out-dir not writable, ...: save_checkpoint keeps the old file
        print(f"error: {exc}; the last checkpoint written (if any) is intact", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint written (if any) is intact; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
