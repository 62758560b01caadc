"""One run at a time per output path: a second run into an OUT another run is writing fails at
once, naming the holder, and touches nothing; a lock file left by a killed run does not block."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nvfp4_jax import examples
from nvfp4_jax.output_lock import OutputBusyError, lock_path, output_lock
from nvfp4_jax.pipeline import ConvertOptions, convert
from tests.checkpoint_files import tree_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return examples.build_llama_tiny(tmp_path_factory.mktemp("lock") / "src", seed=3)


OPTS = ConvertOptions(input_scale_constant=1.0, progress=False)


def test_a_second_run_into_a_locked_output_fails_and_touches_nothing(llama, tmp_path):
    out = tmp_path / "out"
    convert(llama, out, OPTS, log=lambda m: None)  # a finished output the second run would replace
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "keep.txt").write_text("the other run's work")
    before = {**tree_bytes(out), **{f"partial/{k}": v for k, v in tree_bytes(partial).items()}}
    with output_lock(out):  # the first run, still writing
        with pytest.raises(OutputBusyError, match=rf"{out} is being written by another nvfp4-jax run \(pid {os.getpid()} on"):
            convert(llama, out, ConvertOptions(**{**OPTS.__dict__, "overwrite": True}), log=lambda m: None)
    after = {**tree_bytes(out), **{f"partial/{k}": v for k, v in tree_bytes(partial).items()}}
    assert after == before


def test_the_lock_is_held_across_processes_and_the_cli_names_it(llama, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(  # another process holds the lock until told to stop
        [sys.executable, "-c", "import sys; from nvfp4_jax.output_lock import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        cli = subprocess.run([sys.executable, "-m", "nvfp4_jax.cli", "convert", str(llama), str(out),
                              "--input-scale-constant", "1.0", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    finally:
        holder.communicate("", timeout=60)
    assert cli.returncode != 0
    assert f"is being written by another nvfp4-jax run (pid {holder.pid} on" in cli.stderr
    assert "Traceback" not in cli.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_finished_run_removes_its_lock_and_a_stale_lock_file_does_not_block(llama, tmp_path):
    out = tmp_path / "out"
    stale = lock_path(out)
    stale.write_text("pid 999999 on a host that was killed\n")  # no process holds a lock on it
    convert(llama, out, OPTS, log=lambda m: None)
    assert out.is_dir() and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_lock_on_a_file_removed_meanwhile_is_not_trusted(tmp_path, monkeypatch):
    """The holder removes its file before it unlocks, so a newcomer may open the old file, then lock
    it once the holder is gone: a lock on a file no longer at the path, which would let a third run
    lock a new file beside it. output_lock sees that and locks the file at the path instead."""
    from nvfp4_jax import output_lock as mod

    out = tmp_path / "out"
    path = lock_path(out)
    real, calls = mod.fcntl.flock, []

    def flock_after_the_holder_left(fd, op):
        calls.append(os.fstat(fd).st_ino)
        if len(calls) == 1:
            os.unlink(path)  # the holder finished between our open and our lock
        return real(fd, op)

    monkeypatch.setattr(mod.fcntl, "flock", flock_after_the_holder_left)
    with output_lock(out) as held:
        assert held == path and len(calls) == 2  # the orphan was dropped and the path's file locked
        assert os.stat(path).st_ino == calls[1]
