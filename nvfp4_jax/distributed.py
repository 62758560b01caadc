"""Multi-host conversion over JAX's multi-controller runtime (``jax.distributed``).

    # on every host (process ids 0..N-1), the same command but --process-id:
    nvfp4-jax convert SRC OUT --calib-tokens t.json \\
        --coordinator host0:1234 --num-processes N --process-id I

How the work is split, and why the result is byte-identical to a one-process run:

* Output layout first. Every output tensor's name, dtype and shape follow from the reader's
  shapes and the quantization decisions (:class:`nvfp4_jax.plan.ConversionPlan`), so shard
  boundaries, headers and byte offsets are computed before any data exists, with the rule of the
  one-process writer (:class:`nvfp4_jax.checkpoint.writer.PlannedWriter`). Every process computes
  the plan itself; they check that they agree (a digest exchange), process 0 creates ``OUT.partial``
  with every shard file at its final size, and each process writes its own tensors at their
  offsets. ``OUT`` must be on a file system every process sees.
* Work split. Source tensors are dealt to processes largest first, a fused group as one item
  (:meth:`nvfp4_jax.plan.ConversionPlan.owners`); a process quantizes and writes only its share.
  Calibration is split by whole batches (batch ``b`` goes to process ``b % N``), so each batch's
  forward is exactly the one-process forward; after every layer the statistics are merged over all
  processes (max of every amax, sum of token counts: order-free and exact), so every process
  derives the same input scales. The calibration forward needs the whole layer, so calibrated runs
  read every layer on every process (except with ``--expert-parallel processes``, where a MoE layer's
  routed experts are split over every process's devices and each process reads only its own:
  :mod:`nvfp4_jax.expert_parallel`); calibration-free runs read only their share.
* End. Each process reports its manifest (units done, tensors written) to process 0, which checks
  that every planned tensor was written exactly once, writes index, configs and report, and
  renames ``OUT.partial`` to ``OUT``; the others wait for that and exit with its outcome.
* Resume. Each process keeps ``OUT.partial/manifest-p{I}-of-{N}.json``; ``--resume`` with the same
  process count redoes only the units a process had not finished (the calibration forward still
  runs for every layer, to rebuild the activations).

Failures never hang: every exchange goes through the coordination service's key-value store with
bounded waits (``--timeout``, default 300 s), polled once a second, and each poll also checks the
other processes' error keys and heartbeats. Every process has a daemon thread that bumps its
``alive`` key once a second; a process whose key has not moved for :func:`heartbeat_seconds` (a
third of ``--timeout`` within 5..100 s, also the coordination service's own heartbeat timeout) is
gone. The polls never call the client's ``get_live_nodes``: it is a barrier (it returns once every
live process has called it, see ``jax.experimental.multihost_utils.live_devices``), so a process
polling it blocked until every other process polled too; a process that found its keys at once
went on into a gloo collective while the one that polled sat in ``get_live_nodes``, and gloo's
30 s connection setup failed (``Gloo context initialization failed``, issue 12). The runtime runs
with ``jax_enable_recoverability`` so that a lost process is reported to us instead of aborting
everyone. A process that fails posts its error, and the others stop with ``process I failed: <its
error>``; one that dies (killed, crashed, host lost) is reported as ``process I is gone``. Only a
lost coordinator (process 0, which hosts the service) ends the others through JAX's own fatal
error, within seconds.

:class:`ProcessGroup` is the :class:`nvfp4_jax.coordinator.Coordinator` of one such process. Tests
inject failures with ``fault``, a callable given the name of each point a process passes
(``stats:layer.L`` before the statistics exchange of layer L, ``barrier:TAG`` and ``passed:TAG``
before and after a barrier, e.g. ``experts/layer.L`` before a MoE layer's collectives, ``done``
before reporting its manifest), which may kill the process or raise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from nvfp4_jax.calibration import CalibStats
from nvfp4_jax.coordinator import Coordinator, WriteOutputs, process_writer
from nvfp4_jax.errors import NVFP4Error, UsageError

_PREFIX = "nvfp4_jax"
_POLL_S = 1.0
_BEAT_S = 1.0  # how often a process bumps its alive key


class DistributedError(NVFP4Error, RuntimeError):
    """Another process failed or vanished, or the processes disagree; the message names it."""


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class ProcessGroup(Coordinator):
    """The processes of one conversion, talking through the ``jax.distributed`` key-value store.

    Every exchange is ``set my key, then wait for the others' keys``; a wait polls every second and
    between polls looks for error keys and dead processes, so it ends with a clear
    :class:`DistributedError` instead of hanging; ``timeout_s`` bounds a wait on a live process.
    fault: called with the name of each fault point this process passes (tests only).
    """

    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float = 300.0,
                 fault: Optional[Callable[[str], None]] = None):
        self.client, self.process_id, self.num_processes = client, int(process_id), int(num_processes)
        self.timeout_s = float(timeout_s)
        self.fault = fault or (lambda point: None)
        self.stale_s = float(heartbeat_seconds(self.timeout_s))
        self._beats: dict[int, tuple[Optional[str], float]] = {}  # peer -> (last alive value, when it changed)
        self._stop_beating = threading.Event()
        self._beater: Optional[threading.Thread] = None

    # -- liveness -------------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Bump this process's alive key every _BEAT_S from a daemon thread until stop_heartbeat."""
        key = self._key("alive", self.process_id)
        self.publish(key, "0")

        def beat():
            n = 0
            while not self._stop_beating.wait(_BEAT_S):
                n += 1
                try:
                    self.publish(key, str(n))
                except Exception:  # noqa: BLE001 - the service is gone: the others see us stop
                    return

        self._beater = threading.Thread(target=beat, name=f"nvfp4-heartbeat-p{self.process_id}", daemon=True)
        self._beater.start()

    def stop_heartbeat(self) -> None:
        self._stop_beating.set()
        if self._beater is not None:
            self._beater.join()
            self._beater = None

    def _silent_peers(self) -> list[int]:
        """Peers whose alive key has not moved for stale_s as seen by this process's polls (and
        that did not leave normally). Never blocks on the others (unlike get_live_nodes)."""
        now = time.monotonic()
        values = {}
        for key, value in self.client.key_value_dir_get(self._key("alive") + "/"):
            values[int(key.rstrip("/").rsplit("/", 1)[-1])] = value
        silent = []
        for p in range(self.num_processes):
            if p == self.process_id:
                continue
            value = values.get(p)
            seen = self._beats.get(p)
            if seen is None or seen[0] != value:
                self._beats[p] = (value, now)
            elif now - seen[1] >= self.stale_s:
                silent.append(p)
        return [p for p in silent if self._try_get(self._key("left", p)) is None]

    # -- primitives -----------------------------------------------------------------------------

    def _key(self, *parts) -> str:
        return "/".join([_PREFIX, *map(str, parts)])

    def publish(self, key: str, value: str) -> None:
        self.client.key_value_set(key, value, allow_overwrite=True)

    def post_error(self, message: str) -> None:
        """Tell the others that this process stops (best effort: the service may be gone)."""
        try:
            self.publish(self._key("error", self.process_id), message)
        except Exception:  # noqa: BLE001 - nothing more can be done
            pass

    def check_peers(self, waiting_for: str) -> None:
        """Raise if another process posted an error or is no longer alive."""
        self._check_errors(waiting_for)
        gone = self._silent_peers()
        if gone:
            self._check_errors(waiting_for)  # it may have posted its error just before leaving
            who = ", ".join(map(str, gone))
            raise DistributedError(
                f"process{'es' if len(gone) > 1 else ''} {who} of {self.num_processes} "
                f"{'are' if len(gone) > 1 else 'is'} gone (no heartbeat for {self.stale_s:.0f} s: died, was killed "
                f"or lost its connection) while process "
                f"{self.process_id} was waiting for {waiting_for}; the output was not finalized. Rerun every "
                "process with --resume to continue from OUT.partial")

    def _check_errors(self, waiting_for: str) -> None:
        errors = {}
        for key, value in self.client.key_value_dir_get(self._key("error") + "/"):
            pid = int(key.rstrip("/").rsplit("/", 1)[-1])
            if pid != self.process_id:
                errors[pid] = value
        if errors:
            # the root cause first: a process that failed on its own, not one that saw another fail
            pid = min(errors, key=lambda p: (errors[p].startswith(DistributedError.__name__), p))
            raise DistributedError(f"process {pid} of {self.num_processes} failed: {errors[pid]} "
                                   f"(process {self.process_id} was waiting for {waiting_for})")

    def wait(self, key: str, waiting_for: str) -> str:
        """The value of ``key`` once some process sets it; raises DistributedError on a peer's
        failure or after ``timeout_s``."""
        from jax.errors import JaxRuntimeError

        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                return self.client.blocking_key_value_get(key, max(1, int(min(_POLL_S, max(left, 0)) * 1000)))
            except JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise DistributedError(f"lost the coordination service (process 0) while process "
                                           f"{self.process_id} was waiting for {waiting_for}: {e}") from None
            try:
                self.check_peers(waiting_for)
            except DistributedError:
                value = self._try_get(key)  # the key may have come just before the peer left
                if value is not None:
                    return value
                raise
            if time.monotonic() >= deadline:
                raise DistributedError(f"process {self.process_id} waited {self.timeout_s:.0f} s for {waiting_for} "
                                       "and gave up (--timeout); every process is still alive, so one is stuck or "
                                       "much slower than the others")

    def _try_get(self, key: str) -> Optional[str]:
        try:
            return self.client.key_value_try_get(key)
        except Exception:  # noqa: BLE001 - NOT_FOUND
            return None

    def mark_left(self) -> None:
        """This process ends normally: its leaving is no failure for those still waiting."""
        self.publish(self._key("left", self.process_id), "ok")

    def all_gather(self, tag: str, value: str, what: str) -> list[str]:
        """Every process's ``value`` for ``tag``, in process order."""
        self.publish(self._key(tag, self.process_id), value)
        out = []
        for p in range(self.num_processes):
            out.append(value if p == self.process_id
                       else self.wait(self._key(tag, p), f"{what} from process {p}"))
        return out

    def barrier(self, tag: str) -> None:
        self.fault(f"barrier:{tag}")
        self.all_gather(f"barrier/{tag}", "1", f"every process to reach {tag}")
        self.fault(f"passed:{tag}")  # e.g. a process lost inside the collectives that follow

    def explain_failure(self, error: BaseException, what: str) -> None:
        # a collective fails on the survivors when a peer is lost inside it (gloo: its setup times
        # out after 30 s, or a connection drops): tell the others, then watch the peers for up to a
        # heartbeat timeout so that the message names the lost process, not gloo's symptom
        self.post_error(f"{type(error).__name__} in {what}: {error}")
        deadline = time.monotonic() + self.stale_s + 2 * _POLL_S
        while True:
            self.check_peers(what)
            if time.monotonic() >= deadline:
                return
            time.sleep(_POLL_S)  # a poll of the store, bounded by the deadline

    def gather_json(self, tag: str, value) -> list:
        return [json.loads(v) for v in self.all_gather(f"json/{tag}", json.dumps(value), f"the {tag} figures")]

    # -- the steps of a conversion ----------------------------------------------------------------

    def batches(self, batches: Sequence) -> list:
        return list(batches[self.process_id::self.num_processes])

    def owned(self, plan, pinned=None) -> frozenset:
        return frozenset(n for n, p in plan.owners(self.num_processes, pinned).items() if p == self.process_id)

    def report_fields(self) -> dict:
        return {"processes": self.num_processes}

    def open_writer(self, out, plan, options, fingerprint: str):
        """The shared output: agree on the plan, process 0 lays out the files, all open them."""
        writer = process_writer(out, plan, options, self)
        mine = _digest({"plan": writer.digest, "run": fingerprint, "out": str(Path(out).resolve())})
        digests = self.all_gather("plan", mine, "the output plan")
        differ = [p for p, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise DistributedError(
                f"processes {differ} planned a different output or run than process 0 (source, output path, "
                "calibration data or options differ): every process must run the same command but --process-id")
        if self.process_id == 0:
            writer.prepare()
            self.publish(self._key("ready"), "1")
        else:
            self.wait(self._key("ready"), f"process 0 to lay out {writer.partial}")
        writer.open()
        return writer

    def allreduce_stats(self, unit: str, stats: CalibStats) -> CalibStats:
        """The statistics of ``unit`` over every process (max amax, summed token counts)."""
        self.fault(f"stats:{unit}")
        parts = self.all_gather(f"stats/{unit}", json.dumps(stats.to_json()), f"the {unit} calibration statistics")
        merged = CalibStats()
        for part in parts:
            merged = merged.merge(CalibStats.from_json(json.loads(part)))
        return merged

    def gather_manifests(self, writer) -> Optional[list[dict]]:
        """Process 0: every process's manifest once all have finished; others: post theirs, None."""
        self.fault("done")
        mine = json.dumps(writer.manifest())
        if self.process_id != 0:
            self.publish(self._key("done", self.process_id), mine)
            return None
        out = [json.loads(mine)]
        for p in range(1, self.num_processes):
            out.append(json.loads(self.wait(self._key("done", p), f"process {p} to finish its tensors")))
        return out

    def finish(self, writer, write_outputs: WriteOutputs) -> Optional[dict]:
        manifests = self.gather_manifests(writer)
        if manifests is None:
            writer.close()
            self.wait(self._key("finalized"), "process 0 to write the index and configs and finalize the output")
            return None
        report = write_outputs(merge_unit_info([m["units"] for m in manifests], writer.unit_order), manifests)
        self.publish(self._key("finalized"), "ok")
        return report

    def linger(self, limit_s: float) -> None:
        """Process 0 hosts the coordination service: stay until the others have left (or limit_s),
        so that they read the last keys instead of losing the service under their feet."""
        deadline = time.monotonic() + limit_s
        waiting = set(range(self.num_processes)) - {self.process_id}
        try:
            while waiting and time.monotonic() < deadline:
                silent = set(self._silent_peers())
                waiting = {p for p in waiting if p not in silent and self._try_get(self._key("left", p)) is None
                           and self._try_get(self._key("error", p)) is None}
                if waiting:
                    time.sleep(0.1)  # a poll of the store, bounded by the deadline
            if not waiting:
                # every other process has left or stopped and is disconnecting; get_live_nodes
                # (a barrier of the live processes) returns once they are off the service
                self.client.get_live_nodes(list(range(self.num_processes)))
        except Exception:  # noqa: BLE001 - the service or a peer is gone: nothing to wait for
            return


def heartbeat_seconds(timeout_s: float) -> int:
    """How long a silent process may go before it counts as dead: a third of --timeout, within
    5..100 s (100 s is JAX's default). A killed process is noticed after this long."""
    return int(max(5, min(100, round(timeout_s / 3))))


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place in a multi-process run (the CLI's --coordinator, --num-processes,
    --process-id, --timeout); ``fault``: see :class:`ProcessGroup` (tests only)."""

    coordinator: Optional[str]
    num_processes: int
    process_id: int
    timeout_s: float = 300.0
    fault: Optional[Callable[[str], None]] = None


def _coordination_client():
    """The key-value client of the running ``jax.distributed`` service. JAX exposes it only through
    its private ``jax._src.distributed`` module, so a JAX release that moved it fails here, clearly."""
    import jax

    try:
        from jax._src import distributed as jax_distributed

        client = jax_distributed.global_state.client
    except (ImportError, AttributeError) as e:
        raise DistributedError(
            f"jax {jax.__version__} no longer has jax._src.distributed.global_state.client ({e}), the "
            "coordination service client that multi-process conversion talks through; use a jax version "
            "that has it (see pyproject.toml)") from None
    missing = [m for m in ("key_value_set", "key_value_try_get", "key_value_dir_get", "blocking_key_value_get",
                           "get_live_nodes") if not hasattr(client, m)]
    if client is None or missing:
        raise DistributedError(f"the jax.distributed client of jax {jax.__version__} is "
                               f"{'not started' if client is None else 'missing ' + ', '.join(missing)}; "
                               "multi-process conversion cannot exchange its keys")
    return client


def initialize(processes: Processes) -> ProcessGroup:
    """``jax.distributed.initialize`` with bounded timeouts, and the group over its client."""
    import jax

    coordinator, num_processes, process_id, timeout_s = (processes.coordinator, processes.num_processes,
                                                         processes.process_id, processes.timeout_s)
    if not coordinator:
        raise UsageError("--num-processes > 1 needs --coordinator HOST:PORT (the address of process 0)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    if not timeout_s > 0:
        raise UsageError(f"--timeout must be > 0, got {timeout_s}")
    # a lost process is reported to the survivors (get_live_nodes) instead of aborting them all
    jax.config.update("jax_enable_recoverability", True)
    secs = max(1, int(round(timeout_s)))
    minutes = max(1, math.ceil(secs / 60))  # the CPU client's topology exchange at backend start
    jax.config.update("jax_cpu_get_local_topology_timeout_minutes", minutes)
    jax.config.update("jax_cpu_get_global_topology_timeout_minutes", minutes + 1)
    # CPU devices of different processes run collectives (the expert-parallel forward) through gloo;
    # without it XLA CPU has no cross-process collectives. No effect on GPU/TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    print(f"nvfp4-jax: process {process_id} of {num_processes} joining {coordinator} "
          f"(waits at most {secs} s for the others)", file=sys.stderr, flush=True)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=secs, heartbeat_timeout_seconds=heartbeat_seconds(timeout_s),
                               shutdown_timeout_seconds=secs)
    jax.devices()  # start the backend now, while every process is known to be alive
    group = ProcessGroup(_coordination_client(), process_id, num_processes, timeout_s, processes.fault)
    group.start_heartbeat()
    return group


def convert_distributed(src, out, opts, processes: Processes) -> Optional[dict]:
    """One process of a multi-process :func:`nvfp4_jax.pipeline.convert`; returns the report on
    process 0 and None elsewhere. Every process runs the same command but the process id."""
    import jax

    from nvfp4_jax.pipeline import convert

    group = initialize(processes)
    pid = group.process_id
    if pid != 0:
        opts = dataclasses.replace(opts, progress=False)

    def log(message: str) -> None:
        print(f"[process {pid}] {message}", file=sys.stderr, flush=True)

    try:
        report = convert(src, out, opts, log=log, coordinator=group)
    except BaseException as e:
        group.post_error(f"{type(e).__name__}: {e}")
        if pid == 0:
            group.linger(min(10.0, group.timeout_s))
        group.stop_heartbeat()
        try:
            jax.distributed.shutdown()
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise
    group.mark_left()
    if pid == 0:
        group.linger(group.timeout_s)
    group.stop_heartbeat()
    jax.distributed.shutdown()
    return report


def merge_unit_info(per_process: Sequence[dict], unit_order: Sequence[str]) -> dict[str, dict]:
    """The unit info of a multi-process run, from every process's share: counts summed, module
    lists joined, the rest (the same on every process) taken once."""
    out: dict[str, dict] = {}
    for unit in unit_order:
        merged: dict = {}
        for units in per_process:
            for k, v in units.get(unit, {}).items():
                if k in ("quantized", "tensors"):
                    merged[k] = merged.get(k, 0) + v
                elif isinstance(v, list):
                    merged[k] = sorted(set(merged.get(k, [])) | set(v))
                else:
                    merged.setdefault(k, v)
        out[unit] = merged
    return out


__all__ = ["DistributedError", "ProcessGroup", "Processes", "initialize", "convert_distributed", "merge_unit_info"]
