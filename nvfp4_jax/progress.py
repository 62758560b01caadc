"""Progress of a conversion over its units (layers), on stderr.

On a terminal: one tqdm bar redrawn in place. Anywhere else (a log file, a pipe, a batch job's
captured stderr): one plain line per step and no carriage returns, so the log reads as text.

The ETA leaves out the first step: the first layer also pays for compiling every jitted function,
often many times the cost of a later layer, and counting it would overstate the remaining time
for most of the run. The ETA is the mean duration of the steps after the first times the steps
left; it is unknown until a second step has finished.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

_BAR_WIDTH = 28


def _seconds(s: Optional[float]) -> str:
    return "?" if s is None else f"{s:.1f}s"


class Progress:
    """``step(label)`` once per finished unit; ``total`` units in all.

    ``stream`` (default: ``sys.stderr`` at construction) and ``clock`` (seconds, monotonic) are
    for tests; the display is a bar only when ``stream.isatty()``. Use it as a context manager
    (or call :meth:`close`) so that a run that stops early ends the bar's line.
    """

    def __init__(self, total: int, enabled: bool, *, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.enabled, self.done = total, enabled, 0
        self._stream = sys.stderr if stream is None else stream
        self._clock = clock
        self._start = clock()
        self._first_done: Optional[float] = None  # when the first step (with compilation) ended
        self._last = self._start  # when the latest step ended
        self._bar = None
        if enabled and _is_terminal(self._stream):
            from tqdm import tqdm

            # the bar and counts from tqdm; label, elapsed and ETA are ours (tqdm's rate would
            # include the first step), passed in as the description
            self._bar = tqdm(total=total, file=self._stream, ascii=" #", mininterval=0, miniters=1,
                             bar_format=f"[{{bar:{_BAR_WIDTH}}}] {{n_fmt}}/{{total_fmt}} {{desc}}")

    def eta_s(self) -> Optional[float]:
        """Seconds left: mean of the steps after the first times the steps left (None: unknown)."""
        left = max(self.total - self.done, 0)
        if left == 0:
            return 0.0
        if self.done < 2:
            return None
        return (self._last - self._first_done) / (self.done - 1) * left

    def step(self, label: str) -> None:
        self.done += 1
        self._last = self._clock()
        if self.done == 1:
            self._first_done = self._last
        if not self.enabled:
            return
        elapsed = self._last - self._start
        status = f"{label}  elapsed {elapsed:.1f}s  eta {_seconds(self.eta_s())}"
        if self._bar is None:
            self._stream.write(f"[{self.done}/{self.total}] {status}\n")
            self._stream.flush()
            return
        self._bar.set_description_str(status, refresh=False)
        self._bar.update(1)
        if self.done >= self.total:
            self.close()

    def close(self) -> None:
        """End the bar's line (a message printed after a failure then starts on its own row);
        idempotent, a no-op off a terminal. Later steps, if any, print plain lines."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


__all__ = ["Progress"]
