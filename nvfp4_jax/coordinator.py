"""What a conversion needs from the processes that run it, so that ``convert()`` has one code path.

A :class:`Coordinator` decides which calibration batches this process runs, which source tensors it
quantizes and writes, merges the calibration statistics of all processes, opens the shared writer,
and gathers every process's manifest to finalize the output. :class:`LocalCoordinator` is the
one-process run; ``nvfp4_jax.distributed.ProcessGroup`` is one process of a ``jax.distributed``
group.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from nvfp4_jax.calibration import CalibStats
from nvfp4_jax.checkpoint.writer import PlannedWriter, WriterOptions, open_planned_writer
from nvfp4_jax.plan import ConversionPlan

# (finished units' info, every process's manifest or None for one process) -> the run report
WriteOutputs = Callable[[dict, Optional[list]], dict]


class Coordinator:
    """The interface; see the module docstring."""

    process_id = 0
    num_processes = 1

    def batches(self, batches: Sequence) -> list:
        """The calibration batches this process runs (whole batches, so each forward is the
        one-process forward)."""
        raise NotImplementedError

    def owned(self, plan: ConversionPlan, pinned=None) -> frozenset:
        """The source tensors this process quantizes and writes (``pinned``: see
        ``ConversionPlan.owners``)."""
        raise NotImplementedError

    def allreduce_stats(self, unit: str, stats: CalibStats) -> CalibStats:
        """The statistics of ``unit`` over every process (max amax, summed token counts)."""
        raise NotImplementedError

    def open_writer(self, out, plan: ConversionPlan, options: WriterOptions, fingerprint: str) -> PlannedWriter:
        """The writer of this process, ready for ``add``; ``fingerprint`` names the run (calibration
        data and options), which every process must share."""
        raise NotImplementedError

    def finish(self, writer: PlannedWriter, write_outputs: WriteOutputs) -> Optional[dict]:
        """Once this process has written its tensors: the finalizing process calls
        ``write_outputs`` and returns the report; the others wait for it and return None."""
        raise NotImplementedError

    def report_fields(self) -> dict:
        """What the run report says about the processes."""
        return {}

    def gather_json(self, tag: str, value) -> list:
        """Every process's JSON-able ``value`` for ``tag``, in process order (every process calls it)."""
        raise NotImplementedError

    def barrier(self, tag: str) -> None:
        """Return once every process has called ``barrier(tag)`` (bounded waits)."""
        raise NotImplementedError

    def explain_failure(self, error: BaseException, what: str) -> None:
        """After ``error`` ended a program whose collectives span the processes (``what``): raise
        the failure of the process that caused it when one failed or is gone (bounded watch),
        else return (the caller re-raises ``error``)."""
        return None


class LocalCoordinator(Coordinator):
    """One process does everything."""

    def batches(self, batches: Sequence) -> list:
        return list(batches)

    def owned(self, plan: ConversionPlan, pinned=None) -> frozenset:
        return frozenset(n for unit in plan.units for n in unit.source_names())

    def allreduce_stats(self, unit: str, stats: CalibStats) -> CalibStats:
        return stats

    def open_writer(self, out, plan: ConversionPlan, options: WriterOptions, fingerprint: str) -> PlannedWriter:
        return open_planned_writer(out, plan.writer_units(), options)

    def finish(self, writer: PlannedWriter, write_outputs: WriteOutputs) -> Optional[dict]:
        return write_outputs(writer.unit_info(), None)

    def gather_json(self, tag: str, value) -> list:
        return [value]

    def barrier(self, tag: str) -> None:
        return None


def process_writer(out, plan: ConversionPlan, options: WriterOptions, coordinator: Coordinator) -> PlannedWriter:
    """An unprepared writer for ``coordinator``'s process of the run."""
    options = dataclasses.replace(options, process_id=coordinator.process_id,
                                  num_processes=coordinator.num_processes)
    return PlannedWriter(out, plan.writer_units(), options)


__all__ = ["Coordinator", "LocalCoordinator", "WriteOutputs", "process_writer"]
