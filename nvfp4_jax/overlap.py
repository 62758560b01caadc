"""Overlap of a conversion's phases: read ahead, write behind.

While the main thread calibrates and quantizes layer L, one background thread reads and decodes
layer L+1 (:func:`read_ahead`) and another writes layer L-1 (:class:`WriteBehind`). Each has room
for exactly one layer, so at most three layers are on the host at once: the one being read, the
one being computed, the one being written (``LAYERS_IN_FLIGHT``). In bytes: the layer read ahead
is decoded (bf16); the one computed is decoded plus, once quantized, its NVFP4 tensors (about
0.28x of its bf16 linears); the one being written holds only its NVFP4 tensors and the decoded
copies of its unquantized tensors. So the layers take about 2.3x the largest layer's bf16 size,
plus the working set of the phase running (docs/ARCHITECTURE.md, "Memory"). Work is started only by the
main thread's progress (the next read when a layer is taken, a write when one is handed over),
so the order of reads and writes is the serial order whatever the threads' timing: the writer
gets the same calls in the same order and writes the same bytes.

An exception in a background thread is re-raised in the main thread (the same exception object,
message and type unchanged) at the point where the serial code would have raised it: a read
error when its layer is taken, a write error at the next hand-over or at the end. When the main
thread stops on an exception (a signal's :class:`nvfp4_jax.interrupts.Interrupted` included), the
writes already handed over are finished first (they are whole units, made durable, so a resume
skips them), nothing new is started, and no thread is left touching the reader or the writer when
the caller closes them. A second exception while those writes finish drops the writes not yet
started and waits only for the running one.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Iterable, Iterator, Optional, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")

READ_AHEAD = 1  # layers read before the main thread asks for them
WRITE_BEHIND = 1  # layers handed to the writer and not yet written
LAYERS_IN_FLIGHT = READ_AHEAD + 1 + WRITE_BEHIND  # host memory bound, in layers


def _wait_uninterrupted(future: Future, on_interrupt: Callable[[], None] = lambda: None) -> None:
    """Wait for a background job even if the main thread gets a signal meanwhile (the job holds the
    reader's or writer's file descriptors; leaving it running would race their close). A signal
    while waiting calls ``on_interrupt`` and waits on: the first exception is already propagating."""
    while True:
        try:
            wait([future])  # never raises the job's exception nor CancelledError
            return
        except BaseException:  # noqa: BLE001 - see the docstring
            on_interrupt()


def read_ahead(items: Iterable[T], load: Callable[[T], R], ahead: int = READ_AHEAD,
               enabled: bool = True) -> Iterator[Tuple[T, R]]:
    """``(item, load(item))`` in order, ``load`` of the next ``ahead`` items running in a background
    thread meanwhile. A new load starts only when the caller takes an item, so when the caller
    holds item i, loads were started for items 0..i+ahead and no more. ``load``'s exception is
    raised here when its item is taken. enabled=False: everything in the caller's thread."""
    items = list(items)
    if not enabled or ahead < 1:
        for item in items:
            yield item, load(item)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvfp4-read")
    pending: collections.deque = collections.deque()
    nxt = 0
    try:
        while nxt < len(items) and len(pending) < ahead:
            pending.append(pool.submit(load, items[nxt]))
            nxt += 1
        for item in items:
            value = pending.popleft().result()  # re-raises load's exception as it was raised
            if nxt < len(items):
                pending.append(pool.submit(load, items[nxt]))
                nxt += 1
            yield item, value
    finally:
        for f in pending:
            f.cancel()
        for f in pending:
            _wait_uninterrupted(f)
        pool.shutdown(wait=True)


class WriteBehind:
    """Runs handed-over jobs in order in one background thread, at most ``depth`` not yet finished.

    ``submit(job)`` waits until fewer than ``depth`` jobs are unfinished, re-raising first the
    exception of an earlier job if one failed (then no later job runs). ``close()`` waits for every
    job and re-raises a failure. Used as a context manager, an exception leaving the block first
    lets the handed-over jobs finish (a signal meanwhile: only the running one), then
    propagates; a job's failure is then attached as the exception's ``__context__`` only if none
    is set. enabled=False: each job runs inside submit, in the caller's thread.
    """

    def __init__(self, depth: int = WRITE_BEHIND, enabled: bool = True):
        if depth < 1:
            raise ValueError(f"WriteBehind depth must be at least 1, got {depth}")
        self.enabled = enabled
        self._slots = threading.BoundedSemaphore(depth)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvfp4-write") if enabled else None
        self._futures: collections.deque = collections.deque()
        self._failed: Optional[BaseException] = None
        self._stop = threading.Event()  # set: jobs not started yet are skipped

    def _run(self, job: Callable[[], None]) -> None:
        try:
            if self._failed is None and not self._stop.is_set():
                job()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self._failed = e
        finally:
            self._slots.release()

    def _reap(self) -> None:
        while self._futures and self._futures[0].done():
            self._futures.popleft()

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise self._failed

    def try_submit(self, job: Callable[[], None]) -> bool:
        """Hand ``job`` over if a slot is free now; False (job not taken) if ``depth`` jobs are
        unfinished. Raises an earlier job's exception."""
        self._raise_failure()
        if not self.enabled:
            job()
            return True
        if not self._slots.acquire(blocking=False):
            return False
        self._futures.append(self._pool.submit(self._run, job))
        self._reap()
        return True

    def submit(self, job: Callable[[], None]) -> None:
        """Hand ``job`` over, waiting for a free slot. Raises an earlier job's exception."""
        self._raise_failure()
        if not self.enabled:
            job()
            return
        self._slots.acquire()
        self._raise_failure()  # the job that freed the slot may have failed
        self._futures.append(self._pool.submit(self._run, job))
        self._reap()

    def wait(self) -> None:
        """Wait until every handed-over job has finished; re-raise a failure."""
        while self._futures:
            self._futures.popleft().result()
        self._raise_failure()

    def close(self, abandon: bool = False) -> None:
        """Stop the thread after the handed-over jobs (abandon=True: after the running one only)."""
        if abandon:
            self._stop.set()
        if self._pool is not None:
            for f in list(self._futures):
                _wait_uninterrupted(f, self._stop.set)
            self._futures.clear()
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            try:
                self.wait()
            finally:
                self.close()
            return
        try:
            self.close()  # let the handed-over writes finish: they are whole units, a resume keeps them
        finally:
            if self._failed is not None and exc.__context__ is None and self._failed is not exc:
                exc.__context__ = self._failed


__all__ = ["LAYERS_IN_FLIGHT", "READ_AHEAD", "WRITE_BEHIND", "WriteBehind", "read_ahead"]
