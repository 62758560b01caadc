"""SIGINT and SIGTERM as one exception, so that a stopped conversion unwinds like any error:
the writer makes its finished units durable and closes, ``OUT.partial`` stays resumable, and the
CLI prints one line instead of a traceback (or, for SIGTERM, nothing at all: the default action
kills the process without running any cleanup)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from nvfp4_jax.errors import NVFP4Error

_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
# Signals received inside `signals_raise`. The handler's exception can land inside library code
# that catches every exception (JAX's persistent compilation cache turns a failed read into a
# warning) or inside a garbage-collector callback, whose exceptions Python reports as "Exception
# ignored" with a traceback; so the run also checks this record at its safe points
# (`raise_pending`), and `_quiet_unraisable` keeps those reports of our own signal off stderr.
_received: list[int] = []


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
        _received.append(signum)
        raise Interrupted(signum)

    _received.clear()
    previous = {s: signal.signal(s, handler) for s in _NAMES}
    previous_hook = sys.unraisablehook

    def _quiet_unraisable(unraisable):
        # An Interrupted that could not propagate (raised in a gc callback or a __del__) is on
        # record in _received and raised again at the next safe point: nothing is lost by not
        # printing it, while printing it would put a traceback before the one-line message.
        if not isinstance(unraisable.exc_value, Interrupted):
            previous_hook(unraisable)

    sys.unraisablehook = _quiet_unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()  # a signal of this block is not one of code that runs after it


def raise_pending() -> None:
    """Raise :class:`Interrupted` if a signal arrived inside `signals_raise` whose exception was
    swallowed on its way up; called between layers and before the output is made final."""
    if _received:
        raise Interrupted(_received[0])


__all__ = ["Interrupted", "raise_pending", "signals_raise"]
