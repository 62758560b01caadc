"""Guards that keep a conversion from destroying what it did not write.

The converter deletes in two places only: it replaces an existing ``OUT`` (``--overwrite``) and
it starts over in an existing ``OUT.partial``. Both are allowed only for directories this tool
wrote, recognised by the files it leaves there (the run report of a finished output, the plan of
a partial one). The output may not overlap anything the run reads (the source directory, the
calibration file), in either direction, because replacing ``OUT`` would then delete the input.
The free-space check runs before any work, from the planned output size, so a full disk is found
in the first second instead of after an hour of calibration.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from nvfp4_jax.errors import NVFP4Error

REPORT_NAME = "nvfp4_report.json"  # written last into every finished output
PLAN_NAME = "plan.json"  # the layout of every OUT.partial, written once it is laid out
PARTIAL_MARKER = ".nvfp4-jax-partial"  # written first into every OUT.partial
PRODUCER_PREFIX = "nvfp4_jax"
_SPACE_MARGIN = 1.02  # headers, index and copied small files on top of the tensor bytes


class OutputPathError(NVFP4Error, ValueError):
    """The output path overlaps an input, or would replace something this tool did not write."""


def _resolved(path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _overlap(a: Path, b: Path) -> str | None:
    """How ``a`` (an output path) overlaps ``b`` (an input path), or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_output_path(out, inputs: Iterable) -> None:
    """Refuse an ``out`` (or its ``.partial``) that is, lies inside, or contains any of ``inputs``."""
    out_p = _resolved(out)
    partial = out_p.with_name(out_p.name + ".partial")
    for src in inputs:
        if src is None:
            continue
        src_p = _resolved(src)
        for candidate in (out_p, partial):
            how = _overlap(candidate, src_p)
            if how:
                raise OutputPathError(
                    f"output {candidate} {how} {src_p}, which this run reads; choose an output path outside it "
                    "(replacing or writing the output would destroy the input)")


def written_by_this_tool(path) -> bool:
    """A finished output of this tool: its run report names our producer."""
    report = Path(path) / REPORT_NAME
    try:
        producer = json.loads(report.read_text()).get("producer", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(producer, dict) and str(producer.get("version", "")).startswith(PRODUCER_PREFIX)


def partial_written_by_this_tool(path) -> bool:
    """An ``OUT.partial`` of this tool: it holds our marker (written first) or our plan file."""
    if (Path(path) / PARTIAL_MARKER).is_file():
        return True
    try:
        plan = json.loads((Path(path) / PLAN_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(plan, dict) and "digest" in plan


def check_replaceable(out, overwrite: bool) -> None:
    """``out`` may be created, or replaced with ``overwrite``; raises naming why not."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise OutputPathError(f"output {out} already exists; pass --overwrite to replace it")
    if out.is_symlink() or not out.is_dir():
        raise OutputPathError(f"output {out} exists and is not a directory; --overwrite replaces only a "
                              "checkpoint directory this tool wrote, so remove it yourself if it should go")
    if not written_by_this_tool(out):
        raise OutputPathError(f"output {out} exists and was not written by nvfp4-jax (no {REPORT_NAME} of ours); "
                              "--overwrite replaces only outputs of this tool: choose another path or remove it "
                              "yourself")


def check_partial_removable(partial) -> None:
    """An existing ``OUT.partial`` may be wiped to start over only if this tool made it."""
    partial = Path(partial)
    if not partial.exists() and not partial.is_symlink():
        return
    if partial.is_symlink() or not partial.is_dir() or not partial_written_by_this_tool(partial):
        raise OutputPathError(f"{partial} exists and was not made by nvfp4-jax (no {PARTIAL_MARKER} or {PLAN_NAME}); it is "
                              "where the output is staged, so move it away or choose another output path")


def check_free_space(out, needed_bytes: int) -> None:
    """Enough free space where ``out`` will be written for ``needed_bytes`` of planned output."""
    where = _resolved(out)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    need = int(needed_bytes * _SPACE_MARGIN)
    if free < need:
        raise OutputPathError(
            f"not enough free space for {out}: the planned output needs {need / 1e9:.2f} GB and "
            f"{where} has {free / 1e9:.2f} GB free; free some space or choose another output path")


__all__ = ["OutputPathError", "check_output_path", "check_replaceable", "check_partial_removable",
           "check_free_space", "written_by_this_tool", "partial_written_by_this_tool"]
