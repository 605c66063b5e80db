"""Ctrl-C and SIGTERM for the programs: exit 130 with one line, never a traceback.

A program calls :func:`exit_quietly_on_signals` before its heavy imports, so a
signal in the first half second (NumPy loading) ends it cleanly, and then
:class:`StopRequest` once it has work it can finish first (a training step, then a save).

>>> stop = StopRequest()
>>> with stop.installed():
...     pass  # the loop checks `stop.requested` between steps
"""
from __future__ import annotations

import contextlib
import os
import signal

EXIT_INTERRUPTED = 130
SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


def exit_quietly_on_signals() -> None:
    """Until a program installs its own handlers, a signal ends it at once with code 130."""
    def handler(signum, frame):
        os.write(2, b"interrupted\n")
        os._exit(EXIT_INTERRUPTED)  # nothing has been written yet: there is nothing to clean up
    for sig in SIGNALS:
        signal.signal(sig, handler)


class StopRequest:
    """The first Ctrl-C or SIGTERM sets ``requested`` (the loop saves and stops at the next
    step); a second one raises KeyboardInterrupt at once. While ``deferred`` is false (before
    the loop starts, when there is nothing to save) the first one raises at once too."""

    def __init__(self):
        self.requested = False
        self.deferred = False
        self.signame = None

    def _handle(self, signum, frame):
        if self.requested or not self.deferred:
            raise KeyboardInterrupt
        self.requested = True
        self.signame = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGINT and SIGTERM inside the block (only in the main thread, where Python
        delivers signals); the previous handlers come back after it."""
        try:
            previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        except ValueError:  # not the main thread (a library caller): leave signals alone
            previous = {}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
