"""The run fingerprint: what a conversion's output bytes depend on, so that a resume can prove it
continues the same run.

A partial output can only be continued by the run that started it: the same source (its config and
every tensor header; tensor contents are checked per layer as they are read again), the same
calibration tokens, and the same value of every option that changes output bytes. The fingerprint
is a flat dict of named settings, stored in ``OUT.partial/plan.json``; :func:`differences` names
each setting that differs, so the refusal says what to fix.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence



def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def source_fingerprint(reader) -> dict[str, str]:
    """Digest of the source's config.json bytes and of every stored tensor header (name, file,
    dtype, shape, byte range): a different checkpoint, or one edited since, gives other values."""
    config_bytes = (Path(reader.path) / "config.json").read_bytes()
    headers = []
    for name in reader.names():
        for part in sorted(reader.info(name).parts.values()):
            e = reader.entry(part)
            headers.append([part, Path(e.file).name, e.dtype, list(e.shape), e.start, e.end])
    return {"source config": hashlib.sha256(config_bytes).hexdigest(),
            "source tensor headers": _sha256_json(sorted(headers))}


def tokens_fingerprint(samples: Sequence[Sequence[int]] | None) -> dict[str, Any]:
    """The calibration tokens exactly as the run uses them (after --num-samples/--seq-len)."""
    if not samples:
        return {"calibration tokens": None}
    return {"calibration tokens": _sha256_json([list(map(int, s)) for s in samples])}


def run_fingerprint(reader, samples, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that determines the output bytes, as named settings."""
    return {**source_fingerprint(reader), **tokens_fingerprint(samples),
            **{k: settings[k] for k in sorted(settings)}}


def digest(settings: Mapping[str, Any]) -> str:
    """One digest of a fingerprint, for processes to check that they run the same conversion."""
    return _sha256_json(dict(settings))


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per setting whose value differs (digests are shown shortened)."""

    def show(v):
        if isinstance(v, str) and len(v) == 64:
            return v[:12] + "..."
        return "(none)" if v is None else repr(v)

    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "(not recorded)"), current.get(key, "(not recorded)")
        if a != b:
            out.append(f"{key}: {show(a)} in the interrupted run, {show(b)} now")
    return out


_SAMPLES, _SAMPLE_BYTES = 8, 4096  # per stored tensor: first, last and evenly spaced slices


def source_sample_crc(reader, names: Iterable[str]) -> str:
    """CRC-32 over slices of the stored bytes of the logical tensors ``names`` (first, last and
    evenly spaced 4 KiB, about 32 KiB per tensor). A resumed run compares it with the interrupted
    run's value per unit: a source whose contents were replaced by another of the same shapes
    differs almost surely, at a cost of a few reads per tensor instead of re-reading the model."""
    import os

    crc, fds = 0, {}
    try:
        for name in sorted(names):
            for part in sorted(reader.info(name).parts.values()):
                e = reader.entry(part)
                fd = fds.get(e.file)
                if fd is None:
                    fd = fds[e.file] = os.open(e.file, os.O_RDONLY)
                span = max(e.nbytes - _SAMPLE_BYTES, 0)
                for k in range(_SAMPLES):
                    offset = e.start + (span * k) // (_SAMPLES - 1)
                    crc = zlib.crc32(os.pread(fd, min(_SAMPLE_BYTES, e.nbytes), offset), crc)
                crc = zlib.crc32(part.encode(), crc)
    finally:
        for fd in fds.values():
            os.close(fd)
    return f"{crc:08x}"


__all__ = ["source_sample_crc", "source_fingerprint", "tokens_fingerprint", "run_fingerprint", "digest", "differences"]
