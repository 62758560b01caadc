"""SIGINT and SIGTERM as one exception, so that a stopped conversion unwinds like any error:
the writer makes its finished units durable and closes, ``OUT.partial`` stays resumable, and the
CLI prints one line instead of a traceback (or, for SIGTERM, nothing at all: the default action
kills the process without running any cleanup)."""

from __future__ import annotations

import contextlib
import signal
import threading

from nvfp4_jax.errors import NVFP4Error

_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(NVFP4Error):
    """The run was stopped by a signal; ``signum`` says which."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {_NAMES.get(self.signum, f'signal {self.signum}')}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process killed by that signal


@contextlib.contextmanager
def signals_raise():
    """Inside the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread; the
    previous handlers come back on exit. Elsewhere than the main thread it does nothing (Python
    delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in _NAMES}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


__all__ = ["Interrupted", "signals_raise"]
