"""nvfp4_jax.overlap: order, bounds and error propagation, without depending on thread timing
(every check follows from the order in which the main thread hands work over; where a job must
still be running, it waits on an event that only the test sets)."""

import threading

import pytest

from nvfp4_jax.overlap import LAYERS_IN_FLIGHT, WriteBehind, read_ahead


def test_read_ahead_yields_in_order_and_starts_at_most_one_item_ahead():
    started = []
    lock = threading.Lock()

    def load(i):
        with lock:
            started.append(i)
        return i * 10

    seen = []
    for i, value in read_ahead(range(6), load, ahead=1):
        assert value == i * 10
        with lock:  # loads are started only when an item is taken: items 0..i+1 at most
            assert max(started) <= i + 1
        seen.append(i)
    assert seen == list(range(6)) and sorted(started) == list(range(6))


def test_read_ahead_raises_the_loads_own_exception_when_its_item_is_taken():
    class Boom(RuntimeError):
        pass

    def load(i):
        if i == 2:
            raise Boom("tensor model.layers.2.x: bad bytes")
        return i

    taken = []
    with pytest.raises(Boom, match=r"^tensor model\.layers\.2\.x: bad bytes$"):
        for i, _ in read_ahead(range(5), load):
            taken.append(i)
    assert taken == [0, 1]  # items before the failing one were all delivered


def test_read_ahead_stops_loading_when_the_consumer_stops():
    started = []

    def load(i):
        started.append(i)
        return i

    with pytest.raises(KeyError):
        for i, _ in read_ahead(range(10), load):
            if i == 3:
                raise KeyError("consumer stopped")
    # the item read ahead (4) may have started or been cancelled; nothing after it ever starts
    assert sorted(started)[:4] == [0, 1, 2, 3] and set(started) <= {0, 1, 2, 3, 4}


def test_write_behind_keeps_order_and_bounds_unfinished_jobs():
    done, release = [], threading.Event()

    def first():
        release.wait()
        done.append(0)

    with WriteBehind(depth=1) as writes:
        writes.submit(first)
        assert not writes.try_submit(lambda: done.append("extra"))  # first is blocked: no slot free
        release.set()
        for i in range(1, 5):
            writes.submit(lambda i=i: done.append(i))
    assert done == [0, 1, 2, 3, 4]


def test_write_behind_error_is_raised_in_the_caller_with_its_message_and_stops_later_jobs():
    done = []

    def bad():
        raise OSError(28, "No space left on device", "out.partial/model-00001.safetensors")

    writes = WriteBehind()
    writes.submit(bad)
    with pytest.raises(OSError) as err:
        for i in range(3):
            writes.submit(lambda i=i: done.append(i))
        writes.wait()
    assert err.value.filename == "out.partial/model-00001.safetensors" and "No space left" in str(err.value)
    writes.close()
    assert done == []  # nothing after the failed job ran


def test_write_behind_finishes_handed_over_jobs_when_the_caller_fails():
    done, release = [], threading.Event()

    def slow():
        release.wait()
        done.append("unit 1")

    with pytest.raises(KeyboardInterrupt):
        with WriteBehind() as writes:
            writes.submit(slow)
            release.set()
            raise KeyboardInterrupt("stop")
    assert done == ["unit 1"]  # a whole unit handed over is written before the exception leaves


def test_disabled_runs_in_the_callers_thread():
    where = []
    with WriteBehind(enabled=False) as writes:
        writes.submit(lambda: where.append(threading.current_thread()))
    loads = [threading.current_thread() is t for t in
             (w for _, w in read_ahead(range(2), lambda i: threading.current_thread(), enabled=False))]
    assert where == [threading.main_thread()] and loads == [True, True]


def test_memory_bound_is_stated_in_layers():
    assert LAYERS_IN_FLIGHT == 3  # read ahead 1 + computing 1 + writing 1 (docs/ARCHITECTURE.md)
